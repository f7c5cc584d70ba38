"""The service under attack: one test per defect of the hardening review (issue 18), each against a real
server on loopback. A case named `item N` is the review's item N; each failed before its fix.

Every bad request must get its documented JSON error with an X-Request-ID, on a connection that stays
open, and leave the server serving the next good request.
"""

from __future__ import annotations

import gc
import http.client
import io
import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import save as save_safetensors

from pidserve.engines import MAX_SEED, DecodeBatch, open_engine
from pidserve.model.default import load_default_decoder
from pidserve.server import ServerSettings

from .conftest import GATED_SEED, POISON_SEED, latent, live_server

ST = {"Content-Type": "application/x-safetensors"}
JSON = {"Content-Type": "application/json"}
NPY = {"Content-Type": "application/x-npy"}


def _v1(server, body: bytes, headers: dict, **params) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/decode", params=params, content=body, headers=headers, timeout=60)


def _v2(server, body: bytes, headers: dict | None = None) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v2/models/pid-tiny/infer", content=body, headers=headers or JSON, timeout=60
    )


def _v2_body(inputs: list[dict], **extra) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


def _v2_with(name: str, datatype: str, data: list) -> bytes:
    """A v2 body: a good latent plus input `name` holding `data`."""
    extra = {"name": name, "datatype": datatype, "shape": [len(data)], "data": data}
    return _v2_body([_latent_input(latent()), extra])


def _latent_input(lat: torch.Tensor) -> dict:
    return {"name": "latent", "datatype": "FP32", "shape": list(lat.shape), "data": lat.flatten().tolist()}


def _assert_documented_error(response: httpx.Response, status: int, words: str) -> None:
    assert response.status_code == status, response.text[:300]
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers.get("x-request-id")
    error = response.json()["error"]
    message = error if isinstance(error, str) else error["message"]
    assert words.lower() in message.lower(), message


def _still_serves(server) -> None:
    good = _v1(server, save_safetensors({"latent": latent()}), ST)
    assert good.status_code == 200, good.text[:300]


