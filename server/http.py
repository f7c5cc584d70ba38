"""HTTP helpers shared by the routes: bounded body reads, auth, client-disconnect watch, Server-Timing."""

from __future__ import annotations

import asyncio
import hmac
import zlib

from fastapi import Request
from starlette.requests import ClientDisconnect

from .errors import ApiError, ascii_integer, bad_request, client_closed, too_large


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds `limit` bytes (gzip/deflate decoded)."""
    declared = ascii_integer(request.headers.get("content-length"))
    if declared is not None and declared > limit:
        raise too_large(f"the body is {declared} bytes; the limit is {limit} bytes")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(f"the body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise client_closed() from None
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise ApiError(415, f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none")
    return await asyncio.to_thread(_inflate, body, encoding, limit)  # up to `limit` bytes of inflating


def _inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """Decompress, never past `limit` bytes (a small gzip body can expand to gigabytes)."""
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise bad_request(f"the body is not valid {encoding} data: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise too_large(f"the decompressed body exceeds the limit of {limit} bytes")
    return out


def check_api_key(request: Request) -> None:
    """Enforce `Authorization: Bearer <key>` when the server has a key; constant-time comparison."""
    expected: bytes | None = request.app.state.api_key
    if expected is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
        raise ApiError(
            401,
            "this server needs an API key: send 'Authorization: Bearer <key>'",
            code="unauthorized",
            headers={"WWW-Authenticate": 'Bearer realm="pidserve"'},
        )


def disconnect_watcher(request: Request):
    """An awaitable factory that returns when the client closes its connection (after the body was read)."""

    async def wait() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    return wait


def server_timing(timings: dict[str, float], windows: int = 1) -> str:
    """{"queue": 0.0012, ...} -> 'queue;dur=1.2, ...' (milliseconds, the Server-Timing convention);
    a tiled decode adds 'windows;desc="9"' (windows per image)."""
    entries = [f"{name};dur={seconds * 1e3:.1f}" for name, seconds in timings.items()]
    if windows > 1:
        entries.append(f'windows;desc="{windows}"')
    return ", ".join(entries)
