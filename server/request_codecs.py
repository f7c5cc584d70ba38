"""Request bodies -> latent tensors at the HTTP edge (/v1/decode). Pure functions, no I/O.

Request bodies (`read_latent_body`), by Content-Type:
    application/x-safetensors  tensor "latent" [B,C,h,w] or [C,h,w]; optional "sigma", "seed" ([B] or [])
    application/x-npy          one .npy array (allow_pickle=False: object arrays are refused, never unpickled)
    application/octet-stream   raw little-endian bytes; headers X-Latent-Shape "1,16,32,32", X-Latent-Dtype
    application/json           {"latent": {"data": base64, "shape": [...], "dtype": "float32"} or nested
                                lists, "sigma": 0.3 | [...], "seed": 7 | [...]}
Every failure is an ApiError whose message says what to send instead.

Output encoders are in image_encoders.py (no torch there: they also run in the encoder processes);
KServe v2 requests are parsed by kserve_models.py.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from .errors import ApiError, bad_request, unprocessable

SAFETENSORS = "application/x-safetensors"
NPY = "application/x-npy"
RAW = "application/octet-stream"
JSON = "application/json"
INPUT_MEDIA_TYPES = (SAFETENSORS, NPY, RAW, JSON)

# Wire dtypes of latents: name -> torch dtype (all are converted to float32 before decoding).
LATENT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LatentPayload:
    """A request's latents and what the body said about them (None: not in the body)."""

    latent: torch.Tensor  # float32 [B, C, h, w]
    sigma: torch.Tensor | None = None  # float32 [B] or [] (one value for all)
    seed: torch.Tensor | None = None  # int64 [B] or []


def media_type(content_type: str | None) -> str:
    """'application/json; charset=utf-8' -> 'application/json'."""
    return (content_type or "").split(";")[0].strip().lower()


def read_latent_body(content_type: str | None, body: bytes, headers: Mapping[str, str]) -> LatentPayload:
    kind = media_type(content_type)
    if not body:
        raise bad_request("the request body is empty; send the latent (see /docs for the accepted formats)")
    if kind == SAFETENSORS:
        return _from_safetensors(body)
    if kind == NPY:
        return LatentPayload(_as_latent(_from_npy(body), "the .npy array"))
    if kind == RAW:
        return LatentPayload(_from_raw(body, headers.get("x-latent-shape"), headers.get("x-latent-dtype")))
    if kind == JSON:
        return _from_json(body)
    raise ApiError(
        415,
        f"Content-Type {kind or '(none)'!r} is not accepted; send the latent as "
        + ", ".join(INPUT_MEDIA_TYPES)
        + " (raw bytes need X-Latent-Shape and X-Latent-Dtype headers)",
    )


def _as_latent(tensor: torch.Tensor, what: str) -> torch.Tensor:
    if not tensor.is_floating_point():
        raise unprocessable(f"{what} has dtype {tensor.dtype}; latents are float32, float16 or bfloat16")
    if tensor.ndim == 3:
        tensor = tensor[None]
    if tensor.ndim != 4:
        raise unprocessable(f"{what} has shape {list(tensor.shape)}; latents are [B, C, h, w] or [C, h, w]")
    return tensor.to(torch.float32).contiguous()


def _small_tensor(value: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
    if value.ndim > 1:
        raise unprocessable(f"'{name}' must be a scalar or a [B] vector; got shape {list(value.shape)}")
    if dtype.is_floating_point and not value.is_floating_point() and value.dtype != torch.bool:
        value = value.to(torch.float32)
    if not dtype.is_floating_point and value.is_floating_point():
        raise unprocessable(f"'{name}' must hold integers; got dtype {value.dtype}")
    return value.to(dtype)


def _from_safetensors(body: bytes) -> LatentPayload:
    try:
        tensors = load_safetensors(body)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise bad_request(f"the body is not a valid safetensors file: {exc}") from None
    if "latent" not in tensors:
        found = ", ".join(sorted(tensors)) or "none"
        raise unprocessable(f"the safetensors body needs a tensor named 'latent' (found: {found})")
    unknown = set(tensors) - {"latent", "sigma", "seed"}
    if unknown:
        raise unprocessable(
            f"unexpected tensors {sorted(unknown)} in the safetensors body; allowed: latent, sigma, seed"
        )
    sigma = tensors.get("sigma")
    seed = tensors.get("seed")
    return LatentPayload(
        _as_latent(tensors["latent"], "tensor 'latent'"),
        None if sigma is None else _small_tensor(sigma, "sigma", torch.float32),
        None if seed is None else _small_tensor(seed, "seed", torch.int64),
    )


def _from_npy(body: bytes) -> torch.Tensor:
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise bad_request(
            f"the body is not a plain .npy array ({exc}); save it with np.save, no pickles"
        ) from None
    if not isinstance(array, np.ndarray):
        raise bad_request("the body is an .npz archive; send one .npy array")
    if array.dtype.kind != "f" or array.dtype.itemsize not in (2, 4, 8):
        raise unprocessable(f"the .npy array has dtype {array.dtype}; latents are float32 or float16")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("=")))


