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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pidserve.model import (
    CorrectedWindowLatents,
    LatentSpace,
    PiDNet,
    TilePlan,
    Tiling,
    TinyAutoencoder,
    decode_latent_cascade,
    get_latent_space,
    resolution_shift,
    sample,
    sample_teacher,
    sample_tiled,
)

from . import quality

log = logging.getLogger(__name__)


@dataclass
class QualitySetup:
    photos: Path  # held-out photo folder
    crop: int = 256
    crops_per_photo: int = 6
    short_side: int = 640  # photos are resized like the training photos
    upscale: bool = True  # False: photos below short_side keep their size (the v2 recipes' setting)
    teacher_steps: int = 32
    teacher_shift: float = 3.0  # at 256 px, scaled with the side (the teacher's training shift)
    teacher_shift_base: int = 256
    seed: int = 0
    tile: Tiling | None = None  # also decode the student tiled (a student_tiled row, seam scores)
    # what the tiled student's windows are conditioned on (model/window_latents.py): crop, or
    # corrected (auto: corrected, with this run's autoencoder, as the engines do for tiny-ae latents)
    window_latents: str = "auto"


def holdout_crops(setup: QualitySetup, scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hr [N, 3, S, S], lr [N, 3, S/scale, S/scale]) in [-1, 1]: crops on a fixed grid per photo."""
    from pidserve.training import degrade, grid_crops

    hr = grid_crops(setup.photos, setup.crop, setup.crops_per_photo, setup.short_side, setup.upscale)
    return hr, degrade(hr, scale)


def tiled_window_latents(
    mode: str, ae: TinyAutoencoder, space: LatentSpace | None
) -> CorrectedWindowLatents | None:
    """The window latents of a tiled tiny-ae decode: None (the crop) for 'crop'; for 'corrected' and
    'auto' the crop corrected with *this* autoencoder (a bench may read another tiny-ae's latents)."""
    if mode == "crop":
        return None
    if mode not in ("auto", "corrected"):
        raise ValueError(f"window latents {mode!r} is not one of auto, crop, corrected")
    return CorrectedWindowLatents(ae, space)


@torch.no_grad()
def evaluate_decoders(
    setup: QualitySetup,
    student: PiDNet,
    teacher: PiDNet | None,
    ae: TinyAutoencoder,
    batch: int = 4,
    space: LatentSpace | None = None,
) -> dict:
    """Per-method mean metrics over the held-out crops, plus every output for a picture grid.

    Methods: bicubic (of the true low-res image: what a decoder could at best start from), cascade,
    student, and teacher when given. "ground_truth_blockiness" is the real crops' own figure.
    `space`: the latents' normalisation (default: the student's registered latent space).
    """
    scale = student.cfg.sr_scale
    hr, lr = holdout_crops(setup, scale)
    space = space or get_latent_space(student.cfg.latent_space)
    shift = resolution_shift((setup.crop, setup.crop), setup.teacher_shift, setup.teacher_shift_base)
    decoders: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]] = {
        "bicubic": lambda z, low, g: F.interpolate(low, scale_factor=scale, mode="bicubic"),
        "cascade": lambda z, low, g: decode_latent_cascade(ae, z, scale, space),
        "student": lambda z, low, g: sample(student, z, 0.0, generator=g),
    }
    seams = None
    if setup.tile is not None:  # the same noise draws as "student": identical at the native size
        tile, overlap = setup.tile.size, setup.tile.overlap
        windows = tiled_window_latents(setup.window_latents, ae, space)
        decoders["student_tiled"] = lambda z, low, g: sample_tiled(
            student, z, 0.0, tile=tile, overlap=overlap, generator=g, window_latents=windows
        )
        plan = setup.tile.plan((setup.crop, setup.crop), student.cfg.native_size, student.cfg.output_scale)
        seams = None if plan is None else window_borders(plan)
    grid = student.cfg.output_scale  # output pixels per latent cell: the lattice windows start on
    if teacher is not None:
        decoders["teacher"] = lambda z, low, g: sample_teacher(
            teacher, z, 0.0, steps=setup.teacher_steps, shift=shift, generator=g
        )
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in decoders}
    for start in tqdm(range(0, len(hr), batch), desc="held-out crops", unit="batch"):
        low = lr[start : start + batch]
        z = space.normalize(ae.encode(low).float())
        for name, decode in decoders.items():
            gen = torch.Generator().manual_seed(setup.seed + start)
            outputs[name].append(decode(z, low, gen).float())
    to01 = lambda x: (x.clamp(-1, 1) + 1) / 2  # noqa: E731
    results = {}
    for name, parts in outputs.items():
        pred = torch.cat(parts)
        results[name] = quality.evaluate(to01(pred), to01(hr), to01(lr), scale, seams, grid)
    samples = {name: torch.cat(parts) for name, parts in outputs.items()}
    return {
        "crops": len(hr),
        "crop": setup.crop,
        "scale": scale,
        "metrics": results,
        "ground_truth_blockiness": quality.blockiness(to01(hr)).mean().item(),
        # the real photos' own score at the tiled decode's window borders (what "no seam" measures)
        "ground_truth_seam": None if seams is None else quality.seam_score(to01(hr), *seams).mean().item(),
        "ground_truth_seam_over_grid": None
        if seams is None
        else quality.seam_over_grid(to01(hr), *seams, grid).mean().item(),
        "samples": samples,
        "hr": hr,
        "lr": lr,
    }


