"""KServe v2 / Open Inference Protocol routes, with Triton's binary tensor data extension.

    model "<name>", version 1: inputs latent, sigma, seed; output image UINT8 [B, H, W, 3]
    (the request's data model, its parsing and its OpenAPI schema: kserve_models.py)

Outputs are returned as binary data when the request asks for it (tritonclient's default): the JSON head,
its length in `Inference-Header-Content-Length`, then the image bytes. Errors use the protocol's
`{"error": "<message>"}` form (errors.py).
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import torch
from fastapi import APIRouter, Depends, Request, Response

from pidserve import __version__

from . import triton
from .errors import ApiError, error_responses
from .http import check_api_key, disconnect_watcher, read_body, server_timing
from .kserve_models import INFER_BODY, InferRequest, parse_infer_request
from .loader import ModelLoader
from .service import DecodeService

router = APIRouter(tags=["kserve-v2"])
models = APIRouter(
    dependencies=[Depends(check_api_key)],
    tags=["kserve-v2"],
    responses=error_responses((401, 404, 500), "v2"),
)
# Health and readiness answer with a status and no body (the protocol's form).
_PROBE = {
    "response_class": Response,
    "responses": {200: {"description": "Yes."}, 503: {"description": "No."}},
}
_INFER_ERRORS = error_responses((400, 413, 415, 422, 429, 503, 504), "v2")
_METADATA_ERRORS = error_responses((503,), "v2")

HEADER_LENGTH = "inference-header-content-length"
VERSION = triton.VERSION


def _loader(request: Request) -> ModelLoader:
    return request.app.state.loader


def _model(request: Request, name: str) -> ModelLoader:
    """The served model, if `name` (and the optional {version} path segment) names it; else 404."""
    loader = _loader(request)
    version = request.path_params.get("version")
    if name != loader.name or (version not in (None, "", VERSION)):
        which = name if version in (None, "") else f"{name} version {version}"
        raise ApiError(404, f"unknown model '{which}'; this server serves '{loader.name}' version {VERSION}")
    return loader


@router.get("/v2")
async def server_metadata() -> dict:
    return {"name": "pidserve", "version": __version__, "extensions": triton.EXTENSIONS}


@router.get("/v1/health/live", **_PROBE)  # the NVIDIA NIM operator's default probe paths
@router.get("/v2/health/live", **_PROBE)
async def live(request: Request) -> Response:
    """200 while the process can serve or is loading; 503 once loading failed (restart the pod)."""
    failed = _loader(request).state == "failed"
    return Response(status_code=503 if failed else 200)


@router.get("/v1/health/ready", **_PROBE)
@router.get("/v2/health/ready", **_PROBE)
async def ready(request: Request) -> Response:
    return Response(status_code=200 if _loader(request).ready else 503)


# Before the /v2/models/{name} routes, which would take "stats" for a model name.
@models.get("/v2/models/stats")
async def all_model_stats(request: Request) -> dict:
    """Triton's statistics of every served model (here: one)."""
    return triton.model_stats(_loader(request))


@models.get("/v2/models/{name}/ready", **_PROBE)
async def model_ready(request: Request, name: str) -> Response:
    return Response(status_code=200 if _model(request, name).ready else 503)


@models.get("/v2/models/{name}", responses=_METADATA_ERRORS)
async def model_metadata(request: Request, name: str) -> dict:
    return triton.model_metadata(_model(request, name))


@models.post("/v2/models/{name}/infer", openapi_extra=INFER_BODY, responses=_INFER_ERRORS)
async def infer(request: Request, name: str) -> Response:
    started = time.monotonic()
    loader = _model(request, name)
    service: DecodeService = request.app.state.service
    service.require_ready()
    body = await read_body(request, loader.settings.max_body_bytes)
    # Off the event loop: a large JSON body takes seconds to parse, and health must still answer.
    with service.metrics.parse_seconds.time():
        infer_request, tensors = await asyncio.to_thread(_parse, body, request.headers.get(HEADER_LENGTH))
    outcome = await service.decode(
        infer_request.decode_request(tensors), disconnected=disconnect_watcher(request)
    )
    raw = outcome.bodies[0]  # uint8 [B, H, W, 3], C order
    output: dict = {"name": "image", "datatype": "UINT8", "shape": list(outcome.shape)}
    response: dict = {"model_name": loader.name, "model_version": VERSION, "outputs": [output]}
    if "id" in infer_request.model_fields_set:
        response["id"] = infer_request.id
    headers = {
        "Server-Timing": server_timing(
            {**outcome.timings, "total": time.monotonic() - started}, outcome.windows
        ),
        "X-Seed": ",".join(map(str, outcome.seeds)),
        "X-Batch-Size": ",".join(map(str, outcome.batch_sizes)),
    }
    if not infer_request.wants_binary:
        return Response(
            await asyncio.to_thread(_json_with_data, response, output, raw),
            media_type="application/json",
            headers=headers,
        )
    output["parameters"] = {"binary_data_size": len(raw)}
    head = json.dumps(response).encode()
    headers[HEADER_LENGTH] = str(len(head))
    return Response(head + raw, media_type="application/octet-stream", headers=headers)


def _parse(body: bytes, header_length: str | None) -> tuple[InferRequest, dict[str, torch.Tensor]]:
    infer_request, binary = parse_infer_request(body, header_length)
    return infer_request, infer_request.tensors(binary)


def _json_with_data(response: dict, output: dict, raw: bytes) -> bytes:
    """The response as JSON with the image as a list of numbers (12 M of them at 2048²: seconds)."""
    output["data"] = np.frombuffer(raw, dtype=np.uint8).tolist()
    return json.dumps(response).encode()


@models.get("/v2/models/{name}/config", responses=_METADATA_ERRORS)
async def model_config(request: Request, name: str) -> dict:
    """Triton's model configuration (what perf_analyzer and tritonclient's get_model_config read)."""
    return triton.model_config(_model(request, name))


@models.get("/v2/models/{name}/stats")
async def model_stats(request: Request, name: str) -> dict:
    """Triton's statistics extension, from the same series as /metrics."""
    return triton.model_stats(_model(request, name))


# The same routes with an explicit version (only VERSION exists; `_model` checks the path segment).
@models.get("/v2/models/{name}/versions/{version}/ready", **_PROBE)
async def versioned_model_ready(request: Request, name: str, version: str) -> Response:
    return await model_ready(request, name)


@models.get("/v2/models/{name}/versions/{version}", responses=_METADATA_ERRORS)
async def versioned_model_metadata(request: Request, name: str, version: str) -> dict:
    return await model_metadata(request, name)


@models.post("/v2/models/{name}/versions/{version}/infer", openapi_extra=INFER_BODY, responses=_INFER_ERRORS)
async def versioned_infer(request: Request, name: str, version: str) -> Response:
    return await infer(request, name)


@models.get("/v2/models/{name}/versions/{version}/config", responses=_METADATA_ERRORS)
async def versioned_model_config(request: Request, name: str, version: str) -> dict:
    return await model_config(request, name)


@models.get("/v2/models/{name}/versions/{version}/stats")
async def versioned_model_stats(request: Request, name: str, version: str) -> dict:
    return await model_stats(request, name)
