"""Two gloo processes (torchrun) must train the same parameters as one process, same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from pidserve.model import load_checkpoint

from .conftest import teacher_overrides


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(kind: str, processes: int, overrides: list[str]) -> None:
    cli = [sys.executable, "-m", "pidserve.cli", "train", kind]
    if processes > 1:
        cli = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={processes}",
            f"--master_port={_free_port()}",
            "--master_addr=127.0.0.1",
            "-m",
            "pidserve.cli",
            "train",
            kind,
        ]
    args = [a for o in overrides for a in ("--set", o)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cli + args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize(("kind", "strategy"), [("teacher", "ddp"), ("teacher", "fsdp"), ("distill", "ddp")])
def test_two_gloo_processes_equal_one_process(kind, strategy, tmp_path, photo_dir, tiny_ae_file):
    teacher_file = None
    if kind == "distill":
        base = tmp_path / "teacher"
        _train("teacher", 1, teacher_overrides(base, photo_dir, tiny_ae_file, steps=2))
        teacher_file = base / "teacher_ema.safetensors"
    results = {}
    for processes in (1, 2):
        run = tmp_path / f"{kind}{processes}"
        overrides = teacher_overrides(run, photo_dir, tiny_ae_file, steps=3, strategy=strategy, save_every=2)
        if kind == "distill":
            overrides = [o for o in overrides if not o.startswith(("net=", "shift"))]
            overrides += [f"teacher={teacher_file}", "fake_updates=2", "lr=1e-3", "fake_lr=1e-3"]
        _train(kind, processes, overrides)
        out = run / ("teacher_ema.safetensors" if kind == "teacher" else "student.safetensors")
        results[processes] = load_checkpoint(out).state_dict()
    # The checkpoint of the 2-process run holds full (gathered) tensors, also under FSDP.
    assert (tmp_path / f"{kind}2" / "checkpoints" / "step_0000002" / "weights.safetensors").is_file()
    one, two = results[1], results[2]
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert worst < 1e-4, worst
    # The runs really trained: the weights moved away from the initial ones by far more than that.
    assert any(float(v.abs().max()) > 0 for v in one.values())
