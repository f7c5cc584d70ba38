"""The `pidserve convert` and `pidserve info` commands, run through Typer's test runner."""

from __future__ import annotations

import json
from pathlib import Path

import torch
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
    assert "unknown preset" in runner.invoke(app, ["info", "--preset", "nope"]).output
    assert "either a CHECKPOINT or --preset" in runner.invoke(app, ["info"]).output
    listing = runner.invoke(app, ["info", "--list"]).output
    assert "2kto4k_v1pt5_qwenimage" in listing and "tiny_v1" in listing
