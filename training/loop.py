"""Pieces every trainer shares: learning-rate warmup, progress bar, metric log, sample grids."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm


def warmup_lr(step: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warmup over the first `warmup_steps` optimizer steps (1-based step), then constant."""
    if warmup_steps <= 0:
        return base_lr
    return base_lr * min(1.0, step / warmup_steps)


LR_SCHEDULES = ("constant", "cosine")


def scheduled_lr(step: int, base_lr: float, cfg) -> float:
    """The learning rate of (1-based) `step` under a config's warmup, steps and lr_schedule.

    constant: warmup, then base_lr. cosine: warmup, then a half cosine from base_lr down to
    base_lr * lr_min_ratio at the last step (a decayed rate is what lets a short run settle).
    """
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {cfg.lr_schedule!r}")
    lr = warmup_lr(step, base_lr, cfg.warmup)
    if cfg.lr_schedule == "constant" or step <= cfg.warmup:
        return lr
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    floor = base_lr * cfg.lr_min_ratio
    return floor + (base_lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def fft_magnitude_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean |(|FFT(pred)| - |FFT(target)|)| over [B, C, H, W]: penalises missing (or made-up)
    energy per frequency whatever its phase, so, added to a pixel loss, it keeps a decoder from
    trading detail for a blur."""
    return (
        (
            torch.fft.rfft2(pred.float(), norm="ortho").abs()
            - torch.fft.rfft2(target.float(), norm="ortho").abs()
        )
        .abs()
        .mean()
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class Progress:
    """tqdm bar with the latest losses and images/s; a JSON-lines metric log in the run folder."""

    def __init__(self, run_dir: Path, start: int, total: int, images_per_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.images_per_step = images_per_step
        self.bar = tqdm(total=total, initial=start, disable=not enabled, dynamic_ncols=True, unit="step")
        self.log_path = Path(run_dir) / "metrics.jsonl"
        self.last = time.perf_counter()

    def update(self, step: int, metrics: dict[str, float], log: bool) -> None:
        now = time.perf_counter()
        images_per_s = self.images_per_step / max(now - self.last, 1e-9)
        self.last = now
        if not self.enabled:
            return
        self.bar.update(1)
        shown = {k: f"{v:.4g}" for k, v in metrics.items() if not k.startswith("_")}
        self.bar.set_postfix(shown | {"img/s": f"{images_per_s:.1f}"}, refresh=False)
        if log:
            record = {"step": step, "time": time.time(), "images_per_s": images_per_s, **metrics}
            with self.log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.bar.close()


def save_grid(path: Path, rows: list[torch.Tensor]) -> None:
    """Write rows of images (each [B, 3, H, W] in [-1, 1], resized to the largest H) as one PNG."""
    height = max(r.shape[-2] for r in rows)
    resized = [
        torch.nn.functional.interpolate(
            r.float(), size=(height, height * r.shape[-1] // r.shape[-2]), mode="nearest"
        )
        if r.shape[-2] != height
        else r.float()
        for r in rows
    ]
    lines = [torch.cat(list(r.clamp(-1, 1)), dim=-1) for r in resized]
    width = max(line.shape[-1] for line in lines)
    lines = [torch.nn.functional.pad(line, (0, width - line.shape[-1]), value=1.0) for line in lines]
    grid = torch.cat(lines, dim=-2)
    array = ((grid + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array)).save(path)


def check_finite(loss: torch.Tensor, step: int) -> None:
    if not math.isfinite(loss.item()):
        raise FloatingPointError(
            f"loss became {float(loss)} at step {step}; "
            "lower the learning rate or resume from the last checkpoint"
        )
