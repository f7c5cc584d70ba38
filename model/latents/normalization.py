"""Normalizations: raw encoder latent <-> normalized latent ``z``, expressed as data.

    ScaleShift       z = scale * (raw - shift)                  the classic VAE scaling / shift factors
    ChannelMeanStd   z[:, c] = (raw[:, c] - mean[c]) / std[c]   published per-channel constants
    MeanVarStats     z = (raw - mean) / sqrt(var + eps)         statistics shipped with a checkpoint
    ChannelLayerNorm affine-free LayerNorm over channels         not invertible

Each satisfies the :class:`Normalization` protocol a LatentSpace holds: ``ready``, ``invertible``,
``normalize`` and ``denormalize`` on float32 ``[B, C, h, w]``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch

from ..errors import LatentError
from .layouts import _shape_text


class Normalization(Protocol):
    """What a :class:`LatentSpace` needs from its normalization. Inputs/outputs are float32 [B, C, h, w]."""

    invertible: ClassVar[bool]

    @property
    def ready(self) -> bool:
        """True when every statistic the normalization needs is present."""
        ...

    def normalize(self, raw: torch.Tensor) -> torch.Tensor: ...

    def denormalize(self, z: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class ScaleShift:
    """``z = scale * (raw - shift)``: the classic VAE ``scaling_factor`` / ``shift_factor`` pair."""

    scale: float
    shift: float = 0.0
    invertible: ClassVar[bool] = True

    @property
    def ready(self) -> bool:
        return True

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.shift) * self.scale

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.scale + self.shift


class _MeanStd:
    """Shared by the statistics-based normalisations: z = (raw - mean) / std, with `_stats` giving
    mean and std broadcastable to the latent."""

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise TypeError(f"{type(self).__name__} must define _stats")

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(raw)
        return (raw - mean) / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(z)
        return z * std + mean


@dataclass(frozen=True)
class ChannelMeanStd(_MeanStd):
    """``z[:, c] = (raw[:, c] - mean[c]) / std[c]`` with published constants (one value per channel)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    invertible: ClassVar[bool] = True

    @property
    def ready(self) -> bool:
        return True

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean, dtype=torch.float32, device=like.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=like.device).view(1, -1, 1, 1)
        return mean, std


@dataclass(frozen=True, eq=False)
class MeanVarStats(_MeanStd):
    """``z = (raw - mean) / sqrt(var + eps)`` with statistics that ship with a checkpoint.

    Two layouts: per channel (``mean``/``var`` float32 ``[C]``, an eval-mode affine-free BatchNorm, as
    FLUX.2) or per position (``[C, H, W]``, as the RAE stats file). The statistics are optional so the
    space can be registered before they are loaded; ``normalize`` refuses to run without them.
    ``eq=False``: tensors do not compare with ``==``, so spaces holding them compare by identity.
    """

    eps: float
    per_position: bool
    how_to_load: str  # one sentence for the error raised while the statistics are missing
    mean: torch.Tensor | None = field(default=None, repr=False)
    var: torch.Tensor | None = field(default=None, repr=False)
    invertible: ClassVar[bool] = True

    @property
    def ready(self) -> bool:
        return self.mean is not None and self.var is not None

    def with_statistics(self, mean: object, var: object, channels: int) -> MeanVarStats:
        """Return a copy holding float32 statistics, after checking their shape and values."""
        mean_t = self._as_stat(mean, "mean", channels)
        var_t = self._as_stat(var, "var", channels)
        if mean_t.shape != var_t.shape:
            raise LatentError(
                f"mean and var must have the same shape; got {_shape_text(mean_t.shape)} and "
                f"{_shape_text(var_t.shape)}"
            )
        if (var_t < 0).any():
            raise LatentError(f"var must be >= 0 everywhere; {(var_t < 0).sum().item()} values are negative")
        return dataclasses.replace(self, mean=mean_t, var=var_t)

    def _as_stat(self, value: object, what: str, channels: int) -> torch.Tensor:
        stat = torch.as_tensor(value).detach().to(torch.float32).clone()
        if self.per_position:
            if stat.ndim == 4 and stat.shape[0] == 1:  # stats files often keep a batch axis of 1
                stat = stat[0]
            if stat.ndim != 3 or stat.shape[0] != channels:
                raise LatentError(
                    f"{what} must be per-position statistics of shape [{channels}, H, W]; "
                    f"got {_shape_text(stat.shape)}"
                )
        else:
            stat = stat.squeeze()  # accept [C], [1, C, 1, 1], ...
            if tuple(stat.shape) != (channels,):
                raise LatentError(
                    f"{what} must hold one value per channel, shape [{channels}]; got {stat.numel()}"
                )
        if not torch.isfinite(stat).all():
            raise LatentError(f"{what} must be finite; {(~torch.isfinite(stat)).sum().item()} values are not")
        return stat

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and sqrt(var + eps), shaped to broadcast against ``like`` [B, C, h, w]."""
        assert self.mean is not None and self.var is not None  # callers check `ready` first
        if self.per_position:
            if tuple(like.shape[-2:]) != tuple(self.mean.shape[-2:]):
                raise LatentError(
                    f"the per-position statistics describe a {self.mean.shape[-2]}x{self.mean.shape[-1]} "
                    f"grid; got a {like.shape[-2]}x{like.shape[-1]} latent. Encode images at the resolution "
                    f"the statistics were computed for"
                )
            shape = (1, *self.mean.shape)
        else:
            shape = (1, -1, 1, 1)
        mean = self.mean.to(like.device).view(shape)
        std = torch.sqrt(self.var.to(like.device) + self.eps).view(shape)
        return mean, std


@dataclass(frozen=True)
class ChannelLayerNorm:
    """Affine-free LayerNorm over the channels of every cell: ``(x - mean_c x) / sqrt(var_c x + eps)``.

    Not invertible: it discards each cell's mean and scale.
    """

    eps: float
    invertible: ClassVar[bool] = False

    @property
    def ready(self) -> bool:
        return True

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        mean = raw.mean(dim=1, keepdim=True)
        var = raw.var(dim=1, keepdim=True, unbiased=False)  # LayerNorm uses the biased variance
        return (raw - mean) / torch.sqrt(var + self.eps)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        raise LatentError(
            "a layer-normalized latent cannot be denormalized: the norm discards mean and scale"
        )
