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
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from pidserve.engines import MAX_SEED

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
        return LatentPayload(_from_raw(body, headers))
    if kind == JSON:
        return _from_json(body)
    raise ApiError(
        415,
        f"Content-Type {kind or '(none)'!r} is not accepted; send the latent as "
        + ", ".join(INPUT_MEDIA_TYPES)
        + " (raw bytes need X-Latent-Shape and X-Latent-Dtype headers)",
    )


def _as_latent(tensor: torch.Tensor, what: str) -> torch.Tensor:
    if tensor.dtype not in LATENT_DTYPES.values():
        hint = " (convert it: x.astype(np.float32) or x.float())" if tensor.dtype == torch.float64 else ""
        raise unprocessable(
            f"{what} has dtype {tensor.dtype}; latents are float32, float16 or bfloat16{hint}"
        )
    if tensor.ndim == 3:
        tensor = tensor[None]
    if tensor.ndim != 4:
        raise unprocessable(f"{what} has shape {list(tensor.shape)}; latents are [B, C, h, w] or [C, h, w]")
    return tensor.to(torch.float32).contiguous()


# Tensor dtypes a body's sigma and seed may have: numbers, never bool; seeds signed (a uint64 2**64-1
# would wrap to -1 in int64).
SIGMA_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SEED_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _small_tensor(value: torch.Tensor, name: str, allowed: tuple[torch.dtype, ...], dtype: torch.dtype):
    if value.ndim > 1:
        raise unprocessable(f"'{name}' must be a scalar or a [B] vector; got shape {list(value.shape)}")
    if value.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        kind = "numbers" if dtype.is_floating_point else "integers"
        raise unprocessable(f"'{name}' must hold {kind} ({names}); got dtype {value.dtype}")
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
        None if sigma is None else _small_tensor(sigma, "sigma", SIGMA_DTYPES, torch.float32),
        None if seed is None else _small_tensor(seed, "seed", SEED_DTYPES, torch.int64),
    )


_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def _from_npy(body: bytes) -> torch.Tensor:
    """One .npy array. Its header is read first, so a header declaring more bytes than the body holds
    (a 238 GiB array in a 100-byte body) is refused before anything is allocated."""
    stream = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = _NPY_HEADER_READERS.get(version)
        if read_header is None:
            raise ValueError(f".npy format version {version[0]}.{version[1]} (np.save writes 1.0)")
        shape, fortran_order, dtype = read_header(stream)
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        kind = "an .npz archive" if body.startswith(b"PK") else "not a plain .npy array"
        raise bad_request(f"the body is {kind} ({exc}); send one array saved with np.save") from None
    if dtype.hasobject:
        raise bad_request(
            "the .npy array holds Python objects; send a float32 array (pickles are never read)"
        )
    if dtype.kind != "f" or dtype.itemsize not in (2, 4):
        hint = " (convert it: x.astype(np.float32))" if dtype.kind == "f" else ""
        raise unprocessable(f"the .npy array has dtype {dtype}; latents are float32 or float16{hint}")
    expected = math.prod(shape) * dtype.itemsize
    if expected != len(body) - stream.tell():
        raise bad_request(
            f"the .npy header declares {list(shape)} {dtype} ({expected} bytes) but the body holds "
            f"{len(body) - stream.tell()} bytes of data"
        )
    array = np.frombuffer(body, dtype=dtype, count=math.prod(shape), offset=stream.tell())
    array = array.reshape(shape, order="F" if fortran_order else "C")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=dtype.newbyteorder("=")))


def _parse_shape(text: str | None, header: str) -> list[int]:
    if not text:
        raise bad_request(f"raw latents need the {header} header, e.g. '{header}: 1,16,32,32'")
    if not re.fullmatch(r"[0-9]{1,9}([,x][0-9]{1,9}){0,7}", text.replace(" ", "")):
        raise bad_request(f"{header} must be comma-separated integers like 1,16,32,32; got {text!r}")
    return [int(part) for part in re.split("[,x]", text.replace(" ", ""))]


def _from_raw(body: bytes, headers: Mapping[str, str]) -> torch.Tensor:
    shape = _parse_shape(headers.get("x-latent-shape"), "X-Latent-Shape")
    dtype_text = headers.get("x-latent-dtype")
    return _from_bytes(
        body, shape, "float32" if dtype_text is None else dtype_text, "X-Latent-Shape", "X-Latent-Dtype"
    )


def _from_bytes(
    body: bytes, shape: list[int], dtype_text: str, shape_name: str, dtype_name: str
) -> torch.Tensor:
    """Little-endian tensor bytes of `shape` and dtype `dtype_text`; the names are the fields or
    headers that carried them, for the messages."""
    if not 3 <= len(shape) <= 4 or min(shape) < 1:
        raise unprocessable(f"{shape_name} {shape} is not a latent shape [B, C, h, w] or [C, h, w]")
    dtype = LATENT_DTYPES.get(dtype_text.strip().lower())
    if dtype is None:
        raise unprocessable(f"{dtype_name} {dtype_text!r} is not one of {', '.join(LATENT_DTYPES)}")
    expected = math.prod(shape) * dtype.itemsize
    if len(body) != expected:
        raise unprocessable(
            f"{shape_name} {shape} in {dtype_text} is {expected} bytes; the data has {len(body)} bytes"
        )
    tensor = torch.frombuffer(bytearray(body), dtype=dtype).reshape(shape)
    return _as_latent(tensor, "the latent")


def _from_json(body: bytes) -> LatentPayload:
    try:
        document = json.loads(body)
    except RecursionError:  # deeper than Python's recursion limit (~1000): said as the depth check says it
        raise unprocessable(_TOO_DEEP) from None
    except ValueError as exc:  # JSONDecodeError, bad UTF-8, an integer of more than 4300 digits
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
        if _depth(latent) > 4:
            raise unprocessable(_TOO_DEEP)
        tensor = _from_nested_list(latent, "latent", torch.float32)
    else:
        raise unprocessable('"latent" must be {"data": base64, "shape": [...], "dtype": ...} or nested lists')
    return LatentPayload(
        _as_latent(tensor, '"latent"'),
        _json_scalar_or_list(document.get("sigma"), "sigma", torch.float32),
        _json_scalar_or_list(document.get("seed"), "seed", torch.int64),
    )


_TOO_DEEP = '"latent" is nested too deeply: a latent is [B, C, h, w] or [C, h, w], at most 4 lists deep'


def _depth(value: object) -> int:
    """How deep the first elements of nested lists go (what a rectangular array's rank would be)."""
    depth = 0
    while isinstance(value, list):
        depth += 1
        value = value[0] if value else None
    return depth


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
    if not isinstance(dtype, str):
        raise unprocessable(f'"latent.dtype" must be one of {", ".join(LATENT_DTYPES)}')
    return _from_bytes(raw, shape, dtype, '"latent.shape"', '"latent.dtype"')


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
    if not dtype.is_floating_point and not all(0 <= v <= MAX_SEED for v in numbers):
        raise unprocessable(f'"{name}" values are integers in 0..{MAX_SEED}; got {_short(value)}')
    tensor = _from_nested_list(numbers, name, dtype)
    return tensor if isinstance(value, list) else tensor.reshape(())


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