def _parse_shape(text: str | None, header: str) -> list[int]:
    if not text:
        raise bad_request(f"raw latents need the {header} header, e.g. '{header}: 1,16,32,32'")
    try:
        shape = [int(part) for part in text.replace("x", ",").split(",") if part.strip()]
    except ValueError:
        raise bad_request(
            f"{header} must be comma-separated integers like 1,16,32,32; got {text!r}"
        ) from None
    if not 3 <= len(shape) <= 4 or min(shape) < 1:
        raise unprocessable(f"{header} {text!r} is not a latent shape [B, C, h, w] or [C, h, w]")
    return shape


def _from_raw(body: bytes, shape_text: str | None, dtype_text: str | None) -> torch.Tensor:
    shape = _parse_shape(shape_text, "X-Latent-Shape")
    dtype_name = (dtype_text or "float32").strip().lower()
    if dtype_name not in LATENT_DTYPES:
        raise unprocessable(f"X-Latent-Dtype {dtype_text!r} is not one of {', '.join(LATENT_DTYPES)}")
    dtype = LATENT_DTYPES[dtype_name]
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if len(body) != expected:
        raise unprocessable(
            f"X-Latent-Shape {shape} in {dtype_name} is {expected} bytes; the body has {len(body)} bytes"
        )
    tensor = torch.frombuffer(bytearray(body), dtype=dtype).reshape(shape)
    return _as_latent(tensor, "the raw latent")


def _from_json(body: bytes) -> LatentPayload:
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"the body is not valid JSON: {exc}") from None
    if not isinstance(document, dict) or "latent" not in document:
        raise unprocessable('the JSON body must be an object with a "latent" field')
    unknown = set(document) - {"latent", "sigma", "seed"}
    if unknown:
        raise unprocessable(f"unexpected JSON fields {sorted(unknown)}; allowed: latent, sigma, seed")
    latent = document["latent"]
    if isinstance(latent, dict):
        tensor = _from_base64(latent)
    elif isinstance(latent, list):
        tensor = _from_nested_list(latent, "latent", torch.float32)
    else:
        raise unprocessable('"latent" must be {"data": base64, "shape": [...], "dtype": ...} or nested lists')
    return LatentPayload(
        _as_latent(tensor, '"latent"'),
        _json_scalar_or_list(document.get("sigma"), "sigma", torch.float32),
        _json_scalar_or_list(document.get("seed"), "seed", torch.int64),
    )


def _from_base64(field: dict) -> torch.Tensor:
    if not isinstance(field.get("data"), str):
        raise unprocessable('"latent.data" must be a base64 string of the little-endian tensor bytes')
    try:
        raw = base64.b64decode(field["data"], validate=True)
    except (binascii.Error, ValueError):
        raise bad_request('"latent.data" is not valid base64') from None
    shape = field.get("shape")
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) for n in shape):
        raise unprocessable('"latent.shape" must be a list of integers like [1, 16, 32, 32]')
    dtype = field.get("dtype", "float32")
    return _from_raw(raw, ",".join(map(str, shape)) or None, dtype if isinstance(dtype, str) else None)


def _from_nested_list(value: list, name: str, dtype: torch.dtype) -> torch.Tensor:
    try:
        return torch.tensor(value, dtype=dtype)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise unprocessable(f'"{name}" must be a rectangular nested list of numbers') from None


def _json_scalar_or_list(value: object, name: str, dtype: torch.dtype) -> torch.Tensor | None:
    if value is None:
        return None
    numbers = value if isinstance(value, list) else [value]
    valid = (float, int) if dtype.is_floating_point else (int,)
    if not all(isinstance(v, valid) and not isinstance(v, bool) for v in numbers):
        kind = "numbers" if dtype.is_floating_point else "integers"
        raise unprocessable(f'"{name}" must be one of {kind} or a list of them; got {value!r}')
    tensor = _from_nested_list(numbers, name, dtype)
    return tensor if isinstance(value, list) else tensor.reshape(())
