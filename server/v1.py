"""The native API: POST /v1/decode and GET /v1/models."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BeforeValidator

from pidserve.engines import MAX_SEED
from pidserve.model import MAX_STUDENT_STEPS

from . import remote_decode, request_codecs
from .errors import error_responses, unprocessable
from .http import check_api_key, disconnect_watcher, read_body, server_timing
from .image_encoders import MEDIA_TYPES, multipart
from .loader import ModelLoader
from .service import TENSOR, DecodeRequest, DecodeService
from .settings import OutputFormat


def _digits_only(value: object) -> object:
    """Query integers as digits only: pydantic alone reads '2.0' as 2 and '²' fails late."""
    if isinstance(value, str) and not re.fullmatch(r"-?[0-9]{1,20}", value):
        raise ValueError("must be a whole number written in digits, e.g. 4")
    return value


# After Query(...) in each Annotated, so that the OpenAPI schema keeps Query's minimum and maximum.
DIGITS_ONLY = BeforeValidator(_digits_only)

router = APIRouter(
    dependencies=[Depends(check_api_key)],
    tags=["decode"],
    responses=error_responses((401, 500)),  # every route here; /v1/decode adds its own below
)
DECODE_ERRORS = error_responses((400, 413, 415, 422, 429, 503, 504))

_BASE64_LATENT = {
    "type": "object",
    "required": ["data", "shape"],
    "properties": {
        "data": {"type": "string", "format": "byte", "description": "little-endian tensor bytes, base64"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}, "example": [1, 16, 8, 8]},
        "dtype": {"type": "string", "enum": list(request_codecs.LATENT_DTYPES), "default": "float32"},
    },
}
_NUMBER_OR_LIST = {"oneOf": [{"type": "number"}, {"type": "array", "items": {"type": "number"}}]}
_INT_OR_LIST = {"oneOf": [{"type": "integer"}, {"type": "array", "items": {"type": "integer"}}]}
DECODE_BODY = {
    "requestBody": {
        "required": True,
        "description": "The latent [B, C, h, w] or [C, h, w] (normalised, as the generator produced it).",
        "content": {
            request_codecs.SAFETENSORS: {
                "schema": {"type": "string", "format": "binary"},
                "example": "tensors 'latent', optional 'sigma' [B] and 'seed' [B]",
            },
            request_codecs.NPY: {"schema": {"type": "string", "format": "binary"}},
            request_codecs.RAW: {
                "schema": {"type": "string", "format": "binary"},
                "description": "raw bytes; headers X-Latent-Shape (e.g. 1,16,32,32) and X-Latent-Dtype",
            },
            request_codecs.JSON: {
                "schema": {
                    "type": "object",
                    "required": ["latent"],
                    "properties": {"latent": _BASE64_LATENT, "sigma": _NUMBER_OR_LIST, "seed": _INT_OR_LIST},
                }
            },
        },
    }
}
_IMAGE_RESPONSES = {
    200: {
        "description": "The image (one latent) or a multipart/mixed of images (a batch); raw and safetensors "
        "hold uint8 [B, H, W, 3]. Headers: Server-Timing, X-Request-ID, X-Seed, X-Batch-Size.",
        "content": {media: {} for media in {*MEDIA_TYPES.values(), "multipart/mixed"}},
    }
}


def _service(request: Request) -> DecodeService:
    return request.app.state.service


@router.post(
    "/v1/decode",
    openapi_extra=DECODE_BODY,
    responses={**_IMAGE_RESPONSES, **DECODE_ERRORS},
    response_class=Response,
)
async def decode(
    request: Request,
    latent_space: Annotated[str | None, Query(description="Checked against the served model's.")] = None,
    sigma: Annotated[
        float | None, Query(ge=0, le=1, description="The latent's noise level (0 = clean).")
    ] = None,
    seed: Annotated[
        int | None, Query(ge=0, le=MAX_SEED, description="Noise seed; latent i uses seed + i."), DIGITS_ONLY
    ] = None,
    steps: Annotated[
        int, Query(ge=1, le=MAX_STUDENT_STEPS, description="Student steps."), DIGITS_ONLY
    ] = MAX_STUDENT_STEPS,
    prompt: Annotated[
        str | None, Query(max_length=4000, description="Text for text-conditioned models.")
    ] = None,
    format: Annotated[OutputFormat | None, Query(description="Output format (default: png).")] = None,
    quality: Annotated[int | None, Query(ge=1, le=100, description="JPEG/WebP quality."), DIGITS_ONLY] = None,
    timeout: Annotated[float | None, Query(gt=0, le=3600, description="Deadline in seconds.")] = None,
    tile: Annotated[
        str | None,
        Query(
            max_length=32,
            description="How the output is cut into blended windows: off, auto, HxW or HxW:OVERLAP "
            "(default: the server's --tile).",
        ),
    ] = None,
) -> Response:
    """Decode a latent (or a small batch) into image(s)."""
    started = time.monotonic()
    service = _service(request)
    service.require_ready(latent_space)
    body = await read_body(request, service.settings.max_body_bytes)
    # Off the event loop: a large JSON or npy body takes seconds to parse, and health must still answer.
    with service.metrics.parse_seconds.time():
        payload = await asyncio.to_thread(
            request_codecs.read_latent_body, request.headers.get("content-type"), body, request.headers
        )
    if payload.sigma is not None and sigma is not None:
        raise unprocessable("sigma is given both in the body and in the query; give it once")
    if payload.seed is not None and seed is not None:
        raise unprocessable("seed is given both in the body and in the query; give it once")
    outcome = await service.decode(
        DecodeRequest(
            latents=payload.latent,
            sigmas=payload.sigma if payload.sigma is not None else sigma,
            seeds=payload.seed if payload.seed is not None else seed,
            steps=steps,
            prompt=prompt,
            timeout_s=timeout,
            output_format=format,
            quality=quality,
            tile=tile,
        ),
        disconnected=disconnect_watcher(request),
    )
    headers = {
        "Server-Timing": server_timing(
            {**outcome.timings, "total": time.monotonic() - started}, outcome.windows
        ),
        "X-Seed": ",".join(map(str, outcome.seeds)),
        "X-Batch-Size": ",".join(map(str, outcome.batch_sizes)),
    }
    media_type = MEDIA_TYPES[outcome.output_format]
    if outcome.output_format in ("raw", "safetensors"):
        headers["X-Image-Shape"] = ",".join(map(str, outcome.shape))
        headers["X-Image-Dtype"] = "uint8"
        return Response(outcome.bodies[0], media_type=media_type, headers=headers)
    if len(outcome.bodies) == 1:
        return Response(outcome.bodies[0], media_type=media_type, headers=headers)
    content, content_type = multipart(outcome.bodies, media_type)
    return Response(content, media_type=content_type, headers=headers)


@router.get("/v1/models")
async def models(request: Request) -> dict:
    """What is loaded, on which backend, and the service's limits."""
    loader: ModelLoader = request.app.state.loader
    settings = loader.settings
    info = loader.info
    return {
        "models": [
            {
                "name": loader.name,
                "state": loader.state,
                **(
                    {}
                    if info is None
                    else {
                        "latent_space": info.latent_space,
                        "latent_channels": info.latent_channels,
                        "output_scale": info.output_scale,
                        "backend": info.backend,
                        "device": info.device,
                        "precision": info.precision,
                        "max_batch": info.max_batch,
                        "steps": list(info.steps),
                        "prompts": info.prompts,
                    }
                ),
            }
        ],
        "limits": {
            "max_body_bytes": settings.max_body_bytes,
            "max_output_pixels": settings.request_limits().output_pixels,
            "max_pixel_steps": settings.request_limits().pixel_steps,
            "max_request_latents": settings.max_request_latents,
            "max_queue_size": settings.max_queue_size,
            "request_timeout_s": settings.request_timeout_s,
        },
        "formats": list(MEDIA_TYPES),
        "input_media_types": list(request_codecs.INPUT_MEDIA_TYPES),
    }


