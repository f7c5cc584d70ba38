"""Queueing, deadlines, failures, readiness, shutdown, auth and metrics — against live servers."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import save as save_safetensors

from pidserve.client import AsyncClient, Client, ServerError

from .conftest import GATED_SEED, POISON_SEED, FaultyEngine, latent, live_server

ST = {"Content-Type": "application/x-safetensors"}


def _post(url: str, seed: int, **params) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/decode", params={"seed": seed, **params}, content=save_safetensors({"latent": latent()}),
        headers=ST, timeout=60,
    )  # fmt: skip


def _background(url: str, seed: int, results: list, **params) -> threading.Thread:
    thread = threading.Thread(target=lambda: results.append(_post(url, seed, **params)), daemon=True)
    thread.start()
    return thread


@pytest.fixture
def gated():
    """A server whose engine can be held; the gate is opened again however the test ends."""
    with live_server(max_queue_size=2, max_queue_delay_ms=0) as live:
        live.engine.gate.clear()
        try:
            yield live
        finally:
            live.engine.gate.set()


def _hold_worker(live) -> tuple[threading.Thread, list]:
    """Occupy the only worker with a gated batch and wait until it is inside the engine."""
    results: list = []
    thread = _background(live.url, GATED_SEED, results)
    assert live.engine.entered.wait(timeout=30)
    return thread, results


def test_full_queue_gets_429_with_retry_after(gated) -> None:
    holder, held = _hold_worker(gated)
    queued: list = []
    waiting = [_background(gated.url, 1, queued), _background(gated.url, 2, queued)]
    deadline = time.monotonic() + 10
    while gated.loader.batcher.depth < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    refused = _post(gated.url, 3)
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    assert "queue is full" in refused.json()["error"]["message"]
    gated.engine.gate.set()
    for thread in [holder, *waiting]:
        thread.join(timeout=30)
    assert [r.status_code for r in held + queued] == [200, 200, 200]
    assert _post(gated.url, 4).status_code == 200


def test_deadline_gives_504_and_queued_work_is_dropped(gated) -> None:
    holder, held = _hold_worker(gated)
    late = _post(gated.url, 9, timeout=0.3)
    assert late.status_code == 504
    assert "0.3 s" in late.json()["error"]["message"]
    gated.engine.gate.set()
    holder.join(timeout=30)
    assert held[0].status_code == 200
    time.sleep(0.2)
    metrics = httpx.get(f"{gated.url}/metrics").text
    assert 'pidserve_dropped_total{reason="deadline"} 1.0' in metrics  # expired in the queue, not "cancelled"
    assert GATED_SEED in gated.engine.seen_seeds
    assert 9 not in gated.engine.seen_seeds  # the expired request never reached the engine


def test_injected_engine_failure_fails_one_batch_only(server) -> None:
    failed = _post(server.url, POISON_SEED)
    assert failed.status_code == 500
    assert "injected engine failure" in failed.json()["error"]["message"]
    assert _post(server.url, 1).status_code == 200
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "pidserve_batch_failures_total 1.0" in metrics


def test_failure_does_not_touch_other_batches(server) -> None:
    """A poisoned request and good ones in flight together: only the poisoned batch fails."""

    async def run():
        async with AsyncClient(server.url) as client:
            return await asyncio.gather(
                *(
                    client.decode(latent(size=s), seed=POISON_SEED if s == 4 else 1, format="raw")
                    for s in (2, 4, 6)
                ),
                return_exceptions=True,
            )

    ok_small, poisoned, ok_large = asyncio.run(run())
    assert isinstance(poisoned, ServerError) and poisoned.status == 500
    assert ok_small.images().shape == (1, 64, 64, 3)
    assert ok_large.images().shape == (1, 192, 192, 3)


def test_not_ready_until_loaded_then_ready() -> None:
    release = threading.Event()

    def slow_factory(settings, net):
        from pidserve.server.loader import open_configured_engine

        release.wait(timeout=60)
        return FaultyEngine(open_configured_engine(settings, net))

    with live_server(wait_ready=False, engine_factory=slow_factory) as live:
        assert httpx.get(f"{live.url}/v2/health/live").status_code == 200
        assert httpx.get(f"{live.url}/v2/health/ready").status_code == 503
        early = _post(live.url, 1)
        assert early.status_code == 503 and early.headers["retry-after"]
        assert "loading" in early.json()["error"]["message"]
        release.set()
        assert live.loader.wait_loaded(timeout=60)
        assert httpx.get(f"{live.url}/v2/health/ready").status_code == 200
        assert _post(live.url, 1).status_code == 200


def test_failed_load_is_reported_not_ready_and_not_live() -> None:
    def broken(settings, net):
        raise RuntimeError("no such engine")

    with live_server(wait_ready=False, engine_factory=broken) as live:
        live.loader.wait_loaded(timeout=60)
        assert httpx.get(f"{live.url}/v2/health/live").status_code == 503
        response = _post(live.url, 1)
        assert response.status_code == 503 and "no such engine" in response.json()["error"]["message"]


def test_graceful_shutdown_drains_the_queue() -> None:
    with live_server(max_queue_delay_ms=0) as live:
        live.engine.gate.clear()
        results: list = []
        threads = [_background(live.url, GATED_SEED, results)]
        assert live.engine.entered.wait(timeout=30)
        threads.append(_background(live.url, 5, results))
        deadline = time.monotonic() + 10
        while live.loader.batcher.depth < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        live.server.should_exit = True  # what SIGTERM does
        time.sleep(0.3)
        live.engine.gate.set()
        for thread in threads:
            thread.join(timeout=30)
        assert sorted(r.status_code for r in results) == [200, 200]


def test_api_key(tmp_path) -> None:
    secret = tmp_path / "key"
    secret.write_text("s3cret\n")
    with live_server(api_key_file=secret) as live:
        assert _post(live.url, 1).status_code == 401
        wrong = httpx.post(
            f"{live.url}/v1/decode", headers={**ST, "Authorization": "Bearer nope"}, content=b"x"
        )
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"].startswith("Bearer")
        assert (
            httpx.get(f"{live.url}/v2/models/pid-tiny", headers={"Authorization": "Bearer x"}).status_code
            == 401
        )
        assert httpx.get(f"{live.url}/v2/health/ready").status_code == 200  # probes need no key
        with Client(live.url, api_key="s3cret") as client:
            assert client.decode(latent(), seed=1).seeds == [1]


def test_metrics_exposition(server) -> None:
    assert _post(server.url, 1).status_code == 200
    text = httpx.get(f"{server.url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "pidserve_requests", "pidserve_request_duration_seconds", "pidserve_queue_seconds",
        "pidserve_compute_seconds", "pidserve_encode_seconds", "pidserve_batch_size", "pidserve_queue_depth",
        "pidserve_images", "pidserve_model_info", "pidserve_ready",
    ):  # fmt: skip
        assert name in families, name
    decode_ok = [
        s for s in families["pidserve_requests"].samples
        if s.labels.get("route") == "/v1/decode" and s.labels.get("status") == "200"
    ]  # fmt: skip
    assert decode_ok and decode_ok[0].value >= 1
    model = families["pidserve_model_info"].samples[0].labels
    assert model["backend"] == "torch" and model["name"] == "pid-tiny" and model["attention"] == "auto"
    assert not any(name.startswith("pidserve_gpu") for name in families)  # no GPU here: not exported


def test_access_log_carries_the_request_id(server, caplog) -> None:
    def logged() -> bool:
        return any('"request_id": "trace-42"' in r.getMessage() for r in caplog.records)

    with caplog.at_level(logging.INFO, logger="pidserve.access"):
        response = httpx.get(f"{server.url}/v1/models", headers={"X-Request-ID": "trace-42"})
        # The access line is written once the response has been sent (it carries the duration), so
        # on a busy machine it can land just after the client has the response: wait for it.
        deadline = time.monotonic() + 5
        while not logged() and time.monotonic() < deadline:
            time.sleep(0.01)
    assert response.headers["x-request-id"] == "trace-42"
    assert logged()


def test_work_of_a_client_that_went_away_is_dropped(gated) -> None:
    holder, held = _hold_worker(gated)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
        _post_with_client_timeout(gated.url, seed=12, client_timeout=0.5)
    deadline = time.monotonic() + 10
    while not _dropped(gated.url) and time.monotonic() < deadline:
        gated.engine.gate.set()  # let the worker reach the queued job, which must be skipped
        time.sleep(0.05)
    holder.join(timeout=30)
    assert held[0].status_code == 200
    assert _dropped(gated.url) == 1
    assert 12 not in gated.engine.seen_seeds


def _post_with_client_timeout(url: str, seed: int, client_timeout: float) -> httpx.Response:
    body = save_safetensors({"latent": latent()})
    return httpx.post(
        f"{url}/v1/decode", params={"seed": seed}, content=body, headers=ST, timeout=client_timeout
    )


def _dropped(url: str) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        if family.name == "pidserve_dropped":
            return sum(s.value for s in family.samples if s.name.endswith("_total"))
    return 0.0


class _FakeNvml:
    """Stands in for pynvml's device queries (there is no GPU here); values as NVML reports them."""

    class _Util:
        gpu = 73

    class _Memory:
        used, total = 30 * 2**30, 80 * 2**30

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUtilizationRates(self, handle: int):
        return self._Util()

    def nvmlDeviceGetMemoryInfo(self, handle: int):
        return self._Memory()

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return 350_000  # milliwatts


