"""Tiny photo folders, a tiny autoencoder and tiny recipes, so training tests run in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pidserve.model.autoencoder import AutoencoderConfig, TinyAutoencoder, save_autoencoder

TINY_NET = {
    "preset": "tiny_v1",
    "latent_space": "tiny-ae",
    "hidden_size": 32,
    "num_heads": 2,
    "patch_depth": 2,
    "pixel_hidden_size": 4,
    "pixel_attn_hidden_size": 16,
    "pixel_num_heads": 2,
    "pixel_depth": 1,
    "adapter_hidden": 16,
    "adapter_res_blocks": 1,
    "rope_ref_size": [32, 32],
    "aux_rgb_head": True,
}


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six 96x80 RGB 'photos': smooth colour fields with stripes and noise (real PNG files)."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:80, 0:96] / 80.0
    for i in range(6):
        base = np.stack([np.sin(3 * xx + i), np.cos(2 * yy - i), np.sin(xx * yy * 5 + i)], axis=-1)
        stripes = 0.3 * np.sign(np.sin(xx * (8 + 2 * i) * np.pi))[..., None]
        image = 0.5 + 0.3 * base + stripes * 0.5 + 0.05 * rng.standard_normal((80, 96, 3))
        Image.fromarray((image.clip(0, 1) * 255).astype(np.uint8)).save(folder / f"photo{i}.png")
    return folder


@pytest.fixture(scope="session")
def tiny_ae_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    ae = TinyAutoencoder(AutoencoderConfig(latent_channels=16, widths=(8, 8, 8, 16)))
    path = tmp_path_factory.mktemp("ae") / "ae.safetensors"
    save_autoencoder(ae, path, {"latent_stats": {"mean": 0.0, "std": 1.0}})
    return path


def teacher_overrides(run_dir: Path, photo_dir: Path, ae: Path, **extra: object) -> list[str]:
    values = {
        "run_dir": str(run_dir),
        "data": str(photo_dir),
        "autoencoder": str(ae),
        "net": TINY_NET,
        "batch": 4,
        "crop": 32,
        "short_side": 64,
        "workers": 0,
        "lr": 3e-3,
        "warmup": 0,
        "log_every": 1,
        "save_every": 1000,
        "sample_every": 1000,
        "shift": 1.0,
        "shift_base_size": 32,
        **extra,
    }
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
