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

Modules, in reading order:

    builtin        the registered spaces (flux1, sd3, sdxl, flux2, qwenimage, dinov2-rae,
                   siglip2-rae, tiny-ae) as one table of data
    space          LatentSpace (validate, normalize / denormalize, add_noise, image_size) and the
                   registry: register_latent_space, get_latent_space, list_latent_spaces
    normalization  ScaleShift, ChannelMeanStd, MeanVarStats, ChannelLayerNorm
    layouts        client-side rearrangements: pack_sequence / unpack_sequence, patchify_2x2 /
                   unpatchify_2x2, tokens_to_grid, from_euler, validate_sigma

Every bad input raises :class:`LatentError` (a ``ValueError``) with a message that says what to fix.
"""

from ..errors import LatentError
from .builtin import TINY_AE_SHIFT, TINY_AE_STD
from .layouts import (
    from_euler,
    pack_sequence,
    patchify_2x2,
    tokens_to_grid,
    unpack_sequence,
    unpatchify_2x2,
    validate_sigma,
)
from .normalization import ChannelLayerNorm, ChannelMeanStd, MeanVarStats, Normalization, ScaleShift
from .space import LatentSpace, Noising, get_latent_space, list_latent_spaces, register_latent_space

__all__ = [
    "TINY_AE_SHIFT",
    "TINY_AE_STD",
    "ChannelLayerNorm",
    "ChannelMeanStd",
    "LatentError",
    "LatentSpace",
    "MeanVarStats",
    "Noising",
    "Normalization",
    "ScaleShift",
    "from_euler",
    "get_latent_space",
    "list_latent_spaces",
    "pack_sequence",
    "patchify_2x2",
    "register_latent_space",
    "tokens_to_grid",
    "unpack_sequence",
    "unpatchify_2x2",
    "validate_sigma",
]