def test_gpu_series_when_nvml_has_gpus() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from pidserve.server.metrics import NvmlCollector

    registry = CollectorRegistry()
    registry.register(NvmlCollector(_FakeNvml()))
    samples = {
        (s.name, s.labels["gpu"]): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }
    assert samples[("pidserve_gpu_utilization_ratio", "1")] == pytest.approx(0.73)
    assert samples[("pidserve_gpu_memory_used_bytes", "0")] == 30 * 2**30
    assert samples[("pidserve_gpu_memory_total_bytes", "0")] == 80 * 2**30
    assert samples[("pidserve_gpu_power_watts", "1")] == 350.0


def test_api_key_from_the_environment(monkeypatch, tmp_path) -> None:
    from pidserve.server import ServerSettings

    monkeypatch.setenv("PIDSERVE_API_KEY", "from-env")
    assert ServerSettings().resolved_api_key() == b"from-env"
    monkeypatch.delenv("PIDSERVE_API_KEY")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        ServerSettings(api_key_file=empty).resolved_api_key()
    assert ServerSettings().resolved_api_key() is None


def test_metrics_on_a_port_of_their_own() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with live_server(metrics_port=port) as live:
        assert _post(live.url, 1).status_code == 200
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert "pidserve_images_total 1.0" in text
