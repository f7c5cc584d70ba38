"""From a checkpoint argument to a network: the one rule the CLI, benchmarks and server share.

    "default"                 -> the embedded pid-tiny (model/default.py)
    our .safetensors          -> its stored config
    an official .pth/.safetensors + variant -> PiDConfig.preset(variant)

load_tiny_autoencoder does the same for the tiny-ae whose latents pid-tiny reads.
Errors are the library's own, for the caller to report: FileNotFoundError (embedded weights or
a file missing), CheckpointError (a file that does not fit), KeyError (an unknown preset, listing
the known ones), ValueError (a file that is not a tiny-ae).
"""

from __future__ import annotations

from pathlib import Path

from .autoencoder import TinyAutoencoder, latent_space_of, load_autoencoder
from .checkpoints import load_checkpoint
from .config import PiDConfig
from .default import load_default_autoencoder, load_default_decoder
from .latents import LatentSpace, get_latent_space
from .network import PiDNet

DEFAULT_CHECKPOINT = "default"


def load_decoder(checkpoint: str, variant: str | None = None) -> PiDNet:
    """A PiDNet in eval mode, float32, on the CPU.

    `checkpoint` is "default" (the embedded pid-tiny), one of our checkpoints (config inside), or
    an official file, which needs `variant` (a preset name such as "2k_flux").
    """
    if checkpoint == DEFAULT_CHECKPOINT:
        return load_default_decoder()
    return load_checkpoint(checkpoint, PiDConfig.preset(variant) if variant else None)


def load_tiny_autoencoder(path: Path | None = None) -> tuple[TinyAutoencoder, LatentSpace]:
    """(tiny-ae in eval mode, its latent space): the embedded one when `path` is None, else the
    file's, normalised with its own recorded statistics."""
    if path is None:
        return load_default_autoencoder(), get_latent_space("tiny-ae")
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; pass a tiny-ae .safetensors (from `pidserve train autoencoder`)"
        )
    ae, info = load_autoencoder(path)
    return ae, latent_space_of(info)
