"""Samplers: the student schedule, reproducibility from seeds, the teacher solver, uint8 output."""

from __future__ import annotations

import pytest
import torch

from pidserve.model import PiDConfig, PiDNet
from pidserve.model.sampler import (
    resolution_shift,
    sample,
    sample_teacher,
    shift_time,
    student_timesteps,
    to_uint8_hwc,
)


@pytest.fixture(scope="module")
def net() -> PiDNet:
    torch.manual_seed(3)
    return PiDNet(PiDConfig.preset("tiny_v1")).eval()


def _latent(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 16, 2, 2, generator=torch.Generator().manual_seed(11))


def test_student_timesteps() -> None:
    assert student_timesteps(4).tolist() == pytest.approx([0.999, 0.866, 0.634, 0.342, 0.0])
    assert student_timesteps(4).dtype == torch.float32
    assert student_timesteps(3).tolist() == pytest.approx([0.999, 0.866, 0.342, 0.0])
    assert student_timesteps(2).tolist() == pytest.approx([0.999, 0.634, 0.0])
    assert student_timesteps(1).tolist() == [1.0, 0.0]
    for bad in (0, 5):
        with pytest.raises(ValueError, match="1 to 4 steps"):
            student_timesteps(bad)


@torch.no_grad()
def test_same_seed_same_pixels_other_seed_other_pixels(net: PiDNet) -> None:
    def run(seed: int) -> torch.Tensor:
        return sample(net, _latent(), 0.1, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == (2, 3, 64, 64) and a.min() >= -1 and a.max() <= 1


@torch.no_grad()
def test_generator_draws_equal_explicit_noises(net: PiDNet) -> None:
    g = torch.Generator().manual_seed(9)
    noises = [torch.randn(2, 3, 64, 64, generator=g) for _ in range(4)]
    explicit = sample(net, _latent(), 0.3, noises=noises)
    drawn = sample(net, _latent(), 0.3, generator=torch.Generator().manual_seed(9))
    assert torch.equal(explicit, drawn)


@torch.no_grad()
def test_one_step_uses_t_equal_one(net: PiDNet) -> None:
    noise = torch.randn(2, 3, 64, 64)
    out = sample(net, _latent(), 0.0, steps=1, noises=[noise])
    v = net(noise, torch.full((2,), 1000.0), _latent(), torch.zeros(2))
    assert torch.allclose(out, (noise - v).clamp(-1, 1), atol=1e-6)


def test_noises_are_validated(net: PiDNet) -> None:
    with pytest.raises(ValueError, match="must hold 4 tensors"):
        sample(net, _latent(), 0.0, noises=[torch.randn(2, 3, 64, 64)])
    with pytest.raises(ValueError, match=r"noises\[0\] has shape \[2, 3, 32, 32\]"):
        sample(net, _latent(), 0.0, steps=1, noises=[torch.randn(2, 3, 32, 32)])


@torch.no_grad()
def test_conditioning_is_built_once_and_reusable(net: PiDNet) -> None:
    calls = []
    hook = net.adapter.register_forward_hook(lambda *a: calls.append(1))
    try:
        sample(net, _latent(), 0.2, generator=torch.Generator().manual_seed(1))
    finally:
        hook.remove()
    assert len(calls) == 1  # the adapter trunk runs once per decode, not once per step


@torch.no_grad()
def test_teacher_euler_one_step_is_x0_from_noise(net: PiDNet) -> None:
    noise = torch.randn(2, 3, 64, 64)
    out = sample_teacher(net, _latent(), 0.0, steps=1, noise=noise)
    v = net(noise, torch.full((2,), 1000.0), _latent(), torch.zeros(2))
    assert torch.allclose(out, (noise - v).clamp(-1, 1), atol=1e-6)


@torch.no_grad()
def test_teacher_heun_differs_from_euler_and_cfg_one_is_no_guidance(net: PiDNet) -> None:
    noise = torch.randn(2, 3, 64, 64)
    euler = sample_teacher(net, _latent(), 0.0, steps=3, noise=noise)
    heun = sample_teacher(net, _latent(), 0.0, steps=3, solver="heun", noise=noise)
    assert not torch.allclose(euler, heun)
    text = torch.randn(2, 5, 32)
    plain = sample_teacher(net, _latent(), 0.0, text=text, steps=2, noise=noise)
    guided = sample_teacher(net, _latent(), 0.0, text=text, steps=2, noise=noise, cfg_scale=3.0)
    assert torch.equal(
        plain, sample_teacher(net, _latent(), 0.0, text=text, steps=2, noise=noise, cfg_scale=1.0)
    )
    assert not torch.allclose(plain, guided)
    with pytest.raises(ValueError, match="solver"):
        sample_teacher(net, _latent(), 0.0, solver="rk4")  # type: ignore[arg-type]


def test_time_shift() -> None:
    t = torch.tensor([0.0, 0.5, 1.0])
    assert torch.equal(shift_time(t, 1.0), t)
    shifted = shift_time(t, 3.0)
    assert shifted[0] == 0 and shifted[2] == 1 and shifted[1] == pytest.approx(0.75)
    assert resolution_shift((2048, 2048), 6.0, 2048) == pytest.approx(6.0)
    assert resolution_shift((4096, 4096), 6.0, 2048) == pytest.approx(12.0)


def test_uint8_conversion_truncates() -> None:
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 0.9999, 1.0, 2.0]).view(1, 1, 1, 7).expand(1, 3, 1, 7)
    out = to_uint8_hwc(x)
    assert out.shape == (1, 1, 7, 3) and out.dtype == torch.uint8
    assert out[0, 0, :, 0].tolist() == [0, 0, 127, 191, 254, 255, 255]


@torch.no_grad()
def test_bfloat16_network_runs_close_to_float32(net: PiDNet) -> None:
    import copy

    half = copy.deepcopy(net).to(torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    noises = [torch.randn(2, 3, 64, 64, generator=g) for _ in range(4)]
    ref = sample(net, _latent(), 0.2, noises=noises)
    low = sample(half, _latent(), 0.2, noises=noises)
    assert low.dtype == torch.float32
    assert (ref - low).abs().mean() < 0.05


def test_wrong_latent_channels_name_the_space(net: PiDNet) -> None:
    from pidserve.model import LatentError

    with pytest.raises(LatentError, match=r"'flux1' latents of shape \[B, 16, h, w\]; got \[1, 4, 2, 2\]"):
        sample(net, torch.randn(1, 4, 2, 2), 0.0)


def test_a_shifted_pixel_position_table_is_a_window_of_a_larger_one():
    from pidserve.model.layers import pixel_position_table

    large = pixel_position_table(96, 128, 8)
    window = pixel_position_table(32, 48, 8, origin=(40, 70))
    assert torch.allclose(window, large[40:72, 70:118], atol=1e-12)
    assert torch.equal(pixel_position_table(32, 48, 8, origin=(0, 0)), pixel_position_table(32, 48, 8))
