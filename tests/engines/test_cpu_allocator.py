"""engines/cpu_allocator.py: glibc keeps freed memory in the process for decodes and training, unless
the user opts out or tunes glibc themselves. Each case runs in a fresh interpreter (mallopt is per
process)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SNIPPET = "from pidserve.engines.cpu_allocator import keep_freed_memory; print(keep_freed_memory())"


def _applied(**env: str) -> str:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MALLOC_") and k != "PIDSERVE_KEEP_FREED_MEMORY"
    }
    result = subprocess.run(
        [sys.executable, "-c", SNIPPET],
        env=clean | env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return result.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_kept_on_glibc_by_default() -> None:
    assert _applied().startswith("on (glibc ")


def test_the_user_can_opt_out() -> None:
    assert _applied(PIDSERVE_KEEP_FREED_MEMORY="0") == "off (PIDSERVE_KEEP_FREED_MEMORY=0)"


def test_glibc_tuning_in_the_environment_is_left_alone() -> None:
    outcome = _applied(MALLOC_TOP_PAD_="0")
    on_linux = sys.platform.startswith("linux")
    assert (outcome.startswith("not applied") and "MALLOC_" in outcome) or not on_linux


def test_the_decode_command_applies_it_and_says_so_in_its_debug_log(tmp_path) -> None:
    import numpy as np
    from PIL import Image

    source = tmp_path / "small.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(source)
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MALLOC_") and k != "PIDSERVE_KEEP_FREED_MEMORY"
    }
    cmd = [sys.executable, "-m", "pidserve.cli", "-v", "decode", str(source), "-o", str(tmp_path / "out.png")]
    result = subprocess.run(cmd, env=clean, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "CPU allocator tuning: " in result.stderr
