"""The PiD network, its latent spaces, samplers and checkpoint IO.

Public API (other folders use exactly these names):
    PiDConfig, PiDNet, Conditioning, load_checkpoint, save_checkpoint, CheckpointError,
    sample, sample_teacher, to_uint8_hwc, get_latent_space, LatentSpace, LatentError
"""

from .checkpoints import load_checkpoint, save_checkpoint
from .config import PiDConfig
from .errors import CheckpointError, LatentError
from .latents import LatentSpace, get_latent_space
from .loading import load_decoder
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
    "load_decoder",
    "sample",
    "sample_teacher",
    "save_checkpoint",
    "to_uint8_hwc",
]
