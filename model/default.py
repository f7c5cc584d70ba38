"""The embedded default: pid-tiny and tiny-ae, trained by this project and shipped in model/weights/.

    image uint8 [H, W, 3] --tiny-ae encode + "tiny-ae" normalize--> latent [1, 16, H/8, W/8]
    latent --pid-tiny, 4 steps--> image [4H, 4W]

See model/weights/MODEL_CARD.md for the data, commands, seeds, training time and metrics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .autoencoder import TinyAutoencoder, load_autoencoder
from .checkpoints import load_checkpoint
from .latents import LatentSpace, get_latent_space
from .network import PiDNet

DEFAULT_MODEL_NAME = "pid-tiny"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DECODER_FILE = WEIGHTS_DIR / "pid-tiny.safetensors"
AUTOENCODER_FILE = WEIGHTS_DIR / "tiny-ae.safetensors"


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(
            f"the embedded default's weights {path.name} are missing from {path.parent}; "
            "they are committed to the repository (reinstall, or rebuild them with the commands in "
            "model/weights/MODEL_CARD.md)"
        )
    return path


def load_default_decoder(device: str | torch.device = "cpu") -> PiDNet:
    """pid-tiny in eval mode, float32."""
    return load_checkpoint(_require(DECODER_FILE), device=device)


def load_default_autoencoder(device: str | torch.device = "cpu") -> TinyAutoencoder:
    """tiny-ae in eval mode, float32."""
    return load_autoencoder(_require(AUTOENCODER_FILE))[0].to(device)


@torch.no_grad()
def encode_image(ae: TinyAutoencoder, image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 RGB [H, W, 3] (H, W multiples of 8) -> normalised "tiny-ae" latent [1, 16, H/8, W/8]."""
    pixels = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.array(image, copy=True))
    if pixels.dtype != torch.uint8 or pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"expected a uint8 RGB image [H, W, 3]; got {pixels.dtype} {list(pixels.shape)}")
    x = pixels.permute(2, 0, 1)[None].float().div(127.5).sub(1.0)
    device = next(ae.parameters()).device
    raw = ae.encode(x.to(device))
    return get_latent_space("tiny-ae").normalize(raw.float())


@torch.no_grad()
def decode_latent_cascade(
    ae: TinyAutoencoder, latent: torch.Tensor, scale: int, space: LatentSpace | None = None
) -> torch.Tensor:
    """The cascade baseline: tiny-ae decode, then bicubic upsampling by `scale`; [-1, 1] float32.

    `space`: the latent's normalisation (default: the registered "tiny-ae" space).
    """
    low = ae.decode((space or get_latent_space("tiny-ae")).denormalize(latent.float()))
    up = torch.nn.functional.interpolate(low, scale_factor=scale, mode="bicubic", align_corners=False)
    return up.clamp(-1, 1)
