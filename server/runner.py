"""Run the service under uvicorn (what `pidserve serve` and `make serve` call).

run(settings): bind the port first (a taken port fails at once, before any model work), then serve
Server: uvicorn's server, told about shutdown as it begins, so that the HTTP server's graceful wait
        and the batcher's drain share one deadline (loader.begin_shutdown)
"""

from __future__ import annotations

import logging
import socket

import uvicorn

from .settings import ServerSettings

log = logging.getLogger(__name__)


class Server(uvicorn.Server):
    """uvicorn.Server that starts the model's shutdown (readiness off, queue cut-off) the moment the
    HTTP server starts its own, instead of after every connection has closed."""

    def __init__(self, config: uvicorn.Config, loader) -> None:
        super().__init__(config)
        self.loader = loader  # the app's ModelLoader (app.state.loader)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.loader.begin_shutdown(float(self.config.timeout_graceful_shutdown or 0))
        await super().shutdown(sockets)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, or a clear error when the address is taken or not ours."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port"
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run(settings: ServerSettings, sock: socket.socket | None = None) -> None:
    from .app import create_app

    logging.getLogger("pidserve").setLevel(settings.log_level.upper())
    sock = sock or bind(settings.host, settings.port)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        log_level=settings.log_level,
        access_log=False,  # pidserve.access logs one JSON line per request, with its request id
        timeout_graceful_shutdown=int(settings.graceful_shutdown_s) or None,
        proxy_headers=True,
    )
    loader = app.state.loader
    server = Server(config, loader)

    def exit_on_failure() -> None:  # a model that cannot load never will: exit (the pod restarts)
        server.should_exit = True

    loader.on_failure = exit_on_failure
    server.run(sockets=[sock])
    if loader.state == "failed" or loader.failure is not None:
        raise SystemExit(f"the model failed to load: {loader.failure}")
