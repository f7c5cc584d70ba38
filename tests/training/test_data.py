from __future__ import annotations

import itertools

import pytest
import torch

from pidserve.training.data import (
    CropSpec,
    LatentNoise,
    PhotoCrops,
    StepSampler,
    degrade,
    make_loader,
    sample_seed,
)


def test_crops_have_the_right_shapes_ranges_and_are_deterministic(photo_dir):
    ds = PhotoCrops(photo_dir, CropSpec(size=32, scale=4, short_side=64), seed=3)
    a, b, other = ds[17], ds[17], ds[18]
    assert a["hr"].shape == (3, 32, 32) and a["lr"].shape == (3, 8, 8)
    assert a["hr"].dtype == torch.float32
    assert float(a["hr"].min()) >= -1 and float(a["hr"].max()) <= 1
    assert float(a["lr"].min()) >= -1 and float(a["lr"].max()) <= 1
    assert torch.equal(a["hr"], b["hr"]) and int(a["seed"]) == int(b["seed"])
    assert not torch.equal(a["hr"], other["hr"])


def test_degradation_is_antialiased_bicubic_and_keeps_flat_colour():
    flat = torch.full((1, 3, 32, 32), 0.25)
    assert torch.allclose(degrade(flat, 4), torch.full((1, 3, 8, 8), 0.25), atol=1e-6)
    # A 1-pixel checkerboard is above the low-res Nyquist limit: antialiasing removes it.
    checker = (torch.arange(32)[:, None] + torch.arange(32)[None]).remainder(2).float().mul(2).sub(1)
    low = degrade(checker.expand(1, 3, 32, 32).contiguous(), 4)
    assert float(low.abs().max()) < 0.05


def test_crop_cycle_gives_one_size_per_step(photo_dir):
    spec = CropSpec(size=32, scale=4, short_side=64, cycle=(16, 32), step_samples=4)
    ds = PhotoCrops(photo_dir, spec)
    assert [ds[i]["hr"].shape[-1] for i in range(0, 16, 2)] == [16, 16, 32, 32, 16, 16, 32, 32]


def test_two_ranks_split_the_global_batch_of_one_process():
    one = iter(StepSampler(global_batch=6, start_step=2))
    r0 = iter(StepSampler(global_batch=6, start_step=2, rank=0, world_size=2))
    r1 = iter(StepSampler(global_batch=6, start_step=2, rank=1, world_size=2))
    single = [next(one) for _ in range(12)]
    assert single == list(range(12, 24))
    assert [next(r0) for _ in range(3)] + [next(r1) for _ in range(3)] == single[:6]
    with pytest.raises(ValueError, match="not divisible"):
        StepSampler(global_batch=5, world_size=2)


def test_latent_noise_matches_the_official_recipe():
    noise = LatentNoise(prob=0.75, max_sigma=0.8, latent_dropout=0.1)
    seeds = torch.tensor([sample_seed(0, i) for i in range(4000)])
    draws = noise.draw(seeds, (2, 1, 1))
    sigma = draws["sigma"]
    assert 0.70 < float((sigma > 0).float().mean()) < 0.80
    assert float(sigma.max()) <= 0.8 and float(sigma.min()) == 0.0
    assert 0.07 < float((~draws["keep"]).float().mean()) < 0.13
    again = noise.draw(seeds[:5], (2, 1, 1))
    assert torch.equal(again["eps"], draws["eps"][:5])


def test_missing_folder_and_small_photos_are_clear_errors(tmp_path, photo_dir):
    with pytest.raises(FileNotFoundError, match="pidserve data photos"):
        PhotoCrops(tmp_path / "nope", CropSpec(32, 4, 64))
    with pytest.raises(ValueError, match="not a multiple"):
        CropSpec(30, 4, 64)


def test_worker_processes_give_the_same_batches(photo_dir):
    ds = PhotoCrops(photo_dir, CropSpec(size=32, scale=4, short_side=64), seed=5)
    inline = make_loader(ds, global_batch=4, start_step=3, rank=0, world_size=1, workers=0)
    workers = make_loader(ds, global_batch=4, start_step=3, rank=0, world_size=1, workers=2)
    for _ in range(3):
        a, b = next(inline), next(workers)
        assert torch.equal(a["hr"], b["hr"]) and torch.equal(a["seed"], b["seed"])


