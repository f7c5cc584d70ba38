"""The KServe v2 request models alone, no server: what each body becomes, and the OpenAPI schema they give."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pidserve.model import MAX_STUDENT_STEPS
from pidserve.server import ServerSettings, create_app
from pidserve.server.errors import ApiError
from pidserve.server.kserve_models import parse_infer_request

LATENT = {"name": "latent", "shape": [1, 16, 2, 2], "datatype": "FP32", "data": [0.0] * 64}


def _body(document: object) -> bytes:
    return json.dumps(document).encode()


def test_a_json_request_and_its_tensors() -> None:
    seed = {"name": "seed", "shape": [1], "datatype": "INT32", "data": [7]}
    parameters = {"steps": 2, "timeout": 1_500_000, "binary_data_output": True, "priority": 1}
    request, binary = parse_infer_request(
        _body({"id": "x", "inputs": [LATENT, seed], "parameters": parameters}), None
    )
    tensors = request.tensors(binary)
    assert tensors["latent"].shape == (1, 16, 2, 2) and tensors["latent"].dtype == torch.float32
    assert tensors["seed"].tolist() == [7] and tensors["seed"].dtype == torch.int32
    assert request.params.steps == 2 and request.params.timeout_s == 1.5 and request.params.prompt is None
    assert request.wants_binary and request.id == "x"
    plain, _ = parse_infer_request(_body({"inputs": [LATENT]}), None)
    assert plain.params.steps == MAX_STUDENT_STEPS and not plain.wants_binary
    assert "id" not in plain.model_fields_set


def test_binary_data_extension() -> None:
    latent = np.arange(64, dtype=np.float16).reshape(1, 16, 2, 2)
    sigma = np.array([0.5], np.float32)
    head = _body(
        {
            "inputs": [
                {
                    "name": "latent",
                    "shape": [1, 16, 2, 2],
                    "datatype": "FP16",
                    "parameters": {"binary_data_size": 128},
                },
                {"name": "sigma", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}},
            ],
            "outputs": [{"name": "image", "parameters": {"binary_data": True}}],
        }
    )
    request, binary = parse_infer_request(head + latent.tobytes() + sigma.tobytes(), str(len(head)))
    tensors = request.tensors(binary)
    np.testing.assert_array_equal(tensors["latent"].numpy(), latent)
    assert tensors["sigma"].tolist() == [0.5] and request.wants_binary
    with pytest.raises(ApiError, match="not claimed"):
        request.tensors(binary + b"\0")
    for length in ("x", str(len(head) + 1000)):
        with pytest.raises(ApiError, match="Inference-Header-Content-Length") as caught:
            parse_infer_request(head, length)
        assert caught.value.status == 400


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b"{", 400, "not valid JSON"),
        (b"[]", 400, '"inputs" list'),
        (_body({}), 400, '"inputs" list'),
        (_body({"inputs": {}}), 400, '"inputs" list'),
        (_body({"inputs": [3]}), 400, "each input must be an object"),
        (_body({"inputs": [LATENT], "parameters": 3}), 400, '"parameters" must be an object'),
        (_body({"inputs": [{**LATENT, "datatype": "INT8"}]}), 422, "'FP32' or 'FP16'"),
        (_body({"inputs": [LATENT, {**LATENT, "name": "seed"}]}), 422, "INT64"),
        (_body({"inputs": [{**LATENT, "name": "image"}]}), 422, "unknown input 'image'"),
        (_body({"inputs": [LATENT, LATENT]}), 422, "given twice"),
        (_body({"inputs": [{**LATENT, "name": "sigma", "shape": [1], "data": [0.0]}]}), 422, "'latent'"),
        (_body({"inputs": [{**LATENT, "shape": [1, -16]}]}), 422, "shape"),
        (_body({"inputs": [LATENT], "parameters": {"steps": 9}}), 422, f"integer 1-{MAX_STUDENT_STEPS}"),
        (_body({"inputs": [LATENT], "parameters": {"steps": True}}), 422, "steps"),
        (_body({"inputs": [LATENT], "parameters": {"timeout": 0}}), 422, "timeout"),
        (_body({"inputs": [LATENT], "parameters": {"prompt": 3}}), 422, "prompt must be a string"),
        (_body({"inputs": [LATENT], "parameters": {"color": "red"}}), 422, "unknown parameters ['color']"),
        (_body({"inputs": [LATENT], "outputs": [{"name": "latent"}]}), 422, "the only output is 'image'"),
    ],
)
def test_malformed_requests(body: bytes, status: int, words: str) -> None:
    with pytest.raises(ApiError) as caught:
        parse_infer_request(body, None)
    assert caught.value.status == status and words in caught.value.message, caught.value.message


@pytest.mark.parametrize(
    "latent, words",
    [
        ({**LATENT, "data": [0.0]}, "1 values given for shape [1, 16, 2, 2]"),
        ({**LATENT, "data": ["a"] * 64}, "numbers of type FP32"),
        ({k: v for k, v in LATENT.items() if k != "data"}, "neither data nor"),
        ({**LATENT, "data": None, "parameters": {"binary_data_size": 256}}, "binary_data_size 256"),
    ],
)
def test_tensors_that_do_not_fit_their_shape(latent: dict, words: str) -> None:
    request, binary = parse_infer_request(_body({"inputs": [latent]}), None)
    with pytest.raises(ApiError) as caught:
        request.tensors(binary)
    assert caught.value.status == 422 and words in caught.value.message, caught.value.message


def test_the_openapi_schema_comes_from_the_models() -> None:
    app = create_app(ServerSettings(encode_workers=1))
    try:
        schema = app.openapi()
    finally:
        app.state.loader.encoders.close()
    for path in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": "#/components/schemas/InferRequest"}
    components = schema["components"]["schemas"]
    assert set(components["InferRequest"]["required"]) == {"inputs"}
    assert components["LatentInput"]["properties"]["datatype"]["enum"] == ["FP32", "FP16"]
    assert components["InferParameters"]["properties"]["steps"]["maximum"] == MAX_STUDENT_STEPS
    assert components["InferParameters"]["additionalProperties"] is False
