"""The KL-VAE decoder of FLUX.1, SD3 and SDXL: the first half of every "decode, then upscale" cascade.

All three use the same convolutional decoder (the latent-diffusion "AutoencoderKL"), differing only in
latent channels and in a 1x1 `post_quant_conv` SDXL applies first:

    raw latent [B, z, h, w] --(post_quant_conv, SDXL)--> conv_in -> mid (res, attention, res)
        -> 4 up levels of 3 residual blocks, nearest 2x + conv between levels -> GroupNorm, SiLU, conv_out
        -> image [B, 3, 8h, 8w] in about [-1, 1] (not clamped)

widths 512, 512, 256, 128 from the bottom up; ~49.5 M parameters (50 M with SDXL's post_quant_conv).
Module names follow Black Forest Labs' FLUX autoencoder, so the decoder half of FLUX.1's ae.safetensors
loads as is (keys "decoder.*"); diffusers-format VAE weights (SD3, SDXL, FLUX.1 "vae/" folders) are
renamed by `from_diffusers_keys`. bench cascade uses it with random weights, to time the cascades at a
2k model's real sizes; `load_vae_decoder` reads real weights.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from .errors import CheckpointError


@dataclass(frozen=True)
class VAEDecoderConfig:
    latent_channels: int = 16
    widths: tuple[int, ...] = (128, 256, 512, 512)  # per level, full resolution first
    blocks_per_level: int = 3
    post_quant_conv: bool = False
    groups: int = 32


# The latent spaces whose own autoencoder this is.
VAE_CONFIGS = {
    "flux1": VAEDecoderConfig(latent_channels=16),
    "sd3": VAEDecoderConfig(latent_channels=16),
    "sdxl": VAEDecoderConfig(latent_channels=4, post_quant_conv=True),
}


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, with 1x1 convolutions as projections."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        normed = self.norm(x)
        q, k, v = (proj(normed).reshape(b, 1, c, h * w).transpose(2, 3) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # [b, 1, hw, c]
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class UpLevel(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, blocks: int, upsample: bool, groups: int) -> None:
        super().__init__()
        widths = [in_channels] + [out_channels] * blocks
        self.block = nn.ModuleList(ResnetBlock(a, b, groups) for a, b in itertools.pairwise(widths))
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


class VAEDecoder(nn.Module):
    def __init__(self, cfg: VAEDecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        top = cfg.widths[-1]
        self.post_quant_conv = (
            nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1) if cfg.post_quant_conv else None
        )
        self.conv_in = nn.Conv2d(cfg.latent_channels, top, 3, padding=1)
        self.mid = MidBlock(top, cfg.groups)
        # `up[i]` is level i (0 = full resolution), as in the FLUX autoencoder; they run from the top down.
        levels = []
        for i, width in enumerate(cfg.widths):
            above = cfg.widths[i + 1] if i + 1 < len(cfg.widths) else top
            levels.append(UpLevel(above, width, cfg.blocks_per_level, upsample=i > 0, groups=cfg.groups))
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cfg.widths[0], cfg.groups)
        self.conv_out = nn.Conv2d(cfg.widths[0], 3, 3, padding=1)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.cfg.widths) - 1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw (denormalised) latent [B, C, h, w] -> image [B, 3, 8h, 8w], about [-1, 1], not clamped."""
        if z.ndim != 4 or z.shape[1] != self.cfg.latent_channels:
            raise ValueError(
                f"expected a raw latent [B, {self.cfg.latent_channels}, h, w]; got {list(z.shape)}"
            )
        z = z.to(self.conv_in.weight.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    forward = decode


# ---- weights --------------------------------------------------------------------------------------
_DIFFUSERS_RENAMES = (
    (r"^mid_block\.resnets\.0\.", "mid.block_1."),
    (r"^mid_block\.resnets\.1\.", "mid.block_2."),
    (r"^mid_block\.attentions\.0\.group_norm\.", "mid.attn_1.norm."),
    (r"^mid_block\.attentions\.0\.to_q\.", "mid.attn_1.q."),
    (r"^mid_block\.attentions\.0\.to_k\.", "mid.attn_1.k."),
    (r"^mid_block\.attentions\.0\.to_v\.", "mid.attn_1.v."),
    (r"^mid_block\.attentions\.0\.to_out\.0\.", "mid.attn_1.proj_out."),
    (r"\.resnets\.", ".block."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"\.upsamplers\.0\.", ".upsample."),
    (r"^conv_norm_out\.", "norm_out."),
)


def from_diffusers_keys(state: dict[str, torch.Tensor], levels: int = 4) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL decoder state dict (keys without "decoder.") in this module's names.

    diffusers counts up blocks from the bottom (up_blocks.0 is the lowest resolution) and stores the
    attention projections as Linear [C, C]; here levels count from the top and projections are 1x1 convs.
    """
    renamed = {}
    for key, tensor in state.items():
        new = key
        match = re.match(r"^up_blocks\.(\d+)\.", new)
        if match:
            new = f"up.{levels - 1 - int(match.group(1))}." + new[match.end() :]
        for pattern, replacement in _DIFFUSERS_RENAMES:
            new = re.sub(pattern, replacement, new)
        if re.match(r"^mid\.attn_1\.(q|k|v|proj_out)\.weight$", new) and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        renamed[new] = tensor
    return renamed


def load_vae_decoder(path: str | Path, latent_space: str, cfg: VAEDecoderConfig | None = None) -> VAEDecoder:
    """The decoder half of a FLUX.1 (Black Forest Labs ae.safetensors), SD3 or SDXL VAE (diffusers) file.

    cfg overrides the latent space's architecture (tests use narrow ones)."""
    if latent_space not in VAE_CONFIGS:
        raise CheckpointError(
            f"no VAE decoder for latent space {latent_space!r}; known: {', '.join(VAE_CONFIGS)}"
        )
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        raise CheckpointError(
            f"{path} is not a .safetensors file (VAE weights are read from safetensors only)"
        )
    full = load_file(str(path))
    state = {k.removeprefix("decoder."): v for k, v in full.items() if k.startswith("decoder.")}
    if "post_quant_conv.weight" in full:
        state["post_quant_conv.weight"] = full["post_quant_conv.weight"]
        state["post_quant_conv.bias"] = full["post_quant_conv.bias"]
    if any(k.startswith(("up_blocks.", "mid_block.")) for k in state):
        state = from_diffusers_keys(state)
    decoder = VAEDecoder(cfg or VAE_CONFIGS[latent_space])
    expected = decoder.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path.name} does not hold a {latent_space} VAE decoder: {len(missing)} missing weights "
            f"(first: {missing[:3]}), {len(unexpected)} unexpected (first: {unexpected[:3]})"
        )
    wrong = [k for k in expected if state[k].shape != expected[k].shape]
    if wrong:
        key = wrong[0]
        raise CheckpointError(
            f"{path.name} does not hold a {latent_space} VAE decoder: {len(wrong)} weights have other shapes "
            f"(first: {key} is {list(state[key].shape)}, expected {list(expected[key].shape)})"
        )
    decoder.load_state_dict(state)
    return decoder.eval()
