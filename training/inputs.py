"""What the PiD trainers feed the network: normalised (noisy) latents from low-res images.

    lr [B, 3, h*8, w*8] --tiny-ae encoder (frozen)--> raw --latent space normalize--> z [B, C, h, w]
    z --noise augmentation (sigma per sample, the space's noising form)--> z_sigma, sigma [B]
    latent dropout: z_sigma is zeroed for the dropped samples (official LQ dropout)

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


def latent_inputs(
    encoder: FrozenEncoder, lr: torch.Tensor, seeds: torch.Tensor, noise: LatentNoise
) -> LatentInputs:
    z = encoder(lr)
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
