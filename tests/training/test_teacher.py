from __future__ import annotations

import torch

from pidserve.model import load_checkpoint
from pidserve.training.config import TeacherTrainConfig, load_config
from pidserve.training.data import CropSpec, LatentNoise, PhotoCrops
from pidserve.training.distributed import DistInfo
from pidserve.training.inputs import FrozenEncoder
from pidserve.training.teacher import FlowMatchingLoss, build_net_config, teacher_step, train_teacher

from .conftest import read_metrics, teacher_overrides

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _fixed_batch_loss(net, cfg: TeacherTrainConfig, photo_dir) -> float:
    """The flow-matching loss on one fixed batch with fixed draws (not a training batch)."""
    encoder = FrozenEncoder(cfg.autoencoder, net.cfg, CPU.device)
    ds = PhotoCrops(photo_dir, CropSpec(cfg.crop, net.cfg.sr_scale, cfg.short_side), seed=99)
    items = [ds[10_000 + i] for i in range(16)]
    batch = {k: torch.stack([it[k] for it in items]) for k in ("hr", "lr", "seed")}
    with torch.no_grad():
        loss, _ = teacher_step(FlowMatchingLoss(net), encoder, batch, LatentNoise(), cfg, CPU)
    return float(loss)


def test_a_few_teacher_steps_decrease_the_loss(tmp_path, photo_dir, tiny_ae_file):
    cfg = load_config(
        TeacherTrainConfig, None, teacher_overrides(tmp_path / "run", photo_dir, tiny_ae_file, steps=40)
    )
    torch.manual_seed(cfg.seed)
    from pidserve.model import PiDNet

    before = _fixed_batch_loss(PiDNet(build_net_config(cfg.net)), cfg, photo_dir)
    final = train_teacher(cfg)
    after = _fixed_batch_loss(load_checkpoint(final), cfg, photo_dir)
    assert after < 0.8 * before, (before, after)
    metrics = read_metrics(tmp_path / "run")
    assert len(metrics) == 40 and {"flow", "aux_rgb", "loss", "images_per_s"} <= set(metrics[0])


def test_resume_continues_the_same_loss_curve(tmp_path, photo_dir, tiny_ae_file):
    straight = tmp_path / "straight"
    train_teacher(
        load_config(
            TeacherTrainConfig,
            None,
            teacher_overrides(straight, photo_dir, tiny_ae_file, steps=6, save_every=3),
        )
    )
    resumed = tmp_path / "resumed"
    train_teacher(
        load_config(
            TeacherTrainConfig,
            None,
            teacher_overrides(resumed, photo_dir, tiny_ae_file, steps=3, save_every=3),
        )
    )
    train_teacher(
        load_config(
            TeacherTrainConfig,
            None,
            teacher_overrides(resumed, photo_dir, tiny_ae_file, steps=6, save_every=3),
        )
    )
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    wa = load_checkpoint(straight / "teacher_ema.safetensors").state_dict()
    wb = load_checkpoint(resumed / "teacher_ema.safetensors").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_adapter_only_training_leaves_the_backbone_untouched(tmp_path, photo_dir, tiny_ae_file):
    cfg = load_config(
        TeacherTrainConfig,
        None,
        teacher_overrides(
            tmp_path / "run",
            photo_dir,
            tiny_ae_file,
            steps=2,
            train_adapter_only=True,
            ema="plain",
            ema_beta=0.0,
        ),
    )
    torch.manual_seed(cfg.seed)
    from pidserve.model import PiDNet

    initial = PiDNet(build_net_config(cfg.net)).state_dict()
    trained = load_checkpoint(train_teacher(cfg)).state_dict()
    changed = {k for k in initial if not torch.equal(initial[k], trained[k])}
    assert changed and all(k.startswith(("adapter.", "gates.")) for k in changed), sorted(changed)
