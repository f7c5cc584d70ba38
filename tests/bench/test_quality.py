"""Image-quality metrics: agreement with scikit-image, published CIEDE2000 pairs, and behaviour."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.color import deltaE_ciede2000, rgb2lab
from skimage.metrics import structural_similarity

from pidserve.bench.quality import (
    blockiness,
    ciede2000,
    colour_error,
    colour_shift,
    evaluate,
    psnr,
    radial_log_spectrum,
    seam_over_grid,
    seam_score,
    spectral_distance,
    spectrum_frequencies,
    srgb_to_lab,
    ssim,
)

# Sharma, Wu & Dalal (2005), "The CIEDE2000 color-difference formula: implementation notes,
# supplementary test data, and mathematical observations", Table 1: L1 a1 b1, L2 a2 b2, dE00.
# The pairs chosen exercise the hue-difference sign, the mean-hue wrap at 2 pi, an achromatic
# colour, the a* stretch near neutral, and the blue-region rotation term.
SHARMA_PAIRS = [
    (50.0000, 2.6772, -79.7751, 50.0000, 0.0000, -82.7485, 2.0425),
    (50.0000, -1.3802, -84.2814, 50.0000, 0.0000, -82.7485, 1.0000),
    (50.0000, 0.0000, 0.0000, 50.0000, -1.0000, 2.0000, 2.3669),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0009, 7.1792),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0011, 7.2195),
    (50.0000, -0.0010, 2.4900, 50.0000, 0.0011, -2.4900, 4.7461),
    (50.0000, 2.5000, 0.0000, 73.0000, 25.0000, -18.0000, 27.1492),
    (50.0000, 2.5000, 0.0000, 56.0000, -27.0000, -3.0000, 31.9030),
    (60.2574, -34.0099, 36.2677, 60.4626, -34.1751, 39.4387, 1.2644),
    (22.7233, 20.0904, -46.6940, 23.0331, 14.9730, -42.5619, 2.0373),
    (90.9257, -0.5406, -0.9208, 88.6381, -0.8985, -0.7239, 1.5381),
    (2.0776, 0.0795, -1.1350, 0.9033, -0.0636, -0.5514, 0.9082),
]


def textured_images(batch: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    """[batch, 3, size, size] in [0.05, 0.95]: smooth colour regions plus fine texture, like a photo."""
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(batch, 3, 8, 8, generator=g), size=size, mode="bicubic")
    fine = torch.rand(batch, 1, size, size, generator=g) - 0.5
    return (0.1 + 0.6 * coarse + 0.3 * fine).clamp(0.05, 0.95)


def gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = math.ceil(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=img.dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    padded = F.pad(img, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(padded, k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
    return F.conv2d(out, k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)


def to_hwc(img: torch.Tensor) -> np.ndarray:
    return img.permute(0, 2, 3, 1).double().numpy()


def test_psnr_of_a_constant_offset_is_20_db() -> None:
    target = torch.full((2, 3, 16, 16), 0.4)
    assert torch.allclose(psnr(target + 0.1, target), torch.full((2,), 20.0, dtype=torch.float64), atol=1e-5)


def test_ssim_matches_skimage_on_luma() -> None:
    target = textured_images(batch=2, size=48, seed=1)
    pred = (gaussian_blur(target, 1.0) + 0.02 * torch.randn_like(target)).clamp(0, 1)
    ours = ssim(pred, target)
    w = np.array([0.299, 0.587, 0.114])
    for i in range(2):
        y_true, y_pred = to_hwc(target)[i] @ w, to_hwc(pred)[i] @ w
        ref = structural_similarity(
            y_true, y_pred, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0
        )
        assert abs(ours[i].item() - ref) < 1e-4
    assert ours.min() > 0.3 and ours.max() < 0.99  # a real, not a degenerate, comparison


def test_srgb_to_lab_matches_skimage() -> None:
    rgb = torch.rand(2, 3, 9, 11, dtype=torch.float64)
    rgb[0, :, 0, :4] = torch.tensor([0.0, 1.0, 0.02, 0.04045])[None]  # black, white, both curve segments
    ours = srgb_to_lab(rgb).permute(0, 2, 3, 1).numpy()
    assert np.abs(ours - rgb2lab(to_hwc(rgb))).max() < 1e-4


def test_ciede2000_matches_skimage_on_random_lab() -> None:
    g = torch.Generator().manual_seed(3)
    # float64: skimage computes float32 inputs in float32, which would be the tolerance's bottleneck.
    scale = torch.tensor([100.0, 256.0, 256.0], dtype=torch.float64).view(1, 3, 1, 1)
    offset = torch.tensor([0.0, -128.0, -128.0], dtype=torch.float64).view(1, 3, 1, 1)
    lab1 = scale * torch.rand(2, 3, 17, 19, generator=g, dtype=torch.float64) + offset
    lab2 = scale * torch.rand(2, 3, 17, 19, generator=g, dtype=torch.float64) + offset
    lab2[:, :, :3] = lab1[:, :, :3] + 2 * torch.rand(2, 3, 3, 19, generator=g, dtype=torch.float64) - 1
    lab2[0, 1:, 5, :] = 0  # achromatic colours: undefined hue
    ours = ciede2000(lab1, lab2).numpy()
    ref = deltaE_ciede2000(to_hwc(lab1), to_hwc(lab2))
    assert np.abs(ours - ref).max() < 1e-6


def test_ciede2000_reproduces_sharma_pairs() -> None:
    data = torch.tensor(SHARMA_PAIRS, dtype=torch.float64)
    lab1 = data[:, 0:3].T.reshape(1, 3, 1, -1)
    lab2 = data[:, 3:6].T.reshape(1, 3, 1, -1)
    ours = ciede2000(lab1, lab2).flatten()
    assert torch.allclose(ours, data[:, 6], atol=5e-5)  # the table has 4 decimals
    ref = deltaE_ciede2000(to_hwc(lab1), to_hwc(lab2)).flatten()
    assert np.abs(ours.numpy() - ref).max() < 1e-6
    assert torch.allclose(ciede2000(lab2, lab1).flatten(), ours, atol=1e-12)  # symmetric


def test_identical_images_score_perfectly() -> None:
    img = textured_images(batch=2, size=32)
    low = F.avg_pool2d(img, 4)
    assert torch.isinf(psnr(img, img)).all()
    assert torch.allclose(ssim(img, img), torch.ones(2, dtype=torch.float64), atol=1e-12)
    assert ciede2000(srgb_to_lab(img), srgb_to_lab(img)).abs().max() == 0
    assert colour_error(img, low, 4).abs().max() < 1e-5
    assert spectral_distance(img, img).abs().max() == 0
    report = evaluate(img, img, low, 4)
    assert set(report) == {
        "psnr", "ssim", "colour_error", "spectral_distance", "blockiness", "colour_shift", "colour_shift_max"
    }  # fmt: skip
    assert report["psnr"] == math.inf and report["spectral_distance"] == 0
    assert report["colour_shift_max"] < 1e-4  # levels (float32 rounding of the low-res mean)


def test_blockiness_finds_a_block_grid_and_not_a_photo_like_texture() -> None:
    img = textured_images(batch=2, size=64)
    assert (blockiness(img) - 1).abs().max() < 0.1  # no grid: steps on grid lines are like any others
    # Per-block offsets on a 16-px grid (a patch decoder's failure): visible at period 16.
    offsets = F.interpolate(
        torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(3)), scale_factor=16
    )
    blocky = (0.7 * img + 0.3 * offsets).clamp(0, 1)
    assert (blockiness(blocky) > 1.25).all()
    assert (blockiness(blocky, periods=(16,)) == blockiness(blocky)).all()
    with pytest.raises(ValueError, match="no 16-px grid lines"):
        blockiness(img[:, :, :12, :12], periods=(16,))


def test_seam_score_finds_a_step_at_the_window_borders_only() -> None:
    # blurred noise: a texture with no preferred lines (textured_images has knots every 8 px)
    noise = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    img = 0.2 + 0.6 * gaussian_blur(noise, 1.5)
    borders = [16, 32, 48]
    assert (seam_score(img, borders, borders) - 1).abs().max() < 0.15  # no seam there
    # 4 x 4 windows of 16 px, each offset by up to +-10 % of full scale: steps at their borders.
    levels = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    seamed = (img + 0.2 * (F.interpolate(levels, scale_factor=16) - 0.5)).clamp(0, 1)
    assert (seam_score(seamed, borders, borders) > 1.5).all()
    between = [8, 24, 40, 56]
    # inside windows no seam (under 1: the borders' steps now count in the mean "elsewhere")
    assert (seam_score(seamed, between, between) < 1.0).all()
    with pytest.raises(ValueError, match="at least one window border"):
        seam_score(img, [], [])


def test_seam_over_grid_separates_window_borders_from_a_decoders_own_cell_grid() -> None:
    noise = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(4))
    img = 0.2 + 0.6 * gaussian_blur(noise, 1.5)
    # windows of 32 px on a 16-px latent grid: borders 32, 64, 96; the other cell lines 16, 48, ...
    borders = [32, 64, 96]

    def checkerboard(period: int) -> torch.Tensor:  # +-0.1 per block: the same step at every line
        index = torch.arange(128) // period
        return 0.1 * (((index[:, None] + index[None, :]) % 2) * 2 - 1).float()

    # a decoder whose every 16-px cell is offset: the borders show, but no more than other cell lines
    celled = img + checkerboard(16)
    assert (seam_score(celled, borders, borders) > 1.5).all()
    assert (seam_over_grid(celled, borders, borders, 16) - 1).abs().max() < 0.1
    # offsets per 32-px window only: the borders show more than the cell lines inside the windows
    seamed = img + checkerboard(32)
    assert (seam_over_grid(seamed, borders, borders, 16) > 1.5).all()
    assert (seam_over_grid(img, borders, borders, 16) - 1).abs().max() < 0.15  # no seam, no grid
    with pytest.raises(ValueError, match="not all on the 16-px grid"):
        seam_over_grid(img, [24], [], 16)
    with pytest.raises(ValueError, match="nothing to compare"):
        seam_over_grid(img[:, :, :32, :32], [16], [16], 16)
    with pytest.raises(ValueError, match="at least one window border"):
        seam_over_grid(img, [], [], 16)


def test_colour_shift_is_the_largest_mean_channel_difference_in_levels() -> None:
    img = textured_images(batch=2, size=32)
    low = F.avg_pool2d(img, 4)
    cast = img + torch.tensor([0.0, 0.0, 10 / 255]).view(1, 3, 1, 1)  # +10 levels of blue
    assert torch.allclose(colour_shift(cast, low), torch.full((2,), 10.0, dtype=torch.float64), atol=1e-6)
    assert colour_shift(img, low).max() < 1e-6
    with pytest.raises(ValueError, match="images"):
        colour_shift(img, low[:1])


def test_spectral_distance_penalises_blur_not_tiny_noise() -> None:
    target = textured_images(batch=2, size=64)
    noisy = target + 0.002 * torch.randn_like(target)
    blurred = gaussian_blur(target, 1.5)
    d_noise, d_blur = spectral_distance(noisy, target), spectral_distance(blurred, target)
    assert (d_noise < 0.05).all()
    assert (d_blur > 1.0).all() and (d_blur > 20 * d_noise).all()
    # The blurred spectrum falls below the truth's, more so at higher frequency.
    gap = radial_log_spectrum(target) - radial_log_spectrum(blurred)
    assert gap.shape == (2, 32) and (gap[:, -8:].mean(1) > gap[:, 8:16].mean(1)).all()


def test_spectrum_bins_cover_non_square_images() -> None:
    img = textured_images(batch=1, size=48)[..., :40]  # 48 x 40
    spec = radial_log_spectrum(img)
    freqs = spectrum_frequencies(48, 40)
    assert spec.shape == (1, 20) and torch.isfinite(spec).all()
    assert freqs[0] == pytest.approx(0.05) and freqs[-1] == pytest.approx(1.0)


def test_colour_error_detects_a_hue_shift_but_not_block_zero_detail() -> None:
    target = textured_images(batch=2, size=32)
    low = F.avg_pool2d(target, 4)
    # Rotate hue a little: mix each channel with the next one.
    shifted = 0.8 * target + 0.2 * target.roll(1, dims=1)
    assert (colour_error(shifted, low, 4) > 3).all()
    # A checkerboard averages to zero in each 4x4 block: new detail, same low-res colour.
    checker = 0.04 * (1 - 2 * ((torch.arange(32)[:, None] + torch.arange(32)[None]) % 2)).float()
    assert colour_error(target + checker, low, 4).max() < 1e-4


@pytest.mark.parametrize(
    ("pred", "target", "match"),
    [
        (torch.rand(3, 16, 16), torch.rand(3, 16, 16), r"\[B, 3, H, W\]"),
        (torch.rand(1, 4, 16, 16), torch.rand(1, 4, 16, 16), r"\[B, 3, H, W\]"),
        (torch.zeros(1, 3, 16, 16, dtype=torch.uint8), torch.zeros(1, 3, 16, 16), "float"),
        (torch.full((1, 3, 16, 16), math.nan), torch.rand(1, 3, 16, 16), "NaN"),
        (torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 12), "same batch size and resolution"),
    ],
)
def test_bad_inputs_raise_value_error(pred: torch.Tensor, target: torch.Tensor, match: str) -> None:
    for metric in (psnr, ssim, spectral_distance):
        with pytest.raises(ValueError, match=match):
            metric(pred, target)


def test_bad_sizes_and_scales_raise_value_error() -> None:
    img = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(img[..., :8, :8], img[..., :8, :8])
    with pytest.raises(ValueError, match="expected"):
        colour_error(img, torch.rand(1, 3, 8, 8), 4)
    with pytest.raises(ValueError, match="not divisible"):
        colour_error(img[..., :14], torch.rand(1, 3, 4, 3), 4)
    with pytest.raises(ValueError, match="positive integer"):
        colour_error(img, torch.rand(1, 3, 4, 4), 0)
    with pytest.raises(ValueError, match="min_frequency"):
        spectral_distance(img, img, min_frequency=1.0)


def test_tiling_seam_excess_compares_tiled_with_untiled_at_the_same_borders() -> None:
    from pidserve.bench.decoder_quality import tiling_seam_excess

    metrics = {"student": {"seam": 1.25}, "student_tiled": {"seam": 1.3125}}
    assert tiling_seam_excess(metrics) == pytest.approx(1.05)
    assert tiling_seam_excess({"student": {"psnr": 20.0}}) is None  # not tiled: no seams measured
