"""`pidserve data photos` on a locally built stand-in for the mate-backgrounds .deb (no network)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess

import pytest
from PIL import Image
from typer.testing import CliRunner

from pidserve.cli import app
from pidserve.training.photos import HOLDOUT, MATE_NATURE_DIR, SKIMAGE_PHOTOS

NATURE = ["Aqua", "Dune", "LadyBird", "Storm"]


@pytest.fixture
def fake_deb(tmp_path):
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed")
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: mate-backgrounds\nVersion: 0.0-test\nArchitecture: all\n"
        "Maintainer: t <t@t>\nDescription: t\n"
    )
    nature = root / MATE_NATURE_DIR
    nature.mkdir(parents=True)
    for i, name in enumerate(NATURE):
        Image.new("RGB", (40, 30), (40 * i, 100, 200)).save(nature / f"{name}.jpg")
    deb = tmp_path / "mate-backgrounds_0.0-test_all.deb"
    subprocess.run(["dpkg-deb", "--build", str(root), str(deb)], check=True, capture_output=True)
    return deb


def test_photo_set_is_rebuilt_with_a_fixed_holdout_and_a_manifest(tmp_path, fake_deb):
    out = tmp_path / "photos"
    result = CliRunner().invoke(app, ["data", "photos", "--out", str(out), "--deb", str(fake_deb)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    photos = {p["file"]: p for p in manifest["photos"]}
    assert len(photos) == len(NATURE) + len(SKIMAGE_PHOTOS)
    assert {f.split("/")[-1] for f, p in photos.items() if p["split"] == "holdout"} == set(HOLDOUT)
    for file, record in photos.items():
        data = (out / file).read_bytes()
        assert hashlib.sha256(data).hexdigest() == record["sha256"]
        assert record["licence"] and record["source"]
        with Image.open(out / file) as im:
            assert im.mode == "RGB" and im.size == (record["width"], record["height"])
    assert "GPL-2+" in photos["train/mate-Aqua.jpg"]["licence"]
    assert "CC0" in photos["holdout/skimage-coffee.png"]["licence"]


def test_a_missing_deb_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(
        app, ["data", "photos", "--out", str(tmp_path / "p"), "--deb", str(tmp_path / "x.deb")]
    )
    assert result.exit_code == 2
    assert "error:" in result.output
