"""What the PiD trainers feed the network: normalised (noisy) latents from low-res images.

    lr [B, 3, h*8, w*8] --tiny-ae encoder (frozen)--> raw --latent space normalize--> z [B, C, h, w]
    z --noise augmentation (sigma per sample, the space's noising form)--> z_sigma, sigma [B]
    latent dropout: z_sigma is zeroed for the dropped samples (official LQ dropout)

Latent context (latent_context > 1 in a recipe): a fraction of the samples take their latent cut
out of the encoding of a larger region around the crop instead of the crop's own encoding. An
encoder that normalises over its whole input (tiny-ae's GroupNorm, like most VAEs') makes the two
differ everywhere, and a tiled decode only ever sees the first kind: training on both keeps its
windows in distribution (docs/quality.md, "Where the tiled cast comes from").

All random draws come from the samples' seeds (training/data.py), never from a global RNG.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pidserve.model import (
    PiDConfig,
    TinyAutoencoder,
    get_latent_space,
    latent_space_of,
    load_autoencoder,
    shift_time,
)

from .data import LatentNoise, per_sample_uniform

SALT_CONTEXT = 0x91  # which samples take a context latent


class FrozenEncoder:
    """The latent space's image encoder, frozen: tiny-ae for the embedded default."""

    def __init__(self, autoencoder_path: str | Path, net_cfg: PiDConfig, device: torch.device) -> None:
        if not autoencoder_path:
            raise ValueError(
                "set `autoencoder` to the tiny-ae .safetensors whose latents the network decodes "
                "(other latent spaces need their own encoder, which this trainer does not bundle)"
            )
        ae, info = load_autoencoder(autoencoder_path)
        self.ae: TinyAutoencoder = ae.to(device).requires_grad_(False)
        self.space = get_latent_space(net_cfg.latent_space)
        if self.space.name == "tiny-ae" and "latent_stats" in info:
            # A tiny-ae normalises with its own statistics (a new one differs from the shipped one).
            self.space = latent_space_of(info)
        if (
            self.space.channels != self.ae.cfg.latent_channels
            or self.space.downsample != self.ae.cfg.downsample
        ):
            raise ValueError(
                f"{autoencoder_path} makes {self.ae.cfg.latent_channels}-channel /{self.ae.cfg.downsample} "
                f"latents but the network decodes '{self.space.name}' ({self.space.channels} ch, "
                f"/{self.space.downsample})"
            )

    @torch.no_grad()
    def __call__(self, lr: torch.Tensor) -> torch.Tensor:
        return self.space.normalize(self.ae.encode(lr).float())


@dataclass
class LatentInputs:
    latent: torch.Tensor  # [B, C, h, w] noisy (and possibly dropped) normalised latent
    sigma: torch.Tensor  # [B] its noise level


@dataclass
class LatentContext:
    """The regions around a batch's crops (PhotoCrops with a latent context) and how often to use them."""

    lr: torch.Tensor  # [B, 3, k*H, k*W] each crop's region, low-res
    cell: torch.Tensor  # [B, 2] int: the crop's (row, column) in its region, in latent cells
    prob: float  # fraction of the samples whose latent is cut from their region's encoding

    @classmethod
    def of_batch(cls, batch: dict, prob: float, device: torch.device) -> LatentContext | None:
        """The batch's context, or None when it has none (latent_context = 1) or prob is 0."""
        if "lr_context" not in batch or prob <= 0:
            return None
        return cls(batch["lr_context"].to(device), batch["context_cell"], prob)


def context_latents(
    encoder: FrozenEncoder, lr: torch.Tensor, seeds: torch.Tensor, context: LatentContext
) -> torch.Tensor:
    """[B, C, h, w]: each sample's own encoding, or (with probability context.prob, drawn from its
    seed) its crop's cells cut from the encoding of its whole region."""
    z = encoder(lr)
    use = (per_sample_uniform(seeds, SALT_CONTEXT) < context.prob).nonzero().flatten().tolist()
    if not use:
        return z
    regions = encoder(context.lr[use])
    height, width = z.shape[-2:]
    for region, i in zip(regions, use, strict=True):
        row, col = context.cell[i].tolist()
        z[i] = region[:, row : row + height, col : col + width]
    return z


def latent_inputs(
    encoder: FrozenEncoder,
    lr: torch.Tensor,
    seeds: torch.Tensor,
    noise: LatentNoise,
    context: LatentContext | None = None,
) -> LatentInputs:
    z = encoder(lr) if context is None else context_latents(encoder, lr, seeds, context)
    draws = noise.draw(seeds, tuple(z.shape[1:]))
    sigma = draws["sigma"].to(z.device)
    noisy = encoder.space.add_noise(z, sigma, draws["eps"].to(z.device))
    noisy = noisy * draws["keep"].to(z.device).view(-1, 1, 1, 1)
    return LatentInputs(noisy, sigma)


def logit_normal_times(seeds: torch.Tensor, mean: float, std: float, shift: float, salt: int) -> torch.Tensor:
    """Per-sample t = shift_time(sigmoid(N(mean, std))): the official logit-normal time, then the
    sampler's time shift (model/sampler.py)."""
    u = per_sample_uniform(seeds, salt).clamp(1e-6, 1 - 1e-6)
    normal = torch.distributions.Normal(0.0, 1.0).icdf(u)
    return shift_time(torch.sigmoid(mean + std * normal), shift)


def mixed_times(
    seeds: torch.Tensor, logit_normal: torch.Tensor, uniform: float, high: float, high_min: float, salt: int
) -> torch.Tensor:
    """Per-sample t from a mixture: U[0, 1) with probability `uniform`, U[high_min, 1) with
    probability `high`, else the given logit-normal time. Draws come from the samples' seeds."""
    if uniform < 0 or high < 0 or uniform + high > 1:
        raise ValueError(f"t_uniform ({uniform}) and t_high ({high}) must be >= 0 and sum to at most 1")
    pick = per_sample_uniform(seeds, salt)
    u = per_sample_uniform(seeds, salt + 1)
    t = torch.where(pick < uniform, u, logit_normal)
    return torch.where((pick >= uniform) & (pick < uniform + high), high_min + (1 - high_min) * u, t)


def pixel_origin(seeds: torch.Tensor, jitter: int, salt: int) -> tuple[int, int]:
    """The pixel position table origin of a step: (row, column) in [0, jitter), from the first seed."""
    if jitter <= 0:
        return (0, 0)
    first = seeds[:1]
    return int(per_sample_uniform(first, salt) * jitter), int(per_sample_uniform(first, salt + 1) * jitter)
