"""tiny-ae training: held-out PSNR logged while it trains, checkpoints that resume exactly."""

from __future__ import annotations

import json

from pidserve.model.autoencoder import load_autoencoder
from pidserve.training.autoencoder import train_autoencoder
from pidserve.training.config import AutoencoderTrainConfig, load_config

from .conftest import read_metrics


def _overrides(run_dir, photo_dir, **extra) -> list[str]:
    values = {
        "run_dir": str(run_dir),
        "data": str(photo_dir),
        "holdout": str(photo_dir),
        "eval_every": 5,
        "eval_crops_per_photo": 2,
        "widths": [8, 8, 8, 16],
        "batch": 4,
        "crop": 32,
        "short_side": 64,
        "upscale": False,
        "lr": 3e-3,
        "lr_schedule": "cosine",
        "warmup": 2,
        "log_every": 1,
        "save_every": 5,
        "sample_every": 1000,
        "workers": 0,
        **extra,
    }
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def test_training_logs_held_out_psnr_and_writes_the_latent_statistics(tmp_path, photo_dir):
    run = tmp_path / "run"
    final = train_autoencoder(load_config(AutoencoderTrainConfig, None, _overrides(run, photo_dir, steps=30)))
    curve = [json.loads(line) for line in (run / "holdout.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == [5, 10, 15, 20, 25, 30]
    assert curve[-1]["psnr"] > curve[0]["psnr"] + 0.5, curve  # it learns
    assert curve[-1]["images"] == 30 * 4
    ae, info = load_autoencoder(final)
    assert info["train_steps"] == 30 and info["latent_stats"]["std"] > 0
    assert ae.cfg.widths == (8, 8, 8, 16)


def test_a_killed_run_resumes_on_the_same_loss_curve(tmp_path, photo_dir, monkeypatch):
    import pytest

    from pidserve.training import autoencoder

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_autoencoder(load_config(AutoencoderTrainConfig, None, _overrides(straight, photo_dir, steps=10)))
    save = autoencoder.save_training_state

    def save_then_die(run_dir, step, *args, **kwargs):
        save(run_dir, step, *args, **kwargs)
        raise KeyboardInterrupt  # killed right after the step-5 checkpoint

    monkeypatch.setattr(autoencoder, "save_training_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_autoencoder(load_config(AutoencoderTrainConfig, None, _overrides(resumed, photo_dir, steps=10)))
    monkeypatch.setattr(autoencoder, "save_training_state", save)
    train_autoencoder(load_config(AutoencoderTrainConfig, None, _overrides(resumed, photo_dir, steps=10)))
    a = [m["loss"] for m in read_metrics(straight)]
    b = [m["loss"] for m in read_metrics(resumed)]
    assert len(a) == 10 and len(b) == 10
    assert a == b  # exact: same batches, same optimizer state and learning rate after the restart
    curve = [json.loads(line)["psnr"] for line in (resumed / "holdout.jsonl").read_text().splitlines()]
    straight_curve = [
        json.loads(line)["psnr"] for line in (straight / "holdout.jsonl").read_text().splitlines()
    ]
    assert curve == straight_curve
