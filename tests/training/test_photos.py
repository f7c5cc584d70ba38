"""`pidserve data photos` on locally built stand-ins for the Debian packages and the scikit-learn
wheel (real .deb and .whl archives with small images; no network)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import zipfile

import pytest
from PIL import Image
from typer.testing import CliRunner

from pidserve.cli import app
from pidserve.training.photos import DEB_SOURCES, HOLDOUT, PACKAGES, SKIMAGE_PHOTOS, SKLEARN_PHOTOS


def _fake_deb(tmp_path, out_dir, source, skip: str | None = None):
    root = tmp_path / source.package
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {source.package}\nVersion: 0.0-test\nArchitecture: all\n"
        "Maintainer: t <t@t>\nDescription: t\n"
    )
    folder = root / source.folder
    folder.mkdir(parents=True)
    for i, name in enumerate(sorted(source.licences)):
        if name != skip:
            Image.new("RGB", (40, 30), (7 * i, 100, 200)).save(folder / name)
    Image.new("RGB", (40, 30)).save(folder / "an-illustration.jpg")  # not in the table: left out
    deb = out_dir / f"{source.package}_0.0-test_all.deb"
    subprocess.run(["dpkg-deb", "--build", str(root), str(deb)], check=True, capture_output=True)


@pytest.fixture
def downloads(tmp_path):
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed")
    (tmp_path / "downloads").mkdir()
    for source in DEB_SOURCES:
        _fake_deb(tmp_path, tmp_path / "downloads", source)
    with zipfile.ZipFile(tmp_path / "downloads" / "scikit_learn-0.0-py3-none-any.whl", "w") as wheel:
        for name in SKLEARN_PHOTOS:
            image = tmp_path / name
            Image.new("RGB", (64, 48), (200, 20, 20)).save(image)
            wheel.write(image, f"sklearn/datasets/images/{name}")
    return tmp_path / "downloads"


def test_photo_set_is_rebuilt_with_a_fixed_holdout_and_a_manifest(tmp_path, downloads):
    out = tmp_path / "photos"
    result = CliRunner().invoke(app, ["data", "photos", "--out", str(out), "--downloads", str(downloads)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    photos = {p["file"]: p for p in manifest["photos"]}
    expected = sum(len(s.licences) for s in DEB_SOURCES) + len(SKIMAGE_PHOTOS) + len(SKLEARN_PHOTOS)
    assert len(photos) == expected
    assert {f.split("/")[-1] for f, p in photos.items() if p["split"] == "holdout"} == set(HOLDOUT)
    assert len({name.split("-")[0] for name in HOLDOUT}) >= 4 and len(HOLDOUT) >= 6
    for file, record in photos.items():
        data = (out / file).read_bytes()
        assert hashlib.sha256(data).hexdigest() == record["sha256"]
        assert record["licence"] and record["source"]
        with Image.open(out / file) as im:
            assert im.mode == "RGB" and im.size == (record["width"], record["height"])
    assert not any("an-illustration" in f for f in photos)
    assert "GPL-2+" in photos["train/mate-Aqua.jpg"]["licence"]
    assert "CC0" in photos["holdout/skimage-coffee.png"]["licence"]
    assert "CC-BY-4.0" in photos["holdout/lomiri-friends_by_Aitzol_Berasategi.jpg"]["licence"]
    assert "CC BY 2.0" in photos["holdout/sklearn-china.jpg"]["licence"]
    # Every photo comes from a listed source and nothing else.
    sources = (*PACKAGES, "scikit-image", "scikit-learn")
    assert all(p["source"].startswith(sources) for p in photos.values())


def test_a_package_without_a_listed_photo_is_a_clear_error(tmp_path, downloads):
    mate = DEB_SOURCES[0]
    for deb in downloads.glob(f"{mate.package}_*.deb"):
        deb.unlink()
    (tmp_path / "other").mkdir()
    _fake_deb(tmp_path / "other", downloads, mate, skip="Aqua.jpg")
    result = CliRunner().invoke(
        app, ["data", "photos", "--out", str(tmp_path / "p"), "--downloads", str(downloads)]
    )
    assert result.exit_code == 2
    assert "Aqua.jpg" in result.output and "different version" in result.output


def test_a_missing_downloads_folder_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(
        app, ["data", "photos", "--out", str(tmp_path / "p"), "--downloads", str(tmp_path / "none")]
    )
    assert result.exit_code == 2
    assert "error:" in result.output and "not a folder" in result.output
