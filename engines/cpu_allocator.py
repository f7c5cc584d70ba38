"""Keep freed memory in the process on glibc, so CPU decodes stop paying the kernel for every tensor.

glibc's malloc returns freed memory at the top of its heap to the system (trim) and takes it back on
the next allocation; a decode allocates and frees hundreds of MB of activations per sampler step, so
on the CPU the kernel's page faults and zeroing cost as much as a quarter of the decode. Measured one
after the other on this project's 2-core VM (bench/RESULTS.md, "CPU allocator": `pidserve bench
tiles` with glibc's variables set to these values, and this module itself): 256² 408 -> 331 ms,
1024² tiled 11.0 -> 8.7 s, system time 19.5 -> 0.7 s.

The price: the resident set stays at its peak (a 2048² tiled decode: ~1 GB) instead of shrinking
between decodes, and resident-set growth no longer measures a decode's memory, so the benchmarks
(`pidserve bench tiles` measures it) run without it. No malloc_trim afterwards either: measured,
decodes after one stay ~1.5x slower than with the tuning, and slower than without it.
Opt out with PIDSERVE_KEEP_FREED_MEMORY=0; a MALLOC_*_ variable already in the environment (glibc's
own knobs, read at start) is the user's choice and is left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: never trim below 2 GiB of free heap top
TOP_PAD = 2**30  # grow the heap 1 GiB at a time, so steady-state decodes never call brk
GLIBC_VARIABLES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX")
OPT_OUT = "PIDSERVE_KEEP_FREED_MEMORY"


def keep_freed_memory() -> str:
    """Apply the tuning once per process where it can; returns what happened, for the log."""
    if os.environ.get(OPT_OUT, "1").strip() == "0":
        return f"off ({OPT_OUT}=0)"
    if not sys.platform.startswith("linux"):
        return f"not applied (glibc only, this is {sys.platform})"
    if any(name in os.environ for name in GLIBC_VARIABLES):
        return "not applied (the environment sets glibc's MALLOC_* tuning itself)"
    path = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(path)
        mallopt = libc.mallopt
        gnu_get_libc_version = libc.gnu_get_libc_version  # glibc's own symbol: not musl
    except (OSError, AttributeError):
        return "not applied (the C library is not glibc)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    gnu_get_libc_version.restype = ctypes.c_char_p
    if not (mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) and mallopt(M_TOP_PAD, TOP_PAD)):
        return "not applied (mallopt refused)"
    return f"on (glibc {gnu_get_libc_version().decode()}: freed memory is kept; {OPT_OUT}=0 turns it off)"


__all__ = ["OPT_OUT", "keep_freed_memory"]