@router.post(
    "/v1/remote-decode",
    responses={200: {"description": "An image, or a tensor with shape/dtype headers"}, **DECODE_ERRORS},
    response_class=Response,
)
async def remote_decode_route(
    request: Request,
    shape: Annotated[
        list[str], Query(description="The tensor's shape (repeated, as requests sends a list).")
    ],
    dtype: Annotated[str, Query(description="float32, float16 or bfloat16")] = "float32",
    scaling_factor: Annotated[
        float | None, Query(description="raw = tensor / scaling_factor + shift_factor")
    ] = None,
    shift_factor: Annotated[float | None, Query()] = None,
    height: Annotated[int | None, Query(ge=1, description="Image height (packed latents).")] = None,
    width: Annotated[int | None, Query(ge=1, description="Image width (packed latents).")] = None,
    output_type: Annotated[str, Query(description="pil (one image) or pt (a tensor)")] = "pil",
    image_format: Annotated[str, Query(description="jpg or png (output_type pil)")] = "jpg",
    partial_postprocess: Annotated[
        bool, Query(description="pt: uint8 [B, H, W, 3] instead of float16")
    ] = False,
    do_scaling: Annotated[bool | None, Query(description="diffusers' deprecated flag; ignored")] = None,
    seed: Annotated[
        int,
        Query(
            ge=0,
            le=MAX_SEED,
            description="Noise seed; 0 unless the endpoint URL says ?seed= (a VAE is deterministic).",
        ),
        DIGITS_ONLY,
    ] = 0,
) -> Response:
    """diffusers' `remote_decode` protocol: a pipeline's latents in, its images out (remote_decode.py)."""
    started = time.monotonic()
    service = _service(request)
    info = service.require_ready()
    body = await read_body(request, service.settings.max_body_bytes)
    parsed_shape = remote_decode.parse_shape(shape)
    with service.metrics.parse_seconds.time():
        latents = await asyncio.to_thread(
            remote_decode.read_latent,
            body,
            parsed_shape,
            dtype,
            scaling_factor,
            shift_factor,
            height,
            width,
            info.latent_space,
            info.latent_downsample,
        )
    remote_decode.check_output(output_type, image_format, int(latents.shape[0]))
    fmt = remote_decode.IMAGE_FORMATS[image_format] if output_type == "pil" else TENSOR
    outcome = await service.decode(
        DecodeRequest(latents=latents, seeds=seed, output_format=fmt),
        disconnected=disconnect_watcher(request),
    )
    headers = {
        "Server-Timing": server_timing(
            {**outcome.timings, "total": time.monotonic() - started}, outcome.windows
        ),
        "X-Seed": ",".join(map(str, outcome.seeds)),
    }
    if output_type == "pil":
        return Response(outcome.bodies[0], media_type=MEDIA_TYPES[fmt], headers=headers)
    images = np.frombuffer(outcome.bodies[0], dtype=np.uint8).reshape(outcome.shape)
    content, tensor_headers = remote_decode.tensor_reply(images, partial_postprocess)
    return Response(content, media_type="tensor/binary", headers={**headers, **tensor_headers})
