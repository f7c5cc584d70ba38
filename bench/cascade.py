"""`pidserve bench cascade`: PiD against the pipelines it replaces; one device, one output size, one run.

    pid                     latent --PiD, 4 steps (the served engine)----------------------------> image S
    decode+bicubic          latent --latent decoder--> image S/sr --bicubic x sr------------------> image S
    decode+sr-diffusion/N   latent --latent decoder--> image S/sr --SR diffusion model, N steps---> image S

The SR diffusion model is built from this project's own blocks so that it has PiD's size: a PiDNet with the
decoder's backbone (same widths, depths, pixel blocks), conditioned on the decoded RGB image instead of a
latent (latent_channels 3, latent_downsample 1: the adapter folds each 4x4 pixel block into channels and
the gates inject it exactly as PiD injects a latent). It is sampled like an undistilled flow-matching
model: N Euler steps of the flow ODE, N = 50 by default (the official PiD teacher's `num_sample_steps`).
Its weights are random: it is only timed, and it has no quality figures.

Every pipeline runs eager PyTorch in the same precision on the same device, starts from latents on the
host and ends with uint8 [B, H, W, 3] pixels on the host; time per image is the median wall time of
whole calls, the pipelines' calls taking turns. Quality (PSNR, SSIM, ... against ground truth) is added
for `pid` and `decode+bicubic` when held-out photos are given.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from pidserve.engines import DecodeBatch, StageTimer, open_engine
from pidserve.model import (
    VAE_CONFIGS,
    PiDConfig,
    PiDNet,
    VAEDecoder,
    get_latent_space,
    load_default_autoencoder,
    load_vae_decoder,
    sample_teacher,
)

from . import plots, report
from .stats import Summary, ratio

log = logging.getLogger(__name__)

# The official teacher's sampling step count (FACTS: num_sample_steps 50): an undistilled model's usual count.
DEFAULT_SR_STEPS = 50

Pipeline = Callable[
    [torch.Tensor], tuple[torch.Tensor, dict[str, float]]
]  # latents -> (uint8 BHWC, stages s)


def latent_decoder(
    latent_space: str, device: torch.device, weights: Path | None = None
) -> tuple[torch.nn.Module, str]:
    """The decoder of the latent space's own autoencoder (the first half of every cascade), and a
    description of it. FLUX.1, SD3 and SDXL VAE decoders get random weights unless `weights` names a
    VAE file: the time of a decode does not depend on its weights."""
    if latent_space == "tiny-ae":
        if weights is not None:
            raise ValueError("tiny-ae's decoder is the embedded default's; --vae is for flux1, sd3 and sdxl")
        return load_default_autoencoder(device), "tiny-ae decoder"
    if latent_space in VAE_CONFIGS:
        if weights is None:
            torch.manual_seed(0)
            return VAEDecoder(VAE_CONFIGS[latent_space]).to(
                device
            ).eval(), f"{latent_space} VAE decoder (random weights)"
        return load_vae_decoder(weights, latent_space).to(
            device
        ), f"{latent_space} VAE decoder ({weights.name})"
    raise ValueError(
        f"bench cascade needs the '{latent_space}' autoencoder's decoder, which this project does not "
        f"include (it has tiny-ae's and the {', '.join(VAE_CONFIGS)} VAE decoders)"
    )


def sr_model_config(decoder: PiDConfig) -> PiDConfig:
    """PiD's backbone, conditioned on an RGB image at 1/sr_scale of the output instead of a latent."""
    return dataclasses.replace(decoder, latent_channels=3, latent_downsample=1, latent_unpatchify=1)


