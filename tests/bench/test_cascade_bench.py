"""bench cascade: the baselines are what they say, timing takes turns, and a real run writes its report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pidserve.bench.cascade import (
    CascadeSetup,
    add_quality,
    bench_cascade,
    decode_then_bicubic,
    decode_then_sr_diffusion,
    latent_decoder,
    sr_model_config,
    time_interleaved,
)
from pidserve.cli import app
from pidserve.model import PiDConfig, PiDNet
from pidserve.model.default import decode_latent_cascade, load_default_decoder
from pidserve.model.vae_decoder import VAEDecoder

from .plots_check import assert_is_plot


@pytest.fixture(scope="module")
def pid_tiny() -> PiDNet:
    return load_default_decoder()


def test_the_sr_model_has_pids_backbone_and_reads_an_image(pid_tiny: PiDNet) -> None:
    cfg = sr_model_config(pid_tiny.cfg)
    assert (cfg.hidden_size, cfg.patch_depth, cfg.pixel_depth) == (
        pid_tiny.cfg.hidden_size,
        pid_tiny.cfg.patch_depth,
        pid_tiny.cfg.pixel_depth,
    )
    assert cfg.latent_channels == 3 and cfg.output_size(16, 16) == (64, 64)  # an image at 1/4 -> x4
    sr = PiDNet(cfg)
    pid_params = sum(p.numel() for p in pid_tiny.parameters())
    assert sum(p.numel() for p in sr.parameters()) == pytest.approx(pid_params, rel=0.05)


def test_decode_then_bicubic_is_the_quality_baseline_in_uint8(pid_tiny: PiDNet) -> None:
    decoder, name = latent_decoder("tiny-ae", torch.device("cpu"))
    assert name == "tiny-ae decoder"
    latents = torch.randn(2, 16, 2, 3, generator=torch.Generator().manual_seed(1))
    pixels, stages = decode_then_bicubic(decoder, "tiny-ae", 4, torch.float32)(latents)
    assert pixels.dtype == torch.uint8 and pixels.shape == (2, 64, 96, 3)
    expected = decode_latent_cascade(decoder, latents, 4)  # [-1, 1], what bench quality scores
    expected = expected.add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.equal(pixels, expected)
    assert {"latent_decode", "upsample", "postprocess"} <= set(stages)


def test_decode_then_sr_diffusion_writes_the_output_size(pid_tiny: PiDNet) -> None:
    decoder, _ = latent_decoder("tiny-ae", torch.device("cpu"))
    sr = PiDNet(sr_model_config(pid_tiny.cfg)).eval()
    pixels, stages = decode_then_sr_diffusion(decoder, "tiny-ae", sr, 2, torch.float32)(
        torch.randn(1, 16, 2, 2)
    )
    assert pixels.dtype == torch.uint8 and pixels.shape == (1, 64, 64, 3)
    assert stages["sr_diffusion"] > 0


def test_only_latent_spaces_with_a_decoder_here_can_cascade(tmp_path: Path) -> None:
    decoder, name = latent_decoder("flux1", torch.device("cpu"))
    assert name == "flux1 VAE decoder (random weights)" and isinstance(decoder, VAEDecoder)
    with pytest.raises(
        ValueError, match="'flux2' autoencoder's decoder, which this project does not include"
    ):
        latent_decoder("flux2", torch.device("cpu"))
    with pytest.raises(ValueError, match="--vae is for flux1, sd3 and sdxl"):
        latent_decoder("tiny-ae", torch.device("cpu"), tmp_path / "ae.safetensors")


def test_a_flux_model_cascades_through_the_flux_vae_decoder(tmp_path: Path) -> None:
    """tiny_v1 decodes flux1 latents: its cascade runs the full-size FLUX.1 VAE decoder (random weights)."""
    net = PiDNet(PiDConfig.preset("tiny_v1")).eval()
    rows = bench_cascade(net, CascadeSetup(image_size=(64, 64), sr_steps=[1], warmup=0, repeat=1))
    assert [r.name for r in rows] == ["pid", "decode+bicubic", "decode+sr-diffusion/1"]
    assert rows[1].description == "flux1 VAE decoder (random weights), bicubic x4"
    assert rows[1].parameters_millions == pytest.approx(49.545475)
    assert rows[1].stages_ms_per_image["latent_decode"] > 0


def test_time_interleaved_takes_turns_and_reports_per_image() -> None:
    calls: list[str] = []

    def fake(name: str, stage_s: float):
        def run(latents: torch.Tensor):
            calls.append(name)
            return latents, {"work": stage_s, "total": 2 * stage_s}

        return run

    latents = torch.zeros(4, 1, 1, 1)  # a batch of 4: figures are per image
    timed = time_interleaved({"a": fake("a", 0.4), "b": fake("b", 0.8)}, latents, warmup=1, repeat=3)
    assert calls == ["a", "b"] * 4  # one warm-up round, then three timed rounds, alternating
    summary, stages = timed["b"]
    assert summary.n == 3 and stages == {"work": pytest.approx(200.0)}  # 0.8 s / 4 images, "total" dropped


def _photos(tmp_path: Path) -> Path:
    from skimage import data

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("astronaut", "coffee"):
        Image.fromarray(np.asarray(getattr(data, name)())).save(folder / f"{name}.png")
    return folder


def test_cli_runs_every_pipeline_and_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "cascade"
    args = ["bench", "cascade", "--size", "64x64", "--sr-steps", "8,2", "--repeat", "2", "--warmup", "0"]
    result = CliRunner().invoke(app, [*args, "--photos", str(_photos(tmp_path)), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "cascade.json").read_text())["results"]
    assert [r["name"] for r in rows] == [
        "pid",
        "decode+bicubic",
        "decode+sr-diffusion/8",
        "decode+sr-diffusion/2",
    ]
    assert rows[0]["pid_speedup"] == 1.0
    for row in rows:
        assert row["ms_per_image_median"] > 0 and row["image_size"] == [64, 64]
        assert row["pid_speedup"] == pytest.approx(
            row["ms_per_image_median"] / rows[0]["ms_per_image_median"]
        )
    # quality where ground truth exists: PiD and decode+bicubic, never the random-weight SR model
    assert rows[0]["quality"]["psnr"] > 10 and rows[1]["quality"]["psnr"] > 10
    assert rows[2]["quality"] is None
    assert_is_plot(out / "cascade_stages.png")
    assert "| decode+sr-diffusion/8 |" in (out / "cascade.md").read_text()


def test_cli_refuses_bad_sizes_and_latent_spaces(tmp_path: Path) -> None:
    odd = CliRunner().invoke(app, ["bench", "cascade", "--size", "48x48", "--out", str(tmp_path)])
    assert odd.exit_code == 2 and "must be a multiple of 32" in odd.output
    flux2 = CliRunner().invoke(app, ["bench", "cascade", "--preset", "tiny_v1.5", "--out", str(tmp_path)])
    assert flux2.exit_code == 2 and "'flux2' autoencoder's decoder" in flux2.output
    missing = tmp_path / "ae.safetensors"
    args = ["bench", "cascade", "--preset", "tiny_v1", "--vae", str(missing), "--out", str(tmp_path)]
    no_vae = CliRunner().invoke(app, args)
    assert no_vae.exit_code == 2 and "not a .safetensors file" in no_vae.output


def test_quality_needs_square_crops(pid_tiny: PiDNet, tmp_path: Path) -> None:
    rows = bench_cascade(pid_tiny, CascadeSetup(image_size=(64, 128), sr_steps=[1], warmup=0, repeat=1))
    with pytest.raises(ValueError, match="square crops"):
        add_quality(rows, pid_tiny, tmp_path)
