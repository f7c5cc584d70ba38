"""bench http: statistics on synthetic records, the loopback rule, and real runs against `pidserve serve`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pidserve.bench.http_load import (
    STATUS_TRANSPORT_ERROR,
    HttpPlan,
    LoadLevel,
    NotLoopback,
    RequestRecord,
    findings,
    local_server,
    markdown_table,
    poisson_arrivals,
    require_loopback,
)
from pidserve.bench.stats import Summary
from pidserve.cli import app

from .plots_check import assert_is_plot

SIZE = "64x64"  # pid-tiny: a 2x2 latent; ~40 ms per decode on 2 cores


# ---- synthetic ---------------------------------------------------------------------------------------
def _record(
    start: float, ms: float, status: int = 200, batch: int = 1, compute: float = 30.0
) -> RequestRecord:
    ok = status == 200
    return RequestRecord(
        start=start,
        end=start + ms / 1e3,
        status=status,
        images=1 if ok else 0,
        response_bytes=1000 if ok else 0,
        server_ms={"queue": 2.0, "compute": compute, "encode": 1.0} if ok else {},
        batch_size=batch if ok else 0,
    )


def test_load_level_from_synthetic_records() -> None:
    # 8 good requests, 40..110 ms, over a 1-second window, plus a 429 and a transport error.
    records = [_record(0.1 * i, 40.0 + 10 * i, batch=1 + i % 2) for i in range(8)]
    records += [_record(0.0, 5.0, status=429), _record(0.5, 500.0, status=STATUS_TRANSPORT_ERROR)]
    level = LoadLevel.from_records("png", "concurrency", 4, records, engine_batch=1.5)
    assert level.sent == 10 and level.ok == 8
    assert level.errors == {"429": 1, "transport": 1}
    assert level.latency_ms is not None
    assert level.latency_ms.n == 8 and level.latency_ms.median == pytest.approx(75.0)
    assert level.latency_ms.max == pytest.approx(110.0)
    # window: first start 0.0 -> last end 0.7 + 0.110 = 0.81 s (the transport error ends at 1.0)
    assert level.duration_s == pytest.approx(1.0)
    assert level.images_per_s == pytest.approx(8.0)
    assert level.server_ms == {"compute": 30.0, "encode": 1.0, "queue": 2.0}
    assert level.mean_batch_per_request == pytest.approx(1.5) and level.mean_engine_batch == 1.5
    assert level.mean_response_bytes == 1000


def test_a_level_with_only_failures_has_no_latency() -> None:
    level = LoadLevel.from_records("raw", "rate", 5.0, [_record(0.0, 3.0, status=503)], engine_batch=None)
    assert level.ok == 0 and level.latency_ms is None and level.images_per_s == 0.0
    table = markdown_table([level])
    assert "| raw | 5 | 0/1 | 503: 1 | - | - | - |" in table


def _level(fmt: str, load: float, latency: float, images_per_s: float, compute: float) -> LoadLevel:
    return LoadLevel(
        format=fmt,
        mode="concurrency",
        load=load,
        sent=10,
        ok=10,
        errors={},
        duration_s=1.0,
        images_per_s=images_per_s,
        latency_ms=Summary.of([latency]),
        server_ms={"compute": compute},
        mean_batch_per_request=1.0,
        mean_engine_batch=1.0,
        mean_response_bytes=1.0,
    )


def test_findings_compare_the_lowest_and_highest_levels_of_each_format() -> None:
    levels = [_level("raw", 1, 110.0, 9.0, 100.0), _level("raw", 8, 400.0, 18.0, 300.0)]
    found = findings(levels, engine_baseline_ms=100.0)
    assert found == {
        "raw_latency_over_server_compute_at_1": pytest.approx(1.1),
        "raw_latency_over_engine_at_1": pytest.approx(1.1),
        "raw_images_per_s_gain_8_over_1": pytest.approx(2.0),
    }
    assert "raw_latency_over_engine_at_1" not in findings(levels, engine_baseline_ms=None)


def test_poisson_arrivals_have_the_offered_rate_and_are_reproducible() -> None:
    times = poisson_arrivals(20.0, 20000, seed=3)
    assert times == sorted(times) and times == poisson_arrivals(20.0, 20000, seed=3)
    assert 20000 / times[-1] == pytest.approx(20.0, rel=0.03)
    with pytest.raises(ValueError, match="rate must be > 0"):
        poisson_arrivals(0.0, 5)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:8000/v1"])
def test_loopback_urls_are_accepted(url: str) -> None:
    require_loopback(url)


@pytest.mark.parametrize("url", ["http://192.0.2.7:8000", "http://10.1.2.3", "http://[2001:db8::1]:80"])
def test_other_hosts_are_refused(url: str) -> None:
    with pytest.raises(NotLoopback, match="only loads servers on loopback"):
        require_loopback(url)
    with pytest.raises(NotLoopback, match="no host"):
        require_loopback("/v1/decode")


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        (HttpPlan(["raw"], "burst", [1]), "mode must be"),
        (HttpPlan(["raw"], "concurrency", [1.5]), "whole numbers"),
        (HttpPlan(["raw"], "rate", [-2.0]), "must be > 0"),
        (HttpPlan([], "rate", [2.0]), "at least one format"),
        (HttpPlan(["raw"], "rate", [2.0], requests=0), "requests must be >= 1"),
    ],
)
def test_bad_plans_are_refused(plan: HttpPlan, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan.validate()


# ---- real runs ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with local_server(["--max-batch", "4", "--image-size", SIZE, "--max-queue-delay-ms", "20"], log) as url:
        yield url


def _bench(out: Path, *args: str) -> dict:
    result = CliRunner().invoke(
        app, ["bench", "http", "--size", SIZE, "--requests", "6", "--warmup", "1", "--out", str(out), *args]
    )
    assert result.exit_code == 0, result.output
    return json.loads((out / "http.json").read_text())


def test_concurrency_sweep_against_a_running_server(server_url: str, tmp_path: Path) -> None:
    report = _bench(tmp_path, "--url", server_url, "--concurrency", "1,3", "--formats", "raw,png")
    results = report["results"]
    assert results["model"]["name"] == "pid-tiny" and results["engine_baseline_ms_per_image"] is None
    levels = results["levels"]
    assert [(lv["format"], lv["load"]) for lv in levels] == [("raw", 1), ("raw", 3), ("png", 1), ("png", 3)]
    for lv in levels:
        assert lv["ok"] == lv["sent"] == 6 and lv["errors"] == {}
        assert 0 < lv["latency_ms"]["median"] <= lv["latency_ms"]["p99"]
        assert lv["images_per_s"] > 0 and lv["server_ms"]["compute"] > 0
        assert lv["mean_engine_batch"] >= 1
    raw, png = levels[0], levels[2]
    assert raw["mean_response_bytes"] == 64 * 64 * 3  # raw uint8 pixels
    assert png["mean_response_bytes"] < raw["mean_response_bytes"]  # PNG compresses them
    # three clients and a 20 ms batching window: some engine batches hold more than one latent
    assert levels[1]["mean_engine_batch"] > 1
    assert "raw_images_per_s_gain_3_over_1" in results["findings"]
    assert report["command"].startswith("pidserve bench http --url")
    assert_is_plot(tmp_path / "latency_vs_load.png")
    assert "| raw | 3 | 6/6 |" in (tmp_path / "http.md").read_text()


def test_open_loop_rate_against_a_running_server(server_url: str, tmp_path: Path) -> None:
    report = _bench(tmp_path, "--url", server_url, "--rate", "10", "--formats", "jpeg", "--no-plots")
    (level,) = report["results"]["levels"]
    assert level["mode"] == "rate" and level["load"] == 10 and level["ok"] == 6
    assert "--rate 10" in report["command"] and report["command"].endswith("--no-plots")
    assert not (tmp_path / "latency_vs_load.png").exists()


def test_refuses_a_remote_server_and_a_bad_option(tmp_path: Path) -> None:
    remote = CliRunner().invoke(
        app, ["bench", "http", "--url", "http://192.0.2.7:8000", "--out", str(tmp_path)]
    )
    assert remote.exit_code == 2 and "only loads servers on loopback" in remote.output
    bad = CliRunner().invoke(app, ["bench", "http", "--concurrency", "0,2"])
    assert bad.exit_code == 2 and "--concurrency must be >= 1" in bad.output


def test_starts_its_own_server_and_times_the_engine_alone(tmp_path: Path) -> None:
    report = _bench(tmp_path, "--concurrency", "2", "--formats", "raw", "--no-plots", "--max-batch", "2")
    results = report["results"]
    assert results["engine_baseline_ms_per_image"] > 0
    assert len(results["engine_baseline_runs_ms"]) == 2  # before the server started and after it stopped
    assert "raw_latency_over_engine_at_2" in results["findings"]
    assert results["levels"][0]["ok"] == 6
    log = (tmp_path / "server.log").read_text()
    assert "engine: backend=torch" in log and "drain" in log.lower()


def test_a_preset_is_served_on_random_weights_deleted_afterwards(tmp_path: Path) -> None:
    """bench http --preset load-tests a model without its checkpoint (speed does not depend on weights)."""
    report = _bench(tmp_path, "--preset", "tiny_v1", "--concurrency", "1", "--formats", "raw", "--no-plots")
    results = report["results"]
    model = results["model"]
    assert model["weights"] == "random (tiny_v1)" and model["name"] == "random-tiny_v1"
    assert results["levels"][0]["ok"] == 6 and results["engine_baseline_ms_per_image"] > 0
    assert (
        f"loading checkpoint {tmp_path / 'random-tiny_v1.safetensors'}"
        in (tmp_path / "server.log").read_text()
    )
    assert not list(tmp_path.glob("*.safetensors"))  # 2.8 GB for a 2k model: not left behind


def test_a_preset_excludes_a_checkpoint_and_must_exist(tmp_path: Path) -> None:
    both = CliRunner().invoke(app, ["bench", "http", "--preset", "tiny_v1", "--checkpoint", "x.safetensors"])
    assert both.exit_code == 2 and "leave out --url, --checkpoint and --variant" in both.output
    unknown = CliRunner().invoke(app, ["bench", "http", "--preset", "2k_pixart", "--out", str(tmp_path)])
    assert unknown.exit_code == 2 and "unknown PiD preset '2k_pixart'" in unknown.output