def window_borders(plan: TilePlan) -> tuple[list[int], list[int]]:
    """(rows, cols): where a tiled decode's windows start or end inside the image."""
    height, width = plan.output
    rows = sorted({p for top, _ in plan.origins for p in (top, top + plan.tile[0]) if 0 < p < height})
    cols = sorted({p for _, left in plan.origins for p in (left, left + plan.tile[1]) if 0 < p < width})
    return rows, cols


# x0 error of a flow network at these times: the student's four (0.999 ... 0.342) and a low one.
X0_TIMES = (0.999, 0.866, 0.634, 0.342, 0.1)


@torch.no_grad()
def x0_error_by_t(
    setup: QualitySetup,
    nets: dict[str, PiDNet],
    ae: TinyAutoencoder,
    times: tuple[float, ...] = X0_TIMES,
    batch: int = 8,
    space: LatentSpace | None = None,
) -> dict[str, dict[float, float]]:
    """Held-out x0 MSE (on [-1, 1]) of each net at each t, teacher-forced: x_t = (1 - t) hr + t eps.

    x0 = x_t - t * v(x_t, t); sigma 0, the same noise for every net. This is the check that a
    teacher predicts the image from the latent where every sampler starts (t near 1), against a
    regression baseline's figure at t = 0.999.
    """
    first = next(iter(nets.values()))
    scale = first.cfg.sr_scale
    hr, lr = holdout_crops(setup, scale)
    space = space or get_latent_space(first.cfg.latent_space)
    errors: dict[str, dict[float, list[torch.Tensor]]] = {name: {t: [] for t in times} for name in nets}
    for start in tqdm(range(0, len(hr), batch), desc="x0 error", unit="batch"):
        target = hr[start : start + batch]
        z = space.normalize(ae.encode(lr[start : start + batch]).float())
        for k, t in enumerate(times):
            gen = torch.Generator().manual_seed(setup.seed + 1000 * k + start)
            eps = torch.randn(target.shape, generator=gen)
            x_t = (1 - t) * target + t * eps
            for name, net in nets.items():
                t_scaled = torch.full((len(target),), t * 1000.0)
                v = net(x_t, t_scaled, z, torch.zeros(len(target))).float()
                errors[name][t].append((x_t - t * v - target).pow(2).mean(dim=(1, 2, 3)))
    return {name: {t: float(torch.cat(v).mean()) for t, v in per_t.items()} for name, per_t in errors.items()}


