"""`pidserve serve` as a real process, and `pidserve decode --url` against a live server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from pidserve.cli import app

from .conftest import latent, reference

runner = CliRunner()


def test_decode_url_latent_file(server, reference_engine, tmp_path) -> None:
    path = tmp_path / "latent.safetensors"
    save_file({"latent": latent(seed=31), "sigma": torch.tensor([0.2])}, str(path))
    out = tmp_path / "out.png"
    result = runner.invoke(app, ["decode", str(path), "--url", server.url, "--seed", "4", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "request" in result.output
    expected = reference(reference_engine, latent(seed=31), [4], 0.2).numpy()[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out)), expected)


def test_decode_url_image_is_encoded_locally(server, tmp_path) -> None:
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 24, 3), dtype=np.uint8)).save(photo)
    out = tmp_path / "big.png"
    result = runner.invoke(app, ["decode", str(photo), "--url", server.url, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (24 * 4, 16 * 4)


def test_decode_url_reports_server_errors(server, tmp_path) -> None:
    path = tmp_path / "bad.safetensors"
    save_file({"latent": torch.zeros(1, 4, 2, 2)}, str(path))
    result = runner.invoke(app, ["decode", str(path), "--url", server.url])
    assert result.exit_code == 2
    assert "16 channels" in result.output
    unreachable = runner.invoke(app, ["decode", str(path), "--url", "http://127.0.0.1:9"])
    assert unreachable.exit_code == 2 and "could not reach" in unreachable.output


def test_serve_rejects_bad_settings() -> None:
    result = runner.invoke(app, ["serve", "--image-size", "big"])
    assert result.exit_code == 2 and "HEIGHTxWIDTH" in result.output
    result = runner.invoke(app, ["serve", "--png-encoder", "gif"])
    assert result.exit_code == 2 and "png_encoder" in result.output
    result = runner.invoke(app, ["serve", "--attention-backend", "fa3"])
    assert result.exit_code == 2 and "attention_backend" in result.output and "'cudnn'" in result.output


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_process_starts_serves_and_stops_on_sigterm() -> None:
    port = _free_port()
    env = {**os.environ, "PIDSERVE_ENCODE_WORKERS": "1", "PIDSERVE_MAX_BATCH": "2"}
    process = subprocess.Popen(
        [sys.executable, "-m", "pidserve.cli", "serve", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        models = httpx.get(f"{url}/v1/models").json()["models"][0]
        assert models["name"] == "pid-tiny" and models["max_batch"] == 2  # the variable reached the settings
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    # uvicorn finishes its shutdown, then re-raises the captured SIGTERM (exit status -15): a clean stop.
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "ready: pid-tiny" in output
    assert "decode queue drained" in output and "Application shutdown complete" in output
