"""The latent spaces PiD decodes, and the pre-processing that happens outside the network.

PiD is a pixel diffusion decoder. It does not read raw VAE output: it reads the *normalized* latent
``z`` that an upstream latent diffusion model denoises (what a diffusers pipeline returns with
``output_type="latent"``, un-packed to ``[B, C, h, w]``), together with that latent's noise level
``sigma`` in [0, 1], and writes an image ``sr_scale`` times larger than the image the latent encodes.

Words used throughout:

* raw latent: what the upstream VAE encoder (or representation encoder) outputs.
* normalized latent ``z``: the raw latent after the model family's fixed normalization; the space
  the diffusion model works in and the tensor PiD receives. Float32 ``[B, C, h, w]``.
* downsample: pixels per latent cell, per side, of the image the latent encodes.

Each :class:`LatentSpace` is plain data (channels, downsample, noising form, normalization) plus
small methods: ``validate`` (clear errors for bad latents), ``normalize`` / ``denormalize``,
``add_noise`` and ``image_size``. Module-level helpers do the rearrangements that some model
families need: ``pack_sequence`` / ``unpack_sequence`` (FLUX.1 / Qwen-Image token sequences),
``patchify_2x2`` / ``unpatchify_2x2`` (FLUX.2), ``tokens_to_grid`` (RAE encoders), ``from_euler``
(SDXL k-diffusion sigmas) and ``validate_sigma``.

Every bad input raises :class:`LatentError` (a ``ValueError``) with a message that says what to fix.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Protocol

import torch

logger = logging.getLogger(__name__)

Noising = Literal["flow", "vp"]
_NOISING_FORMS = ("flow", "vp")


class LatentError(ValueError):
    """A latent (or its sigma, statistics or space name) that PiD cannot use; the message says why."""


# ---------------------------------------------------------------------------------------------------
# Small formatting and checking helpers
# ---------------------------------------------------------------------------------------------------


def _shape_text(shape: Sequence[int]) -> str:
    """``torch.Size([1, 4, 64, 64])`` -> ``"[1, 4, 64, 64]"``: the form the error messages use."""
    return "[" + ", ".join(str(int(n)) for n in shape) + "]"


def _require_float_tensor(x: object, *, ndim: int, what: str, layout: str) -> torch.Tensor:
    """Check the generic contract of the rearrangement helpers and return ``x`` as float32.

    ``what`` names the function for the message, ``layout`` is the expected shape, e.g. "[B, C, h, w]".
    """
    if not isinstance(x, torch.Tensor):
        raise LatentError(f"{what} expects a {layout} torch.Tensor; got {type(x).__name__}")
    if x.ndim != ndim:
        raise LatentError(f"{what} expects a {layout} tensor; got {_shape_text(x.shape)} ({x.ndim}-D)")
    if not x.is_floating_point():
        raise LatentError(f"{what} expects a floating tensor; got dtype {x.dtype}. Convert it with .float()")
    return x.to(torch.float32)


def _is_int(value: object) -> bool:
    """True for real integers; bool is excluded because ``True`` as a size is always a mistake."""
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------------
# Rearrangements: token sequences, 2x2 patches, encoder token grids
# ---------------------------------------------------------------------------------------------------


def pack_sequence(z: torch.Tensor) -> torch.Tensor:
    """Pack a latent into the 2x2-patch token sequence the FLUX.1 / Qwen-Image pipelines use.

    Args:
        z: float ``[B, C, h, w]`` with h and w even.

    Returns:
        float32 ``[B, (h/2) * (w/2), 4 C]``. Token ``row * (w/2) + col`` holds the 2x2 patch whose
        top-left cell is ``(2 row, 2 col)``; feature ``c * 4 + pi * 2 + pj`` is channel ``c`` at
        ``(2 row + pi, 2 col + pj)``. This is diffusers' ``FluxPipeline._pack_latents``.
    """
    z = _require_float_tensor(z, ndim=4, what="pack_sequence", layout="[B, C, h, w]")
    b, c, h, w = z.shape
    if h % 2 or w % 2:
        raise LatentError(f"pack_sequence needs even h and w; got {_shape_text(z.shape)}")
    patches = z.reshape(b, c, h // 2, 2, w // 2, 2)  # [B, c, row, pi, col, pj]
    patches = patches.permute(0, 2, 4, 1, 3, 5)  # [B, row, col, c, pi, pj]
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_sequence(seq: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Exact inverse of :func:`pack_sequence`: ``[B, (h/2)(w/2), 4 C]`` -> float32 ``[B, C, h, w]``.

    Args:
        seq: the packed latent a FLUX.1 or Qwen-Image pipeline returns with ``output_type="latent"``.
        h, w: latent height and width in cells (image pixels / 8 for these VAEs); both even.
            The sequence does not record them, so the caller must (it knows the image size).
    """
    seq = _require_float_tensor(seq, ndim=3, what="unpack_sequence", layout="[B, tokens, features]")
    if not (_is_int(h) and _is_int(w)) or h < 2 or w < 2 or h % 2 or w % 2:
        raise LatentError(
            f"unpack_sequence needs h and w as positive even integers (latent cells); got {h}, {w}"
        )
    b, tokens, features = seq.shape
    if tokens != (h // 2) * (w // 2):
        raise LatentError(
            f"unpack_sequence: a {h}x{w} latent packs into {(h // 2) * (w // 2)} tokens of 2x2 cells; "
            f"got {tokens} tokens in {_shape_text(seq.shape)}. Pass the latent height and width in cells "
            f"(image pixels / 8), not in pixels"
        )
    if features % 4:
        raise LatentError(f"unpack_sequence needs features divisible by 4 (C x 2 x 2); got {features}")
    patches = seq.reshape(b, h // 2, w // 2, features // 4, 2, 2)  # [B, row, col, c, pi, pj]
    patches = patches.permute(0, 3, 1, 4, 2, 5)  # [B, c, row, pi, col, pj]
    return patches.reshape(b, features // 4, h, w)


def patchify_2x2(z: torch.Tensor) -> torch.Tensor:
    """Fold each 2x2 block of cells into channels, as FLUX.2 does before its BatchNorm.

    Args:
        z: float ``[B, C, h, w]`` with h and w even (FLUX.2: the 32-channel /8 encoder mean).

    Returns:
        float32 ``[B, 4 C, h/2, w/2]``: output channel ``c * 4 + pi * 2 + pj`` at ``(row, col)`` is
        input channel ``c`` at ``(2 row + pi, 2 col + pj)`` (channel order (c, pi, pj)).
    """
    z = _require_float_tensor(z, ndim=4, what="patchify_2x2", layout="[B, C, h, w]")
    b, c, h, w = z.shape
    if h % 2 or w % 2:
        raise LatentError(
            f"patchify_2x2 needs even h and w; got {_shape_text(z.shape)}. "
            f"Encode an image whose sides are multiples of 16 pixels"
        )
    blocks = z.reshape(b, c, h // 2, 2, w // 2, 2)  # [B, c, row, pi, col, pj]
    blocks = blocks.permute(0, 1, 3, 5, 2, 4)  # [B, c, pi, pj, row, col]
    return blocks.reshape(b, c * 4, h // 2, w // 2)


def unpatchify_2x2(z: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`patchify_2x2`: float ``[B, 4 C, h, w]`` -> float32 ``[B, C, 2 h, 2 w]``."""
    z = _require_float_tensor(z, ndim=4, what="unpatchify_2x2", layout="[B, 4C, h, w]")
    b, c4, h, w = z.shape
    if c4 % 4:
        raise LatentError(f"unpatchify_2x2 needs channels divisible by 4; got {_shape_text(z.shape)}")
    blocks = z.reshape(b, c4 // 4, 2, 2, h, w)  # [B, c, pi, pj, row, col]
    blocks = blocks.permute(0, 1, 4, 2, 5, 3)  # [B, c, row, pi, col, pj]
    return blocks.reshape(b, c4 // 4, h * 2, w * 2)


def tokens_to_grid(tokens: torch.Tensor, num_prefix_tokens: int = 0) -> torch.Tensor:
    """Turn a ViT encoder's last hidden state into a square latent grid.

    Args:
        tokens: float ``[B, N, C]``, the encoder's ``last_hidden_state``.
        num_prefix_tokens: leading non-patch tokens to drop: 5 for DINOv2-with-registers
            (CLS + 4 registers), 0 for SigLIP2 (no CLS token).

    Returns:
        float32 ``[B, C, s, s]`` with ``s * s = N - num_prefix_tokens`` (patch tokens are row-major).
    """
    tokens = _require_float_tensor(tokens, ndim=3, what="tokens_to_grid", layout="[B, tokens, channels]")
    b, n, c = tokens.shape
    if not _is_int(num_prefix_tokens) or not 0 <= num_prefix_tokens < n:
        raise LatentError(f"tokens_to_grid: num_prefix_tokens must be in [0, {n}); got {num_prefix_tokens}")
    patch_tokens = n - num_prefix_tokens
    side = math.isqrt(patch_tokens)
    if side * side != patch_tokens:
        raise LatentError(
            f"tokens_to_grid: {patch_tokens} patch tokens (after dropping {num_prefix_tokens}) do not form "
            f"a square grid; check num_prefix_tokens"
        )
    grid = tokens[:, num_prefix_tokens:, :].reshape(b, side, side, c)
    return grid.permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------------------------------
# Sigma handling
# ---------------------------------------------------------------------------------------------------


def _sigma_values(sigma: object, batch: int, what: str) -> torch.Tensor:
    """Turn a float or [B] tensor into a finite float32 [B] tensor; range checks are the caller's."""
    if not _is_int(batch) or batch < 1:
        raise LatentError(f"{what}: batch must be a positive integer; got {batch!r}")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float, torch.Tensor)):
        raise LatentError(f"{what} must be a float or a [B] tensor; got {type(sigma).__name__}")
    if isinstance(sigma, torch.Tensor):
        if sigma.dtype == torch.bool or sigma.is_complex():
            raise LatentError(f"{what} must hold real numbers; got dtype {sigma.dtype}")
        if sigma.ndim == 0:
            values = sigma.detach().to(torch.float32).reshape(1).expand(batch)
        elif tuple(sigma.shape) == (batch,):
            values = sigma.detach().to(torch.float32)
        else:
            raise LatentError(
                f"{what} must be a float or a [B] tensor with B = {batch} (one per latent in the batch); "
                f"got shape {_shape_text(sigma.shape)}"
            )
    else:
        values = torch.full((batch,), float(sigma), dtype=torch.float32)
    if not torch.isfinite(values).all():
        raise LatentError(f"{what} must be finite; got {values.tolist()}")
    return values.contiguous()


def validate_sigma(sigma: float | torch.Tensor, batch: int) -> torch.Tensor:
    """Check PiD's noise level and return it as one value per latent.

    Args:
        sigma: a float, a 0-d tensor, or a ``[B]`` tensor; each value in [0, 1]
            (0 = clean latent, 1 = pure noise).
        batch: B, the number of latents in the batch.

    Returns:
        float32 ``[B]`` tensor (on the input tensor's device; CPU for a float).
    """
    values = _sigma_values(sigma, batch, "sigma")
    if ((values < 0) | (values > 1)).any():
        raise LatentError(
            f"sigma must lie in [0, 1] (0 = clean latent, 1 = pure noise); got min {values.min().item():g}, "
            f"max {values.max().item():g}. An Euler / k-diffusion sigma (SDXL schedulers, can exceed 1) "
            f"must be converted with from_euler(latent, sigma) first"
        )
    return values


def from_euler(x_eu: torch.Tensor, sigma_eu: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert an Euler-scheduler (k-diffusion, variance-exploding) latent to PiD's VP form (SDXL).

    The Euler scheduler works with ``x_eu = z + sigma_eu * eps``; dividing by ``sqrt(sigma_eu^2 + 1)``
    gives ``x_vp = sqrt(1 - sigma_vp^2) z + sigma_vp eps``, the form the ``sdxl`` space uses.

    Args:
        x_eu: float ``[B, C, h, w]`` Euler latent (not divided by ``init_noise_sigma``).
        sigma_eu: float or ``[B]`` tensor, each >= 0 (unbounded).

    Returns:
        ``(x_vp, sigma_vp)``: float32 ``[B, C, h, w]`` and float32 ``[B]`` in [0, 1).
    """
    x_eu = _require_float_tensor(x_eu, ndim=4, what="from_euler", layout="[B, C, h, w]")
    sigma_eu = _sigma_values(sigma_eu, x_eu.shape[0], "sigma_eu").to(x_eu.device)
    if (sigma_eu < 0).any():
        raise LatentError(f"sigma_eu must be >= 0; got min {sigma_eu.min().item():g}")
    scale = torch.rsqrt(sigma_eu * sigma_eu + 1)  # [B]
    return x_eu * scale.view(-1, 1, 1, 1), sigma_eu * scale


# ---------------------------------------------------------------------------------------------------
# Normalizations: raw encoder latent <-> normalized latent, expressed as data
# ---------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------
# The latent space
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatentSpace:
    """One latent space PiD decodes: its shape, normalization and noising form.

    Attributes:
        name: registry key, e.g. "flux1".
        description: one line for humans.
        channels: C of the normalized latent PiD receives.
        downsample: pixels per latent cell, per side, of the image the latent encodes.
        noising: "flow" (``(1 - sigma) z + sigma eps``) or "vp" (``sqrt(1 - sigma^2) z + sigma eps``).
        normalization: raw encoder latent <-> normalized latent (see :class:`Normalization`).
        pid_variants: released PiD checkpoints that decode this space.
        sequence_patch: side of the square patches the upstream pipeline packs the latent into a token
            sequence with (2 for FLUX.1 and Qwen-Image); the latent's h and w must be multiples of it.
        raw_patch: side of the patches folded into channels before normalizing (2 for FLUX.2: the raw
            latent has ``channels / 4`` channels at ``downsample / 2``).
    """

    name: str
    description: str
    channels: int
    downsample: int
    noising: Noising
    normalization: Normalization
    pid_variants: tuple[str, ...] = ()
    sequence_patch: int = 1
    raw_patch: int = 1

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.name, str) or not self.name or self.name != self.name.strip():
            problems.append(f"name must be a non-empty string without surrounding spaces; got {self.name!r}")
        if not _is_int(self.channels) or self.channels < 1:
            problems.append(f"channels must be a positive integer; got {self.channels!r}")
        if not _is_int(self.downsample) or self.downsample < 1:
            problems.append(f"downsample must be a positive integer; got {self.downsample!r}")
        if self.noising not in _NOISING_FORMS:
            problems.append(f"noising must be one of {_NOISING_FORMS}; got {self.noising!r}")
        if self.sequence_patch not in (1, 2):
            problems.append(f"sequence_patch must be 1 or 2; got {self.sequence_patch!r}")
        if self.raw_patch not in (1, 2):
            problems.append(f"raw_patch must be 1 or 2 (only 2x2 patchify exists); got {self.raw_patch!r}")
        elif not problems and (self.channels % self.raw_patch**2 or self.downsample % self.raw_patch):
            problems.append("channels and downsample must be divisible by raw_patch^2 and raw_patch")
        if problems:
            raise LatentError(f"invalid LatentSpace {self.name!r}: " + "; ".join(problems))

    # ---- shapes ----------------------------------------------------------------------------------
    @property
    def raw_channels(self) -> int:
        """Channels of the raw encoder latent that ``normalize`` takes (32 for FLUX.2)."""
        return self.channels // self.raw_patch**2

    @property
    def raw_downsample(self) -> int:
        """Pixels per raw-latent cell, per side (8 for FLUX.2)."""
        return self.downsample // self.raw_patch

    @property
    def can_normalize(self) -> bool:
        """True when ``normalize`` can run (statistics present where the space needs them)."""
        return self.normalization.ready

    def image_size(self, latent_hw: Sequence[int], sr_scale: int) -> tuple[int, int]:
        """Output pixel size ``(H, W)`` of PiD for a latent of spatial size ``(h, w)``.

        ``H = h * downsample * sr_scale``: ``downsample`` maps cells to pixels of the image the latent
        encodes, ``sr_scale`` is PiD's super-resolution factor (4 for the 2k variants, 8 for 2k_scale_rae).
        """
        if len(latent_hw) != 2 or not all(_is_int(n) and n >= 1 for n in latent_hw):
            raise LatentError(f"latent_hw must be two positive integers (h, w); got {tuple(latent_hw)}")
        if not _is_int(sr_scale) or sr_scale < 1:
            raise ValueError(f"sr_scale must be a positive integer; got {sr_scale!r}")
        factor = self.downsample * sr_scale
        return latent_hw[0] * factor, latent_hw[1] * factor

    # ---- validation ------------------------------------------------------------------------------
    def validate(self, latent: torch.Tensor) -> None:
        """Raise :class:`LatentError` unless ``latent`` is a normalized latent of this space.

        Accepted: a finite floating tensor ``[B, channels, h, w]`` with B, h, w >= 1 (h and w multiples
        of ``sequence_patch``). Returns None.
        """
        self._check(
            latent,
            channels=self.channels,
            downsample=self.downsample,
            multiple=self.sequence_patch,
            what="a latent",
            odd_reason=(
                f"The '{self.name}' pipeline packs 2x2 cells into tokens, so the latents it produces are "
                f"always even; check where this latent was cropped or resized"
            ),
        )

    def _expected(self, what: str, channels: int, downsample: int, multiple: int) -> str:
        size_rule = {1: "", 2: ", h and w even"}[multiple]
        return (
            f"latent space '{self.name}' expects {what} of shape [B, {channels}, h, w] "
            f"({channels} channels, one cell per {downsample}x{downsample} pixels{size_rule})"
        )

    def _check(
        self, x: object, *, channels: int, downsample: int, multiple: int, what: str, odd_reason: str
    ) -> None:
        """The checks behind ``validate`` (and ``normalize``'s raw-input check), first failure wins.

        ``multiple`` is 1 or 2 (h and w must be even); ``odd_reason`` explains the latter in the error.
        """
        expected = self._expected(what, channels, downsample, multiple)
        if not isinstance(x, torch.Tensor):
            raise LatentError(
                f"{expected}; got a {type(x).__name__}. Pass a torch.Tensor "
                f"(torch.from_numpy(array) converts a NumPy array)"
            )
        got = _shape_text(x.shape)
        if x.ndim != 4:
            raise LatentError(f"{expected}; got {got} ({x.ndim}-D). {self._ndim_hint(x)}")
        b, c, h, w = x.shape
        if b < 1:
            raise LatentError(f"{expected}; got {got}, an empty batch")
        if c != channels:
            raise LatentError(f"{expected}; got {got}. {self._channel_hint(x, channels)}")
        if not x.is_floating_point():
            raise LatentError(f"{expected}; got dtype {x.dtype}. Convert it with latent.float()")
        if h < 1 or w < 1:
            raise LatentError(f"{expected}; got {got}, an empty spatial size")
        if h % multiple or w % multiple:
            raise LatentError(f"{expected}; got {got}, whose h={h} and w={w} are not both even. {odd_reason}")
        bad = int((~torch.isfinite(x)).sum().item())
        if bad:
            raise LatentError(
                f"{expected}; got {got} with {bad} non-finite values (NaN or inf) out of {x.numel()}. "
                f"The upstream sampler diverged or the latent overflowed a half-precision dtype; fix the "
                f"latent at its source"
            )

    def _ndim_hint(self, x: torch.Tensor) -> str:
        if x.ndim == 3 and x.shape[0] == self.channels:
            return "For a single latent, add the batch axis with latent.unsqueeze(0)"
        if x.ndim == 3 and self.sequence_patch == 2:
            return "Un-pack a packed token sequence [B, tokens, features] with unpack_sequence(seq, h, w)"
        if x.ndim == 5 and x.shape[2] == 1:
            return "Drop the single-frame axis of a video VAE latent with latent.squeeze(2)"
        return "Reshape it to [B, C, h, w]"

    def _channel_hint(self, x: torch.Tensor, channels: int) -> str:
        """One sentence guessing what the wrong-channel tensor is; ``channels`` is what was expected."""
        got_c = x.shape[1]
        if self.raw_channels != self.channels:  # spaces whose raw and normalized latents differ (FLUX.2)
            if got_c == self.raw_channels:
                return f"It looks like the raw {got_c}-channel encoder latent; use space.normalize(raw)"
            if got_c == self.channels:
                return "It looks already normalized; pass it to PiD as it is"
        others = [f"'{s.name}'" for s in _REGISTRY.values() if s.channels == got_c and s.name != self.name]
        if others:
            return (
                f"A {got_c}-channel latent fits latent space {' / '.join(others)}; decode it with that space"
            )
        if x.shape[-1] == channels and x.shape[-2] != channels:
            return "It looks channels-last; use latent.permute(0, 3, 1, 2)"
        return f"Check that the latent comes from the model this space describes: {self.description}"

    # ---- normalization ---------------------------------------------------------------------------
    def with_statistics(self, mean: torch.Tensor, var: torch.Tensor) -> LatentSpace:
        """Return a copy of this space holding its checkpoint statistics (``flux2``, ``dinov2-rae``).

        ``flux2``: the FLUX.2 VAE's BatchNorm ``running_mean`` / ``running_var``, ``[128]`` each
        (diffusers: ``vae.bn.running_mean``, ``vae.bn.running_var``).
        ``dinov2-rae``: the RAE stats file's ``mean`` / ``var``, ``[768, 32, 32]`` (or ``[1, 768, 32, 32]``).
        """
        if not isinstance(self.normalization, MeanVarStats):
            raise LatentError(f"latent space '{self.name}' takes no statistics; its normalization is fixed")
        normalization = self.normalization.with_statistics(mean, var, self.channels)
        logger.debug(
            "latent space %r: statistics loaded, shape %s", self.name, tuple(normalization.mean.shape)
        )
        return dataclasses.replace(self, normalization=normalization)

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw encoder latent -> normalized latent ``z`` (what the diffusion model and PiD work in).

        Args:
            raw: float ``[B, raw_channels, h, w]`` (``channels`` unless the space patchifies: FLUX.2
                takes the 32-channel /8 encoder mean with even h and w).

        Returns:
            float32 ``[B, channels, h / raw_patch, w / raw_patch]``.
        """
        self._check(
            raw,
            channels=self.raw_channels,
            downsample=self.raw_downsample,
            multiple=self.raw_patch,
            what="a raw encoder latent",
            odd_reason=(
                f"normalize folds 2x2 cells into channels; encode an image whose sides are multiples of "
                f"{2 * self.raw_downsample} pixels"
            ),
        )
        self._require_statistics()
        raw = raw.to(torch.float32)
        if self.raw_patch == 2:
            raw = patchify_2x2(raw)
        return self.normalization.normalize(raw)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Normalized latent -> raw encoder latent; the exact inverse of :meth:`normalize`.

        Args:
            z: float ``[B, channels, h, w]``.

        Returns:
            float32 ``[B, raw_channels, h * raw_patch, w * raw_patch]``.
        """
        if not self.normalization.invertible:
            raise LatentError(
                f"latent space '{self.name}' cannot be denormalized: its normalization "
                f"({type(self.normalization).__name__}) discards information"
            )
        self.validate(z)
        self._require_statistics()
        raw = self.normalization.denormalize(z.to(torch.float32))
        if self.raw_patch == 2:
            raw = unpatchify_2x2(raw)
        return raw

    def _require_statistics(self) -> None:
        if not self.normalization.ready:
            how = getattr(self.normalization, "how_to_load", "")
            raise LatentError(
                f"latent space '{self.name}' needs checkpoint statistics to (de)normalize and has none. "
                f"Load them with space = get_latent_space('{self.name}').with_statistics(mean, var). {how}"
            )

    # ---- noising ---------------------------------------------------------------------------------
    def add_noise(self, z: torch.Tensor, sigma: float | torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Noise a normalized latent to level ``sigma`` with this space's noising form.

        Args:
            z: float ``[B, C, h, w]`` normalized latent.
            sigma: float or ``[B]`` tensor in [0, 1], broadcast over C, h, w.
            eps: standard-normal noise of z's shape.

        Returns:
            float32 ``[B, C, h, w]``: flow ``(1 - sigma) z + sigma eps``;
            vp ``sqrt(1 - sigma^2) z + sigma eps``. ``sigma = 0`` returns ``z``.
        """
        self.validate(z)
        if not isinstance(eps, torch.Tensor) or eps.shape != z.shape or not eps.is_floating_point():
            got = _shape_text(eps.shape) if isinstance(eps, torch.Tensor) else type(eps).__name__
            raise LatentError(
                f"latent space '{self.name}': eps must be a float tensor of shape "
                f"{_shape_text(z.shape)}; got {got}"
            )
        s = validate_sigma(sigma, z.shape[0]).to(z.device).view(-1, 1, 1, 1)
        z = z.to(torch.float32)
        eps = eps.to(torch.float32)
        if self.noising == "flow":
            return (1 - s) * z + s * eps
        return torch.sqrt(1 - s * s) * z + s * eps


# ---------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, LatentSpace] = {}


def register_latent_space(space: LatentSpace) -> None:
    """Add a latent space to the registry; a name that is already registered raises LatentError."""
    if not isinstance(space, LatentSpace):
        raise LatentError(f"register_latent_space expects a LatentSpace; got {type(space).__name__}")
    if space.name in _REGISTRY:
        raise LatentError(f"latent space '{space.name}' is already registered; pick another name")
    _REGISTRY[space.name] = space
    logger.debug("registered latent space %r (%d ch, /%d)", space.name, space.channels, space.downsample)


def get_latent_space(name: str) -> LatentSpace:
    """The registered latent space called ``name``; LatentError listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):  # TypeError: an unhashable "name"
        raise LatentError(
            f"unknown latent space {name!r}; known latent spaces: {', '.join(_REGISTRY)}"
        ) from None


def list_latent_spaces() -> list[str]:
    """Names of the registered latent spaces, in registration order."""
    return list(_REGISTRY)


# Qwen-Image VAE (AutoencoderKLQwenImage) per-channel statistics: the `latents_mean` / `latents_std`
# defaults of diffusers src/diffusers/models/autoencoders/autoencoder_kl_qwenimage.py (huggingface/
# diffusers, AutoencoderKLQwenImage.__init__), the same values as Qwen/Qwen-Image vae/config.json and as
# the Wan-2.1 VAE's mean/std (Wan-Video/Wan2.1 wan/modules/vae.py, class WanVAE).
_QWENIMAGE_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
_QWENIMAGE_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

# tiny-ae (model/autoencoder.py, the embedded default's autoencoder): raw latent mean and std measured
# on 512 training-photo crops when it was trained (stored in its weights' metadata; a test checks them).
TINY_AE_SHIFT = 0.0012
TINY_AE_STD = 1.2788

_BUILTIN_SPACES = (
    LatentSpace(
        name="flux1",
        description="FLUX.1 / Z-Image VAE latent: 16 channels at 1/8, z = 0.3611 (raw - 0.1159)",
        channels=16,
        downsample=8,
        noising="flow",
        normalization=ScaleShift(scale=0.3611, shift=0.1159),
        pid_variants=("2k_flux", "2kto4k_v1pt5_flux"),
        sequence_patch=2,
    ),
    LatentSpace(
        name="sd3",
        description="Stable Diffusion 3 VAE latent: 16 channels at 1/8, z = 1.5305 (raw - 0.0609)",
        channels=16,
        downsample=8,
        noising="flow",
        normalization=ScaleShift(scale=1.5305, shift=0.0609),
        pid_variants=("2k_sd3", "2kto4k_sd3"),
    ),
    LatentSpace(
        name="sdxl",
        description="SDXL VAE latent: 4 channels at 1/8, z = 0.13025 raw, variance-preserving noising",
        channels=4,
        downsample=8,
        noising="vp",
        normalization=ScaleShift(scale=0.13025),
        pid_variants=("2kto4k_sdxl",),
    ),
    LatentSpace(
        name="flux2",
        description=(
            "FLUX.2 / Klein VAE latent: 32 channels at 1/8, 2x2-patchified to 128 channels at 1/16, "
            "then the VAE's eval-mode BatchNorm"
        ),
        channels=128,
        downsample=16,
        noising="flow",
        normalization=MeanVarStats(
            eps=1e-4,
            per_position=False,
            how_to_load="They are the FLUX.2 VAE's BatchNorm running_mean / running_var, [128] each.",
        ),
        pid_variants=("2k_flux2", "2kto4k_v1pt5_flux2"),
        raw_patch=2,
    ),
    LatentSpace(
        name="qwenimage",
        description="Qwen-Image VAE latent (Wan-2.1 VAE statistics): 16 channels at 1/8, per-channel z-score",
        channels=16,
        downsample=8,
        noising="flow",
        normalization=ChannelMeanStd(mean=_QWENIMAGE_LATENTS_MEAN, std=_QWENIMAGE_LATENTS_STD),
        pid_variants=("2kto4k_v1pt5_qwenimage",),
        sequence_patch=2,
    ),
    LatentSpace(
        name="dinov2-rae",
        description=(
            "RAE latent: DINOv2-B-with-registers patch tokens (CLS and 4 registers dropped) as a 32x32 "
            "grid for a 512 image (virtual /16), per-position mean/var normalized"
        ),
        channels=768,
        downsample=16,
        noising="flow",
        normalization=MeanVarStats(
            eps=1e-5,
            per_position=True,
            how_to_load="They come from the RAE project's stats file (mean / var, [768, 32, 32]).",
        ),
        pid_variants=("2k_rae",),
    ),
    LatentSpace(
        name="siglip2-rae",
        description=(
            "RAE latent: SigLIP2-so400m-patch14-224 patch tokens as a 16x16 grid for a 256 image "
            "(virtual /16), affine-free LayerNorm over channels"
        ),
        channels=1152,
        downsample=16,
        noising="flow",
        normalization=ChannelLayerNorm(eps=1e-6),
        pid_variants=("2k_scale_rae",),
    ),
    LatentSpace(
        name="tiny-ae",
        description="pidserve's embedded tiny autoencoder: 16 channels at 1/8, z = (raw - mean) / std",
        channels=16,
        downsample=8,
        noising="flow",
        normalization=ScaleShift(scale=1.0 / TINY_AE_STD, shift=TINY_AE_SHIFT),
        pid_variants=("pid-tiny",),
    ),
)

for _space in _BUILTIN_SPACES:
    register_latent_space(_space)
del _space