def _to_uint8_hwc(images: torch.Tensor) -> torch.Tensor:
    return images.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def pid_pipeline(net: PiDNet, device: str, precision: str, batch: int, steps: int = 4) -> Pipeline:
    """The served path: the `torch` engine (on-device noise, adapter once, 4 steps, fused post-process)."""
    engine = open_engine("torch", net=net, device=device, precision=precision, max_batch=batch)

    def run(latents: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        n = latents.shape[0]
        seeds = torch.arange(n, dtype=torch.int64)
        result = engine.decode(DecodeBatch(latents, torch.zeros(n), seeds, None, steps))
        return result.images, result.timings

    return run


def decode_then(
    decoder: torch.nn.Module,
    latent_space: str,
    dtype: torch.dtype,
    upscale_stage: str,
    upscale: Callable[[torch.Tensor], torch.Tensor],
) -> Pipeline:
    """A cascade: the latent space's decoder, then `upscale` (decoded image [-1, 1] -> output size)."""
    space = get_latent_space(latent_space)
    device = next(decoder.parameters()).device

    @torch.no_grad()
    def run(latents: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        timer = StageTimer(device)
        with timer.stage("h2d"):
            z = latents.to(device)
        with timer.stage("latent_decode"):
            low = decoder.decode(space.denormalize(z.float()).to(dtype))
        with timer.stage(upscale_stage):
            high = upscale(low)
        with timer.stage("postprocess"):
            pixels = _to_uint8_hwc(high)
        with timer.stage("d2h"):
            pixels = pixels.cpu()
        return pixels, timer.result()

    return run


def decode_then_bicubic(
    decoder: torch.nn.Module, latent_space: str, scale: int, dtype: torch.dtype
) -> Pipeline:
    def bicubic(low: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(low, scale_factor=scale, mode="bicubic", align_corners=False)

    return decode_then(decoder, latent_space, dtype, "upsample", bicubic)


def decode_then_sr_diffusion(
    decoder: torch.nn.Module, latent_space: str, sr_net: PiDNet, steps: int, dtype: torch.dtype
) -> Pipeline:
    def sr_diffusion(low: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator(device=low.device).manual_seed(0)
        # the network casts its inputs to its own dtype; the image it reads is clamped like a real one
        return sample_teacher(sr_net, low.clamp(-1, 1).float(), 0.0, steps=steps, generator=generator)

    return decode_then(decoder, latent_space, dtype, "sr_diffusion", sr_diffusion)


@dataclass
class PipelineTiming:
    name: str
    description: str
    device: str
    precision: str
    batch: int
    image_size: tuple[int, int]
    repeat: int
    ms_per_image_median: float
    ms_per_image_p90: float
    stages_ms_per_image: dict[str, float]
    parameters_millions: float
    pid_speedup: float = 1.0  # this pipeline's time over PiD's: how many times faster PiD is
    quality: dict[str, float] | None = None


def time_interleaved(
    pipelines: dict[str, Pipeline],
    latents: torch.Tensor,
    warmup: int,
    repeat: int,
    progress: tqdm | None = None,
) -> dict[str, tuple[Summary, dict[str, float]]]:
    """Per pipeline: (per-image wall-time summary in ms, median ms per image of each stage).

    The timed calls take turns (round-robin over the pipelines, `repeat` rounds) so that a slow spell of
    the machine (turbo, a neighbour on a shared host) lands on every pipeline alike, not on one of them.
    """
    for _ in range(warmup):
        for run in pipelines.values():
            run(latents)
            if progress is not None:
                progress.update()
    walls: dict[str, list[float]] = {name: [] for name in pipelines}
    stages: dict[str, dict[str, list[float]]] = {name: {} for name in pipelines}
    for _ in range(repeat):
        for name, run in pipelines.items():
            start = time.perf_counter()
            _, timings = run(latents)  # host pixels: the device work is done
            walls[name].append(time.perf_counter() - start)
            for stage, seconds in timings.items():
                stages[name].setdefault(stage, []).append(seconds)
            if progress is not None:
                progress.update()
    n = latents.shape[0]
    return {
        name: (
            Summary.of(walls[name]).scaled(1e3 / n),
            {k: statistics.median(v) * 1e3 / n for k, v in stages[name].items() if k != "total"},
        )
        for name in pipelines
    }


@dataclass
class CascadeSetup:
    image_size: tuple[int, int] = (256, 256)
    batch: int = 1
    sr_steps: list[int] = field(default_factory=lambda: [DEFAULT_SR_STEPS])
    device: str = "cpu"
    precision: str = "fp32"
    warmup: int = 1
    repeat: int = 5
    vae: Path | None = None  # real VAE weights for flux1/sd3/sdxl (default: random)


def bench_cascade(net: PiDNet, setup: CascadeSetup) -> list[PipelineTiming]:
    """Time PiD and each cascade on random latents of the right shape; PiD first, then the cascades."""
    cfg = net.cfg
    device = torch.device(setup.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[setup.precision]
    height, width = setup.image_size
    scale = cfg.output_scale
    if height % scale or width % scale:
        raise ValueError(f"output size {height}x{width} must be a multiple of {scale} for this model")
    latents = torch.randn(
        setup.batch,
        cfg.latent_channels,
        height // scale,
        width // scale,
        generator=torch.Generator().manual_seed(0),
    )
    decoder, decoder_name = latent_decoder(cfg.latent_space, device, setup.vae)
    decoder = decoder.to(dtype).eval()
    torch.manual_seed(0)
    sr_net = PiDNet(sr_model_config(cfg)).to(device=device, dtype=dtype).eval()
    pid_params = sum(p.numel() for p in net.parameters()) / 1e6
    # the autoencoder's decoder half only: the cascade never runs its encoder
    decoder_params = sum(p.numel() for p in getattr(decoder, "decoder", decoder).parameters()) / 1e6
    sr_params = sum(p.numel() for p in sr_net.parameters()) / 1e6
    candidates: list[tuple[str, str, float, Pipeline]] = [
        (
            "pid",
            "PiD, 4 steps (torch engine)",
            pid_params,
            pid_pipeline(net, setup.device, setup.precision, setup.batch),
        ),
        (
            "decode+bicubic",
            f"{decoder_name}, bicubic x{cfg.sr_scale}",
            decoder_params,
            decode_then_bicubic(decoder, cfg.latent_space, cfg.sr_scale, dtype),
        ),
    ]
    for steps in setup.sr_steps:
        candidates.append(
            (
                f"decode+sr-diffusion/{steps}",
                f"{decoder_name}, then a PiD-sized pixel diffusion SR model (random weights), "
                f"{steps} Euler steps",
                decoder_params + sr_params,
                decode_then_sr_diffusion(decoder, cfg.latent_space, sr_net, steps, dtype),
            )
        )
    with tqdm(total=len(candidates) * (setup.warmup + setup.repeat), desc="pipelines", unit="call") as bar:
        timed = time_interleaved({c[0]: c[3] for c in candidates}, latents, setup.warmup, setup.repeat, bar)
    rows = []
    for name, description, params, _ in candidates:
        summary, stages = timed[name]
        rows.append(
            PipelineTiming(
                name=name,
                description=description,
                device=setup.device,
                precision=setup.precision,
                batch=setup.batch,
                image_size=setup.image_size,
                repeat=setup.repeat,
                ms_per_image_median=summary.median,
                ms_per_image_p90=summary.p90,
                stages_ms_per_image=stages,
                parameters_millions=params,
            )
        )
    for row in rows:
        row.pid_speedup = ratio(row.ms_per_image_median, rows[0].ms_per_image_median)
    return rows


def add_quality(rows: list[PipelineTiming], net: PiDNet, photos: Path, crops_per_photo: int = 6) -> None:
    """PSNR/SSIM/colour/spectral figures against held-out photos, for `pid` and `decode+bicubic`."""
    from .decoder_quality import QualitySetup, evaluate_decoders

    if net.cfg.latent_space != "tiny-ae":
        raise ValueError("quality figures need a tiny-ae model (the photos are encoded with tiny-ae)")
    size = rows[0].image_size
    if size[0] != size[1]:
        raise ValueError(f"quality figures use square crops; the output size is {size[0]}x{size[1]}")
    setup = QualitySetup(photos, crop=size[0], crops_per_photo=crops_per_photo)
    reference = copy.deepcopy(net).float().cpu()  # timing may have moved `net` to a GPU in bf16
    metrics = evaluate_decoders(setup, reference, None, load_default_autoencoder())["metrics"]
    for row in rows:
        source = {"pid": "student", "decode+bicubic": "cascade"}.get(row.name)
        if source is not None:
            row.quality = metrics[source]


def markdown_table(rows: list[PipelineTiming]) -> str:
    columns = [
        "pipeline",
        "what it is",
        "params (M)",
        "ms/image (median)",
        "p90",
        "PiD faster by",
        "stages (ms/image)",
        "PSNR / SSIM",
    ]
    cells = []
    for r in rows:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r.stages_ms_per_image.items())
        quality = f"{r.quality['psnr']:.2f} / {r.quality['ssim']:.4f}" if r.quality else "-"
        cells.append(
            [
                r.name,
                r.description,
                f"{r.parameters_millions:.2f}",
                f"{r.ms_per_image_median:.1f}",
                f"{r.ms_per_image_p90:.1f}",
                f"{r.pid_speedup:.2f}x",
                stages,
                quality,
            ]
        )
    return report.markdown_table(columns, cells)


def write_cascade_report(
    out_dir: Path, rows: list[PipelineTiming], *, with_plots: bool = True, command: str | None = None
) -> list[Path]:
    first = rows[0]
    table = markdown_table(rows) + (
        f"\n\nAll pipelines: {first.device}, {first.precision}, batch {first.batch}, "
        f"{first.image_size[0]}x{first.image_size[1]} output, eager PyTorch."
    )
    written = [
        report.write_report(out_dir, "cascade", [asdict(r) for r in rows], table, command=command),
        out_dir / "cascade.md",
    ]
    if with_plots:
        bars = {r.name: r.stages_ms_per_image for r in rows}
        written.append(
            plots.stage_breakdown(
                bars,
                out_dir / "cascade_stages.png",
                title="PiD vs the cascades it replaces",
                unit="ms per image",
            )
        )
    return written
