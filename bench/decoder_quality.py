"""Decoder quality on held-out photos: PiD student vs its teacher vs the cascade baseline.

For each held-out crop (ground truth hr, size S): lr = official degradation (antialiased
bicubic / scale), latent = tiny-ae(lr). Three decoders reconstruct hr from the latent:
    cascade  tiny-ae decode, then bicubic x scale   (what PiD replaces)
    teacher  the flow-matching teacher, many-step Euler solver
    student  the distilled 4-step student (the served model)
Metrics (bench/quality.py): PSNR and SSIM against hr, CIEDE2000 colour error against lr,
and the high-frequency spectral distance to hr. Same seeds for every run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from pidserve.model import PiDNet, sample, sample_teacher
from pidserve.model.autoencoder import TinyAutoencoder
from pidserve.model.default import decode_latent_cascade
from pidserve.model.latents import get_latent_space
from pidserve.model.sampler import resolution_shift

from . import quality

log = logging.getLogger(__name__)


@dataclass
class QualitySetup:
    photos: Path  # held-out photo folder
    crop: int = 256
    crops_per_photo: int = 6
    short_side: int = 640  # photos are resized like the training photos
    teacher_steps: int = 32
    teacher_shift: float = 3.0  # at 256 px, scaled with the side (the teacher's training shift)
    teacher_shift_base: int = 256
    seed: int = 0


def holdout_crops(setup: QualitySetup, scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hr [N, 3, S, S], lr [N, 3, S/scale, S/scale]) in [-1, 1]: crops on a fixed grid per photo."""
    from pidserve.training.data import degrade, list_images, load_photo

    crops = []
    for path in list_images(setup.photos):
        photo = load_photo(path, setup.short_side, setup.crop)
        _, height, width = photo.shape
        per_row = max(1, setup.crops_per_photo // 2)
        for i in range(setup.crops_per_photo):
            row, col = divmod(i, per_row)
            top = (height - setup.crop) * row // max(1, (setup.crops_per_photo - 1) // per_row)
            left = (width - setup.crop) * col // max(1, per_row - 1)
            crops.append(photo[:, top : top + setup.crop, left : left + setup.crop])
    hr = torch.stack(crops).float().div(127.5).sub(1.0)
    return hr, degrade(hr, scale)


@torch.no_grad()
def evaluate_decoders(
    setup: QualitySetup, student: PiDNet, teacher: PiDNet | None, ae: TinyAutoencoder, batch: int = 4
) -> dict:
    """Per-method mean metrics over the held-out crops, plus one output per method for a picture grid."""
    scale = student.cfg.sr_scale
    hr, lr = holdout_crops(setup, scale)
    space = get_latent_space(student.cfg.latent_space)
    shift = resolution_shift((setup.crop, setup.crop), setup.teacher_shift, setup.teacher_shift_base)
    decoders = {
        "cascade": lambda z, g: decode_latent_cascade(ae, z, scale),
        "student": lambda z, g: sample(student, z, 0.0, generator=g),
    }
    if teacher is not None:
        decoders["teacher"] = lambda z, g: sample_teacher(
            teacher, z, 0.0, steps=setup.teacher_steps, shift=shift, generator=g
        )
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in decoders}
    for start in tqdm(range(0, len(hr), batch), desc="held-out crops", unit="batch"):
        z = space.normalize(ae.encode(lr[start : start + batch]).float())
        for name, decode in decoders.items():
            gen = torch.Generator().manual_seed(setup.seed + start)
            outputs[name].append(decode(z, gen).float())
    to01 = lambda x: (x.clamp(-1, 1) + 1) / 2  # noqa: E731
    results = {}
    for name, parts in outputs.items():
        pred = torch.cat(parts)
        results[name] = quality.evaluate(to01(pred), to01(hr), to01(lr), scale)
    samples = {name: torch.cat(parts) for name, parts in outputs.items()}
    return {
        "crops": len(hr),
        "crop": setup.crop,
        "scale": scale,
        "metrics": results,
        "samples": samples,
        "hr": hr,
        "lr": lr,
    }


def markdown_table(metrics: dict[str, dict[str, float]]) -> str:
    lines = [
        "| decoder | PSNR (dB) ↑ | SSIM ↑ | colour error ΔE00 vs low-res ↓ | high-freq spectral distance ↓ |",
        "|---|---|---|---|---|",
    ]
    for name, m in metrics.items():
        lines.append(
            f"| {name} | {m['psnr']:.2f} | {m['ssim']:.4f} | {m['colour_error']:.3f} | "
            f"{m['spectral_distance']:.3f} |"
        )
    return "\n".join(lines)


def write_report(result: dict, out_dir: Path, grid_columns: int = 3) -> Path:
    """metrics.json, table.md and grid.png (rows: ground truth, cascade, teacher, student)."""
    from pidserve.training.loop import save_grid

    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {k: result[k] for k in ("crops", "crop", "scale", "metrics")}
    (out_dir / "metrics.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out_dir / "table.md").write_text(markdown_table(result["metrics"]) + "\n")
    count = len(result["hr"])
    pick = torch.linspace(0, count - 1, grid_columns).round().long()
    rows = [result["hr"][pick]] + [
        result["samples"][n][pick] for n in ("cascade", "teacher", "student") if n in result["samples"]
    ]
    grid = out_dir / "grid.png"
    save_grid(grid, rows)
    return grid
