"""Training: photo data, tiny-ae, PiD teacher (flow matching), DMD2 distillation; torchrun-ready.

Entry points: `pidserve data photos`, `pidserve train autoencoder|teacher|distill`.

Public API (other folders use exactly these names):
    build_photo_set: the photo set (`pidserve data photos`)
    train_autoencoder, train_teacher, train_distill; their recipes AutoencoderTrainConfig,
        TeacherTrainConfig, DistillTrainConfig; load_config (a TOML recipe + --set overrides)
    grid_crops, degrade, save_grid: the held-out crops, their degradation and the image grids,
        shared with `pidserve bench quality`

Imports are lazy (each name is imported on first use) so that `pidserve data photos` does not import
torch and bench's use of the crop helpers does not import the whole training stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .autoencoder import train_autoencoder
    from .config import AutoencoderTrainConfig, DistillTrainConfig, TeacherTrainConfig, load_config
    from .data import degrade, grid_crops
    from .distill import train_distill
    from .loop import save_grid
    from .photos import build_photo_set
    from .teacher import train_teacher

# name -> the module of this folder that defines it
_MODULES = {
    "AutoencoderTrainConfig": "config",
    "DistillTrainConfig": "config",
    "TeacherTrainConfig": "config",
    "build_photo_set": "photos",
    "degrade": "data",
    "grid_crops": "data",
    "load_config": "config",
    "save_grid": "loop",
    "train_autoencoder": "autoencoder",
    "train_distill": "distill",
    "train_teacher": "teacher",
}

__all__ = [
    "AutoencoderTrainConfig",
    "DistillTrainConfig",
    "TeacherTrainConfig",
    "build_photo_set",
    "degrade",
    "grid_crops",
    "load_config",
    "save_grid",
    "train_autoencoder",
    "train_distill",
    "train_teacher",
]


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(name)
    return getattr(importlib.import_module(f".{_MODULES[name]}", __name__), name)
