"""The KServe v2 routes, called by the real tritonclient HTTP client."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch

from .conftest import MODEL, latent, reference

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture
def client(server):
    triton = httpclient.InferenceServerClient(url=server.host_port)
    yield triton
    triton.close()


def _inputs(x: np.ndarray, sigma: np.ndarray, seed: np.ndarray, binary: bool) -> list:
    inputs = [
        httpclient.InferInput("latent", list(x.shape), "FP16" if x.dtype == np.float16 else "FP32"),
        httpclient.InferInput("sigma", list(sigma.shape), "FP32"),
        httpclient.InferInput("seed", list(seed.shape), "INT64"),
    ]
    for tensor, value in zip(inputs, (x, sigma, seed), strict=True):
        tensor.set_data_from_numpy(value, binary_data=binary)
    return inputs


def test_health_and_metadata(client) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready(MODEL, "2")
    assert client.get_server_metadata()["name"] == "pidserve"
    meta = client.get_model_metadata(MODEL)
    assert meta["name"] == MODEL
    assert {t["name"] for t in meta["inputs"]} == {"latent", "sigma", "seed"}
    assert meta["outputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, -1, -1, 3]}]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_round_trip_equals_the_engine(client, reference_engine, binary) -> None:
    x = latent(seed=21).numpy()
    sigma, seed = np.array([0.1], np.float32), np.array([5], np.int64)
    result = client.infer(
        MODEL,
        _inputs(x, sigma, seed, binary),
        outputs=[httpclient.InferRequestedOutput("image", binary_data=binary)],
        request_id="abc",
        model_version="1",
    )
    image = result.as_numpy("image")
    assert image.dtype == np.uint8 and image.shape == (1, 64, 64, 3)
    np.testing.assert_array_equal(image, reference(reference_engine, torch.from_numpy(x), [5], 0.1).numpy())
    assert result.get_response()["id"] == "abc"


def test_fp16_latent_and_default_outputs(client, reference_engine) -> None:
    x = latent(batch=2, seed=22).numpy().astype(np.float16)
    inputs = _inputs(x, np.zeros(2, np.float32), np.array([1, 2], np.int64), binary=True)
    image = client.infer(MODEL, inputs).as_numpy("image")  # no outputs given: binary by default
    expected = reference(reference_engine, torch.from_numpy(x).float(), [1, 2]).numpy()
    assert np.abs(image.astype(int) - expected).max() <= 2


def test_only_latent_is_required(client) -> None:
    x = latent(seed=23).numpy()
    tensor = httpclient.InferInput("latent", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    assert client.infer(MODEL, [tensor], parameters={"steps": 2}).as_numpy("image").shape == (1, 64, 64, 3)


def test_errors_reach_tritonclient_with_their_message(client, server) -> None:
    bad = np.zeros((1, 4, 2, 2), np.float32)
    tensor = httpclient.InferInput("latent", list(bad.shape), "FP32")
    tensor.set_data_from_numpy(bad)
    with pytest.raises(InferenceServerException, match="16 channels"):
        client.infer(MODEL, [tensor])
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.infer("nope", [tensor])
    with pytest.raises(InferenceServerException, match="steps"):
        client.infer(MODEL, [tensor], parameters={"steps": 9})
    response = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=b"{")
    assert response.status_code == 400 and isinstance(response.json()["error"], str)


@pytest.mark.parametrize(
    "body, headers, words",
    [
        (
            {"inputs": [{"name": "latent", "shape": [1, 16, 2, 2], "datatype": "INT8", "data": [0]}]},
            {},
            "FP32",
        ),
        (
            {"inputs": [{"name": "latent", "shape": [1, 16, 2, 2], "datatype": "FP32", "data": [0.0]}]},
            {},
            "values",
        ),
        (
            {"inputs": [{"name": "image", "shape": [1], "datatype": "FP32", "data": [0.0]}]},
            {},
            "unknown input",
        ),
        ({"inputs": []}, {}, "'latent'"),
        (
            {
                "inputs": [
                    {
                        "name": "latent",
                        "shape": [1, 16, 2, 2],
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": 256},
                    }
                ]
            },
            {},
            "binary_data_size",
        ),
    ],
)
def test_malformed_infer_requests(server, body, headers, words) -> None:
    response = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=body, headers=headers)
    assert response.status_code == 422, response.text[:300]
    assert words in response.json()["error"]
