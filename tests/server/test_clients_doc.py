"""Every example in docs/clients.md that can run here, run against a live server (HTTP and gRPC):
the docs stay true to the code. Examples that need a diffusers pipeline or perf_analyzer are skipped
by name (their client calls are tested in test_remote_decode.py and test_triton.py)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import live_server

DOC = Path(__file__).resolve().parents[2] / "docs" / "clients.md"
BLOCKS = re.findall(r"```(bash|python)\n(.*?)```", DOC.read_text(), flags=re.S)
# What cannot run here: a diffusers pipeline's `pipe`, the perf_analyzer binary.
RUNNABLE = [(kind, code) for kind, code in BLOCKS if "pipe." not in code and "perf_analyzer" not in code]


@pytest.fixture(scope="module")
def doc_server():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        grpc_port = sock.getsockname()[1]
    with live_server(grpc_port=grpc_port) as live:
        yield live, grpc_port


def test_the_doc_has_the_examples_it_promises() -> None:
    kinds = [kind for kind, _ in RUNNABLE]
    assert kinds.count("python") >= 3 and kinds.count("bash") >= 1


@pytest.mark.parametrize("index", range(len(RUNNABLE)))
def test_each_runnable_example_works(doc_server, index, tmp_path) -> None:
    live, grpc_port = doc_server
    kind, code = RUNNABLE[index]
    code = code.replace("127.0.0.1:8001", f"127.0.0.1:{grpc_port}").replace("127.0.0.1:8000", live.host_port)
    code = code.replace("localhost:8000", live.host_port)
    if kind == "bash":
        code = code.replace("python -", f"{sys.executable} -")
        result = subprocess.run(
            ["bash", "-e", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
    else:
        result = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )  # fmt: skip
    assert result.returncode == 0, result.stdout[-1500:] + result.stderr[-1500:]
    if "out.png" in code:
        assert (tmp_path / "out.png").read_bytes().startswith(b"\x89PNG")
