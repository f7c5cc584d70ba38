"""The PiD network, its latent spaces, samplers and checkpoint IO.

Public API (other folders use exactly these names):
    PiDConfig, PiDNet, Conditioning, load_checkpoint, save_checkpoint, CheckpointError,
    load_decoder, DEFAULT_CHECKPOINT, DEFAULT_MODEL_NAME, sample, sample_teacher, MAX_STUDENT_STEPS,
    to_uint8_hwc, get_latent_space, LatentSpace, LatentError
"""

from .checkpoints import load_checkpoint, save_checkpoint
from .config import PiDConfig
from .default import DEFAULT_MODEL_NAME
from .errors import CheckpointError, LatentError
from .latents import LatentSpace, get_latent_space
from .loading import DEFAULT_CHECKPOINT, load_decoder
from .network import Conditioning, PiDNet
from .sampler import MAX_STUDENT_STEPS, sample, sample_teacher, to_uint8_hwc

__all__ = [
    "DEFAULT_CHECKPOINT",
    "DEFAULT_MODEL_NAME",
    "MAX_STUDENT_STEPS",
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
