"""Peak memory of a stretch of work, on the CPU (Linux) or a CUDA device, for the benchmarks.

On CUDA: torch's peak allocated bytes since the reset. On the CPU: the process's peak resident set
since the kernel's high-water mark was reset (`/proc/self/clear_refs`, "5"), above the resident set
at the reset, so the weights and the interpreter already resident are not counted. None where
neither is available (no /proc). The CPU figure is the growth of the resident set: memory that
the allocator freed earlier and still holds is reused without growing it, so in a long-lived process
it is a lower bound of what the work allocated.
"""

from __future__ import annotations

from pathlib import Path

import torch


class PeakMemory:
    """Peak memory of what runs between `start()` and `stop()`, in bytes (None where unmeasurable)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self._baseline = 0

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            self._baseline = -1
            return
        self._baseline = _status_kib("VmRSS") * 1024

    def stop(self) -> int | None:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        if self._baseline < 0:
            return None
        # the kernel folds per-thread RSS counters into VmHWM lazily: VmRSS may be ahead of it
        peak = max(_status_kib("VmHWM"), _status_kib("VmRSS")) * 1024
        return max(0, peak - self._baseline)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")