def _npy_header(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": dtype, "fortran_order": False, "shape": shape})
    return out.getvalue()


# ---- item 3: a seed that overflows fails alone, before the worker ----------------------------------
def test_item_3_seed_that_would_overflow_is_refused_before_queueing(server) -> None:
    body = save_safetensors({"latent": latent(batch=2), "seed": torch.tensor(MAX_SEED)})
    _assert_documented_error(_v1(server, body, ST), 422, f"at most {MAX_SEED - 1}")
    one = save_safetensors({"latent": latent(), "seed": torch.tensor(MAX_SEED)})
    assert _v1(server, one, ST).status_code == 200
    _still_serves(server)


def test_item_3_a_failing_latent_does_not_fail_its_batch_mate() -> None:
    """A poisoned latent and another client's good one in the same engine batch: only the poisoned fails,
    and the failed batch is counted."""
    with live_server(max_queue_delay_ms=0) as live:
        live.engine.gate.clear()
        try:
            holder, held = _hold_worker(live)
            results: dict[int, httpx.Response] = {}
            threads = [
                threading.Thread(target=lambda s=s: results.__setitem__(s, _post_seed(live, s)), daemon=True)
                for s in (POISON_SEED, 5)
            ]
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 10
            while live.loader.batcher.depth < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert live.loader.batcher.depth == 2  # both wait for the one worker: they share a batch
        finally:
            live.engine.gate.set()
        for thread in [holder, *threads]:
            thread.join(timeout=60)
        assert held[0].status_code == 200
        assert results[5].status_code == 200
        _assert_documented_error(results[POISON_SEED], 500, "injected engine failure")
        metrics = httpx.get(f"{live.url}/metrics").text
        assert "pidserve_batch_failures_total 2.0" in metrics  # the batch of two, then the poison alone


def _hold_worker(live) -> tuple[threading.Thread, list]:
    """Occupy the only worker with a gated request (the gate is closed) until it is inside the engine."""
    held: list = []
    holder = threading.Thread(target=lambda: held.append(_post_seed(live, GATED_SEED)), daemon=True)
    holder.start()
    assert live.engine.entered.wait(timeout=30)
    return holder, held


def _post_seed(live, seed: int) -> httpx.Response:
    body = save_safetensors({"latent": latent()})
    return httpx.post(f"{live.url}/v1/decode", params={"seed": seed}, content=body, headers=ST, timeout=60)


# ---- item 4: inputs that used to escape as unhandled 500s --------------------------------------------
DEEP = b"[" * 1000 + b"]" * 1000
NINES = b"9" * 5000
HUGE_NPY = _npy_header((1, 16, 2**16, 2**16 - 1)) + b"\0" * 64  # declares 238 GiB
UNHANDLED = {
    # name: (route, body, headers, status, words)
    "v1 JSON nested 1000 deep": ("v1", b'{"latent": ' + DEEP + b"}", JSON, 422, "nested too deeply"),
    "v1 JSON nested 5000 deep": (
        "v1",
        b'{"latent": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        JSON,
        422,
        "too deeply",
    ),
    "v2 JSON nested 1000 deep": ("v2", b'{"inputs": ' + DEEP + b"}", JSON, 400, "recursion"),
    "v1 integer of 5000 digits": (
        "v1",
        b'{"latent": [[[0.0]]], "seed": ' + b"9" * 5000 + b"}",
        JSON,
        400,
        "JSON",
    ),
    "v2 integer of 5000 digits": (
        "v2",
        b'{"inputs": [{"name": "seed", "datatype": "INT64", "shape": [1], "data": [' + b"9" * 5000 + b"]}]}",
        JSON,
        400,
        "JSON",
    ),
    "v2 input parameters not an object": (
        "v2",
        _v2_body([{**_latent_input(latent()), "parameters": 5}]),
        JSON,
        422,
        "object",
    ),
    "v2 output parameters not an object": (
        "v2",
        _v2_body([_latent_input(latent())], outputs=[{"name": "image", "parameters": 7}]),
        JSON,
        422,
        "object",
    ),
    "v2 shape of 100 dims": (
        "v2",
        _v2_body([{"name": "latent", "datatype": "FP32", "shape": [1] * 100, "data": [0.0]}]),
        JSON,
        422,
        "at most 8",
    ),
    "v2 Unicode digits in Inference-Header-Content-Length": (
        "v2",
        _v2_body([_latent_input(latent())]),
        {**JSON, "Inference-Header-Content-Length": "²".encode("latin-1")},
        400,
        "Inference-Header-Content-Length",
    ),
    "npy header declaring 238 GiB": (
        "v1",
        _npy_header((1, 16, 2**16, 2**16 - 1)) + b"\0" * 64,
        NPY,
        400,
        "declares",
    ),
    "Unicode digits in X-Latent-Shape": (
        "v1",
        b"\0" * 256,
        {"Content-Type": "application/octet-stream", "X-Latent-Shape": "1,16,2,²".encode("latin-1")},
        400,
        "X-Latent-Shape",
    ),
}


@pytest.mark.parametrize("name", list(UNHANDLED))
def test_item_4_no_unhandled_500(server, name) -> None:
    route, body, headers, status, words = UNHANDLED[name]
    response = (_v1 if route == "v1" else _v2)(server, body, headers)
    _assert_documented_error(response, status, words)
    _still_serves(server)


def test_item_4_an_unexpected_error_is_json_with_request_id_on_a_kept_connection(server, monkeypatch) -> None:
    """A bug no handler expected (injected here into the validation step) still gets the documented body,
    the request id and a connection the client's pool can reuse."""

    def bug(request):
        raise KeyError("injected bug")

    monkeypatch.setattr(server.app.state.service, "validate", bug)
    host, port = server.host_port.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    body = save_safetensors({"latent": latent()})
    connection.request("POST", "/v1/decode", body=body, headers={**ST, "X-Request-ID": "bug-1"})
    response = connection.getresponse()
    payload = json.loads(response.read())
    assert response.status == 500
    assert response.getheader("x-request-id") == "bug-1"
    assert payload["error"]["code"] == "internal_error" and "bug-1" in payload["error"]["message"]
    assert (response.getheader("connection") or "").lower() != "close"
    socket_used = connection.sock
    monkeypatch.undo()
    connection.request("POST", "/v1/decode", body=body, headers=ST)
    again = connection.getresponse()
    again.read()
    assert again.status == 200 and connection.sock is socket_used  # the same TCP connection
    connection.close()


def test_item_4_client_leaving_mid_body_is_a_499(server) -> None:
    host, port = server.host_port.split(":")
    before, errors = _count(server, "/v1/decode", "499"), _count(server, "/v1/decode", "500")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/decode HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-safetensors\r\n"
            b"Content-Length: 100000\r\n\r\n" + b"\0" * 1000
        )
        time.sleep(0.2)
    deadline = time.monotonic() + 10
    while _count(server, "/v1/decode", "499") == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _count(server, "/v1/decode", "499") == before + 1
    assert _count(server, "/v1/decode", "500") == errors
    _still_serves(server)


