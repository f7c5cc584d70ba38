"""Every bad input gets its status and a message that says what to fix; the next good request still works."""

from __future__ import annotations

import io
import json
import pickle

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import save as save_safetensors

from .conftest import latent

ST = {"Content-Type": "application/x-safetensors"}


def _st(**tensors: torch.Tensor) -> bytes:
    return save_safetensors(tensors)


def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=True)
    return out.getvalue()


class Evil:
    """Unpickling this would run code: the server must never unpickle."""

    def __reduce__(self):
        return (print, ("unpickled!",))


BAD_REQUESTS = {
    # name: (params, body, headers, status, words the message must contain)
    "body too large": ({}, b"\0" * (2 << 20), ST, 413, "limit"),
    "too many output pixels": ({}, _st(latent=latent(size=10)), ST, 413, "pixels"),
    "too many latents": ({}, _st(latent=latent(batch=5)), ST, 413, "split"),
    "unsupported content type": (
        {},
        b"hello",
        {"Content-Type": "text/plain"},
        415,
        "application/x-safetensors",
    ),
    "no content type": ({}, b"hello", {}, 415, "Content-Type"),
    "empty body": ({}, b"", ST, 400, "empty"),
    "broken safetensors": ({}, b"\x10\0\0\0\0\0\0\0{not json}xxxxxxx", ST, 400, "safetensors"),
    "missing latent tensor": ({}, _st(image=latent()), ST, 422, "'latent'"),
    "wrong channels": ({}, _st(latent=torch.randn(1, 4, 2, 2)), ST, 422, "16 channels"),
    "wrong rank": ({}, _st(latent=torch.randn(16, 2)), ST, 422, "[B, C, h, w]"),
    "integer latent": ({}, _st(latent=torch.ones(1, 16, 2, 2, dtype=torch.int32)), ST, 422, "float"),
    "non-finite latent": (
        {},
        _st(latent=latent().index_fill(2, torch.tensor([0]), float("nan"))),
        ST,
        422,
        "NaN",
    ),
    "sigma out of range (query)": ({"sigma": 1.5}, _st(latent=latent()), ST, 422, "sigma"),
    "sigma out of range (body)": ({}, _st(latent=latent(), sigma=torch.tensor([2.0])), ST, 422, "[0, 1]"),
    "sigma twice": ({"sigma": 0.1}, _st(latent=latent(), sigma=torch.tensor([0.1])), ST, 422, "once"),
    "seed count": ({}, _st(latent=latent(), seed=torch.tensor([1, 2])), ST, 422, "seed"),
    "float seed": ({}, _st(latent=latent(), seed=torch.tensor([1.5])), ST, 422, "integers"),
    "steps": ({"steps": 7}, _st(latent=latent()), ST, 422, "steps"),
    "format": ({"format": "gif"}, _st(latent=latent()), ST, 422, "format"),
    "latent space": ({"latent_space": "flux"}, _st(latent=latent()), ST, 422, "tiny-ae"),
    "prompt without text encoder": ({"prompt": "a cat"}, _st(latent=latent()), ST, 422, "omit 'prompt'"),
    "pickled npy": (
        {},
        _npy(np.array([Evil()], dtype=object)),
        {"Content-Type": "application/x-npy"},
        400,
        "pickle",
    ),
    "integer npy": (
        {},
        _npy(np.ones((1, 16, 2, 2), np.int64)),
        {"Content-Type": "application/x-npy"},
        422,
        "float",
    ),
    "raw without shape": (
        {},
        b"\0" * 256,
        {"Content-Type": "application/octet-stream"},
        400,
        "X-Latent-Shape",
    ),
    "raw size mismatch": (
        {},
        b"\0" * 100,
        {"Content-Type": "application/octet-stream", "X-Latent-Shape": "1,16,2,2"},
        422,
        "256 bytes",
    ),
    "raw dtype": (
        {},
        b"\0" * 256,
        {"Content-Type": "application/octet-stream", "X-Latent-Shape": "1,16,2,2", "X-Latent-Dtype": "int8"},
        422,
        "float32",
    ),
    "invalid json": ({}, b"{nope", {"Content-Type": "application/json"}, 400, "JSON"),
    "json without latent": ({}, b'{"sigma": 0}', {"Content-Type": "application/json"}, 422, '"latent"'),
    "json bad base64": (
        {},
        json.dumps({"latent": {"data": "@@@", "shape": [1, 16, 2, 2]}}).encode(),
        {"Content-Type": "application/json"},
        400,
        "base64",
    ),
    "json ragged lists": (
        {},
        b'{"latent": [[1, 2], [3]]}',
        {"Content-Type": "application/json"},
        422,
        "rectangular",
    ),
    "json odd field": (
        {},
        b'{"latent": [[[0.0]]], "steps": 3}',
        {"Content-Type": "application/json"},
        422,
        "allowed",
    ),
    "gzip bomb-ish": ({}, b"not gzip", {**ST, "Content-Encoding": "gzip"}, 400, "gzip"),
    "unknown encoding": ({}, b"x", {**ST, "Content-Encoding": "br"}, 415, "gzip"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_input_gets_a_clear_error(server, name) -> None:
    params, body, headers, status, words = BAD_REQUESTS[name]
    response = httpx.post(f"{server.url}/v1/decode", params=params, content=body, headers=headers, timeout=30)
    assert response.status_code == status, response.text[:300]
    error = response.json()["error"]
    assert set(error) == {"code", "message"}
    assert words.lower() in error["message"].lower(), error["message"]
    assert response.headers["x-request-id"]
    good = httpx.post(f"{server.url}/v1/decode", content=_st(latent=latent()), headers=ST, timeout=30)
    assert good.status_code == 200, good.text[:300]


def test_never_unpickles(server, capfd) -> None:
    _, body, headers, _, _ = BAD_REQUESTS["pickled npy"]
    httpx.post(f"{server.url}/v1/decode", content=body, headers=headers)
    assert "unpickled!" not in capfd.readouterr().out
    assert pickle.dumps(Evil())  # the payload really is a live pickle


def test_gzip_body_is_accepted(server) -> None:
    import gzip

    response = httpx.post(
        f"{server.url}/v1/decode",
        content=gzip.compress(_st(latent=latent())),
        headers={**ST, "Content-Encoding": "gzip"},
    )
    assert response.status_code == 200, response.text


def test_unknown_route_and_method_use_the_error_shape(server) -> None:
    missing = httpx.get(f"{server.url}/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = httpx.get(f"{server.url}/v1/decode")
    assert wrong.status_code == 405 and "message" in wrong.json()["error"]
