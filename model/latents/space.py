"""The LatentSpace type and the registry of spaces PiD decodes.

A :class:`LatentSpace` is plain data (channels, downsample, noising form, normalization) plus small
methods: ``validate`` (clear errors for bad latents), ``normalize`` / ``denormalize``, ``add_noise``
and ``image_size``. ``register_latent_space`` / ``get_latent_space`` / ``list_latent_spaces`` keep
the name -> space registry; the built-in spaces are registered by builtin.py.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import LatentError
from .layouts import _is_int, _shape_text, patchify_2x2, unpatchify_2x2, validate_sigma
from .normalization import MeanVarStats, Normalization

logger = logging.getLogger(__name__)

Noising = Literal["flow", "vp"]
_NOISING_FORMS = ("flow", "vp")


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
