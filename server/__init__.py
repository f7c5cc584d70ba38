"""The decode service: FastAPI, dynamic batcher, encoder pool, KServe v2 routes, Prometheus metrics.

Public API (other folders use exactly these names):
    ServerSettings, create_app, run

Imports are lazy so that the encoder pool's worker processes, which import `pidserve.server.encoder_pool`
and `pidserve.server.image_encoders`, do not pay for FastAPI and torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app
    from .runner import run
    from .settings import ServerSettings

__all__ = ["ServerSettings", "create_app", "run"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "run":
        from .runner import run

        return run
    if name == "ServerSettings":
        from .settings import ServerSettings

        return ServerSettings
    raise AttributeError(name)
