"""bench/gpu_suite.sh, to the boundary that runs without a GPU: lint, usage, stage bookkeeping."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "bench" / "gpu_suite.sh"


def _run(*args: str, out: Path) -> subprocess.CompletedProcess[str]:
    # no wheels to install: this test's Python already has pidserve's dependencies
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "WHEELS": str(out / "no-wheels")}
    return subprocess.run(
        ["bash", str(SUITE), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_suite_and_the_ci_script_pass_shellcheck() -> None:
    shellcheck = Path(sys.executable).parent / "shellcheck"
    done = subprocess.run(
        [str(shellcheck), str(SUITE), str(ROOT / ".ci" / "run")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_without_a_stage_it_prints_its_usage(tmp_path: Path) -> None:
    done = _run(out=tmp_path)
    assert done.returncode == 2
    assert "Stages, in the order to run them:" in done.stdout and "fp8" in done.stdout


def test_a_failing_stage_is_logged_packed_and_the_next_stage_still_runs(tmp_path: Path) -> None:
    done = _run("warp-drive", "also-unknown", out=tmp_path)
    assert done.returncode == 1
    assert "torch" in done.stdout and "NO GPU" in done.stdout  # what the install step found
    for stage in ("warp-drive", "also-unknown"):
        log = (tmp_path / f"{stage}.log").read_text()
        assert f"unknown stage '{stage}'" in log and f"=== {stage} FAILED" in log
        with tarfile.open(tmp_path / f"{stage}.tar.gz") as packed:
            assert sorted(packed.getnames()) == [stage, f"{stage}.log"]


def _hanging_python(tmp_path: Path) -> Path:
    """A stand-in Python whose benchmarks hang (it still runs the suite's install checks)."""
    slow_python = tmp_path / "python"
    slow_python.write_text(
        f'#!/usr/bin/env bash\nif [ "$1 $2" = "-m pidserve.cli" ]; then echo measuring; exec sleep 120; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    slow_python.chmod(0o755)
    return slow_python


def test_a_stage_past_its_time_limit_is_interrupted_and_packed(tmp_path: Path) -> None:
    # The suite must stop a hanging benchmark at STAGE_TIMEOUT, keep its log, and go on to the next
    # stage (on the GPU machine a call has 10 minutes, whatever a stage needs).
    slow_python = _hanging_python(tmp_path)
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": str(slow_python), "STAGE_TIMEOUT": "2"}
    env["WHEELS"] = str(tmp_path / "no-wheels")
    done = subprocess.run(
        ["bash", str(SUITE), "kernels", "eager"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 1
    for stage in ("kernels", "eager"):
        log = (tmp_path / "out" / f"{stage}.log").read_text()
        assert "measuring" in log and f"=== {stage} FAILED" in log
        assert (tmp_path / "out" / f"{stage}.tar.gz").is_file()


def test_a_stage_of_two_commands_shares_its_time_limit(tmp_path: Path) -> None:
    # `attention` runs bench kernels, then bench engine: each gets a share of STAGE_TIMEOUT (25 % and
    # 70 %), so the stage ends within the limit instead of taking it twice.
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": str(_hanging_python(tmp_path))}
    env |= {"STAGE_TIMEOUT": "12", "WHEELS": str(tmp_path / "no-wheels")}
    started = time.monotonic()
    done = subprocess.run(
        ["bash", str(SUITE), "attention"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=100
    )
    elapsed = time.monotonic() - started
    log = (tmp_path / "out" / "attention.log").read_text()
    assert done.returncode == 1 and log.count("measuring") == 2  # both commands ran and were stopped
    # 3 s + 8 s of benchmarks plus the install checks; a full STAGE_TIMEOUT per command would be 24 s
    assert elapsed < 20, elapsed
