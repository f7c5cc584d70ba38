"""KServe v2 over gRPC, called by the real tritonclient gRPC client against a live server: the same
service as HTTP (pixels, batching, limits, API key, metrics), every error as its gRPC status."""

from __future__ import annotations

import asyncio
import socket

import numpy as np
import pytest

from .conftest import MODEL, latent, live_server, reference

grpcclient = pytest.importorskip("tritonclient.grpc")
import grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def grpc_server():
    port = _port()
    with live_server(grpc_port=port, max_batch=4, max_queue_delay_ms=50.0, max_request_latents=4) as live:
        live.grpc_url = f"127.0.0.1:{port}"
        yield live


def _inputs(x: np.ndarray, seed: int | None = None) -> list:
    inputs = [grpcclient.InferInput("latent", list(x.shape), "FP32")]
    inputs[0].set_data_from_numpy(x)
    if seed is not None:
        inputs.append(grpcclient.InferInput("seed", [x.shape[0]], "INT64"))
        inputs[1].set_data_from_numpy(np.arange(seed, seed + x.shape[0], dtype=np.int64))
    return inputs


def test_health_metadata_config_and_statistics(grpc_server) -> None:
    client = grpcclient.InferenceServerClient(url=grpc_server.grpc_url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    assert not client.is_model_ready(MODEL, "2")
    assert "statistics" in client.get_server_metadata(as_json=True)["extensions"]
    meta = client.get_model_metadata(MODEL, as_json=True)
    assert [t["name"] for t in meta["inputs"]] == ["latent", "sigma", "seed"]
    config = client.get_model_config(MODEL, as_json=True)["config"]
    assert config["max_batch_size"] == 4 and config["input"][0]["dims"] == ["16", "-1", "-1"]
    stats = client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    assert stats["name"] == MODEL


def test_infer_equals_the_engine_and_is_counted(grpc_server, reference_engine) -> None:
    client = grpcclient.InferenceServerClient(url=grpc_server.grpc_url)
    x = latent(batch=2, seed=41).numpy()
    image = client.infer(MODEL, _inputs(x, seed=9)).as_numpy("image")
    assert image.shape == (2, 64, 64, 3) and image.dtype == np.uint8
    expected = reference(reference_engine, latent(batch=2, seed=41), [9, 10]).numpy()
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1
    import httpx

    metrics = httpx.get(f"{grpc_server.url}/metrics").text
    assert 'pidserve_requests_total{route="grpc:ModelInfer",status="200"}' in metrics


def test_concurrent_grpc_requests_share_batches(grpc_server) -> None:
    async def run() -> list:
        import tritonclient.grpc.aio as aioclient

        client = aioclient.InferenceServerClient(url=grpc_server.grpc_url)
        try:
            calls = [client.infer(MODEL, _inputs(latent(seed=s).numpy(), seed=s)) for s in range(4)]
            return await asyncio.gather(*calls)
        finally:
            await client.close()

    engine = grpc_server.engine
    seen = len(engine.seen_seeds)
    batches_before = len(engine.seen_text)
    results = asyncio.run(run())
    assert all(r.as_numpy("image").shape == (1, 64, 64, 3) for r in results)
    assert len(engine.seen_seeds) - seen == 4
    assert len(engine.seen_text) - batches_before < 4  # at least two of the four shared a batch


ERRORS = {
    # name: (inputs, model, status code, words)
    "wrong channels": (
        lambda: _inputs(np.zeros((1, 4, 2, 2), np.float32)),
        MODEL,
        "StatusCode.INVALID_ARGUMENT",
        "16",
    ),
    "unknown model": (lambda: _inputs(latent().numpy()), "nope", "StatusCode.NOT_FOUND", "unknown model"),
    "too many latents": (
        lambda: _inputs(latent(batch=5).numpy()),
        MODEL,
        "StatusCode.RESOURCE_EXHAUSTED",
        "split",
    ),
    "bad seed": (lambda: _inputs(latent().numpy(), seed=-3), MODEL, "StatusCode.INVALID_ARGUMENT", "0.."),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_every_error_is_its_grpc_status(grpc_server, name) -> None:
    make_inputs, model, code, words = ERRORS[name]
    client = grpcclient.InferenceServerClient(url=grpc_server.grpc_url)
    with pytest.raises(InferenceServerException) as caught:
        client.infer(model, make_inputs())
    assert caught.value.status() == code, caught.value
    assert words in caught.value.message()
    assert client.infer(MODEL, _inputs(latent().numpy())).as_numpy("image").shape == (1, 64, 64, 3)


def test_api_key_is_authorization_metadata() -> None:
    port = _port()
    with live_server(grpc_port=port, api_key="s3cret") as live:
        client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{port}")
        assert client.is_server_live()  # the probes stay open
        with pytest.raises(InferenceServerException) as caught:
            client.infer(MODEL, _inputs(latent().numpy()))
        assert caught.value.status() == "StatusCode.UNAUTHENTICATED"
        ok = client.infer(MODEL, _inputs(latent().numpy()), headers={"authorization": "Bearer s3cret"})
        assert ok.as_numpy("image").shape == (1, 64, 64, 3)
        del live


def test_a_message_beyond_the_limit_is_resource_exhausted() -> None:
    port = _port()
    with live_server(grpc_port=port, max_body_bytes=1 << 16, max_output_pixels=64 * 64) as live:
        channel = grpc.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)]
        )
        from tritonclient.grpc import service_pb2 as pb
        from tritonclient.grpc import service_pb2_grpc as rpc

        stub = rpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name=MODEL, raw_input_contents=[b"\0" * (4 << 20)])
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        del live


def test_queue_full_deadline_engine_failure_and_not_ready_map_to_their_codes() -> None:
    """429 -> RESOURCE_EXHAUSTED, 504 -> DEADLINE_EXCEEDED, 500 -> INTERNAL, 503 -> UNAVAILABLE."""
    import threading
    import time

    from .conftest import GATED_SEED, POISON_SEED

    port = _port()
    with live_server(grpc_port=port, max_queue_size=1, max_queue_delay_ms=0) as live:
        client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{port}")

        def code_of(**kwargs) -> str:
            with pytest.raises(InferenceServerException) as caught:
                client.infer(MODEL, _inputs(latent().numpy(), seed=kwargs.pop("seed", 1)), **kwargs)
            return caught.value.status()

        assert code_of(seed=POISON_SEED) == "StatusCode.INTERNAL"
        live.engine.gate.clear()
        try:
            held = threading.Thread(
                target=lambda: client.infer(MODEL, _inputs(latent().numpy(), seed=GATED_SEED))
            )
            held.start()
            assert live.engine.entered.wait(timeout=30)
            assert (
                code_of(seed=3, timeout=300_000) == "StatusCode.DEADLINE_EXCEEDED"
            )  # 0.3 s, in microseconds
            # The expired request left the queue at once: this one takes its slot.
            results: list = []
            queued = threading.Thread(
                target=lambda: results.append(client.infer(MODEL, _inputs(latent().numpy(), seed=4)))
            )
            queued.start()
            deadline = time.monotonic() + 10
            while live.loader.batcher.depth < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert code_of(seed=5) == "StatusCode.RESOURCE_EXHAUSTED"  # the queue is full
        finally:
            live.engine.gate.set()
        held.join(timeout=30)
        queued.join(timeout=30)
        assert results and results[0].as_numpy("image").shape == (1, 64, 64, 3)
        live.loader.state = "stopping"  # what shutdown does first
        assert code_of(seed=6) == "StatusCode.UNAVAILABLE"
        live.loader.state = "ready"
