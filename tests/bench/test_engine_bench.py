"""The engine benchmark: statistics on synthetic values, and a short real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pidserve.bench.engine import markdown_table, percentile, random_batch, time_engine
from pidserve.cli import app
from pidserve.engines import open_engine
from pidserve.model import PiDConfig, PiDNet


def test_percentile_interpolates_between_order_statistics() -> None:
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 5.0
    assert percentile(values, 50) == 3.0
    assert percentile(values, 90) == pytest.approx(4.6)
    with pytest.raises(ValueError):
        percentile([], 50)


def test_time_engine_reports_per_image_figures() -> None:
    net = PiDNet(PiDConfig.preset("tiny_v1")).eval()
    engine = open_engine("torch", net=net, max_batch=2)
    timing = time_engine(engine, net.cfg, random_batch(net.cfg, 2, (64, 64), 4), warmup=1, repeat=2)
    assert timing.batch == 2 and timing.image_size == (64, 64) and timing.repeat == 2
    assert 0 < timing.ms_per_image_median <= timing.ms_per_image_p90
    assert timing.tflops_achieved > 0
    assert {"condition", "steps", "postprocess"} <= set(timing.stages_ms)
    table = markdown_table([timing])
    assert table.count("\n") == 2 and "| torch | cpu | fp32 | 2 | 64x64 |" in table


def test_bench_engine_command_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["bench", "engine", "--preset", "tiny_v1", "--size", "64x64", "--backends", "torch"]
    result = CliRunner().invoke(app, [*args, "--repeat", "2", "--warmup", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["machine"]["torch"] == torch.__version__
    assert report["results"][0]["backend"] == "torch"
    assert "| torch |" in result.output
