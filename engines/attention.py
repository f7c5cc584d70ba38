"""Which scaled-dot-product-attention kernels the torch engines let PyTorch use.

Attention is most of a PiD decode's work (at 2048² on 2k flux without text, 92.4 of 173.5 TFLOP are
the patch blocks' attention over 16k tokens), so the attention kernel sets how close a decode gets to
the FLOP floor. PyTorch's `scaled_dot_product_attention` picks a kernel by a fixed priority
(FlashAttention-2 first on CUDA), which is not the fastest on every GPU: on Hopper, cuDNN's attention
kernels are reported to be substantially faster. `bench kernels --operations
patch-attention,pixel-attention` measures the kernels at a model's shapes; an engine's
`attention_backend` then pins the choice:

    auto       the kernel measured fastest at PiD's shapes on this GPU's compute capability
               (MEASURED_FASTEST), else PyTorch's own choice (its default priority; FlashAttention-2
               first on CUDA)
    flash      FlashAttention only (CUDA and CPU)
    cudnn      cuDNN attention only (CUDA)
    efficient  memory-efficient attention only (CUDA)
    math       the unfused reference implementation only (CUDA and CPU; slow, memory-hungry)

A pinned backend is a restriction, not a preference: a shape it cannot run fails with PyTorch's error
("No available kernel" on CUDA, "No viable backend" on the CPU) instead of silently running on another
kernel. The choice is applied around everything the engine runs, so torch.compile traces (and CUDA
graphs capture) the chosen kernel.

PyTorch keeps these switches process-wide, not per thread: while a pinned decode runs, any other
thread's scaled_dot_product_attention sees the pin too. So pinned decodes hold one process-wide lock
(two never interleave their save and restore of the switches), and the server loads its text encoder
with eager attention when the engine pins a kernel (server/loader.py), so prompt encoding never calls
scaled_dot_product_attention. One pinned engine per process is the supported set-up.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .base import EngineConfigError

ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")

SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}

# What PyTorch implements per device type (the CPU has its own flash kernel and the math fallback).
RUNS_ON = {"cuda": ("flash", "cudnn", "efficient", "math"), "cpu": ("flash", "math")}


@dataclass(frozen=True)
class KernelMeasurement:
    """One row of MEASURED_FASTEST: what `bench kernels --operations patch-attention` measured."""

    kernel: str  # a key of SDPA_BACKENDS
    tflops: float  # its patch-attention throughput at PiD's shapes
    runner_up: str  # the next fastest, for the record
    runner_up_tflops: float
    gpu: str
    date: str
    command: str


# The attention kernel `auto` pins, per CUDA compute capability, from `bench kernels` runs on real GPUs
# (bench/RESULTS.md). Empty: no GPU run has measured the kernels yet (bench/gpu_suite.sh's `attention`
# stage), so `auto` is PyTorch's own choice everywhere. A row is added with its figures, never guessed.
MEASURED_FASTEST: dict[tuple[int, int], KernelMeasurement] = {}


def resolve_attention_backend(choice: str, device: torch.device) -> str:
    """`choice`, with `auto` replaced by the measured-fastest kernel of `device`'s compute capability
    where MEASURED_FASTEST has one (else "auto": PyTorch decides)."""
    if choice != "auto" or device.type != "cuda":
        return choice
    measured = MEASURED_FASTEST.get(torch.cuda.get_device_capability(device))
    return measured.kernel if measured is not None else "auto"


def check_attention_backend(choice: str, device: torch.device) -> None:
    """Refuse an unknown backend, or one that does not exist on `device`, before any work is done."""
    if choice not in ATTENTION_BACKENDS:
        raise EngineConfigError(
            f"unknown attention backend {choice!r}; choose one of {', '.join(ATTENTION_BACKENDS)}"
        )
    if choice == "auto":
        return
    runnable = RUNS_ON.get(device.type, ())
    if choice not in runnable:
        raise EngineConfigError(
            f"{choice} attention does not run on {device.type}; there: auto, {', '.join(runnable)}"
            if runnable
            else f"attention backends cannot be pinned on {device.type}; use auto"
        )


# Held while the process-wide switches are pinned (see the module docstring).
_PINNED = threading.Lock()


@contextmanager
def attention_context(choice: str) -> Iterator[None]:
    """A context in which scaled_dot_product_attention may use only `choice` (auto: PyTorch decides)."""
    if choice == "auto":
        yield
        return
    with _PINNED, sdpa_kernel(SDPA_BACKENDS[choice]):
        yield
