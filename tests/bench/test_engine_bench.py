"""The engine benchmark: statistics on synthetic values, and a short real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pidserve.bench.engine import markdown_table, random_batch, time_engine
from pidserve.cli import app
from pidserve.engines import open_engine
from pidserve.model import PiDConfig, PiDNet

from .plots_check import assert_is_plot


def test_time_engine_reports_per_image_figures() -> None:
    net = PiDNet(PiDConfig.preset("tiny_v1")).eval()
    engine = open_engine("torch", net=net, max_batch=2)
    timing = time_engine(engine, net.cfg, random_batch(net.cfg, 2, (64, 64), 4), warmup=1, repeat=2)
    assert timing.batch == 2 and timing.image_size == (64, 64) and timing.repeat == 2
    assert 0 < timing.ms_per_image_median <= timing.ms_per_image_p90
    assert timing.tflops_achieved > 0
    assert {"condition", "steps", "postprocess"} <= set(timing.stages_ms)
    table = markdown_table([timing])
    assert table.count("\n") == 2 and "| torch | auto | cpu | fp32 | 2 | 64x64 |" in table


def test_bench_engine_command_writes_report_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "engine"
    args = [
        "bench",
        "engine",
        "--checkpoint",
        "default",  # the embedded pid-tiny
        "--size",
        "64x64",
        "--backends",
        "torch",
        "--batches",
        "1,2",
        "--attention-backends",
        "auto,math",
    ]
    result = CliRunner().invoke(app, [*args, "--repeat", "2", "--warmup", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "engine.json").read_text())
    command = report["command"]  # the options that differ from their defaults, in declaration order
    assert command.startswith("pidserve bench engine --checkpoint default --backends torch --size 64x64")
    assert "--preset" not in command and "--device" not in command
    assert report["versions"]["torch"] == torch.__version__ and report["git"]
    assert report["machine"]["logical_cores"] >= 1 and "date" in report
    rows = report["results"]
    # backend x attention kernel at each batch size, side by side
    assert [(r["batch"], r["attention"]) for r in rows] == [
        (1, "auto"),
        (1, "math"),
        (2, "auto"),
        (2, "math"),
    ]
    for row in rows:
        assert row["images_per_s"] == pytest.approx(1e3 / row["ms_per_image_median"])
        assert row["flops_per_image"] > 0 and row["device_ms_per_image"] > 0
    assert "| torch | math | cpu | fp32 | 2 | 64x64 |" in (out / "engine.md").read_text()
    for plot in ("throughput_vs_batch.png", "stages.png"):
        assert_is_plot(out / plot)


def test_bench_engine_refuses_bad_options(tmp_path: Path) -> None:
    runner = CliRunner()
    both = runner.invoke(app, ["bench", "engine", "--preset", "tiny_v1", "--checkpoint", "default"])
    assert both.exit_code == 2 and "either --checkpoint or --preset" in both.output
    bad = runner.invoke(app, ["bench", "engine", "--preset", "tiny_v1", "--batches", "1,x"])
    assert bad.exit_code == 2 and "--batches must be comma-separated integers" in bad.output
    backend = runner.invoke(app, ["bench", "engine", "--preset", "tiny_v1", "--backends", "nope"])
    assert backend.exit_code == 2 and "unknown backend" in backend.output
    kernel = runner.invoke(app, ["bench", "engine", "--preset", "tiny_v1", "--attention-backends", "cudnn"])
    assert kernel.exit_code == 2 and "cudnn attention does not run on cpu" in kernel.output


def test_plots_without_matplotlib_fail_with_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    args = ["bench", "engine", "--checkpoint", "default", "--size", "32x32", "--backends", "torch"]
    result = CliRunner().invoke(app, [*args, "--repeat", "1", "--warmup", "0", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "pip install 'pidserve[bench]'" in result.output
    assert "--no-plots" in result.output
    assert (tmp_path / "engine.json").is_file()  # the numbers are kept; only the plots are missing
    ok = CliRunner().invoke(
        app, [*args, "--repeat", "1", "--warmup", "0", "--out", str(tmp_path), "--no-plots"]
    )
    assert ok.exit_code == 0, ok.output
