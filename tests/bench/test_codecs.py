"""The codec benchmark harness runs end to end on a small image (timings are reported, never asserted)."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from pidserve.bench.codecs import CANDIDATES, load_photo, time_codecs
from pidserve.cli import app


def _photo(tmp_path):
    path = tmp_path / "photo.png"
    gradient = np.linspace(0, 255, 80 * 120 * 3).reshape(80, 120, 3).astype(np.uint8)
    Image.fromarray(gradient).save(path)
    return path


def test_lossless_flags_are_measured(tmp_path) -> None:
    rows = time_codecs(_photo(tmp_path), [64], repeat=1, only=["fpng (served)", "simplejpeg q90 (served)"])
    by_name = {r.codec: r for r in rows}
    assert by_name["fpng (served)"].lossless and by_name["fpng (served)"].format == "png"
    assert not by_name["simplejpeg q90 (served)"].lossless
    assert all(r.ms_median > 0 and r.megabytes > 0 and r.two_thread_speedup > 0 for r in rows)


def test_every_candidate_names_a_served_format() -> None:
    assert {fmt for fmt, _, _ in CANDIDATES.values()} == {"png", "jpeg", "webp"}


def test_photo_is_centre_cropped_square(tmp_path) -> None:
    assert load_photo(_photo(tmp_path), 32).shape == (32, 32, 3)


def test_cli(tmp_path) -> None:
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app, ["bench", "codecs", "--image", str(_photo(tmp_path)), "--sizes", "32", "--repeat", "1",
              "--workers", "1", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "| fpng (served) | 32² |" in result.output
    report = json.loads((out / "codecs.json").read_text())
    assert report["results"]["server_pool"][0]["size"] == 32 and len(report["results"]["codecs"]) >= 5
    assert "| fpng (served) | 32² |" in (out / "codecs.md").read_text()
    missing = CliRunner().invoke(app, ["bench", "codecs", "--image", str(tmp_path / "nope.png")])
    assert missing.exit_code == 2 and "pidserve data photos" in missing.output
