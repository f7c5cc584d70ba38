"""`pidserve bench window-latents`: where a tiled decode's colour cast comes from, the blending or
the window latents (docs/quality.md, "Where the tiled cast comes from").

Each held-out crop's low-res image is encoded whole, as a user's latent is, and decoded six ways:

    untiled             the whole latent at once
    tiled_crop          the given tiling: windows blended at every step, each conditioned on its crop
                        of the latent
    tiled_corrected     the same, each window's crop corrected for the encoder's context
                        (model/window_latents.py): what the engines run for tiny-ae latents
    windows             overlap 0: every window decoded on its own from its crop, no blending
    windows_own_latent  overlap 0, each window given the encoding of *its own* low-res crop: the
                        latents the decoder was trained on (an oracle: it needs the image)
    windows_reencoded   overlap 0, each window given the encoding of its crop of the autoencoder's
                        decode of the whole latent (replacing the latent: loses what the round trip
                        loses; `corrected` adds the difference to the crop instead)

The overlap-0 rows read the whole image's seeded noise cropped to each window, so `windows` is
`sample_tiled` with overlap 0. Figures per row: colour shift (mean and worst crop, 8-bit levels), the
signed mean colour error per channel over the crops, PSNR against the ground truth.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from pidserve.model import (
    CorrectedWindowLatents,
    LatentSpace,
    PiDNet,
    TilePlan,
    Tiling,
    TinyAutoencoder,
    get_latent_space,
    image_windows,
    sample,
    sample_tiled,
)

from . import quality
from .decoder_quality import QualitySetup, holdout_crops

ROWS = ("untiled", "tiled_crop", "tiled_corrected", "windows", "windows_own_latent", "windows_reencoded")


@torch.no_grad()
def window_latent_cast(
    setup: QualitySetup,
    net: PiDNet,
    ae: TinyAutoencoder,
    tiling: Tiling,
    space: LatentSpace | None = None,
) -> dict[str, dict[str, float | list[float]]]:
    """Per row of ROWS: {"colour_shift", "colour_shift_max", "signed_error" [R, G, B], "psnr"}."""
    scale, grid = net.cfg.sr_scale, net.cfg.output_scale
    space = space or get_latent_space(net.cfg.latent_space)
    output = (setup.crop, setup.crop)
    plan = tiling.plan(output, net.cfg.native_size, grid)
    if plan is None:
        raise ValueError(
            f"a {setup.crop}² output decodes in one window with tile {tiling}: nothing to compare"
        )
    if any(side % tile for side, tile in zip(output, plan.tile, strict=True)):
        raise ValueError(
            f"the crop {setup.crop} must be a multiple of the window {plan.tile} (overlap-0 rows)"
        )
    alone = TilePlan.build(output, plan.tile, 0, grid)  # the overlap-0 windows: a partition
    hr, lr = holdout_crops(setup, scale)
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in ROWS}
    corrected = CorrectedWindowLatents(ae, space)

    def encode(image: torch.Tensor) -> torch.Tensor:
        return space.normalize(ae.encode(image).float())

    for i in tqdm(range(len(hr)), desc="held-out crops", unit="crop"):
        low = lr[i : i + 1]
        latent = encode(low)
        reconstruction = ae.decode(space.denormalize(latent)).clamp(-1, 1)
        noises = _noises(setup.seed + i, output)
        outputs["untiled"].append(sample(net, latent, 0.0, noises=noises))
        for name, window_latents in (("tiled_crop", None), ("tiled_corrected", corrected)):
            outputs[name].append(
                sample_tiled(
                    net,
                    latent,
                    0.0,
                    tile=plan.tile,
                    overlap=plan.overlap,
                    noises=noises,
                    window_latents=window_latents,
                )
            )
        pixels = ae.cfg.downsample  # low-res pixels per latent cell
        latents = {
            "windows": list(alone.latent_rows(latent).split(1)),
            "windows_own_latent": [encode(crop) for crop in image_windows(alone, low, pixels)],
            "windows_reencoded": [encode(crop) for crop in image_windows(alone, reconstruction, pixels)],
        }
        for name, window_latents in latents.items():
            image = torch.empty(1, 3, *output)
            for w, window_latent in enumerate(window_latents):
                window_noises = [alone.crop(n, w) for n in noises]
                alone.crop(image, w).copy_(sample(net, window_latent, 0.0, noises=window_noises))
            outputs[name].append(image)
    return {name: _figures(torch.cat(parts), hr, lr) for name, parts in outputs.items()}


def _noises(seed: int, output: tuple[int, int]) -> list[torch.Tensor]:
    """The 4 sampler draws of one whole output image, from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 3, *output, generator=generator) for _ in range(4)]


def _figures(pred: torch.Tensor, hr: torch.Tensor, lr: torch.Tensor) -> dict[str, float | list[float]]:
    to01 = lambda x: (x.clamp(-1, 1) + 1) / 2  # noqa: E731
    shift = quality.colour_shift(to01(pred), to01(lr))
    signed = 255 * (to01(pred).double().mean(dim=(2, 3)) - to01(lr).double().mean(dim=(2, 3))).mean(0)
    return {
        "colour_shift": shift.mean().item(),
        "colour_shift_max": shift.max().item(),
        "signed_error": [round(v, 3) for v in signed.tolist()],
        "psnr": quality.psnr(to01(pred), to01(hr)).mean().item(),
    }


def window_latent_table(figures: dict[str, dict[str, float | list[float]]]) -> str:
    lines = [
        "| decode | colour shift mean / max (levels) | signed mean error R / G / B | PSNR (dB) |",
        "|---|---|---|---|",
    ]
    for name, f in figures.items():
        r, g, b = f["signed_error"]
        lines.append(
            f"| {name} | {f['colour_shift']:.2f} / {f['colour_shift_max']:.2f} | "
            f"{r:+.1f} / {g:+.1f} / {b:+.1f} | {f['psnr']:.2f} |"
        )
    return "\n".join(lines)
