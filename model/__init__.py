"""The PiD network, its latent spaces, samplers and checkpoint IO.

Public API (other folders use exactly these names):
    PiDConfig, PiDNet, Conditioning, load_checkpoint, save_checkpoint, CheckpointError, sample
"""

from .checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from .config import PiDConfig
from .network import Conditioning, PiDNet

__all__ = ["CheckpointError", "Conditioning", "PiDConfig", "PiDNet", "load_checkpoint", "save_checkpoint"]
