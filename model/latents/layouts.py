"""Client-side latent layouts: the rearrangements and sigma conversions done before PiD sees a latent.

    pack_sequence / unpack_sequence  FLUX.1 / Qwen-Image tokens   [B, (h/2)(w/2), 4C] <-> [B, C, h, w]
    patchify_2x2 / unpatchify_2x2    FLUX.2's 2x2 channel fold    [B, C, h, w] <-> [B, 4C, h/2, w/2]
    tokens_to_grid                   ViT (RAE) encoder tokens     [B, N, C] -> [B, C, s, s]
    validate_sigma                   PiD's noise level            float or [B] -> [B] in [0, 1]
    from_euler                       SDXL k-diffusion (VE) latent and sigma -> PiD's VP form

Plus the small checking helpers the other latents modules share (`_shape_text`, `_is_int`).
Every bad input raises LatentError with a message that says what to fix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import LatentError

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
