from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pidserve.model import PiDNet, load_checkpoint
from pidserve.training.config import DistillTrainConfig, TeacherTrainConfig, load_config
from pidserve.training.data import CropSpec, LatentNoise, PhotoCrops
from pidserve.training.distill import Distiller, _student_init, train_distill
from pidserve.training.inputs import FrozenEncoder, latent_inputs
from pidserve.training.loop import fft_magnitude_l1
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


def _student_file(tmp_path, teacher: PiDNet) -> Path:
    """A distilled student as shipped: the teacher's architecture without the aux RGB head, other weights."""
    from pidserve.model import save_checkpoint

    torch.manual_seed(1)
    student = PiDNet(teacher.cfg.replace(aux_rgb_head=False))
    path = tmp_path / "student.safetensors"
    save_checkpoint(student, path)
    return path


def test_a_paired_fine_tune_starts_from_student_init_and_never_runs_the_fake_score(
    tmp_path, photo_dir, tiny_ae_file, tiny_teacher
):
    from pidserve.model import save_checkpoint

    teacher_file = tmp_path / "teacher.safetensors"
    save_checkpoint(tiny_teacher, teacher_file)
    init = _student_file(tmp_path, tiny_teacher)
    paired = {
        "teacher": str(teacher_file),
        "student_init": str(init),
        "fake_updates": 0,
        "dmd_weight": 0.0,
        "gan_weight": 0.0,
        "regression_weight": 1.0,
        "fft_weight": 0.1,
        "cell_mean_weight": 1.0,
        "student_mode": "backward_simulation",
        "rollout_steps": [3],
    }
    cfg = _distill_cfg(tmp_path / "run", photo_dir, tiny_ae_file, steps=3, **paired)
    d = Distiller(tiny_teacher, cfg, torch.device("cpu"), _student_init(str(init), tiny_teacher))
    start = load_checkpoint(init).state_dict()
    assert all(torch.equal(v, start[k]) for k, v in d.student.state_dict().items() if k in start)

    train_distill(cfg)
    metrics = read_metrics(tmp_path / "run")
    assert len(metrics) == 3 and all(m["k"] == 3 for m in metrics)
    assert all({"regression", "fft", "cell_mean"} <= m.keys() for m in metrics)
    assert not any({"dmd", "gan_g", "fake_fm", "d_loss"} & m.keys() for m in metrics)


def test_recipes_that_would_train_nothing_or_against_an_untrained_fake_score_are_refused(
    tmp_path, photo_dir, tiny_ae_file, tiny_teacher
):
    from pidserve.model import save_checkpoint

    teacher_file = tmp_path / "teacher.safetensors"
    save_checkpoint(tiny_teacher, teacher_file)
    base = {"teacher": str(teacher_file), "steps": 1}
    with pytest.raises(ValueError, match="fake_updates = 0 leaves the fake score"):
        train_distill(_distill_cfg(tmp_path / "a", photo_dir, tiny_ae_file, fake_updates=0, **base))
    with pytest.raises(ValueError, match=r"rollout_steps must list sampler steps in 0\.\.3"):
        train_distill(_distill_cfg(tmp_path / "b", photo_dir, tiny_ae_file, rollout_steps=[4], **base))
    cfg = _distill_cfg(tmp_path / "c", photo_dir, tiny_ae_file, dmd_weight=0.0, gan_weight=0.0)
    d = Distiller(tiny_teacher, cfg, torch.device("cpu"))
    encoder = FrozenEncoder(tiny_ae_file, tiny_teacher.cfg, torch.device("cpu"))
    hr, inputs, seeds = _fixed_batch(cfg, tiny_teacher, photo_dir, encoder)
    with pytest.raises(ValueError, match="every student loss weight is 0"):
        d.student_loss(hr, inputs, seeds, k=0)


def test_student_init_of_another_architecture_is_refused(tmp_path, tiny_teacher):
    from pidserve.model import save_checkpoint

    other = PiDNet(tiny_teacher.cfg.replace(aux_rgb_head=False, hidden_size=48))
    path = tmp_path / "other.safetensors"
    save_checkpoint(other, path)
    with pytest.raises(ValueError, match="is not the teacher's architecture"):
        _student_init(str(path), tiny_teacher)


def test_fft_magnitude_term_ignores_where_detail_is_but_not_whether_it_is_there():
    torch.manual_seed(0)
    image = torch.rand(2, 3, 32, 32)
    shifted = torch.roll(image, shifts=(5, 9), dims=(2, 3))  # same spectrum magnitude, other phase
    blurred = torch.nn.functional.avg_pool2d(image, 3, stride=1, padding=1, count_include_pad=False)
    assert fft_magnitude_l1(image, image).item() == 0.0
    assert fft_magnitude_l1(shifted, image).item() < 1e-5
    assert fft_magnitude_l1(blurred, image).item() > 0.01
