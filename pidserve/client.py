"""A small client for the decode service, for upstream generators: sync `Client` and async `AsyncClient`.

    from pidserve.client import Client
    with Client("http://127.0.0.1:8000") as client:
        result = client.decode(latent, sigma=0.0, seed=7)      # latent: numpy or torch, [B,C,h,w] or [C,h,w]
        result.save("out.png")                                # or result.images(): uint8 [B, H, W, 3]

Latents travel as safetensors (float32/float16, no base64). Errors raise `ServerError` with the server's
status, code and message. Depends on httpx, numpy and safetensors only (not on torch or the server).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

FORMATS = ("png", "jpeg", "webp", "raw", "safetensors")


class ServerError(Exception):
    """The server refused or failed a request."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


@dataclass
class DecodeResult:
    content: bytes
    media_type: str
    seeds: list[int]
    timings_ms: dict[str, float]  # Server-Timing: queue, compute, encode, total
    batch_sizes: list[int]  # the engine batch each latent ran in
    request_id: str
    shape: tuple[int, ...] | None = None  # raw/safetensors: [B, H, W, 3]

    def encoded(self) -> list[bytes]:
        """One encoded image per latent (png/jpeg/webp)."""
        if self.media_type.startswith("multipart/"):
            return parse_multipart(self.content, self.media_type)
        if self.media_type.startswith("image/"):
            return [self.content]
        raise ValueError(f"a {self.media_type} response holds tensors; use images()")

    def images(self) -> np.ndarray:
        """uint8 [B, H, W, 3], whatever the format."""
        if self.media_type == "application/x-safetensors":
            return load_safetensors(self.content)["images"]
        if self.media_type == "application/octet-stream":
            return np.frombuffer(self.content, dtype=np.uint8).reshape(self.shape)
        from PIL import Image

        return np.stack([np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in self.encoded()])

    def save(self, path: str | Path) -> list[Path]:
        """Write the image(s): path, or path_0, path_1, ... for a batch. Returns the paths written."""
        path = Path(path)
        if self.media_type.startswith(("image/", "multipart/")):
            blobs = self.encoded()
        else:
            from PIL import Image

            blobs = []
            for image in self.images():
                out = io.BytesIO()
                Image.fromarray(image).save(out, "PNG")
                blobs.append(out.getvalue())
        paths = (
            [path]
            if len(blobs) == 1
            else [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(len(blobs))]
        )
        for blob, target in zip(blobs, paths, strict=True):
            target.write_bytes(blob)
        return paths


def parse_multipart(body: bytes, content_type: str) -> list[bytes]:
    """The parts of the server's multipart/mixed batch response, in batch order."""
    boundary = content_type.split("boundary=", 1)[1].strip().strip('"').encode()
    parts = []
    for section in body.split(b"--" + boundary)[1:]:
        if section.startswith(b"--"):
            break
        head, _, payload = section.partition(b"\r\n\r\n")
        lengths = [
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ]
        parts.append(payload[: lengths[0]] if lengths else payload.rstrip(b"\r\n"))
    return parts


def _as_array(value: Any, dtype: type) -> np.ndarray:
    """numpy or torch (any device, bfloat16 included) -> a C-contiguous numpy array of `dtype`."""
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().float().cpu().numpy() if dtype is np.float32 else value.detach().cpu().numpy()
    array = np.ascontiguousarray(np.asarray(value))
    if dtype is np.float32 and array.dtype == np.float16:
        return array
    return array.astype(dtype, copy=False)


def _request(latent: Any, sigma: Any, seed: Any, steps: int, prompt: str | None, fmt: str,
             quality: int | None, timeout: float | None, tile: str | None) -> tuple[dict, bytes]:  # fmt: skip
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    tensors = {"latent": _as_array(latent, np.float32)}
    params: dict[str, Any] = {"steps": steps, "format": fmt}
    if sigma is not None:
        if np.ndim(sigma) == 0:
            params["sigma"] = float(sigma)
        else:
            tensors["sigma"] = _as_array(sigma, np.float32)
    if seed is not None:
        if np.ndim(seed) == 0:
            params["seed"] = int(seed)
        else:
            tensors["seed"] = _as_array(seed, np.int64)
    for name, value in (("prompt", prompt), ("quality", quality), ("timeout", timeout), ("tile", tile)):
        if value is not None:
            params[name] = value
    return params, save_safetensors(tensors)


