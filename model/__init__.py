"""The PiD network, its latent spaces, samplers and checkpoint IO.

Public API (other folders use exactly these names):
    PiDConfig, PiDNet, Conditioning, load_checkpoint, save_checkpoint, CheckpointError,
    sample, sample_teacher, to_uint8_hwc, get_latent_space, LatentSpace, LatentError
"""

from .checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from .config import PiDConfig
from .latents import LatentError, LatentSpace, get_latent_space
from .network import Conditioning, PiDNet
from .sampler import sample, sample_teacher, to_uint8_hwc

__all__ = [
    "CheckpointError",
    "Conditioning",
    "LatentError",
    "LatentSpace",
    "PiDConfig",
    "PiDNet",
    "get_latent_space",
    "load_checkpoint",
    "sample",
    "sample_teacher",
    "save_checkpoint",
    "to_uint8_hwc",
]
