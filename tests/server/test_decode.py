"""POST /v1/decode over real HTTP: every input format decodes to the engine's own pixels."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load as load_safetensors
from safetensors.torch import save as save_safetensors

from pidserve.client import AsyncClient, Client, parse_multipart
from pidserve.server import image_encoders

from .conftest import latent, reference


def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def _bodies(x: torch.Tensor, sigma: float, seed: int) -> dict[str, tuple[dict, bytes, dict]]:
    """Each input format: (query params, body, headers) for the same latent, sigma and seed."""
    params = {"sigma": sigma, "seed": seed, "format": "raw"}
    array = x.numpy()
    return {
        "safetensors": (
            {"format": "raw"},
            save_safetensors({"latent": x, "sigma": torch.tensor([sigma]), "seed": torch.tensor([seed])}),
            {"Content-Type": "application/x-safetensors"},
        ),
        "npy": (params, _npy(array), {"Content-Type": "application/x-npy"}),
        "npy-float16": (params, _npy(array.astype(np.float16)), {"Content-Type": "application/x-npy"}),
        "raw": (
            params,
            array.tobytes(),
            {
                "Content-Type": "application/octet-stream",
                "X-Latent-Shape": ",".join(map(str, array.shape)),
                "X-Latent-Dtype": "float32",
            },
        ),
        "json-base64": (
            {"format": "raw"},
            json.dumps(
                {
                    "latent": {
                        "data": base64.b64encode(array.tobytes()).decode(),
                        "shape": list(array.shape),
                    },
                    "sigma": sigma,
                    "seed": seed,
                }
            ).encode(),
            {"Content-Type": "application/json"},
        ),
        "json-lists": (
            params,
            json.dumps({"latent": array.tolist()}).encode(),
            {"Content-Type": "application/json; charset=utf-8"},
        ),
    }


@pytest.mark.parametrize("kind", ["safetensors", "npy", "npy-float16", "raw", "json-base64", "json-lists"])
def test_each_input_format_equals_the_engine(server, reference_engine, kind) -> None:
    x, sigma, seed = latent(seed=3), 0.25, 11
    params, body, headers = _bodies(x, sigma, seed)[kind]
    response = httpx.post(f"{server.url}/v1/decode", params=params, content=body, headers=headers, timeout=60)
    assert response.status_code == 200, response.text[:300]
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["x-image-shape"] == "1,64,64,3"
    image = np.frombuffer(response.content, np.uint8).reshape(1, 64, 64, 3)
    source = x.half().float() if kind == "npy-float16" else x
    expected = reference(reference_engine, source, [seed], sigma).numpy()
    np.testing.assert_array_equal(image, expected)
    assert response.headers["x-seed"] == str(seed)
    assert response.headers["x-request-id"]
    timing = response.headers["server-timing"]
    for stage in ("queue", "compute", "encode", "total"):
        assert f"{stage};dur=" in timing


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp", "safetensors"])
def test_output_formats(server, reference_engine, fmt) -> None:
    x = latent(seed=4)
    with Client(server.url) as client:
        result = client.decode(x, seed=5, format=fmt)
    expected = reference(reference_engine, x, [5]).numpy()
    assert result.media_type == image_encoders.MEDIA_TYPES[fmt]
    images = result.images()
    assert images.shape == expected.shape and images.dtype == np.uint8
    if fmt in ("png", "safetensors"):  # lossless
        np.testing.assert_array_equal(images, expected)
    else:  # lossy: the same bytes as encoding the engine's pixels with the same codec and quality
        encode = {"jpeg": image_encoders.encode_jpeg, "webp": image_encoders.encode_webp}[fmt]
        assert result.encoded() == [encode(expected[0], 90)]


def test_pillow_png_encoder_is_lossless_too(reference_engine) -> None:
    from .conftest import live_server

    with live_server(png_encoder="pillow", encode_workers=1) as live, Client(live.url) as client:
        result = client.decode(latent(seed=6), seed=1)
    np.testing.assert_array_equal(result.images(), reference(reference_engine, latent(seed=6), [1]).numpy())


def test_batch_request_returns_multipart_and_seed_plus_index(server, reference_engine) -> None:
    x = latent(batch=3, seed=7)
    response = httpx.post(
        f"{server.url}/v1/decode",
        params={"seed": 100},
        content=save_safetensors({"latent": x}),
        headers={"Content-Type": "application/x-safetensors"},
        timeout=60,
    )
    assert response.status_code == 200, response.text[:300]
    assert response.headers["content-type"].startswith("multipart/mixed; boundary=")
    parts = parse_multipart(response.content, response.headers["content-type"])
    assert response.headers["x-seed"] == "100,101,102"
    images = np.stack([np.asarray(Image.open(io.BytesIO(p))) for p in parts])
    expected = reference(reference_engine, x, [100, 101, 102]).numpy()
    # the three latents ran as one batch of 3: float rounding may move a level (see engines/base.py)
    assert np.abs(images.astype(int) - expected).max() <= 2


def test_batch_as_safetensors(server) -> None:
    with Client(server.url) as client:
        result = client.decode(latent(batch=2), seed=[3, 9], sigma=[0.0, 0.5], format="safetensors")
    assert result.seeds == [3, 9]
    assert load_safetensors(result.content)["images"].shape == (2, 64, 64, 3)


def test_random_seed_is_reported_and_reproduces(server) -> None:
    with Client(server.url) as client:
        first = client.decode(latent(seed=8), format="raw")
        again = client.decode(latent(seed=8), seed=first.seeds[0], format="raw")
    np.testing.assert_array_equal(first.images(), again.images())


def test_sixteen_concurrent_requests_are_batched_and_correct(server, reference_engine) -> None:
    xs = [latent(seed=100 + i) for i in range(16)]

    async def run() -> list:
        async with AsyncClient(server.url) as client:
            return await asyncio.gather(*(client.decode(x, seed=i, format="raw") for i, x in enumerate(xs)))

    results = asyncio.run(run())
    for i, (x, result) in enumerate(zip(xs, results, strict=True)):
        expected = reference(reference_engine, x, [i]).numpy()
        assert np.abs(result.images().astype(int) - expected).max() <= 2
    assert max(size for r in results for size in r.batch_sizes) > 1


def test_models_reports_backend(server) -> None:
    models = httpx.get(f"{server.url}/v1/models").json()
    assert models["models"][0]["name"] == "pid-tiny"
    assert models["models"][0]["backend"] == "torch"
    assert models["models"][0]["latent_space"] == "tiny-ae"
