"""Tests for pidserve.model.latents: the registry, rearrangements, normalizations, noising, validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pidserve.model import latents
from pidserve.model.latents import (
    LatentError,
    LatentSpace,
    ScaleShift,
    from_euler,
    get_latent_space,
    list_latent_spaces,
    pack_sequence,
    patchify_2x2,
    register_latent_space,
    tokens_to_grid,
    unpack_sequence,
    unpatchify_2x2,
    validate_sigma,
)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _flux2_with_stats() -> LatentSpace:
    mean = _randn(128, seed=1)
    var = _randn(128, seed=2).abs() + 0.1
    return get_latent_space("flux2").with_statistics(mean, var)


def _dinov2_with_stats() -> LatentSpace:
    mean = _randn(768, 32, 32, seed=3)
    var = _randn(768, 32, 32, seed=4).abs() + 0.1
    return get_latent_space("dinov2-rae").with_statistics(mean, var)


# ---- registry -----------------------------------------------------------------------------------


def test_builtin_spaces_are_registered_in_order():
    assert list_latent_spaces() == [
        "flux1", "sd3", "sdxl", "flux2", "qwenimage", "dinov2-rae", "siglip2-rae", "tiny-ae"
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "channels", "downsample", "noising", "variants"),
    [
        ("flux1", 16, 8, "flow", ("2k_flux", "2kto4k_v1pt5_flux")),
        ("sd3", 16, 8, "flow", ("2k_sd3", "2kto4k_sd3")),
        ("sdxl", 4, 8, "vp", ("2kto4k_sdxl",)),
        ("flux2", 128, 16, "flow", ("2k_flux2", "2kto4k_v1pt5_flux2")),
        ("qwenimage", 16, 8, "flow", ("2kto4k_v1pt5_qwenimage",)),
        ("dinov2-rae", 768, 16, "flow", ("2k_rae",)),
        ("siglip2-rae", 1152, 16, "flow", ("2k_scale_rae",)),
        ("tiny-ae", 16, 8, "flow", ("pid-tiny",)),
    ],
)
def test_space_table(name, channels, downsample, noising, variants):
    space = get_latent_space(name)
    assert (space.name, space.channels, space.downsample, space.noising) == (
        name,
        channels,
        downsample,
        noising,
    )
    assert space.pid_variants == variants
    assert space.description


def test_unknown_name_lists_known_spaces():
    with pytest.raises(LatentError, match="unknown latent space 'flux3'") as info:
        get_latent_space("flux3")
    assert isinstance(info.value, ValueError)
    for name in list_latent_spaces():
        assert name in str(info.value)


def test_register_new_space_and_reject_duplicates(monkeypatch):
    # keep the global registry clean
    monkeypatch.setattr(latents.space, "_REGISTRY", dict(latents.space._REGISTRY))
    tiny = LatentSpace(
        name="my-test-ae",
        description="test space",
        channels=16,
        downsample=8,
        noising="flow",
        normalization=ScaleShift(scale=2.0, shift=0.5),
    )
    register_latent_space(tiny)
    assert get_latent_space("my-test-ae") is tiny
    assert "my-test-ae" in list_latent_spaces()
    with pytest.raises(LatentError, match="already registered"):
        register_latent_space(tiny)


def test_invalid_space_definition_is_rejected():
    with pytest.raises(LatentError, match="noising"):
        LatentSpace(
            name="bad", description="", channels=4, downsample=8, noising="ve", normalization=ScaleShift(1.0)
        )


# ---- rearrangements -------------------------------------------------------------------------------


def test_pack_sequence_matches_diffusers_layout():
    z = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    seq = pack_sequence(z)
    assert seq.shape == (2, 2 * 3, 3 * 4)
    for row in range(2):
        for col in range(3):
            for c in range(3):
                for pi in range(2):
                    for pj in range(2):
                        expected = z[:, c, 2 * row + pi, 2 * col + pj]
                        assert torch.equal(seq[:, row * 3 + col, c * 4 + pi * 2 + pj], expected)


def test_pack_unpack_sequence_round_trip():
    z = _randn(2, 16, 8, 10)
    seq = pack_sequence(z)
    assert seq.shape == (2, 4 * 5, 64)
    assert torch.equal(unpack_sequence(seq, 8, 10), z)
    assert torch.equal(pack_sequence(unpack_sequence(seq, 8, 10)), seq)


def test_unpack_sequence_rejects_wrong_sizes():
    seq = _randn(1, 20, 64)
    with pytest.raises(LatentError, match="20 tokens"):
        unpack_sequence(seq, 64, 80)  # pixel sizes instead of latent cells
    with pytest.raises(LatentError, match="even"):
        unpack_sequence(seq, 5, 16)
    with pytest.raises(LatentError, match="even"):
        pack_sequence(_randn(1, 16, 5, 8))


def test_patchify_channel_mapping():
    z = torch.arange(1 * 32 * 4 * 6, dtype=torch.float32).reshape(1, 32, 4, 6)
    out = patchify_2x2(z)
    assert out.shape == (1, 128, 2, 3)
    for c in range(32):
        for pi in range(2):
            for pj in range(2):
                for row in range(2):
                    for col in range(3):
                        assert out[0, c * 4 + pi * 2 + pj, row, col] == z[0, c, 2 * row + pi, 2 * col + pj]


def test_patchify_unpatchify_round_trip():
    z = _randn(2, 32, 6, 8)
    assert torch.equal(unpatchify_2x2(patchify_2x2(z)), z)
    z128 = _randn(2, 128, 3, 5)
    assert torch.equal(patchify_2x2(unpatchify_2x2(z128)), z128)


def test_patchify_rejects_odd_size():
    with pytest.raises(LatentError, match="even h and w"):
        patchify_2x2(_randn(1, 32, 7, 8))
    with pytest.raises(LatentError, match="divisible by 4"):
        unpatchify_2x2(_randn(1, 30, 4, 4))


def test_tokens_to_grid_drops_prefix_tokens():
    grid = _randn(2, 768, 4, 4)
    patch_tokens = grid.flatten(2).transpose(1, 2)  # [B, 16, 768], row-major
    tokens = torch.cat([_randn(2, 5, 768, seed=9), patch_tokens], dim=1)  # CLS + 4 registers first
    assert torch.equal(tokens_to_grid(tokens, num_prefix_tokens=5), grid)
    with pytest.raises(LatentError, match="square"):
        tokens_to_grid(tokens, num_prefix_tokens=0)


# ---- normalization -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("space", "raw_shape"),
    [
        (get_latent_space("flux1"), (2, 16, 6, 8)),
        (get_latent_space("sd3"), (2, 16, 5, 7)),
        (get_latent_space("sdxl"), (2, 4, 5, 7)),
        (get_latent_space("qwenimage"), (2, 16, 6, 8)),
        (_flux2_with_stats(), (2, 32, 6, 8)),
        (_dinov2_with_stats(), (2, 768, 32, 32)),
    ],
    ids=lambda v: v.name if isinstance(v, LatentSpace) else None,
)
def test_normalize_denormalize_round_trip(space, raw_shape):
    raw = _randn(*raw_shape) * 3 + 1
    z = space.normalize(raw)
    assert z.dtype == torch.float32
    space.validate(z)
    back = space.denormalize(z)
    assert back.shape == raw.shape
    torch.testing.assert_close(back, raw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "raw_value", "z_value"),
    [
        ("flux1", 0.1159 + 1 / 0.3611, 1.0),
        ("sd3", 0.0609 + 2 / 1.5305, 2.0),
        ("sdxl", 1.0, 0.13025),
    ],
)
def test_scale_shift_constants(name, raw_value, z_value):
    space = get_latent_space(name)
    raw = torch.full((1, space.channels, 2, 2), raw_value)
    torch.testing.assert_close(space.normalize(raw), torch.full_like(raw, z_value))


def test_qwenimage_uses_per_channel_statistics():
    space = get_latent_space("qwenimage")
    mean = torch.tensor(latents.builtin._QWENIMAGE_LATENTS_MEAN)
    std = torch.tensor(latents.builtin._QWENIMAGE_LATENTS_STD)
    assert mean.shape == std.shape == (16,)
    raw = (mean + std).view(1, 16, 1, 1).expand(1, 16, 2, 2)  # one standard deviation above the mean
    torch.testing.assert_close(space.normalize(raw), torch.ones(1, 16, 2, 2))
    # Spot-check the published values (first and last channel of each vector).
    assert (mean[0].item(), mean[-1].item()) == pytest.approx((-0.7571, -0.2921))
    assert (std[0].item(), std[-1].item()) == pytest.approx((2.8184, 1.9160))


def test_flux2_normalize_equals_patchify_then_eval_batchnorm():
    mean = _randn(128, seed=1)
    var = _randn(128, seed=2).abs() + 0.1
    space = get_latent_space("flux2").with_statistics(mean, var)
    bn = torch.nn.BatchNorm2d(128, eps=1e-4, affine=False).eval()
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(var)
    raw = _randn(2, 32, 8, 6)
    with torch.no_grad():
        expected = bn(patchify_2x2(raw))
    z = space.normalize(raw)
    assert z.shape == (2, 128, 4, 3)
    torch.testing.assert_close(z, expected)


def test_flux2_accepts_batchnorm_shaped_statistics():
    mean = _randn(1, 128, 1, 1, seed=1)
    var = _randn(1, 128, 1, 1, seed=2).abs()
    space = get_latent_space("flux2").with_statistics(mean, var)
    assert space.can_normalize
    assert not get_latent_space("flux2").can_normalize  # the registered space is unchanged


def test_statistics_are_checked():
    with pytest.raises(LatentError, match=r"\[128\]"):
        get_latent_space("flux2").with_statistics(torch.zeros(64), torch.ones(64))
    with pytest.raises(LatentError, match="negative"):
        get_latent_space("flux2").with_statistics(torch.zeros(128), -torch.ones(128))
    with pytest.raises(LatentError, match="takes no statistics"):
        get_latent_space("sd3").with_statistics(torch.zeros(16), torch.ones(16))


@pytest.mark.parametrize(("name", "raw_shape"), [("flux2", (1, 32, 8, 8)), ("dinov2-rae", (1, 768, 32, 32))])
def test_normalize_without_statistics_says_how_to_load_them(name, raw_shape):
    space = get_latent_space(name)
    with pytest.raises(LatentError, match=rf"'{name}' needs checkpoint statistics") as info:
        space.normalize(_randn(*raw_shape))
    assert "with_statistics(mean, var)" in str(info.value)


def test_dinov2_statistics_must_match_the_grid():
    space = _dinov2_with_stats()
    with pytest.raises(LatentError, match="32x32 grid; got a 16x16 latent"):
        space.normalize(_randn(1, 768, 16, 16))


def test_dinov2_normalize_is_per_position():
    mean = _randn(768, 32, 32, seed=3)
    var = _randn(768, 32, 32, seed=4).abs() + 0.1
    space = get_latent_space("dinov2-rae").with_statistics(mean[None], var[None])  # stats file layout
    raw = _randn(2, 768, 32, 32)
    torch.testing.assert_close(space.normalize(raw), (raw - mean) / torch.sqrt(var + 1e-5))


def test_siglip2_normalize_is_affine_free_layer_norm():
    space = get_latent_space("siglip2-rae")
    raw = _randn(2, 1152, 16, 16) * 5 + 2
    z = space.normalize(raw)
    expected = F.layer_norm(raw.permute(0, 2, 3, 1), (1152,), eps=1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(z, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(LatentError, match="cannot be denormalized"):
        space.denormalize(z)


def test_normalize_returns_float32_for_half_input():
    z = get_latent_space("flux1").normalize(_randn(1, 16, 4, 4).to(torch.bfloat16))
    assert z.dtype == torch.float32


def test_normalize_checks_the_raw_latent():
    with pytest.raises(LatentError, match=r"'flux2' expects a raw encoder latent of shape \[B, 32, h, w\]"):
        _flux2_with_stats().normalize(_randn(1, 32, 7, 8))


# ---- noising ---------------------------------------------------------------------------------------


def test_flow_noising_formula_with_per_sample_sigma():
    space = get_latent_space("flux1")
    z, eps = _randn(2, 16, 4, 4, seed=1), _randn(2, 16, 4, 4, seed=2)
    sigma = torch.tensor([0.25, 0.8])
    x = space.add_noise(z, sigma, eps)
    torch.testing.assert_close(x[0], 0.75 * z[0] + 0.25 * eps[0])
    torch.testing.assert_close(x[1], 0.2 * z[1] + 0.8 * eps[1])


def test_vp_noising_formula():
    space = get_latent_space("sdxl")
    z, eps = _randn(1, 4, 4, 4, seed=1), _randn(1, 4, 4, 4, seed=2)
    x = space.add_noise(z, 0.6, eps)
    torch.testing.assert_close(x, 0.8 * z + 0.6 * eps)


@pytest.mark.parametrize("name", ["flux1", "sdxl"])
def test_sigma_zero_returns_the_latent(name):
    space = get_latent_space(name)
    z = _randn(2, space.channels, 4, 4)
    assert torch.equal(space.add_noise(z, 0.0, _randn(2, space.channels, 4, 4, seed=5)), z)


def test_add_noise_checks_eps_shape():
    space = get_latent_space("flux1")
    with pytest.raises(LatentError, match="eps must be a float tensor of shape"):
        space.add_noise(_randn(1, 16, 4, 4), 0.5, _randn(1, 16, 2, 2))


def test_from_euler_converts_to_vp():
    z, eps = _randn(2, 4, 4, 4, seed=1), _randn(2, 4, 4, 4, seed=2)
    sigma_eu = torch.tensor([0.0, 3.0])
    x_eu = z + sigma_eu.view(-1, 1, 1, 1) * eps  # the Euler (variance-exploding) form
    x_vp, sigma_vp = from_euler(x_eu, sigma_eu)
    torch.testing.assert_close(sigma_vp, torch.tensor([0.0, 3.0 / math.sqrt(10.0)]))
    torch.testing.assert_close(x_vp, get_latent_space("sdxl").add_noise(z, sigma_vp, eps))
    assert sigma_vp.dtype == x_vp.dtype == torch.float32


def test_from_euler_rejects_negative_sigma():
    with pytest.raises(LatentError, match=">= 0"):
        from_euler(_randn(1, 4, 2, 2), -1.0)


# ---- sigma -----------------------------------------------------------------------------------------


def test_validate_sigma_returns_float32_per_sample():
    assert torch.equal(validate_sigma(0.5, 3), torch.full((3,), 0.5))
    assert validate_sigma(1, 2).dtype == torch.float32
    out = validate_sigma(torch.tensor([0.0, 1.0], dtype=torch.float64), 2)
    assert out.dtype == torch.float32 and out.tolist() == [0.0, 1.0]


@pytest.mark.parametrize(
    ("sigma", "message"),
    [
        (-0.1, r"in \[0, 1\]"),
        (1.5, r"in \[0, 1\]"),
        (float("nan"), "finite"),
        (torch.tensor([0.1, 0.2, 0.3]), r"\[B\] tensor with B = 2"),
        (True, "float or a"),
        ("0.5", "float or a"),
    ],
)
def test_validate_sigma_errors(sigma, message):
    with pytest.raises(LatentError, match=message):
        validate_sigma(sigma, 2)


# ---- image size ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "latent_hw", "sr_scale", "expected"),
    [
        ("flux1", (64, 96), 4, (2048, 3072)),
        ("flux2", (32, 32), 4, (2048, 2048)),
        ("siglip2-rae", (16, 16), 8, (2048, 2048)),
        ("sdxl", (128, 128), 4, (4096, 4096)),
    ],
)
def test_image_size(name, latent_hw, sr_scale, expected):
    assert get_latent_space(name).image_size(latent_hw, sr_scale) == expected


def test_image_size_rejects_bad_arguments():
    space = get_latent_space("flux1")
    with pytest.raises(LatentError):
        space.image_size((0, 64), 4)
    with pytest.raises(ValueError, match="sr_scale"):
        space.image_size((64, 64), 0)


# ---- validation ------------------------------------------------------------------------------------

FLUX1_EXPECTS = "latent space 'flux1' expects a latent of shape [B, 16, h, w]"


def test_validate_accepts_a_good_latent():
    assert get_latent_space("flux1").validate(_randn(2, 16, 8, 6)) is None
    # Spaces without sequence packing accept odd sizes.
    assert get_latent_space("sdxl").validate(_randn(1, 4, 7, 9)) is None
    assert get_latent_space("flux2").validate(_randn(1, 128, 3, 5)) is None


def test_wrong_channels_message_is_exact():
    with pytest.raises(LatentError) as info:
        get_latent_space("flux1").validate(torch.zeros(1, 4, 64, 64))
    assert str(info.value).startswith(
        "latent space 'flux1' expects a latent of shape [B, 16, h, w] (16 channels, one cell per 8x8 pixels, "
        "h and w even); got [1, 4, 64, 64]."
    )
    assert "'sdxl'" in str(info.value)  # points at the space a 4-channel latent fits


def _bad_latents() -> list[tuple[object, str]]:
    with_nans = _randn(1, 16, 4, 4)
    with_nans[0, 0, 0, :3] = float("nan")
    with_inf = _randn(1, 16, 4, 4)
    with_inf[0, 1, 1, 1] = float("inf")
    return [
        (torch.zeros(1, 4, 64, 64), "got [1, 4, 64, 64]"),
        (torch.zeros(16, 64, 64), "(3-D)"),
        (torch.zeros(1, 4096, 64), "unpack_sequence"),
        (torch.zeros(1, 16, 64, 64, dtype=torch.int64), "dtype torch.int64"),
        (with_nans, "3 non-finite values"),
        (with_inf, "1 non-finite values"),
        (torch.zeros(1, 16, 63, 64), "not both even"),
        (torch.zeros(0, 16, 64, 64), "empty batch"),
        (torch.zeros(1, 16, 0, 64), "empty spatial size"),
        ([[0.0]], "got a list"),
    ]


@pytest.mark.parametrize(("latent", "detail"), _bad_latents())
def test_validate_errors_name_space_shape_and_problem(latent, detail):
    with pytest.raises(LatentError) as info:
        get_latent_space("flux1").validate(latent)
    message = str(info.value)
    assert message.startswith(FLUX1_EXPECTS)
    assert detail in message


def test_validate_points_raw_flux2_latent_to_normalize():
    with pytest.raises(
        LatentError, match="latent space 'flux2' expects a latent of shape \\[B, 128, h, w\\]"
    ) as info:
        get_latent_space("flux2").validate(_randn(1, 32, 8, 8))
    assert "normalize" in str(info.value)


def test_add_noise_validates_the_latent():
    with pytest.raises(LatentError, match="'sdxl' expects a latent of shape"):
        get_latent_space("sdxl").add_noise(_randn(1, 16, 4, 4), 0.5, _randn(1, 16, 4, 4))