def _result(response: httpx.Response) -> DecodeResult:
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
            code, message = (
                (error["code"], error["message"]) if isinstance(error, dict) else ("error", str(error))
            )
        except (ValueError, KeyError, TypeError):
            code, message = "error", response.text[:500]
        retry = response.headers.get("retry-after")
        raise ServerError(response.status_code, code, message, float(retry) if retry else None)
    headers = response.headers
    timings = {}
    for item in headers.get("server-timing", "").split(","):
        name, _, dur = item.strip().partition(";dur=")
        if name and dur:
            timings[name] = float(dur)
    shape = headers.get("x-image-shape")
    return DecodeResult(
        content=response.content,
        media_type=headers.get("content-type", ""),
        seeds=[int(s) for s in headers.get("x-seed", "").split(",") if s],
        timings_ms=timings,
        batch_sizes=[int(s) for s in headers.get("x-batch-size", "").split(",") if s],
        request_id=headers.get("x-request-id", ""),
        shape=tuple(int(n) for n in shape.split(",")) if shape else None,
    )


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class Client:
    """Blocking client. `timeout` is the HTTP timeout in seconds (decodes of large batches take a while)."""

    def __init__(
        self, url: str = "http://127.0.0.1:8000", *, api_key: str | None = None, timeout: float = 300.0
    ):
        self._http = httpx.Client(base_url=url, headers=_headers(api_key), timeout=timeout)

    def decode(self, latent: Any, *, sigma: Any = None, seed: Any = None, steps: int = 4,
               prompt: str | None = None, format: str = "png", quality: int | None = None,
               timeout: float | None = None, tile: str | None = None) -> DecodeResult:  # fmt: skip
        """Decode a latent [C,h,w] or batch [B,C,h,w]; scalar sigma/seed apply to all (latent i: seed + i).
        tile: off, auto, HxW or HxW:OVERLAP (how the server cuts the output into windows; None: its own)."""
        params, body = _request(latent, sigma, seed, steps, prompt, format, quality, timeout, tile)
        response = self._http.post(
            "/v1/decode", params=params, content=body, headers={"Content-Type": "application/x-safetensors"}
        )
        return _result(response)

    def models(self) -> dict:
        response = self._http.get("/v1/models")
        if response.status_code >= 400:
            _result(response)
        return response.json()

    def ready(self) -> bool:
        return self._http.get("/v2/health/ready").status_code == 200

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """The same as `Client`, for asyncio code (many concurrent decodes share one connection pool)."""

    def __init__(
        self, url: str = "http://127.0.0.1:8000", *, api_key: str | None = None, timeout: float = 300.0
    ):
        self._http = httpx.AsyncClient(base_url=url, headers=_headers(api_key), timeout=timeout)

    async def decode(self, latent: Any, *, sigma: Any = None, seed: Any = None, steps: int = 4,
                     prompt: str | None = None, format: str = "png", quality: int | None = None,
                     timeout: float | None = None, tile: str | None = None) -> DecodeResult:  # fmt: skip
        params, body = _request(latent, sigma, seed, steps, prompt, format, quality, timeout, tile)
        response = await self._http.post(
            "/v1/decode", params=params, content=body, headers={"Content-Type": "application/x-safetensors"}
        )
        return _result(response)

    async def models(self) -> dict:
        response = await self._http.get("/v1/models")
        if response.status_code >= 400:
            _result(response)
        return response.json()

    async def ready(self) -> bool:
        return (await self._http.get("/v2/health/ready")).status_code == 200

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
