"""The repo's source folders never hide installed packages of the same top-level name.

kernels/, model/, engines/ ... are installed as pidserve.kernels, pidserve.model, ...; the folders
themselves must not be importable under their bare names ahead of site-packages, or a dependency
that imports, say, the PyPI package `kernels` (transformers does) gets ours instead and fails. pytest
runs with --import-mode=append from its own script (make test) for that reason; `python -m pytest`
puts the repo root first and this test says so.
"""

from __future__ import annotations

import importlib.util
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# pidserve/ is the installed package itself (an editable install resolves it here, as it should)
SOURCE_FOLDERS = sorted(
    p.name for p in REPO.iterdir() if (p / "__init__.py").is_file() and p.name not in ("pidserve", "tests")
)


def test_the_source_folders_are_the_ones_the_package_maps():
    # keeps SOURCE_FOLDERS honest: if this list changes, the check below covers the new folder
    assert {"kernels", "model", "engines", "bench", "training", "server"} <= set(SOURCE_FOLDERS)


def test_installed_packages_are_not_shadowed_by_source_folders():
    installed = packages_distributions()
    shadowed = []
    for name in SOURCE_FOLDERS:
        if name not in installed:
            continue  # nothing installed under this name: nothing to hide
        spec = importlib.util.find_spec(name)
        origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
        if origin is not None and origin.parent == REPO / name:  # our folder, not site-packages
            shadowed.append(f"{name} (from {', '.join(installed[name])}) resolves to {origin}")
    assert not shadowed, (
        "repo folders hide installed packages: "
        + "; ".join(shadowed)
        + ". Run the tests with `make test` or `.venv/bin/pytest`, not `python -m pytest` from the repo root."
    )
