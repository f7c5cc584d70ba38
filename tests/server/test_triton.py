"""Triton's model configuration and statistics (what perf_analyzer and tritonclient read), through the
real tritonclient HTTP client, against a live server; the statistics agree with /metrics."""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import MODEL, latent, live_server

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def triton_server():
    # Its own server: the statistics below count every request it has seen.
    with live_server(max_batch=4, max_queue_delay_ms=7.0) as live:
        yield live


def _infer(client, batch: int, sigma_dims: int = 1, channels: int = 16):
    x = latent(batch=batch, seed=3).numpy()[:, :channels]
    shape = [batch] if sigma_dims == 1 else [batch, 1]
    inputs = [
        httpclient.InferInput("latent", list(x.shape), "FP32"),
        httpclient.InferInput("sigma", shape, "FP32"),
    ]
    inputs[0].set_data_from_numpy(x)
    inputs[1].set_data_from_numpy(np.full(shape, 0.1, np.float32))
    return client.infer(MODEL, inputs)


def test_the_server_lists_the_extensions_and_the_model_config(triton_server) -> None:
    client = httpclient.InferenceServerClient(url=triton_server.host_port)
    extensions = client.get_server_metadata()["extensions"]
    assert {"binary_tensor_data", "model_configuration", "statistics"} <= set(extensions)
    config = client.get_model_config(MODEL)
    assert config["name"] == MODEL and config["max_batch_size"] == 4
    inputs = {tensor["name"]: tensor for tensor in config["input"]}
    assert inputs["latent"] == {**inputs["latent"], "data_type": "TYPE_FP32", "dims": [16, -1, -1]}
    assert inputs["sigma"]["optional"] and inputs["seed"]["optional"]
    assert inputs["seed"]["data_type"] == "TYPE_INT64" and inputs["sigma"]["dims"] == [1]
    assert config["output"] == [{"name": "image", "data_type": "TYPE_UINT8", "dims": [-1, -1, 3]}]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 7000
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    assert client.get_model_config(MODEL, "1") == config
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_config("nope")


def test_statistics_count_what_ran_and_agree_with_metrics(triton_server) -> None:
    client = httpclient.InferenceServerClient(url=triton_server.host_port)
    before = client.get_inference_statistics(MODEL)["model_stats"][0]
    _infer(client, batch=2)
    _infer(client, batch=1, sigma_dims=2)  # a per-sample scalar as [B, 1], as Triton's tools send it
    with pytest.raises(InferenceServerException):
        _infer(client, batch=1, channels=4)  # not a tiny-ae latent: a failed inference
    after = client.get_inference_statistics(MODEL, "1")["model_stats"][0]
    stats, old = after["inference_stats"], before["inference_stats"]
    assert after["name"] == MODEL and after["version"] == "1"
    assert after["inference_count"] - before["inference_count"] == 3  # images
    assert after["execution_count"] - before["execution_count"] == 2  # engine batches
    assert stats["success"]["count"] - old["success"]["count"] == 2
    assert stats["fail"]["count"] - old["fail"]["count"] == 1
    assert stats["queue"]["count"] - old["queue"]["count"] == 3
    assert stats["compute_infer"]["count"] - old["compute_infer"]["count"] == 2
    assert stats["compute_input"]["count"] - old["compute_input"]["count"] == 3
    assert stats["success"]["ns"] > old["success"]["ns"] and after["last_inference"] > 0
    everything = client.get_inference_statistics()["model_stats"]
    assert [s["name"] for s in everything] == [MODEL]
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(httpx.get(f"{triton_server.url}/metrics").text)
        for s in family.samples
    }
    now = client.get_inference_statistics(MODEL)["model_stats"][0]
    assert now["inference_count"] == samples[("pidserve_images_total", ())]
    assert now["execution_count"] == samples[("pidserve_batch_size_count", ())]
    success = samples[("pidserve_inference_duration_seconds_count", (("outcome", "success"),))]
    assert now["inference_stats"]["success"]["count"] == success


def test_nim_operator_probe_paths_answer_like_the_v2_ones(triton_server) -> None:
    import httpx

    for path in ("live", "ready"):
        assert httpx.get(f"{triton_server.url}/v1/health/{path}").status_code == 200
        assert httpx.get(f"{triton_server.url}/v2/health/{path}").status_code == 200
