"""The FastAPI application: routes, error handlers, the request-id/metrics/access-log middleware, lifecycle.

create_app(settings)  ->  FastAPI
  lifespan: ModelLoader.start() (loads + warms up in the background) ... ModelLoader.stop() (drains)
  app.state.loader (loader.py: the model's lifecycle), app.state.service (service.py: the request path)
  /v1/decode, /v1/models (v1.py)   /v2/... (kserve.py)   /metrics   /docs, /openapi.json
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request, Response
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest, start_http_server

from pidserve import __version__

from . import kserve, kserve_models, v1
from .errors import error_body, install_error_handlers
from .http import check_api_key
from .loader import EngineFactory, ModelLoader
from .metrics import Metrics
from .service import DecodeService
from .settings import ServerSettings

log = logging.getLogger(__name__)
access_log = logging.getLogger("pidserve.access")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestContext:
    """Pure ASGI middleware: X-Request-ID on every response, request metrics by route, one access-log line.

    (Pure ASGI rather than BaseHTTPMiddleware so that `request.receive` still reports client disconnects.)
    """

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.monotonic()
        status = 500
        response_started = False

        async def send_with_id(message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # The one error path for what no handler expected: the documented JSON body, the request id,
            # and (by not re-raising) the connection kept alive for the client's next pooled request.
            log.exception("unhandled error in %s %s (request %s)", scope["method"], scope["path"], request_id)
            if response_started:
                raise  # half a response is on the wire: the server must close the connection
            message = f"internal error (request id {request_id}); the server log has the details"
            body = json.dumps(error_body(scope["path"], "internal_error", message)).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send_with_id({"type": "http.response.start", "status": 500, "headers": headers})
            await send_with_id({"type": "http.response.body", "body": body})
        finally:
            seconds = time.monotonic() - started
            route = getattr(scope.get("route"), "path", "other")
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.request_seconds.labels(route).observe(seconds)
            # Probes and scrapes arrive every few seconds: keep them out of the INFO log.
            quiet = route.startswith(("/v2/health", "/v1/health")) or route == "/metrics"
            access_log.log(
                logging.DEBUG if quiet and status < 400 else logging.INFO,
                json.dumps(
                    {
                        "request_id": request_id,
                        "method": scope["method"],
                        "path": scope["path"],
                        "route": route,
                        "status": status,
                        "ms": round(seconds * 1e3, 2),
                        "client": (scope.get("client") or ["?"])[0],
                    }
                ),
            )


def create_app(
    settings: ServerSettings | None = None, engine_factory: EngineFactory | None = None
) -> FastAPI:
    settings = settings or ServerSettings()
    metrics = Metrics()
    loader = ModelLoader(settings, metrics, engine_factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        exporter = None
        if (
            settings.metrics_port is not None
        ):  # a scrape port of its own (Kubernetes: no auth, no API traffic)
            exporter, _ = start_http_server(
                settings.metrics_port, addr=settings.host, registry=metrics.registry
            )
        grpc_server = None
        if settings.grpc_port is not None:  # KServe v2 over gRPC beside HTTP, on the same service
            from .grpc_service import start_grpc_server

            grpc_server = await start_grpc_server(
                loader, app.state.service, app.state.api_key, settings.host, settings.grpc_port
            )
        loader.start()
        try:
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(grace=1.0)  # its in-flight calls were cut off with the batcher's
            loader.stop()
            if exporter is not None:
                exporter.shutdown()

    # The schema and docs pages are routes of ours (below), so that an API key guards them too.
    app = FastAPI(
        title="pidserve",
        version=__version__,
        description="PiD pixel diffusion decoder: latents in, high-resolution pixels out.",
        lifespan=lifespan,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.loader = loader
    app.state.service = DecodeService(loader)
    app.state.metrics = metrics
    app.state.api_key = settings.resolved_api_key()
    install_error_handlers(app)
    app.include_router(v1.router)
    app.include_router(kserve.router)
    app.include_router(kserve.models)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus(request: Request) -> Response:
        metrics.queue_depth.set(loader.batcher.depth if loader.batcher else 0)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.openapi = lambda: _openapi_with_model_name(app, loader.name)  # type: ignore[method-assign]
    _add_docs_routes(app)
    app.add_middleware(RequestContext, metrics=metrics)
    return app


def _add_docs_routes(app: FastAPI) -> None:
    """/openapi.json, /docs (Swagger UI) and /redoc, behind the API key when the server has one (a
    browser sends no key, so with a key set the pages are for clients that send the header)."""
    guarded = [Depends(check_api_key)]

    @app.get("/openapi.json", include_in_schema=False, dependencies=guarded)
    async def openapi_schema() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=guarded)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - Swagger UI")

    @app.get("/redoc", include_in_schema=False, dependencies=guarded)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")


def _openapi_with_model_name(app: FastAPI, name: str) -> dict:
    """The generated schema, with the v2 {name} and {version} path parameters pinned to what is served
    and the KServe request's models (kserve_models.py) among its components."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        for path in schema["paths"].values():
            for operation in path.values():
                for param in operation.get("parameters", []):
                    if param["in"] == "path" and param["name"] == "name":
                        param["schema"] = {"type": "string", "enum": [name]}
                    elif param["in"] == "path" and param["name"] == "version":
                        param["schema"] = {"type": "string", "enum": [kserve.VERSION]}
        schema.setdefault("components", {}).setdefault("schemas", {}).update(kserve_models.OPENAPI_SCHEMAS)
        app.openapi_schema = schema
    return app.openapi_schema
