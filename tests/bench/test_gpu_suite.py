"""bench/gpu_suite.sh, to the boundary that runs without a GPU: lint, usage, stage bookkeeping."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
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


def test_a_stage_of_two_commands_shares_its_time_limit_and_fails_if_either_fails(tmp_path: Path) -> None:
    # `attention` runs bench kernels, then bench engine: each gets a share of STAGE_TIMEOUT (25 % and
    # 70 %) so the stage ends within the limit instead of taking it twice, and a failure of the first
    # command fails the stage even when the second succeeds. A stand-in `timeout` records the limits
    # it is given and fails the kernels benchmark.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    stub = bin_dir / "timeout"
    # arguments: --signal=INT --kill-after=20 SECONDS PYTHON -m pidserve.cli bench WHAT ...
    stub.write_text(f'#!/usr/bin/env bash\necho "$3 $8" >> {calls}\n[ "$8" != kernels ]\n')
    stub.chmod(0o755)
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "STAGE_TIMEOUT": "12"}
    env |= {"WHEELS": str(tmp_path / "no-wheels"), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", str(SUITE), "attention"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=100
    )
    assert calls.read_text().splitlines() == ["3 kernels", "8 engine"]
    assert done.returncode == 1 and "=== attention FAILED" in (tmp_path / "out" / "attention.log").read_text()


def test_a_stage_timeout_must_be_whole_seconds(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "STAGE_TIMEOUT": "9m"}
    done = subprocess.run(["bash", str(SUITE), "tests"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "STAGE_TIMEOUT must be a whole number of seconds, got '9m'" in done.stderr
