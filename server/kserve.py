"""KServe v2 / Open Inference Protocol routes, with Triton's binary tensor data extension.

    model "<name>": inputs  latent FP32|FP16 [B, C, h, w]; sigma FP32 [B] (optional, default 0);
                            seed INT64 [B] (optional)
                    outputs image UINT8 [B, H, W, 3]
    request parameters: steps (int, 4), prompt (string), timeout (microseconds, Triton's unit)

Binary extension: when the `Inference-Header-Content-Length: N` header is present, the first N bytes of the
body are the JSON request and the rest are the tensors with `parameters.binary_data_size`, in input order.
Outputs are returned the same way when the request asks for binary data (tritonclient's default). Errors use
the protocol's `{"error": "<message>"}` form.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import torch
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from pidserve import __version__

from .errors import ApiError, bad_request, unprocessable
from .http import check_api_key, disconnect_watcher, read_body, server_timing
from .service import DecodeRequest, DecodeService

router = APIRouter(tags=["kserve-v2"])
models = APIRouter(dependencies=[Depends(check_api_key)], tags=["kserve-v2"])

HEADER_LENGTH = "inference-header-content-length"
VERSION = "1"
# Wire datatypes -> numpy dtype, for the inputs we accept.
DATATYPES = {"FP32": np.float32, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32, "UINT8": np.uint8}
ACCEPTED = {"latent": ("FP32", "FP16"), "sigma": ("FP32",), "seed": ("INT64", "INT32")}
# Request parameters tritonclient may send that do not change a decode.
IGNORED_PARAMETERS = {"binary_data_output", "priority", "sequence_id", "sequence_start", "sequence_end"}


def _service(request: Request) -> DecodeService:
    return request.app.state.service


def _model(request: Request, name: str) -> DecodeService:
    """The served model, if `name` (and the optional {version} path segment) names it; else 404."""
    service = _service(request)
    version = request.path_params.get("version")
    if name != service.name or (version not in (None, "", VERSION)):
        which = name if version in (None, "") else f"{name} version {version}"
        raise ApiError(404, f"unknown model '{which}'; this server serves '{service.name}' version {VERSION}")
    return service


@router.get("/v2")
async def server_metadata() -> dict:
    return {"name": "pidserve", "version": __version__, "extensions": ["binary_tensor_data"]}


@router.get("/v2/health/live")
async def live(request: Request) -> Response:
    """200 while the process can serve or is loading; 503 once loading failed (restart the pod)."""
    failed = _service(request).state == "failed"
    return Response(status_code=503 if failed else 200)


@router.get("/v2/health/ready")
async def ready(request: Request) -> Response:
    return Response(status_code=200 if _service(request).ready else 503)


@models.get("/v2/models/{name}/ready")
async def model_ready(request: Request, name: str) -> Response:
    return Response(status_code=200 if _model(request, name).ready else 503)


@models.get("/v2/models/{name}")
async def model_metadata(request: Request, name: str) -> dict:
    service = _model(request, name)
    info = service.require_ready()
    return {
        "name": service.name,
        "versions": [VERSION],
        "platform": f"pidserve_{info.backend}",
        "inputs": [
            {"name": "latent", "datatype": "FP32", "shape": [-1, info.latent_channels, -1, -1]},
            {"name": "sigma", "datatype": "FP32", "shape": [-1], "optional": True},
            {"name": "seed", "datatype": "INT64", "shape": [-1], "optional": True},
        ],
        "outputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, -1, -1, 3]}],
    }


_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string", "enum": list(ACCEPTED)},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 64}},
        "datatype": {"type": "string", "enum": sorted({t for types in ACCEPTED.values() for t in types})},
        "data": {"type": "array", "items": {"type": "number"}},
        "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer"}}},
    },
}
INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {
                            "type": "object",
                            "properties": {
                                "steps": {"type": "integer"},
                                "prompt": {"type": "string"},
                                "timeout": {"type": "integer"},
                            },
                        },
                        "inputs": {"type": "array", "items": _TENSOR, "maxItems": 3},
                        "outputs": {"type": "array", "items": {"type": "object"}},
                    },
                }
            }
        },
    }
}


@models.post("/v2/models/{name}/infer", openapi_extra=INFER_BODY)
async def infer(request: Request, name: str) -> Response:
    started = time.monotonic()
    service = _model(request, name)
    service.require_ready()
    body = await read_body(request, service.settings.max_body_bytes)
    document, binary = _split(body, request.headers.get(HEADER_LENGTH))
    tensors = _read_inputs(document, binary)
    params = _parameters(document)
    if "latent" not in tensors:
        raise unprocessable("the request needs an input named 'latent' (FP32 or FP16 [B, C, h, w])")
    outcome = await service.decode(
        DecodeRequest(
            latents=tensors["latent"].float(),
            sigmas=tensors.get("sigma"),
            seeds=tensors["seed"].to(torch.int64) if "seed" in tensors else None,
            steps=params["steps"],
            prompt=params["prompt"],
            timeout_s=params["timeout_s"],
        ),
        disconnected=disconnect_watcher(request),
    )
    images = outcome.images
    output: dict = {"name": "image", "datatype": "UINT8", "shape": list(images.shape)}
    response: dict = {"model_name": service.name, "model_version": VERSION, "outputs": [output]}
    if "id" in document:
        response["id"] = document["id"]
    headers = {
        "Server-Timing": server_timing({**outcome.timings, "total": time.monotonic() - started}),
        "X-Seed": ",".join(map(str, outcome.seeds)),
        "X-Batch-Size": ",".join(map(str, outcome.batch_sizes)),
    }
    if not _wants_binary(document):
        output["data"] = images.reshape(-1).tolist()
        return JSONResponse(response, headers=headers)
    raw = np.ascontiguousarray(images).tobytes()
    output["parameters"] = {"binary_data_size": len(raw)}
    head = json.dumps(response).encode()
    headers[HEADER_LENGTH] = str(len(head))
    return Response(head + raw, media_type="application/octet-stream", headers=headers)


# The same routes with an explicit version (only VERSION exists; `_model` checks the path segment).
@models.get("/v2/models/{name}/versions/{version}/ready")
async def versioned_model_ready(request: Request, name: str, version: str) -> Response:
    return await model_ready(request, name)


@models.get("/v2/models/{name}/versions/{version}")
async def versioned_model_metadata(request: Request, name: str, version: str) -> dict:
    return await model_metadata(request, name)


@models.post("/v2/models/{name}/versions/{version}/infer", openapi_extra=INFER_BODY)
async def versioned_infer(request: Request, name: str, version: str) -> Response:
    return await infer(request, name)


def _split(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    if header_length is None:
        json_part, binary = body, b""
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise bad_request(
                f"Inference-Header-Content-Length {header_length!r} must be the byte length of the JSON "
                f"header, at most the body's {len(body)} bytes"
            )
        json_part, binary = body[: int(header_length)], body[int(header_length) :]
    try:
        document = json.loads(json_part)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"the inference request is not valid JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("inputs"), list):
        raise bad_request('the inference request must be a JSON object with an "inputs" list')
    return document, binary


def _read_inputs(document: dict, binary: bytes) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    offset = 0
    for spec in document["inputs"]:
        if not isinstance(spec, dict):
            raise bad_request("each input must be an object with name, shape, datatype and data")
        name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
        if name not in ACCEPTED:
            raise unprocessable(
                f"unknown input {name!r}; inputs are latent, sigma (optional), seed (optional)"
            )
        if name in tensors:
            raise unprocessable(f"input {name!r} is given twice")
        if datatype not in ACCEPTED[name]:
            raise unprocessable(f"input {name!r} must be {' or '.join(ACCEPTED[name])}; got {datatype!r}")
        if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise unprocessable(f"input {name!r} needs a shape: a list of non-negative integers")
        dtype = np.dtype(DATATYPES[datatype]).newbyteorder("<")
        count = math.prod(shape)
        size = (spec.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size != count * dtype.itemsize or offset + size > len(binary):
                raise unprocessable(
                    f"input {name!r}: binary_data_size {size!r} does not match shape {shape} of {datatype} "
                    f"({count * dtype.itemsize} bytes) or the {len(binary) - offset} bytes left in the body"
                )
            array = np.frombuffer(binary, dtype=dtype, count=count, offset=offset).reshape(shape)
            offset += size
        elif "data" in spec:
            try:
                array = np.asarray(spec["data"], dtype=dtype)
            except (TypeError, ValueError, OverflowError):
                raise unprocessable(f"input {name!r}: data must be numbers of type {datatype}") from None
            if array.size != count:
                raise unprocessable(f"input {name!r}: {array.size} values given for shape {shape}")
            array = array.reshape(shape)
        else:
            raise unprocessable(f"input {name!r} has neither data nor parameters.binary_data_size")
        tensors[name] = torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))
    if offset != len(binary):
        raise unprocessable(f"{len(binary) - offset} bytes of binary data are not claimed by any input")
    return tensors


def _parameters(document: dict) -> dict:
    params = document.get("parameters") or {}
    if not isinstance(params, dict):
        raise bad_request('"parameters" must be an object')
    unknown = set(params) - IGNORED_PARAMETERS - {"steps", "prompt", "timeout"}
    if unknown:
        raise unprocessable(f"unknown parameters {sorted(unknown)}; supported: steps, prompt, timeout")
    steps, prompt, timeout = params.get("steps", 4), params.get("prompt"), params.get("timeout")
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= 4:
        raise unprocessable(f"parameter steps must be an integer 1-4; got {steps!r}")
    if prompt is not None and not isinstance(prompt, str):
        raise unprocessable("parameter prompt must be a string")
    if timeout is not None and (not isinstance(timeout, int) or isinstance(timeout, bool) or timeout <= 0):
        raise unprocessable("parameter timeout must be a positive integer (microseconds)")
    return {"steps": steps, "prompt": prompt, "timeout_s": None if timeout is None else timeout / 1e6}


def _wants_binary(document: dict) -> bool:
    outputs = document.get("outputs")
    if isinstance(outputs, list) and outputs:
        for spec in outputs:
            if not isinstance(spec, dict) or spec.get("name") != "image":
                raise unprocessable("the only output is 'image'")
        return bool((outputs[0].get("parameters") or {}).get("binary_data", False))
    return bool((document.get("parameters") or {}).get("binary_data_output", False))
