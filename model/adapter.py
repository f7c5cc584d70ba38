"""The sigma-aware latent adapter: latent -> per-patch features, and the gates that inject them.

The adapter's convolutional trunk does not depend on the diffusion time, so PiDNet runs it
once per decode (`PiDNet.condition`) and the 4 sampler steps reuse its output.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import PiDConfig


class ResBlock(nn.Module):
    """x + [GroupNorm(4) -> SiLU -> Conv3x3 -> GroupNorm(4) -> SiLU -> Conv3x3](x)."""

    def __init__(self, channels: int, padding_mode: str) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.GroupNorm(4, channels, eps=1e-5),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1, padding_mode=padding_mode),
            nn.GroupNorm(4, channels, eps=1e-5),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1, padding_mode=padding_mode),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class LatentAdapter(nn.Module):
    """Latent [B, C, h, w] -> one [B, L, D] feature per gate (+ one for the pixel gate in v1.5)."""

    def __init__(self, cfg: PiDConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hidden, pad = cfg.adapter_hidden, cfg.adapter_padding
        self.trunk = nn.Sequential(
            nn.Conv2d(cfg.adapter_in_channels, hidden, 3, padding=1, padding_mode=pad),
            nn.SiLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1, padding_mode=pad),
            *[ResBlock(hidden, pad) for _ in range(cfg.adapter_res_blocks)],
        )
        self.heads = nn.ModuleList(nn.Linear(hidden, cfg.hidden_size) for _ in range(cfg.num_gates))
        self.pixel_head = nn.Linear(hidden, cfg.hidden_size) if cfg.pixel_gate else None
        # Training-only (v1.5 teachers): predicts the low-res RGB image of each patch from the
        # trunk features; never used at inference. Its activation is not recorded in the
        # official facts; our own training uses GELU.
        if cfg.aux_rgb_head:
            rgb_per_patch = 3 * max(1, cfg.patch_size // cfg.sr_scale) ** 2
            self.aux_rgb_head = nn.Sequential(
                nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, rgb_per_patch)
            )
        else:
            self.aux_rgb_head = None

    def features(self, latent: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """The trunk's output as tokens [B, L, adapter_hidden], L = grid_h * grid_w, row-major."""
        aligned = align_latent_to_grid(latent, self.cfg, grid_hw)
        return self.trunk(aligned).flatten(2).transpose(1, 2)

    def forward(
        self, latent: torch.Tensor, grid_hw: tuple[int, int]
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        tokens = self.features(latent, grid_hw)
        gate_features = [head(tokens) for head in self.heads]
        pixel_feature = self.pixel_head(tokens) if self.pixel_head is not None else None
        return gate_features, pixel_feature


def align_latent_to_grid(latent: torch.Tensor, cfg: PiDConfig, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Bring a latent [B, C, h, w] onto the patch grid [B, C', grid_h, grid_w].

    1. Un-patchify (FLUX.2 in v1.5 nets): channel c*f^2 + i*f + j -> channel c at (row*f+i, col*f+j).
    2. Ratio r > 1: nearest-neighbour resize (legacy floor rule; pixel replication for integer r).
       r == 1: identity, bilinear only if the size differs.
       r < 1: bilinear to the exact size, then space-to-depth (channel c*f^2 + fy*f + fx).
    """
    f = cfg.latent_unpatchify
    if f > 1:
        b, c, h, w = latent.shape
        latent = latent.reshape(b, c // (f * f), f, f, h, w).permute(0, 1, 4, 2, 5, 3)
        latent = latent.reshape(b, c // (f * f), h * f, w * f)
    ratio = cfg.latent_to_patch_ratio
    grid_h, grid_w = grid_hw
    if ratio > 1:
        return F.interpolate(latent, size=(grid_h, grid_w), mode="nearest")
    if ratio == 1:
        if tuple(latent.shape[-2:]) != (grid_h, grid_w):
            latent = F.interpolate(latent, size=(grid_h, grid_w), mode="bilinear", align_corners=False)
        return latent
    fold = round(1 / ratio)
    target = (grid_h * fold, grid_w * fold)
    if tuple(latent.shape[-2:]) != target:
        latent = F.interpolate(latent, size=target, mode="bilinear", align_corners=False)
    return F.pixel_unshuffle(latent, fold)


class SigmaGate(nn.Module):
    """s + g * q with g = sigmoid(content_proj([s, q]) - exp(log_alpha) * sigma).

    per_token_per_dim (v1): g is [B, L, D]; per_token (v1.5): g is one scalar per token [B, L, 1].
    A noisier latent (larger sigma) closes the gate: the network then trusts the latent less.
    """

    def __init__(self, hidden: int, per_dim: bool) -> None:
        super().__init__()
        self.log_alpha = nn.Parameter(torch.tensor(math.log(5.0)))
        self.content_proj = nn.Linear(2 * hidden, hidden if per_dim else 1)
        nn.init.constant_(self.content_proj.bias, 2.0)

    def gate(self, s: torch.Tensor, q: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The gate value g (float32 where sigma enters, returned in s's dtype)."""
        logits = self.content_proj(torch.cat([s, q], dim=-1))
        sigma_term = self.log_alpha.float().exp() * sigma.float().view(-1, 1, 1)
        return torch.sigmoid(logits.float() - sigma_term).to(s.dtype)

    def forward(self, s: torch.Tensor, q: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return s + self.gate(s, q, sigma) * q
