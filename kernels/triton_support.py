"""Lazy Triton detection shared by every kernel in this folder.

Importing `pidserve.kernels` must work (and stay fast) on machines without Triton, e.g. a CPU-only
install of torch. So nothing here imports Triton at module import time: `triton_available()` tries
the import the first time it is asked and remembers the answer.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "Triton is not installed. CUDA builds of torch on Linux normally ship it; otherwise install it with "
    "`pip install 'pidserve[kernels]'` or `pip install triton` (pick the version your torch was built "
    "with), or pass impl='torch' to use the plain-torch reference instead."
)


@functools.cache
def triton_available() -> bool:
    """True when `import triton` succeeds. Tried once, on first call, then cached."""
    try:
        importlib.import_module("triton")
    except ImportError as exc:
        logger.debug("Triton is not importable: %s", exc)
        return False
    return True


def interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET=1, i.e. Triton runs kernels in its NumPy interpreter on CPU memory.

    Triton reads this variable when a kernel is *decorated* (when its module is first imported), so it
    must be set before the first kernel call in the process; setting it later has no effect on kernels
    already imported. Tests therefore run interpreted kernels in a fresh subprocess.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
