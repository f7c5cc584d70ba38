"""Latent context: crops whose latent is cut from the encoding of a larger region, as a tiled
decode cuts its windows' latents out of a whole image's latent."""

from __future__ import annotations

import pytest
import torch

from pidserve.training.config import DistillTrainConfig, TeacherTrainConfig, load_config
from pidserve.training.data import CropSpec, LatentNoise, PhotoCrops, crop_spec, degrade
from pidserve.training.distill import train_distill
from pidserve.training.distributed import DistInfo
from pidserve.training.inputs import (
    SALT_CONTEXT,
    FrozenEncoder,
    LatentContext,
    context_latents,
    latent_inputs,
    per_sample_uniform,
)
from pidserve.training.teacher import build_net_config, train_teacher

from .conftest import TINY_NET, read_metrics, teacher_overrides

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
CELL = 32  # TINY_NET: output pixels per latent cell (tiny-ae's 8 x sr_scale 4)


def _batch(photo_dir, count: int = 16, context: int = 2, seed: int = 5) -> dict:
    spec = CropSpec(size=32, scale=4, short_side=64, context=context, cell=CELL)
    items = [PhotoCrops(photo_dir, spec, seed=seed)[i] for i in range(count)]
    return {key: torch.stack([item[key] for item in items]) for key in items[0] if key != "caption"}


def test_a_context_crop_lies_in_its_region_on_the_latent_grid(photo_dir):
    spec = CropSpec(size=32, scale=4, short_side=96, context=2, cell=16)
    dataset = PhotoCrops(photo_dir, spec, seed=3)
    cells = set()
    for index in range(24):
        item = dataset[index]
        assert item["hr"].shape == (3, 32, 32) and item["lr"].shape == (3, 8, 8)
        assert item["lr_context"].shape == (3, 16, 16)
        row, col = item["context_cell"].tolist()
        assert 0 <= row <= 2 and 0 <= col <= 2  # (64 - 32) / 16 + 1 = 3 places per axis
        cells.add((row, col))
        # the region's low-res image, at the crop's cells, is the crop's own low-res image (inside,
        # where the antialiasing filter does not reach across the crop's border)
        lr_cell = 16 // 4
        window = item["lr_context"][:, row * lr_cell : row * lr_cell + 8, col * lr_cell : col * lr_cell + 8]
        assert torch.allclose(window[:, 2:-2, 2:-2], item["lr"][:, 2:-2, 2:-2], atol=1e-4)
        assert torch.allclose(degrade(item["hr"][None], 4)[0], item["lr"])
    assert len(cells) > 3  # the crop moves inside its region
    again = dataset[7]
    assert torch.equal(again["hr"], dataset[7]["hr"]) and torch.equal(
        again["context_cell"], dataset[7]["context_cell"]
    )


def test_without_context_a_sample_is_what_it_always_was(photo_dir):
    item = PhotoCrops(photo_dir, CropSpec(size=32, scale=4, short_side=64, cell=CELL), seed=3)[11]
    plain = PhotoCrops(photo_dir, CropSpec(size=32, scale=4, short_side=64), seed=3)[11]
    assert set(item) == {"hr", "lr", "seed", "caption"}
    assert torch.equal(item["hr"], plain["hr"]) and torch.equal(item["lr"], plain["lr"])


def test_context_settings_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="at least 1"):
        CropSpec(size=32, scale=4, short_side=64, context=0)
    with pytest.raises(ValueError, match=r"smaller than the context region \(2 x 32\) 64"):
        CropSpec(size=32, scale=4, short_side=48, context=2, cell=16)
    with pytest.raises(ValueError, match="whole number of 16-px latent cells"):
        CropSpec(size=40, scale=4, short_side=128, context=2, cell=16)
    with pytest.raises(ValueError, match=r"latent_context_prob 1.5 must be in \[0, 1\]"):
        crop_spec(TeacherTrainConfig(crop=32, short_side=64, latent_context=2, latent_context_prob=1.5), 4, 1)


