"""The `pidserve convert` and `pidserve info` commands, run through Typer's test runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pidserve.cli import app
from pidserve.model import load_checkpoint
from pidserve.model.flops import decode_flops
from tests.conftest import OFFICIAL, load_tensors

runner = CliRunner()


def _official_pth(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.pth"
    torch.save(
        {
            "net." + k: v.to(torch.bfloat16)
            for k, v in load_tensors(OFFICIAL / name / "weights.safetensors").items()
        },
        path,
    )
    return path


def test_convert_then_load_without_a_config(tmp_path: Path) -> None:
    out = tmp_path / "model.safetensors"
    result = runner.invoke(
        app, ["convert", str(_official_pth(tmp_path, "tiny_v1.5")), "--variant", "tiny_v1.5", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    net = load_checkpoint(out)
    assert net.cfg.version == "v1.5" and net.cfg.latent_channels == 128


def test_convert_detects_an_unambiguous_variant(tmp_path: Path) -> None:
    out = tmp_path / "model.safetensors"
    result = runner.invoke(app, ["convert", str(_official_pth(tmp_path, "tiny_v1")), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "variant tiny_v1" in result.output


def test_convert_wrong_variant_prints_a_diff_not_a_traceback(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "convert",
            str(_official_pth(tmp_path, "tiny_v1")),
            "--variant",
            "2k_flux",
            "-o",
            str(tmp_path / "x.safetensors"),
        ],
    )
    assert result.exit_code == 2
    assert "wrong shape" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.safetensors").exists()


def test_info_json_has_parameters_and_flops() -> None:
    result = runner.invoke(app, ["info", "--preset", "2k_flux", "--size", "2048x2048", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["parameters"]["total"] == 1_362_348_170
    assert report["parameters"]["backbone"] == 1_302_470_787
    from pidserve.model import PiDConfig

    assert report["decode"]["flops"]["total"] == decode_flops(PiDConfig.preset("2k_flux"), 2048, 2048).total


def test_info_counts_a_tiled_decode_window_by_window() -> None:
    """2k flux at 4096²: 3 x 3 windows of its trained 2048² (512-px overlap) cost less than one global
    attention over 4096², and the count is exactly windows x one 2048² decode."""
    from pidserve.model import PiDConfig

    result = runner.invoke(
        app, ["info", "--preset", "2k_flux", "--size", "4096x4096", "--tile", "auto", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    tiled, untiled = report["tiled"], report["decode"]["flops"]["total"]
    window = decode_flops(PiDConfig.preset("2k_flux"), 2048, 2048, steps=4).total
    assert tiled["windows"] == 9 and tiled["tile"] == "2048x2048" and tiled["overlap"] == 512
    assert tiled["flops"]["total"] == 9 * window
    assert tiled["ratio_to_untiled"] == pytest.approx(9 * window / untiled) and tiled["ratio_to_untiled"] < 1
    fits = runner.invoke(app, ["info", "--preset", "2k_flux", "--size", "2048x2048", "--tile", "auto"])
    assert "fits in one window: decoded untiled" in fits.output
    bad = runner.invoke(app, ["info", "--preset", "2k_flux", "--tile", "2000x2000"])
    assert bad.exit_code != 0 and "multiples of 32" in bad.output


def test_info_on_a_file_reports_format_dtype_and_variant(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["info", str(_official_pth(tmp_path, "tiny_v1")), "--size", "128x128", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["format"] == "official" and report["variants"] == ["tiny_v1"]
    assert report["stored_dtypes"] == {"bfloat16": 174}


def test_info_bad_arguments() -> None:
    assert "HEIGHTxWIDTH" in runner.invoke(app, ["info", "--preset", "2k_flux", "--size", "big"]).output
    assert (
        "unknown PiD preset 'nope'; known presets:" in runner.invoke(app, ["info", "--preset", "nope"]).output
    )
    assert "either a CHECKPOINT or --preset" in runner.invoke(app, ["info"]).output
    listing = runner.invoke(app, ["info", "--list"]).output
    assert "2kto4k_v1pt5_qwenimage" in listing and "tiny_v1" in listing


def _latent_file(tmp_path: Path, channels: int = 16, sigma: float | None = None) -> Path:
    from safetensors.torch import save_file

    tensors = {"latent": torch.randn(1, channels, 2, 2, generator=torch.Generator().manual_seed(1))}
    if sigma is not None:
        tensors["sigma"] = torch.tensor([sigma])
    path = tmp_path / "latent.safetensors"
    save_file(tensors, str(path))
    return path


def _our_checkpoint(tmp_path: Path) -> Path:
    from pidserve.model import PiDConfig, save_checkpoint

    path = tmp_path / "tiny_v1.safetensors"
    save_checkpoint(
        load_checkpoint(OFFICIAL / "tiny_v1" / "weights.safetensors", PiDConfig.preset("tiny_v1")), path
    )
    return path


def test_decode_writes_a_png_of_the_output_size(tmp_path: Path) -> None:
    from PIL import Image

    out = tmp_path / "img.png"
    args = ["decode", str(_latent_file(tmp_path, sigma=0.2)), "--checkpoint", str(_our_checkpoint(tmp_path))]
    result = runner.invoke(app, [*args, "-o", str(out), "--seed", "3"])
    assert result.exit_code == 0, result.output
    first = Image.open(out)
    assert first.size == (64, 64) and first.mode == "RGB"
    pixels = torch.from_numpy(__import__("numpy").asarray(first))
    again = tmp_path / "again.png"
    assert runner.invoke(app, [*args, "-o", str(again), "--seed", "3"]).exit_code == 0
    assert torch.equal(pixels, torch.from_numpy(__import__("numpy").asarray(Image.open(again))))
    # the attention kernel can be pinned; same seed, same image to within float rounding
    math = tmp_path / "math.png"
    assert (
        runner.invoke(app, [*args, "-o", str(math), "--seed", "3", "--attention-backend", "math"]).exit_code
        == 0
    )
    diff = pixels.int() - torch.from_numpy(__import__("numpy").asarray(Image.open(math))).int()
    assert diff.abs().max() <= 2


def test_decode_reports_bad_inputs(tmp_path: Path) -> None:
    checkpoint = str(_our_checkpoint(tmp_path))
    wrong = runner.invoke(
        app, ["decode", str(_latent_file(tmp_path, channels=4)), "--checkpoint", checkpoint]
    )
    assert wrong.exit_code == 2 and "[B, 16, h, w]" in wrong.output
    bad_sigma = runner.invoke(
        app, ["decode", str(_latent_file(tmp_path)), "--checkpoint", checkpoint, "--sigma", "1.5"]
    )
    assert bad_sigma.exit_code == 2 and "sigma" in bad_sigma.output
    kernel = runner.invoke(
        app,
        ["decode", str(_latent_file(tmp_path)), "--checkpoint", checkpoint, "--attention-backend", "cudnn"],
    )
    assert kernel.exit_code == 2 and "cudnn attention does not run on cpu" in kernel.output
    pickled = tmp_path / "latent.npy"
    import numpy as np

    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    refused = runner.invoke(app, ["decode", str(pickled), "--checkpoint", checkpoint])
    assert refused.exit_code == 2 and "plain .npy" in refused.output
    image_for_flux = tmp_path / "photo.png"
    Image.new("RGB", (16, 16)).save(image_for_flux)
    no_encoder = runner.invoke(app, ["decode", str(image_for_flux), "--checkpoint", checkpoint])
    assert no_encoder.exit_code == 2 and "encode the image with that VAE" in no_encoder.output


def test_build_checks_the_gpu_class_precision_and_tensorrt_first(tmp_path: Path) -> None:
    checkpoint = str(_our_checkpoint(tmp_path))
    base = ["build", "--checkpoint", checkpoint, "-o", str(tmp_path / "engines")]
    unknown = runner.invoke(app, [*base, "--gpu-class", "a100"])
    assert unknown.exit_code == 2 and "unknown GPU class 'a100'" in unknown.output
    # Without TensorRT (this machine has only its type stubs) the build stops before exporting.
    no_trt = runner.invoke(app, [*base, "--gpu-class", "h100", "--precision", "bf16"])
    assert no_trt.exit_code == 2 and "TensorRT is not installed" in no_trt.output
    assert not (tmp_path / "engines").exists()
