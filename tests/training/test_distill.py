from __future__ import annotations

import pytest
import torch

from pidserve.model import PiDNet, load_checkpoint
from pidserve.training.config import DistillTrainConfig, TeacherTrainConfig, load_config
from pidserve.training.data import CropSpec, LatentNoise, PhotoCrops
from pidserve.training.distill import Distiller, train_distill
from pidserve.training.inputs import FrozenEncoder, latent_inputs
from pidserve.training.teacher import build_net_config

from .conftest import read_metrics, teacher_overrides


@pytest.fixture(scope="module")
def tiny_teacher(photo_dir, tiny_ae_file) -> PiDNet:
    cfg = load_config(TeacherTrainConfig, None, teacher_overrides("/unused", photo_dir, tiny_ae_file))
    torch.manual_seed(0)
    return PiDNet(build_net_config(cfg.net))


def _distill_cfg(tmp_path, photo_dir, ae, **extra) -> DistillTrainConfig:
    overrides = [
        o for o in teacher_overrides(tmp_path, photo_dir, ae, **extra) if not o.startswith(("net=", "shift"))
    ]
    return load_config(DistillTrainConfig, None, overrides)


def _fixed_batch(cfg, net, photo_dir, encoder):
    ds = PhotoCrops(photo_dir, CropSpec(cfg.crop, net.cfg.sr_scale, cfg.short_side), seed=7)
    items = [ds[50_000 + i] for i in range(8)]
    hr = torch.stack([it["hr"] for it in items])
    seeds = torch.stack([it["seed"] for it in items])
    inputs = latent_inputs(encoder, torch.stack([it["lr"] for it in items]), seeds, LatentNoise())
    return hr, inputs, seeds


def test_fake_score_and_discriminator_updates_decrease_their_losses(
    tmp_path, photo_dir, tiny_ae_file, tiny_teacher
):
    cfg = _distill_cfg(tmp_path, photo_dir, tiny_ae_file)
    d = Distiller(tiny_teacher, cfg, torch.device("cpu"))
    encoder = FrozenEncoder(tiny_ae_file, tiny_teacher.cfg, torch.device("cpu"))
    hr, inputs, seeds = _fixed_batch(cfg, tiny_teacher, photo_dir, encoder)
    params = list(d.fake.parameters()) + list(d.head.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    first = None
    for _ in range(25):
        loss, metrics = d.fake_loss(hr, inputs, seeds, k=1)
        first = first or metrics
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert metrics["fake_fm"] < 0.8 * first["fake_fm"]
    assert metrics["d_loss"] < first["d_loss"]


@pytest.mark.parametrize("mode", ["teacher_forcing", "backward_simulation"])
def test_student_loss_reaches_only_the_student(mode, tmp_path, photo_dir, tiny_ae_file, tiny_teacher):
    cfg = _distill_cfg(tmp_path, photo_dir, tiny_ae_file, student_mode=mode)
    d = Distiller(tiny_teacher, cfg, torch.device("cpu"))
    with torch.no_grad():  # make the fake score differ from the teacher, so the DMD gradient is non-zero
        for p in d.fake.parameters():
            p.add_(0.01 * torch.randn_like(p))
    encoder = FrozenEncoder(tiny_ae_file, tiny_teacher.cfg, torch.device("cpu"))
    hr, inputs, seeds = _fixed_batch(cfg, tiny_teacher, photo_dir, encoder)
    loss, metrics = d.student_loss(hr, inputs, seeds, k=2)
    loss.backward()
    assert metrics["dmd"] > 0 and torch.isfinite(loss)
    assert "regression" not in metrics  # off by default: pure DMD2
    assert sum(float(p.grad.abs().sum()) for p in d.student.parameters() if p.grad is not None) > 0
    assert all(p.grad is None for p in d.teacher.parameters())
    assert all(p.grad is None for p in d.fake.parameters())


def test_distillation_runs_resumes_and_writes_a_student(tmp_path, photo_dir, tiny_ae_file, tiny_teacher):
    from pidserve.model import save_checkpoint

    teacher_file = tmp_path / "teacher.safetensors"
    save_checkpoint(tiny_teacher, teacher_file)
    common = {"teacher": str(teacher_file), "fake_updates": 2, "lr": 1e-3, "fake_lr": 1e-3, "save_every": 2}
    straight = _distill_cfg(tmp_path / "a", photo_dir, tiny_ae_file, steps=4, **common)
    train_distill(straight)
    train_distill(_distill_cfg(tmp_path / "b", photo_dir, tiny_ae_file, steps=2, **common))
    out = train_distill(_distill_cfg(tmp_path / "b", photo_dir, tiny_ae_file, steps=4, **common))
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    student = load_checkpoint(out)
    assert any(not torch.equal(v, tiny_teacher.state_dict()[k]) for k, v in student.state_dict().items())


def test_optional_regression_term_pulls_the_student_towards_the_real_image(
    tmp_path, photo_dir, tiny_ae_file, tiny_teacher
):
    cfg = _distill_cfg(
        tmp_path, photo_dir, tiny_ae_file, regression_weight=1.0, dmd_weight=0.0, gan_weight=0.0
    )
    d = Distiller(tiny_teacher, cfg, torch.device("cpu"))
    encoder = FrozenEncoder(tiny_ae_file, tiny_teacher.cfg, torch.device("cpu"))
    hr, inputs, seeds = _fixed_batch(cfg, tiny_teacher, photo_dir, encoder)
    opt = torch.optim.Adam(d.student.parameters(), lr=3e-3)
    values = []
    for _ in range(15):
        loss, metrics = d.student_loss(hr, inputs, seeds, k=0)
        values.append(metrics["regression"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert values[-1] < 0.7 * values[0], values