def test_context_latents_are_cut_from_the_regions_encoding(photo_dir, tiny_ae_file):
    encoder = FrozenEncoder(tiny_ae_file, build_net_config(TINY_NET), CPU.device)
    batch = _batch(photo_dir)
    own, regions = encoder(batch["lr"]), encoder(batch["lr_context"])
    cut = torch.stack(
        [
            region[:, row : row + 1, col : col + 1]
            for region, (row, col) in zip(regions, batch["context_cell"].tolist(), strict=True)
        ]
    )
    # why the option exists: an encoder normalising over its input encodes the two differently
    assert not torch.allclose(own, cut, atol=1e-3)

    everyone = context_latents(
        encoder, batch["lr"], batch["seed"], LatentContext(batch["lr_context"], batch["context_cell"], 1.0)
    )
    assert torch.allclose(everyone, cut, atol=1e-5)

    half = context_latents(
        encoder, batch["lr"], batch["seed"], LatentContext(batch["lr_context"], batch["context_cell"], 0.5)
    )
    chosen = per_sample_uniform(batch["seed"], SALT_CONTEXT) < 0.5
    assert 0 < int(chosen.sum()) < len(chosen)  # both kinds in one batch, drawn from the seeds
    for i, from_region in enumerate(chosen.tolist()):
        assert torch.allclose(half[i], (cut if from_region else own)[i], atol=1e-5)


def test_a_batch_without_context_or_with_prob_0_encodes_the_crops(photo_dir, tiny_ae_file):
    encoder = FrozenEncoder(tiny_ae_file, build_net_config(TINY_NET), CPU.device)
    assert LatentContext.of_batch(_batch(photo_dir, 4, context=1), 0.5, CPU.device) is None
    batch = _batch(photo_dir, 4)
    assert LatentContext.of_batch(batch, 0.0, CPU.device) is None
    noise = LatentNoise(prob=0.0, latent_dropout=0.0)
    inputs = latent_inputs(encoder, batch["lr"], batch["seed"], noise, None)
    assert torch.equal(inputs.latent, encoder(batch["lr"]))


def test_teacher_and_distill_runs_train_on_context_latents(tmp_path, photo_dir, tiny_ae_file):
    from pidserve.model import PiDNet, save_checkpoint

    extra = {"steps": 2, "latent_context": 2, "latent_context_prob": 1.0}
    overrides = teacher_overrides(tmp_path / "teacher", photo_dir, tiny_ae_file, **extra)
    train_teacher(load_config(TeacherTrainConfig, None, overrides))
    assert len(read_metrics(tmp_path / "teacher")) == 2

    teacher = tmp_path / "teacher.safetensors"
    save_checkpoint(PiDNet(build_net_config(TINY_NET)), teacher)
    paired = {"teacher": str(teacher), "fake_updates": 0, "dmd_weight": 0.0, "gan_weight": 0.0}
    paired |= {"regression_weight": 1.0, "student_mode": "backward_simulation", "rollout_steps": [3]}
    overrides = teacher_overrides(tmp_path / "student", photo_dir, tiny_ae_file, **extra, **paired)
    overrides = [o for o in overrides if not o.startswith(("net=", "shift"))]
    train_distill(load_config(DistillTrainConfig, None, overrides))
    assert len(read_metrics(tmp_path / "student")) == 2


def test_the_proposed_windows_recipe_loads_and_fits_its_photos():
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "pid_tiny_windows.toml"
    cfg = load_config(DistillTrainConfig, recipe, [])
    assert (cfg.latent_context, cfg.latent_context_prob) == (2, 0.5)
    spec = crop_spec(cfg, 4, cfg.batch, cell=32)  # the 512² regions fit photos of short side 640
    assert spec.context == 2 and spec.short_side >= 2 * max(cfg.crop, *cfg.crop_cycle)