def _count(server, route: str, status: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text):
        for sample in family.samples:
            if sample.name == "pidserve_requests_total" and sample.labels == {
                "route": route,
                "status": status,
            }:
                return sample.value
    return 0.0


# ---- item 7: disconnects and deadlines are said and counted as what they are ------------------------
def test_item_7_disconnect_while_waiting_is_a_quiet_499_and_a_queue_expiry_counts_as_deadline(caplog) -> None:
    with live_server(max_queue_delay_ms=0) as live:
        live.engine.gate.clear()
        try:
            holder, held = _hold_worker(live)

            with caplog.at_level(logging.ERROR):
                expired = httpx.post(
                    f"{live.url}/v1/decode",
                    params={"seed": 2, "timeout": 0.3},
                    content=save_safetensors({"latent": latent()}),
                    headers=ST,
                    timeout=60,
                )
                _leave_while_queued(live)
        finally:
            live.engine.gate.set()
        holder.join(timeout=60)
        assert held[0].status_code == 200  # the held request itself was never disturbed
        assert expired.status_code == 504
        time.sleep(0.3)
        gc.collect()
        metrics = httpx.get(f"{live.url}/metrics").text
        assert 'pidserve_dropped_total{reason="deadline"} 1.0' in metrics
        assert 'pidserve_dropped_total{reason="client_closed"} 1.0' in metrics
        assert 'status="499"' in metrics and 'status="500"' not in metrics
        assert "never retrieved" not in caplog.text
        assert "Traceback" not in caplog.text


def _leave_while_queued(live) -> None:
    """Send a request, wait until it is queued, then close the connection."""
    host, port = live.host_port.split(":")
    body = save_safetensors({"latent": latent()})
    depth = live.loader.batcher.depth
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            f"POST /v1/decode?seed=3 HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-safetensors\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 10
        while live.loader.batcher.depth == depth and time.monotonic() < deadline:
            time.sleep(0.01)
    deadline = time.monotonic() + 10
    while (
        'reason="client_closed"' not in httpx.get(f"{live.url}/metrics").text and time.monotonic() < deadline
    ):
        time.sleep(0.05)


# ---- item 8: the API key guards every route but health and metrics; an empty key is an error --------
def test_item_8_api_key_guards_the_docs(tmp_path) -> None:
    with live_server(api_key="s3cret") as live:
        for path in ("/docs", "/redoc", "/openapi.json"):
            refused = httpx.get(f"{live.url}{path}")
            assert refused.status_code == 401, path
            allowed = httpx.get(f"{live.url}{path}", headers={"Authorization": "Bearer s3cret"})
            assert allowed.status_code == 200, path
        assert httpx.get(f"{live.url}/v2/health/ready").status_code == 200
        assert httpx.get(f"{live.url}/metrics").status_code == 200


def test_item_8_an_empty_api_key_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("PIDSERVE_API_KEY", "")
    with pytest.raises(ValueError, match="empty"):
        ServerSettings()


# ---- item 9: validation is exact -----------------------------------------------------------------
def _json_latent(**fields) -> bytes:
    return json.dumps({"latent": [[[[0.0]] * 2] * 2] * 16, **fields}).encode()


