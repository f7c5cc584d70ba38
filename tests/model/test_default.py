"""The embedded default (model/weights/): it loads, its latent space matches tiny-ae, and it decodes
a fixed latent to fixed pixels with a fixed seed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from pidserve.bench.quality import evaluate
from pidserve.cli import app
from pidserve.model import PiDConfig, get_latent_space, sample, to_uint8_hwc
from pidserve.model.autoencoder import load_autoencoder
from pidserve.model.default import (
    AUTOENCODER_FILE,
    DECODER_FILE,
    encode_image,
    load_default_autoencoder,
    load_default_decoder,
)
from pidserve.model.latents import TINY_AE_SHIFT, TINY_AE_STD

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "default_model"
DEFAULT_CHECKPOINT = DECODER_FILE
_ones = torch.full((1, 3, 32, 32), 0.5)
FIGURES = tuple(evaluate(_ones, _ones, _ones[:, :, :8, :8], 4))


def test_the_shipped_weights_are_small_and_load():
    total = DECODER_FILE.stat().st_size + AUTOENCODER_FILE.stat().st_size
    assert total < 60 * 10**6, total  # issue 16's budget for the embedded default
    net = load_default_decoder()
    assert net.cfg == PiDConfig.preset("pid-tiny")
    assert not net.training


def test_the_tiny_ae_latent_space_uses_the_measured_statistics():
    _, info = load_autoencoder(AUTOENCODER_FILE)
    stats = info["latent_stats"]
    assert pytest.approx(stats["mean"], abs=1e-4) == TINY_AE_SHIFT
    assert pytest.approx(stats["std"], abs=1e-4) == TINY_AE_STD
    space = get_latent_space("tiny-ae")
    raw = torch.randn(1, 16, 2, 2)
    assert torch.allclose(space.denormalize(space.normalize(raw)), raw, atol=1e-6)


def test_a_fixed_latent_decodes_to_fixed_pixels():
    """Pins the shipped weights and the CPU decode path. Not bit for bit: CPUs with different vector
    units take different BLAS/oneDNN kernels and round float sums differently, which moves a handful of
    pixels by one level (9 of 196608 on an AVX2-only EPYC against the reference made on an earlier
    machine; a SHA-256 pin failed there). Different weights or a changed decode move far more."""
    reference = load_file(str(FIXTURES / "decode_reference.safetensors"))
    net = load_default_decoder()
    images = sample(net, reference["latent"], 0.0, generator=torch.Generator().manual_seed(0))
    assert images.shape == (1, 3, 256, 256)
    diff = (to_uint8_hwc(images).int() - reference["pixels"].int()).abs()
    assert diff.max() <= 1
    assert (diff > 0).float().mean() < 1e-3


def test_decode_default_encodes_an_image_and_writes_4x_pixels(tmp_path):
    source = tmp_path / "small.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (36, 50, 3), dtype=np.uint8)).save(source)
    out = tmp_path / "big.png"
    result = CliRunner().invoke(app, ["decode", str(source), "-o", str(out), "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "cropping small.png from 50x36 to 48x32" in result.output
    assert Image.open(out).size == (48 * 4, 32 * 4)


def test_encode_image_refuses_non_rgb_uint8():
    ae = load_default_autoencoder()
    with pytest.raises(ValueError, match="uint8 RGB"):
        encode_image(ae, np.zeros((16, 16), dtype=np.uint8))
    latent = encode_image(ae, np.zeros((16, 24, 3), dtype=np.uint8))
    assert latent.shape == (1, 16, 2, 3)


def _bench_quality(tmp_path, seed: int, *extra: str):
    """`pidserve bench quality` on one noise "photo" (2 crops); (the CLI result, the output folder)."""
    photos = tmp_path / "holdout"
    photos.mkdir()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (300, 320, 3), dtype=np.uint8)).save(photos / "p.png")
    out = tmp_path / "quality"
    args = ["bench", "quality", "--photos", str(photos), "--out", str(out), "--crops-per-photo", "2"]
    return CliRunner().invoke(app, [*args, *extra]), out


def test_bench_quality_reports_every_metric_for_the_default(tmp_path):
    result, out = _bench_quality(tmp_path, 1)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "metrics.json").read_text())
    metrics = report["metrics"]
    assert set(metrics) == {"bicubic", "cascade", "student"}
    for figures in metrics.values():
        assert set(figures) == set(FIGURES)
    assert report["ground_truth_blockiness"] > 0.5  # noise: no grid, about 1
    # 6 columns (held-out crops: here 2, repeated), rows: input, bicubic, cascade, student, truth.
    assert Image.open(out / "grid.png").size == (6 * 256, 5 * 256)


def test_bench_x0_error_compares_checkpoints_at_each_time(tmp_path):
    photos = tmp_path / "holdout"
    photos.mkdir()
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 255, (260, 300, 3), dtype=np.uint8)).save(photos / "p.png")
    out = tmp_path / "x0"
    args = ["bench", "x0-error", str(DEFAULT_CHECKPOINT), "--photos", str(photos), "--crops-per-photo", "2"]
    result = CliRunner().invoke(app, [*args, "--times", "0.999,0.5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    errors = json.loads((out / "x0_error.json").read_text())
    per_t = errors[DEFAULT_CHECKPOINT.name]
    assert set(per_t) == {"0.999", "0.5"}
    # At t = 0.5 half the image is in the input: the x0 error is far below the pure-noise one.
    assert 0 < per_t["0.5"] < per_t["0.999"]
    bad = CliRunner().invoke(app, [*args, "--times", "0.9,2"])
    assert bad.exit_code == 2 and "(0, 1]" in bad.output
    # Two runs' teacher_ema.safetensors: same file name, so the rows are named by path.
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        (tmp_path / run / DEFAULT_CHECKPOINT.name).write_bytes(DEFAULT_CHECKPOINT.read_bytes())
    pair = [str(tmp_path / run / DEFAULT_CHECKPOINT.name) for run in ("a", "b")]
    both = ["bench", "x0-error", *pair, "--photos", str(photos), "--crops-per-photo", "2", "--times", "0.5"]
    result = CliRunner().invoke(app, [*both, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert set(json.loads((out / "x0_error.json").read_text())) == set(pair)
    twice = CliRunner().invoke(app, ["bench", "x0-error", pair[0], pair[0], "--photos", str(photos)])
    assert twice.exit_code == 2 and "twice" in twice.output


def _holdout_figures() -> dict[str, dict[str, float]]:
    """bench quality's figures for the shipped student and the cascade on the 4 held-out crops of
    tests/fixtures/default_model (coffee and rocket, never trained on)."""
    from pidserve.model import decode_latent_cascade
    from pidserve.training import degrade

    paths = sorted(FIXTURES.glob("holdout_*.png"))
    assert len(paths) == 4
    hr = torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1) for p in paths]).float()
    hr = hr / 127.5 - 1
    lr = degrade(hr, 4)
    net, ae = load_default_decoder(), load_default_autoencoder()
    space = get_latent_space("tiny-ae")
    with torch.no_grad():
        z = space.normalize(ae.encode(lr).float())
        outputs = {
            "student": sample(net, z, 0.0, generator=torch.Generator().manual_seed(0)),
            "cascade": decode_latent_cascade(ae, z, 4, space),
        }
    to01 = lambda x: (x.clamp(-1, 1) + 1) / 2  # noqa: E731
    return {name: evaluate(to01(pred), to01(hr), to01(lr), 4) for name, pred in outputs.items()}


@pytest.fixture(scope="module")
def holdout_figures() -> dict[str, dict[str, float]]:
    return _holdout_figures()


def test_the_shipped_default_does_not_regress_on_held_out_crops(holdout_figures) -> None:
    """v3.1 as shipped (2026-12-03) on these crops: PSNR 21.07 dB, SSIM 0.468, ΔE00 5.76, colour shift
    3.06 levels, blockiness 1.363, spectral distance 0.56 (v3: 20.19 dB, SSIM ~0.35, 3.58 levels,
    1.31, 0.37). Deterministic, so the bounds are tight: new weights must be at least this good. v3.1
    loosened two of v3's bounds on purpose: its fine-tune removed most of v3's grain, which lowers the
    steps between grid lines that the blockiness ratio divides by and the high-frequency energy the
    spectral distance compares (still 8x below the cascade's 4.7); docs/quality.md, "v3.1"."""
    student = holdout_figures["student"]
    assert student["psnr"] >= 21.0
    assert student["ssim"] >= 0.46
    assert student["colour_error"] <= 5.8
    assert student["colour_shift"] <= 3.1
    assert student["blockiness"] <= 1.37
    assert student["spectral_distance"] <= 0.6


@pytest.mark.xfail(
    strict=True, reason="issue 16's goal, not met by v3.1: the student is ~1.4 dB below the cascade here"
)
def test_the_default_meets_issue_16s_goal_on_held_out_crops(holdout_figures) -> None:
    """Flips to a pass (and so, being strict, fails) the day the embedded default meets its goal:
    then remove the xfail."""
    student, cascade = holdout_figures["student"], holdout_figures["cascade"]
    assert student["psnr"] >= cascade["psnr"] - 0.5
    assert student["colour_error"] <= cascade["colour_error"]
    assert student["colour_shift"] <= 3


def test_bench_quality_scores_the_window_borders_of_a_tiled_decode(tmp_path):
    result, out = _bench_quality(tmp_path, 4, "--tile", "128x128:32")  # 256² in 3 x 3 windows
    assert result.exit_code == 0, result.output
    report = json.loads((out / "metrics.json").read_text())
    for figures in report["metrics"].values():  # every decoder, at the tiled decode's borders
        assert set(figures) == {*FIGURES, "seam", "seam_over_grid"}
    # noise has no preferred lines: its steps at the borders are like those at any other cell line
    assert report["ground_truth_seam_over_grid"] == pytest.approx(1.0, abs=0.15)
    assert "seams over the other latent-cell lines" in (out / "table.md").read_text()


def test_bench_quality_adds_a_tiled_student_row_equal_to_the_untiled_one_at_the_native_size(tmp_path):
    result, out = _bench_quality(tmp_path, 3, "--tile", "256x256")
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["student_tiled"] == metrics["student"]  # one window at 256²: bit for bit the same
    assert Image.open(out / "grid.png").size == (6 * 256, 6 * 256)  # a row more: student tiled
