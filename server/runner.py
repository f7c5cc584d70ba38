"""Run the service under uvicorn (what `pidserve serve` and `make serve` call)."""

from __future__ import annotations

import logging

from .settings import ServerSettings


def run(settings: ServerSettings) -> None:
    import uvicorn

    from .app import create_app

    logging.getLogger("pidserve").setLevel(settings.log_level.upper())
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # pidserve.access logs one JSON line per request, with its request id
        timeout_graceful_shutdown=int(settings.graceful_shutdown_s) or None,
        proxy_headers=True,
    )
