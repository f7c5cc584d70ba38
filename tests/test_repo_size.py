"""The tracked tree stays small enough to travel to a lent GPU machine.

Those machines take the working tree (tracked files, plus the wheels `make gpu-wheels` puts in .whl/,
about 4 MiB) up to 64 MiB in all; a tree over it makes every GPU run fail before it starts. Large
training artefacts belong in git history or run folders, not in the tree (model/weights/teacher/README.md).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIMIT_MIB = 64
WHEELS_MIB = 6  # room for .whl/ (3.8 MiB on 2026-12-02) and some growth


def test_the_tracked_tree_leaves_room_for_the_gpu_wheels() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(
        b"\0"
    )
    paths = [ROOT / name.decode() for name in names if name]
    sizes = {str(p.relative_to(ROOT)): p.stat().st_size for p in paths if p.exists()}  # deleted: not sent
    total = sum(sizes.values()) / 2**20
    largest = ", ".join(f"{n} {s / 2**20:.1f} MiB" for n, s in sorted(sizes.items(), key=lambda i: -i[1])[:3])
    assert total <= LIMIT_MIB - WHEELS_MIB, f"tracked files: {total:.1f} MiB (largest: {largest})"
