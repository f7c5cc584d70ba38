"""One exception for every client-visible failure, and the JSON body it becomes.

/v1 and the rest:  {"error": {"code": "unsupported_media_type", "message": "..."}}
/v2 (KServe v2):   {"error": "..."}   (the Open Inference Protocol's form, which tritonclient parses)
"""

from __future__ import annotations

import re
from http import HTTPStatus

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class ApiError(Exception):
    """A request that fails with `status`; `message` says what to fix."""

    def __init__(self, status: int, message: str, *, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
        self.headers = headers or {}


def bad_request(message: str) -> ApiError:
    return ApiError(400, message)


def unprocessable(message: str) -> ApiError:
    return ApiError(422, message, code="invalid_input")


def too_large(message: str) -> ApiError:
    return ApiError(413, message)


def client_closed() -> ApiError:
    """499 (nginx's code): the client went away; nobody reads the response, the logs and metrics do."""
    return ApiError(499, "the client closed the connection", code="client_closed")


def error_body(path: str, code: str, message: str) -> dict:
    """The JSON error body of a route: the Open Inference Protocol's form under /v2, ours elsewhere."""
    return {"error": message} if path.startswith("/v2") else {"error": {"code": code, "message": message}}


def error_response(request: Request, status: int, code: str, message: str, headers: dict | None = None):
    return JSONResponse(error_body(request.url.path, code, message), status_code=status, headers=headers)


def ascii_integer(text: str | None) -> int | None:
    """A header's non-negative integer, or None unless it is 1-19 ASCII digits (str.isdigit accepts
    '²' and other Unicode digits, which int() then refuses)."""
    if text is None or not re.fullmatch(r"[0-9]{1,19}", text.strip()):
        return None
    return int(text)


async def handle_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(request, exc.status, exc.code, exc.message, exc.headers)


async def handle_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_")
    return error_response(request, exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))


async def handle_validation_error(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's parameter validation, said in one line per problem."""
    assert isinstance(exc, RequestValidationError)
    problems = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err.get("loc", ()))
        problems.append(f"{where}: {err.get('msg', 'invalid')}")
    return error_response(request, 422, "invalid_input", "; ".join(problems) or "invalid request")


# The error responses each route family documents in OpenAPI, with what each status means there.
_V1_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        }
    },
}
_V2_ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
STATUS_MEANINGS = {
    400: "The body is not what its Content-Type says (broken JSON, safetensors, npy, base64).",
    401: "The server has an API key: send 'Authorization: Bearer <key>'.",
    404: "No such model or version.",
    413: "Over a limit: body bytes, latents per request, output pixels or pixel-steps.",
    415: "Unsupported Content-Type or Content-Encoding.",
    422: "A well-formed request the model cannot decode (shape, dtype, sigma, seed, steps, ...).",
    429: "The queue is full; retry after Retry-After seconds.",
    500: "The engine failed on this latent, or an internal error (the message has the request id).",
    503: "Not ready (loading, shutting down, encoder processes lost); retry after Retry-After.",
    504: "The request's deadline passed before its images were ready.",
}


def error_responses(statuses: tuple[int, ...], protocol: str = "v1") -> dict[int, dict]:
    """OpenAPI `responses` for `statuses`, with the error body of `protocol` ("v1" or "v2")."""
    schema = _V2_ERROR_SCHEMA if protocol == "v2" else _V1_ERROR_SCHEMA
    return {
        status: {"description": STATUS_MEANINGS[status], "content": {"application/json": {"schema": schema}}}
        for status in statuses
    }


def install_error_handlers(app) -> None:
    app.add_exception_handler(ApiError, handle_api_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_exception)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