def test_photos_are_never_enlarged_unless_smaller_than_the_largest_crop(tmp_path):
    from PIL import Image

    from pidserve.training.data import load_photo

    path = tmp_path / "small.png"
    Image.new("RGB", (120, 90), (10, 20, 30)).save(path)
    assert load_photo(path, 640, 64).shape == (3, 640, 853)  # v1: enlarged to the short side
    assert load_photo(path, 640, 64, upscale=False).shape == (3, 90, 120)  # v2: kept
    assert load_photo(path, 60, 32, upscale=False).shape == (3, 60, 80)  # larger photos still reduced
    assert load_photo(path, 640, 128, upscale=False).shape == (3, 128, 171)  # below the crop: to it


def test_grid_crops_are_a_fixed_set(photo_dir):
    from pidserve.training.data import grid_crops

    crops = grid_crops(photo_dir, 32, per_photo=4, short_side=64)
    assert crops.shape == (6 * 4, 3, 32, 32)
    assert torch.equal(crops, grid_crops(photo_dir, 32, per_photo=4, short_side=64))
    assert float(crops.min()) >= -1 and float(crops.max()) <= 1


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    from types import SimpleNamespace

    from pidserve.training.loop import scheduled_lr

    cfg = SimpleNamespace(lr_schedule="cosine", lr_min_ratio=0.1, warmup=10, steps=110)
    lrs = [scheduled_lr(step, 1.0, cfg) for step in range(1, 111)]
    assert lrs[4] == pytest.approx(0.5) and lrs[9] == pytest.approx(1.0)
    assert lrs[59] == pytest.approx(0.55, abs=0.01)  # half way: the mean of top and floor
    assert lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    constant = SimpleNamespace(lr_schedule="constant", lr_min_ratio=0.1, warmup=10, steps=110)
    assert scheduled_lr(100, 1.0, constant) == 1.0
    with pytest.raises(ValueError, match="lr_schedule"):
        scheduled_lr(1, 1.0, SimpleNamespace(lr_schedule="linear", warmup=0, steps=1))


def test_time_mixture_covers_the_sampler_start_and_keeps_the_official_default():
    from pidserve.training.inputs import logit_normal_times, mixed_times

    seeds = torch.tensor([sample_seed(0, i) for i in range(4000)])
    base = logit_normal_times(seeds, 0.0, 1.0, 3.0, salt=1)
    assert torch.equal(mixed_times(seeds, base, 0.0, 0.0, 0.95, salt=2), base)
    mixed = mixed_times(seeds, base, 0.3, 0.2, 0.95, salt=2)
    # P(t >= 0.95) = 0.2 (the high part) + 0.3 * 0.05 (uniform) + 0.5 * P(logit-normal t >= 0.95)
    expected = 0.2 + 0.3 * 0.05 + 0.5 * float((base >= 0.95).float().mean())
    assert abs(float((mixed >= 0.95).float().mean()) - expected) < 0.03
    assert float((mixed < 0.2).float().mean()) > 0.3 * 0.2 * 0.9  # the uniform part reaches low t
    regression = mixed_times(seeds, base, 0.0, 1.0, 0.999, salt=2)
    assert float(regression.min()) >= 0.999 and float(regression.max()) < 1.0
    with pytest.raises(ValueError, match="sum to at most 1"):
        mixed_times(seeds, base, 0.7, 0.5, 0.95, salt=2)


def test_pixel_origin_is_fixed_by_the_step_and_zero_without_jitter():
    from pidserve.training.inputs import pixel_origin

    seeds = torch.tensor([sample_seed(0, i) for i in range(8)])
    assert pixel_origin(seeds, 0, salt=5) == (0, 0)
    origin = pixel_origin(seeds, 640, salt=5)
    assert origin == pixel_origin(seeds[:1], 640, salt=5) and all(0 <= o < 640 for o in origin)
    others = {pixel_origin(torch.tensor([sample_seed(0, i)]), 640, salt=5) for i in range(50)}
    assert len(others) > 40
