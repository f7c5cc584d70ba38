"""The decode service: FastAPI, dynamic batcher, encoder pool, KServe v2 routes, Prometheus metrics.

Public API (other folders use exactly these names):
    ServerSettings, create_app, run, bind (the listening socket, before anything loads),
    check_settings (what can be checked before loading)
    the served image encoders and their process pool (what `bench codecs` times):
        encode_fpng, encode_pillow_png, encode_jpeg, encode_webp, EncoderPool

Imports are lazy (each name is imported on first use) so that the encoder pool's worker processes,
which import `pidserve.server.encoder_pool` and `pidserve.server.image_encoders`, do not pay for
FastAPI and torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app
    from .encoder_pool import EncoderPool
    from .image_encoders import encode_fpng, encode_jpeg, encode_pillow_png, encode_webp
    from .loader import check_settings
    from .runner import bind, run
    from .settings import ServerSettings

# name -> the module of this folder that defines it
_MODULES = {
    "EncoderPool": "encoder_pool",
    "ServerSettings": "settings",
    "create_app": "app",
    "encode_fpng": "image_encoders",
    "encode_jpeg": "image_encoders",
    "encode_pillow_png": "image_encoders",
    "encode_webp": "image_encoders",
    "bind": "runner",
    "check_settings": "loader",
    "run": "runner",
}

__all__ = [
    "EncoderPool",
    "ServerSettings",
    "bind",
    "check_settings",
    "create_app",
    "encode_fpng",
    "encode_jpeg",
    "encode_pillow_png",
    "encode_webp",
    "run",
]


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(name)
    return getattr(importlib.import_module(f".{_MODULES[name]}", __name__), name)