def x0_table(errors: dict[str, dict[float, float]]) -> str:
    times = list(next(iter(errors.values())))
    lines = ["| network | " + " | ".join(f"t = {t}" for t in times) + " |", "|---" * (len(times) + 1) + "|"]
    for name, per_t in errors.items():
        lines.append(f"| {name} | " + " | ".join(f"{per_t[t]:.4f}" for t in times) + " |")
    return "\n".join(lines)


def markdown_table(metrics: dict[str, dict[str, float]]) -> str:
    lines = [
        "| decoder | PSNR (dB) ↑ | SSIM ↑ | colour error ΔE00 vs low-res ↓ | high-freq spectral distance ↓ "
        "| blockiness (~1) | colour shift, levels (mean / max) ↓ | seams (~1) | seams over cell lines (~1) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in metrics.items():
        seam = f"{m['seam']:.3f}" if "seam" in m else "-"
        over_grid = f"{m['seam_over_grid']:.3f}" if "seam_over_grid" in m else "-"
        lines.append(
            f"| {name} | {m['psnr']:.2f} | {m['ssim']:.4f} | {m['colour_error']:.3f} | "
            f"{m['spectral_distance']:.3f} | {m['blockiness']:.3f} | "
            f"{m['colour_shift']:.2f} / {m['colour_shift_max']:.2f} | {seam} | {over_grid} |"
        )
    return "\n".join(lines)


def tiling_seam_excess(metrics: dict[str, dict[str, float]]) -> float | None:
    """The tiled decode's seam score over the untiled one's at the same window borders: what the
    tiling itself adds, apart from a decoder grid the borders happen to lie on (None: not tiled)."""
    tiled, untiled = metrics.get("student_tiled", {}), metrics.get("student", {})
    if "seam" not in tiled or "seam" not in untiled:
        return None
    return tiled["seam"] / untiled["seam"]


GRID_ROWS = ("bicubic", "cascade", "teacher", "student", "student_tiled")


def write_report(result: dict, out_dir: Path, grid_columns: int = 6) -> Path:
    """metrics.json, table.md and grid.png: `grid_columns` crops spread over the held-out set.

    Grid rows, top to bottom: the low-res input (pixels enlarged), bicubic, cascade, teacher (when
    measured), student, student tiled (with --tile), ground truth.
    """
    from pidserve.training import save_grid

    out_dir.mkdir(parents=True, exist_ok=True)
    keys = (
        "crops",
        "crop",
        "scale",
        "metrics",
        "ground_truth_blockiness",
        "ground_truth_seam",
        "ground_truth_seam_over_grid",
    )
    excess = tiling_seam_excess(result["metrics"])
    payload = {k: result.get(k) for k in keys} | {"tiling_seam_excess": excess}
    (out_dir / "metrics.json").write_text(json.dumps(payload, indent=2) + "\n")
    table = markdown_table(result["metrics"])
    table += f"\n\nground-truth blockiness: {result['ground_truth_blockiness']:.3f}\n"
    if result.get("ground_truth_seam") is not None:
        table += f"ground-truth seam score at the window borders: {result['ground_truth_seam']:.3f}\n"
        over_grid = result["ground_truth_seam_over_grid"]
        table += f"ground-truth seams over the other latent-cell lines: {over_grid:.3f}\n"
    if excess is not None:
        table += f"tiled over untiled seam score at the same borders (what tiling adds): {excess:.3f}\n"
    (out_dir / "table.md").write_text(table)
    count = len(result["hr"])
    pick = torch.linspace(0, count - 1, grid_columns).round().long()
    rows = [result["lr"][pick]]
    rows += [result["samples"][n][pick] for n in GRID_ROWS if n in result["samples"]]
    rows.append(result["hr"][pick])
    grid = out_dir / "grid.png"
    save_grid(grid, rows)
    return grid