GOOD = save_safetensors({"latent": latent()})
VALIDATION = {
    # name: (route, body, headers, params, status, words)
    "float64 latent (safetensors)": (
        "v1", save_safetensors({"latent": latent().double()}), ST, {}, 422, "float32",
    ),
    "float64 latent (npy)": ("v1", _npy_header((1, 16, 2, 2), "<f8") + b"\0" * 512, NPY, {}, 422, "float32"),
    "bool sigma (safetensors)": (
        "v1", save_safetensors({"latent": latent(), "sigma": torch.tensor([True])}), ST, {}, 422, "numbers",
    ),
    "bool sigma (JSON)": ("v1", _json_latent(sigma=True), JSON, {}, 422, "sigma"),
    "bool sigma (v2)": (
        "v2",
        _v2_with("sigma", "FP32", [True]),
        JSON, {}, 422, "numbers",
    ),
    "seed 2**64-1 (JSON)": ("v1", _json_latent(seed=2**64 - 1), JSON, {}, 422, "0..9223372036854775807"),
    "seed 2**64-1 (uint64 safetensors)": (
        "v1",
        save_safetensors({"latent": latent(), "seed": torch.tensor([2**64 - 1], dtype=torch.uint64)}),
        ST, {}, 422, "integers",
    ),
    "seed 2**64-1 (query)": ("v1", GOOD, ST, {"seed": 2**64 - 1}, 422, "seed"),
    "seed 1.5 (v2)": (
        "v2",
        _v2_with("seed", "INT64", [1.5]),
        JSON, {}, 422, "integers",
    ),
    "negative seed (v2)": (
        "v2",
        _v2_with("seed", "INT64", [-1]),
        JSON, {}, 422, "0..",
    ),
    "steps=2.0 (query)": ("v1", GOOD, ST, {"steps": "2.0"}, 422, "whole number"),
    "JSON latent shape said as a field, not a header": (
        "v1",
        json.dumps({"latent": {"data": "AAAA", "shape": [1, 16, 2, 2]}}).encode(),
        JSON, {}, 422, '"latent.shape"',
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(VALIDATION))
def test_item_9_validation(server, name) -> None:
    route, body, headers, params, status, words = VALIDATION[name]
    response = _v1(server, body, headers, **params) if route == "v1" else _v2(server, body, headers)
    _assert_documented_error(response, status, words)
    assert "X-Latent-Shape" not in response.text or headers.get("Content-Type") != JSON["Content-Type"]
    _still_serves(server)


def test_item_9_seeds_differ_in_their_high_bits() -> None:
    """The CPU generator keeps 32 bits of a seed; every seed in 0..MAX_SEED must still be its own noise,
    and seeds below 2**32 keep the official sampler's noise."""
    engine = open_engine("torch", net=load_default_decoder(), max_batch=1)
    lat = latent()

    def pixels(seed: int) -> torch.Tensor:
        return engine.decode(DecodeBatch.single(lat, sigma=0.5, seed=seed)).images[0]

    low = pixels(5)
    assert not torch.equal(low, pixels(5 + 2**32))
    assert not torch.equal(pixels(5 * 2**32 + 1), pixels(1 * 2**32 + 5))  # swapped halves differ too
    assert torch.equal(pixels(5 + 2**32), pixels(5 + 2**32))  # and each is deterministic
    generator = torch.Generator().manual_seed(5)
    from pidserve.engines.base import seeded_noises

    assert torch.equal(seeded_noises(torch.tensor([5]), (1, 3, 4, 4), 1, torch.device("cpu"))[0],
                       torch.randn((1, 3, 4, 4), generator=generator))  # fmt: skip
    assert pixels(MAX_SEED).shape == low.shape


# ---- item 1: a dead PNG encoder process is replaced; a pool that cannot recover makes us unready -----
def _encoder_pids(live) -> list[int]:
    # ProcessPoolExecutor keeps its processes in a private dict: the test needs real pids to kill.
    return list(live.loader.encoders.processes._processes)


def _png(live) -> httpx.Response:
    body = save_safetensors({"latent": latent()})
    return httpx.post(f"{live.url}/v1/decode", content=body, headers=ST, params={"format": "png"}, timeout=60)


def test_item_1_killed_png_encoder_is_replaced_and_unrecoverable_pool_is_unready(monkeypatch) -> None:
    import os
    import signal

    with live_server(encode_workers=2) as live:
        assert _png(live).status_code == 200
        for _ in range(2):  # killed twice: each breakage is healed by the next encode
            pids = _encoder_pids(live)
            assert pids
            os.kill(pids[0], signal.SIGKILL)
            time.sleep(0.5)
            with ThreadPoolExecutor(3) as clients:
                results = list(clients.map(lambda _: _png(live), range(3)))
            assert [r.status_code for r in results] == [200, 200, 200]
            assert all(r.content.startswith(b"\x89PNG") for r in results)
            assert set(_encoder_pids(live)).isdisjoint(pids)
            assert httpx.get(f"{live.url}/v2/health/ready").status_code == 200
        assert live.loader.encoders.rebuilds == 2

        def cannot_start():
            raise OSError("no more processes")

        monkeypatch.setattr(live.loader.encoders, "_start_processes", cannot_start)
        os.kill(_encoder_pids(live)[0], signal.SIGKILL)
        time.sleep(0.5)
        _assert_documented_error(_png(live), 503, "could not be restarted")
        assert httpx.get(f"{live.url}/v2/health/ready").status_code == 503
        jpeg = httpx.post(
            f"{live.url}/v1/decode", content=save_safetensors({"latent": latent()}), headers=ST,
            params={"format": "jpeg"}, timeout=60,
        )  # fmt: skip
        assert jpeg.status_code == 503  # not ready: the pod is to be restarted, not half-used


# ---- item 5: parsing a body never stalls the event loop -------------------------------------------
@pytest.mark.parametrize("route", ["v1", "v2"])
def test_item_5_health_answers_while_a_body_is_parsed(server, monkeypatch, route) -> None:
    """The parser is held mid-parse (standing in for a 58 MB JSON body that takes seconds); liveness
    must answer meanwhile, which it cannot if parsing runs on the event loop."""
    from pidserve.server import kserve, request_codecs

    module, name = (request_codecs, "read_latent_body") if route == "v1" else (kserve, "parse_infer_request")
    parse = getattr(module, name)
    parsing, release = threading.Event(), threading.Event()

    def slow_parse(*args, **kwargs):
        parsing.set()
        release.wait(timeout=30)
        return parse(*args, **kwargs)

    monkeypatch.setattr(module, name, slow_parse)
    body, headers = (
        (save_safetensors({"latent": latent()}), ST)
        if route == "v1"
        else (_v2_body([_latent_input(latent())]), JSON)
    )
    results: list[httpx.Response] = []
    big = threading.Thread(
        target=lambda: results.append((_v1 if route == "v1" else _v2)(server, body, headers)), daemon=True
    )
    big.start()
    try:
        assert parsing.wait(timeout=30)
        live = httpx.get(f"{server.url}/v2/health/live", timeout=5)  # times out if the loop is blocked
        assert live.status_code == 200
        assert not release.is_set() and big.is_alive()  # answered while the parse was still held
    finally:
        release.set()
        big.join(timeout=60)
    assert results[0].status_code == 200, results[0].text[:200]


# ---- item 2: the cost of a request is bounded; a deadline stops the compute too ---------------------
COSTLY = {
    # name: (latent [B, 16, h, w], query, words): every body here is 4 MiB or less
    "one 8192x8192 image": ((1, 16, 256, 256), {"steps": 4}, "--max-output-pixels"),
    "16 images of 2048x2048": ((16, 16, 64, 64), {"steps": 4}, "--max-output-pixels"),
    "one 2048x2048 image untiled": ((1, 16, 64, 64), {"steps": 4, "tile": "off"}, "--max-pixel-steps"),
    "one 2048x2048 image in windows overlapping by 3/4": (
        (1, 16, 64, 64),
        {"steps": 4, "tile": "256x256:192"},
        "--max-pixel-steps",
    ),
}


@pytest.fixture(scope="module")
def default_limits():
    """A server with the CPU's default request limits (the shared server's are smaller)."""
    with live_server(max_request_latents=16, max_body_bytes=8 << 20) as live:
        yield live


@pytest.mark.parametrize("name", list(COSTLY))
def test_item_2_costly_requests_are_refused_with_the_limit_and_its_flag(default_limits, name) -> None:
    shape, query, flag = COSTLY[name]
    body = save_safetensors({"latent": torch.zeros(shape)})
    response = _v1(default_limits, body, ST, **query)
    _assert_documented_error(response, 413, flag)
    assert "cpu (fp32)" in response.json()["error"]["message"]
    limits = httpx.get(f"{default_limits.url}/v1/models").json()["limits"]
    assert limits["max_output_pixels"] == 2**22 and limits["max_pixel_steps"] == 2**25
    _still_serves(default_limits)


def test_item_2_an_untiled_decode_above_the_native_size_pays_for_its_global_attention(
    default_limits,
) -> None:
    """2048x2048 untiled is 16.8 M pixels x steps, under the 33.6 M limit, but its attention over 64x
    the native tokens makes it ~19x dearer per pixel: refused, with the tiled decode named; the same
    output in 121 native windows (31.7 M pixel-steps, ~43 s here: bench/RESULTS.md) is allowed."""
    from pidserve.model import PiDConfig, TilePlan, Tiling
    from pidserve.server.service import charged_pixel_steps

    body = save_safetensors({"latent": torch.zeros(1, 16, 64, 64)})
    response = _v1(default_limits, body, ST, steps=4, tile="off")
    _assert_documented_error(response, 413, "--max-pixel-steps")
    message = response.json()["error"]["message"]
    assert "untiled (above the native 256x256)" in message and "tile=auto" in message
    cfg = PiDConfig.preset("pid-tiny")
    plan = Tiling.parse("auto").plan((2048, 2048), cfg.native_size, cfg.output_scale)
    assert isinstance(plan, TilePlan) and plan.count == 121
    assert charged_pixel_steps(cfg, (2048, 2048), plan, 4, 0) == 121 * 256 * 256 * 4 < 2**25
    assert charged_pixel_steps(cfg, (256, 256), None, 4, 0) == 256 * 256 * 4  # native: pixels x steps
    untiled = charged_pixel_steps(cfg, (2048, 2048), None, 4, 0)
    assert untiled > 10 * 2048 * 2048 * 4 and untiled > 2**25
    _still_serves(default_limits)


def test_item_2_the_limits_are_settings() -> None:
    settings = ServerSettings(max_pixel_steps=10, device="cuda", precision="bf16")
    assert settings.request_limits() == (2**26, 10)
    assert ServerSettings(device="cuda:1", precision="fp8").request_limits() == (2**26, 2**28)


def test_item_2_a_deadline_stops_the_decode_between_steps() -> None:
    """A 512x512 decode takes seconds here; its 0.3 s deadline must end the compute too (the eager engine
    stops at the next sampler step), counted as a deadline drop, not a failure."""
    with live_server() as live:
        body = save_safetensors({"latent": latent(size=16)})
        late = _v1(live, body, ST, timeout=0.3, seed=1)
        _assert_documented_error(late, 504, "0.3 s")
        deadline = time.monotonic() + 30
        metrics = ""
        while time.monotonic() < deadline:
            metrics = httpx.get(f"{live.url}/metrics").text
            if 'pidserve_dropped_total{reason="deadline"} 1.0' in metrics:
                break
            time.sleep(0.05)
        assert 'pidserve_dropped_total{reason="deadline"} 1.0' in metrics
        assert "pidserve_batch_failures_total 0.0" in metrics
        assert live.engine.abandoned == 1  # the engine itself stopped part-way
        _still_serves(live)


# ---- item 6: shutdown has one deadline, inside the grace period; cut-off work gets 503 ---------------
def test_item_6_shutdown_cuts_off_at_its_deadline_with_503_and_exits_in_the_grace_period() -> None:
    """A batch stuck in the engine (standing in for one that outlasts the grace period) and a queued
    request when SIGTERM comes: both clients get 503 before the grace period ends, and the server is gone
    shortly after it, not after a second full grace period."""
    grace = 2
    with live_server(graceful_shutdown_s=grace, max_queue_delay_ms=0) as live:
        live.engine.gate.clear()
        try:
            results: dict[int, httpx.Response] = {}
            threads = []
            for seed in (GATED_SEED, 5):
                post = threading.Thread(target=lambda s=seed: results.__setitem__(s, _post_seed(live, s)))
                post.start()
                threads.append(post)
                if seed == GATED_SEED:
                    assert live.engine.entered.wait(timeout=30)
            deadline = time.monotonic() + 10
            while live.loader.batcher.depth < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            started = time.monotonic()
            live.server.should_exit = True  # what SIGTERM does
            for thread in threads:
                thread.join(timeout=30)
            answered = time.monotonic() - started
            while not live.server_done() and time.monotonic() - started < 30:
                time.sleep(0.05)
            exited = time.monotonic() - started
        finally:
            live.engine.gate.set()
        for seed in (GATED_SEED, 5):
            _assert_documented_error(results[seed], 503, "shut down")
            assert results[seed].headers["retry-after"]
        assert answered < grace  # every client had its answer inside the grace period
        assert exited < grace + 3, exited  # and the process was done soon after (not 2 x grace)


# ---- item 11: the CLI refuses what cannot work, at once, before any work is done ---------------------
def _cli(*args: str):
    from typer.testing import CliRunner

    from pidserve.cli import app

    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize(
    "args, words",
    [
        (["--checkpoint", "/no/such/file.safetensors"], "does not exist"),
        (["--backend", "tensorflow"], "--backend 'tensorflow'"),
        (["--device", "gpu"], "use cpu, cuda or cuda:N"),
        (["--variant", "2k_nope"], "pidserve info --list"),
    ],
)
def test_item_11_serve_with_settings_that_cannot_work_exits_before_binding(args, words) -> None:
    result = _cli("serve", "--port", "1", *args)  # port 1 would fail to bind: the check comes first
    assert result.exit_code == 2, result.output
    assert words in result.output


def test_item_11_serve_on_a_taken_port_fails_at_once() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = _cli("serve", "--port", str(port))
        assert result.exit_code == 2 and "cannot listen on 127.0.0.1" in result.output, result.output
        assert time.monotonic() - started < 10  # not after loading and warming the model up


def test_item_11_serve_exits_nonzero_when_the_model_cannot_load(tmp_path) -> None:
    """A checkpoint that exists but is not one: the background load fails and the process exits (the
    orchestrator restarts it) instead of serving 503 for ever."""
    import subprocess
    import sys

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a checkpoint")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.run(
        [sys.executable, "-m", "pidserve.cli", "serve", "--checkpoint", str(broken), "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode not in (0, None), process.stderr[-2000:]
    assert "the model failed to load" in process.stderr


def test_item_11_decode_checks_its_output_and_device_before_decoding(tmp_path) -> None:
    lat = tmp_path / "latent.safetensors"
    from safetensors.torch import save_file

    save_file({"latent": latent()}, str(lat))
    no_extension = _cli("decode", str(lat), "-o", str(tmp_path / "x"))
    assert no_extension.exit_code == 2 and ".png" in no_extension.output
    device = _cli("decode", str(lat), "--device", "gpu", "-o", str(tmp_path / "x.png"))
    assert device.exit_code == 2 and "cpu, cuda or cuda:N" in device.output
    into_directory = _cli("decode", str(lat), "-o", str(tmp_path) + "/")
    assert into_directory.exit_code == 0, into_directory.output
    assert (tmp_path / "latent.png").is_file()
    odd_input = _cli("decode", str(tmp_path / "latent.txt"))
    assert odd_input.exit_code == 2 and ".safetensors" in odd_input.output and ".png" in odd_input.output


def test_item_11_decode_reads_gif_and_tiff_and_refuses_giant_outputs(tmp_path) -> None:
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 255, (16, 24, 3), dtype=np.uint8)
    for suffix in (".gif", ".tif"):
        path = tmp_path / f"photo{suffix}"
        Image.fromarray(pixels).save(path)
        result = _cli("decode", str(path), "-o", str(tmp_path / f"out{suffix}.png"))
        assert result.exit_code == 0, result.output
        assert Image.open(tmp_path / f"out{suffix}.png").size == (96, 64)
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((1200, 1600, 3), np.uint8)).save(big)  # a 4000x3000 photo, scaled down
    result = _cli(
        "decode", str(big), "--max-output-pixels", str(4096 * 4096 // 4), "-o", str(tmp_path / "b.png")
    )
    assert result.exit_code == 2 and "--max-output-pixels" in result.output and "6400x4800" in result.output


def test_item_11_decode_url_writes_the_format_its_name_says(server, tmp_path) -> None:
    lat = tmp_path / "latent.safetensors"
    from safetensors.torch import save_file

    save_file({"latent": latent()}, str(lat))
    for name, magic in (("x.jpg", b"\xff\xd8"), ("x.webp", b"RIFF"), ("x.png", b"\x89PNG")):
        result = _cli("decode", str(lat), "--url", server.url, "-o", str(tmp_path / name))
        assert result.exit_code == 0, result.output
        assert (tmp_path / name).read_bytes().startswith(magic), name
