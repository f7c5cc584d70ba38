"""`pidserve bench window-latents` on a noise 'photo': six decodes of one crop, figures per row."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pidserve.bench.decoder_quality import QualitySetup
from pidserve.bench.window_latents import ROWS, window_latent_cast
from pidserve.cli import app
from pidserve.model import Tiling, load_tiny_autoencoder
from pidserve.model.default import load_default_decoder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("holdout")
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (300, 320, 3), dtype=np.uint8)).save(folder / "p.png")
    return folder


def test_with_overlap_0_the_tiled_crop_row_is_the_windows_decoded_alone(photos) -> None:
    ae, space = load_tiny_autoencoder(None)
    setup = QualitySetup(photos, crop=512, crops_per_photo=1, upscale=False)
    figures = window_latent_cast(setup, load_default_decoder(), ae, Tiling.parse("256x256:0"), space)
    assert set(figures) == set(ROWS)
    tiled, alone = figures["tiled_crop"], figures["windows"]
    # the same network rows and noise: equal up to the float rounding of batching windows together
    assert tiled["psnr"] == pytest.approx(alone["psnr"], abs=0.01)
    assert tiled["signed_error"] == pytest.approx(alone["signed_error"], abs=0.05)
    # the windows' own encodings are other latents: another image
    assert figures["windows_own_latent"]["psnr"] != pytest.approx(alone["psnr"], abs=1e-3)
    assert figures["tiled_corrected"]["psnr"] != pytest.approx(tiled["psnr"], abs=1e-3)


def test_the_command_prints_every_row_and_refuses_a_single_window(photos, tmp_path) -> None:
    args = ["bench", "window-latents", "--photos", str(photos), "--crop", "512", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, [*args, "--tile", "256x256"])
    assert result.exit_code == 0, result.output
    assert all(f"| {row} |" in result.output for row in ROWS)
    figures = json.loads((tmp_path / "window_latents.json").read_text())
    assert set(figures["tiled_corrected"]) == {"colour_shift", "colour_shift_max", "signed_error", "psnr"}
    one = CliRunner().invoke(app, [*args, "--crop", "256"])
    assert one.exit_code != 0 and "one window" in one.output
    odd = CliRunner().invoke(app, [*args, "--tile", "192x192"])
    assert odd.exit_code != 0 and "must be a multiple of the window" in odd.output
