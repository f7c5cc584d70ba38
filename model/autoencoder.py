"""tiny-ae: a small convolutional autoencoder, 8x downsampling to 16 channels (like FLUX.1 / SD3).

It exists so that pidserve works with no downloads: the embedded default PiD (pid-tiny)
decodes its latents. Deterministic (no KL sampling): training adds noise to the latent
instead, which keeps the latent space smooth for a decoder that also sees noisy latents.

    image [B, 3, H, W] in [-1, 1]  --encode-->  raw latent [B, 16, H/8, W/8]
    raw latent                      --decode-->  image [B, 3, H, W] in [-1, 1] (not clamped)

The registered latent space "tiny-ae" normalises raw latents with a scale and shift measured
on the training photos (model/latents/builtin.py), like FLUX.1's 0.3611 / 0.1159.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .latents import LatentSpace, ScaleShift, get_latent_space


@dataclass(frozen=True)
class AutoencoderConfig:
    latent_channels: int = 16
    widths: tuple[int, ...] = (32, 64, 96, 128)  # full resolution, then after each 2x downsample

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.widths) - 1)

    def to_dict(self) -> dict:
        return {"latent_channels": self.latent_channels, "widths": list(self.widths)}

    @classmethod
    def from_dict(cls, d: dict) -> AutoencoderConfig:
        return cls(latent_channels=int(d["latent_channels"]), widths=tuple(int(w) for w in d["widths"]))


class ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.GroupNorm(8, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(8, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class Upsample(nn.Module):
    """Nearest 2x then a 3x3 conv (no checkerboard artefacts, unlike transposed convs)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TinyAutoencoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or AutoencoderConfig()
        w = cfg.widths
        enc: list[nn.Module] = [nn.Conv2d(3, w[0], 3, padding=1)]
        for c_in, c_out in itertools.pairwise(w):
            enc += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), ResBlock(c_out)]
        enc += [nn.GroupNorm(8, w[-1]), nn.SiLU(), nn.Conv2d(w[-1], cfg.latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)

        dec: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, w[-1], 3, padding=1), ResBlock(w[-1])]
        for c_in, c_out in zip(w[:0:-1], w[-2::-1], strict=True):
            dec += [Upsample(c_in, c_out), ResBlock(c_out)]
        dec += [nn.GroupNorm(8, w[0]), nn.SiLU(), nn.Conv2d(w[0], 3, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """image [B, 3, H, W] in [-1, 1], H and W multiples of 8 -> raw latent [B, 16, H/8, W/8]."""
        factor = self.cfg.downsample
        if image.ndim != 4 or image.shape[1] != 3 or image.shape[-2] % factor or image.shape[-1] % factor:
            raise ValueError(
                f"tiny-ae encodes RGB images [B, 3, H, W] with H and W multiples of {factor}; "
                f"got {list(image.shape)}"
            )
        return self.encoder(image)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """raw latent [B, 16, h, w] -> image [B, 3, 8h, 8w], roughly in [-1, 1]."""
        if latent.ndim != 4 or latent.shape[1] != self.cfg.latent_channels:
            raise ValueError(
                f"tiny-ae decodes latents [B, {self.cfg.latent_channels}, h, w]; got {list(latent.shape)}"
            )
        return self.decoder(latent)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(image))


def save_autoencoder(ae: TinyAutoencoder, path: str | Path, extra: dict | None = None) -> None:
    """Weights as safetensors; the config (and e.g. latent statistics) in the metadata."""
    metadata = {"format": "pidserve-autoencoder", "config": json.dumps(ae.cfg.to_dict())}
    metadata.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    tensors = {k: v.detach().contiguous() for k, v in ae.state_dict().items()}
    save_file(tensors, str(path), metadata=metadata)


def load_autoencoder(path: str | Path) -> tuple[TinyAutoencoder, dict]:
    """(model in eval mode, float32; metadata dict with JSON values decoded)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "pidserve-autoencoder":
        raise ValueError(
            f"{path} is not a pidserve autoencoder file (metadata format={meta.get('format')!r})"
        )
    info = {k: json.loads(v) for k, v in meta.items() if k != "format"}
    ae = TinyAutoencoder(AutoencoderConfig.from_dict(info["config"]))
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    ae.load_state_dict(state)
    return ae.eval(), info


def latent_space_of(info: dict) -> LatentSpace:
    """The "tiny-ae" latent space normalised with one autoencoder file's own measured statistics.

    `info` is load_autoencoder's metadata. The registered "tiny-ae" space holds the shipped
    tiny-ae's figures; trainers and benchmarks of another tiny-ae (a new one being trained) use
    this instead, so its latents are normalised as the network that reads them was trained.
    """
    stats = info.get("latent_stats")
    if not stats or not stats.get("std"):
        raise ValueError("this autoencoder file records no latent statistics (latent_stats in its metadata)")
    space = get_latent_space("tiny-ae")
    normalization = ScaleShift(scale=1.0 / float(stats["std"]), shift=float(stats["mean"]))
    return dataclasses.replace(space, normalization=normalization)
