"""`pidserve bench kernels`: the hot spots, each implementation against the bytes it must move or the FLOPs
it must do.

kernels/README.md's rule is that a hand-written kernel stays only when a GPU benchmark shows it pays.
This is that benchmark. For each operation it times every implementation that runs on the device, checks
that they agree with the plain-torch reference (a wrong kernel is refused, not timed), and reports the
effective bandwidth: the bytes the operation must read and write at least, divided by its time. A memory-
bound operation cannot beat the device's copy bandwidth, so an implementation near it leaves nothing to
gain, and one far below it is where a kernel could pay.

Operations, at the shapes of a model and output size:
    postprocess       decoded float [B, 3, H, W] -> uint8 [B, H, W, 3] (kernels/postprocess.py)
                      impls: torch (the reference, eager), torch-compile (of the reference), triton (CUDA)
    pixel-modulation  the pixel blocks' modulate(rms_norm(x), shift, scale) over x [B*L, P*P, pd] with
                      shift and scale read from the modulation output [B*L, P*P, 6, pd], twice per block
                      (model/network.py PixelBlock); impls: torch (eager), torch-compile. No kernel exists:
                      this decides whether one is worth writing (the team's second candidate)
    copy              a device-to-device copy of the pixel-modulation input: the bandwidth ceiling
    patch-attention   the patch blocks' attention, q, k, v [B, heads, L, head_dim] over the L patch tokens
                      (no text): most of a decode's FLOPs. Compute-bound, so reported in TFLOP/s.
    pixel-attention   the pixel blocks' patch-level attention (head dim 72 on the released models)
                      impls of both: torch (PyTorch's own kernel choice, the reference), and each kernel
                      pinned with engines/attention.py: flash, cudnn, efficient (CUDA), math (CPU; on CUDA
                      only when asked for by --impls: it materialises [B, heads, L, L] scores). A kernel
                      that cannot run the shape is reported in the log and skipped

Timing: CUDA events around each call on a GPU (after warm-up), wall clock on the CPU; median and p90
over `repeat` calls.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pidserve import kernels
from pidserve.engines import RUNS_ON, SDPA_BACKENDS, attention_context
from pidserve.model import PiDConfig, RMSNorm, modulate

from . import report
from .stats import Summary

log = logging.getLogger(__name__)

OPERATIONS = ("postprocess", "pixel-modulation", "copy", "patch-attention", "pixel-attention")
DEFAULT_OPERATIONS = ("postprocess", "pixel-modulation", "copy")
ATTENTION_KERNELS = tuple(SDPA_BACKENDS)  # flash, cudnn, efficient, math
IMPLS = ("torch", "torch-compile", "triton", *ATTENTION_KERNELS)


@dataclass
class KernelTiming:
    operation: str
    impl: str
    device: str
    dtype: str
    shape: list[int]  # the operation's main input
    ms_median: float
    ms_p90: float
    bytes_moved: int  # the least the operation must read and write
    gbytes_per_s: float  # bytes_moved / median time
    max_abs_diff: float  # against the torch reference (0 for the reference itself)
    flops: int = 0  # compute-bound operations: the multiply-adds x 2 they must do (0: memory-bound)
    tflops_per_s: float = 0.0  # flops / median time


@dataclass
class KernelSetup:
    cfg: PiDConfig
    image_size: tuple[int, int]
    batch: int = 1
    device: str = "cpu"
    dtype: torch.dtype = torch.bfloat16
    warmup: int = 3
    repeat: int = 20


def available_impls(operation: str, device: torch.device) -> tuple[str, ...]:
    """The implementations of `operation` that run on `device`."""
    if operation == "postprocess":
        gpu_kernel = device.type == "cuda" and kernels.triton_available()
        return ("torch", "torch-compile", "triton") if gpu_kernel else ("torch", "torch-compile")
    if operation == "pixel-modulation":
        return ("torch", "torch-compile")
    if operation.endswith("-attention"):
        return (
            "torch",
            *(k for k in _attention_kernels(device) if not (k == "math" and device.type == "cuda")),
        )
    return ("torch",)


def runnable_impls(operation: str, device: torch.device) -> tuple[str, ...]:
    """What --impls may ask for on `device`: the defaults, plus math attention on CUDA."""
    if operation.endswith("-attention"):
        return ("torch", *_attention_kernels(device))
    return available_impls(operation, device)


def _attention_kernels(device: torch.device) -> tuple[str, ...]:
    """The kernels an engine may pin on this device type (engines/attention.py)."""
    return RUNS_ON.get(device.type, ())


def time_call(fn: Callable[[], object], device: torch.device, warmup: int, repeat: int) -> Summary:
    """Seconds per call of fn (CUDA events on a GPU, so only device time between the events counts)."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeat):
            begin = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - begin)
    return Summary.of(samples)


def _postprocess_case(setup: KernelSetup, device: torch.device) -> tuple[list[int], int, dict[str, Callable]]:
    height, width = setup.image_size
    g = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(setup.batch, 3, height, width, generator=g, device=device) * 0.6).to(setup.dtype)
    out = torch.empty(setup.batch, height, width, 3, dtype=torch.uint8, device=device)
    compiled = torch.compile(kernels.postprocess_reference, dynamic=False)
    calls = {
        "torch": lambda: kernels.postprocess_reference(x),
        "torch-compile": lambda: compiled(x),
        "triton": lambda: kernels.postprocess(x, out=out, impl="triton"),
    }
    return list(x.shape), x.numel() * x.element_size() + out.numel(), calls


def _pixel_tokens_shape(setup: KernelSetup) -> list[int]:
    """[B*L, P*P, pd]: the pixel blocks' tokens, one row of P*P pixels per patch."""
    cfg, (height, width) = setup.cfg, setup.image_size
    patches = setup.batch * (height // cfg.patch_size) * (width // cfg.patch_size)
    return [patches, cfg.patch_size**2, cfg.pixel_hidden_size]


def _pixel_modulation_case(
    setup: KernelSetup, device: torch.device
) -> tuple[list[int], int, dict[str, Callable]]:
    patches, pixels, pd = _pixel_tokens_shape(setup)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(patches, pixels, pd, generator=g, device=device).to(setup.dtype)
    mod = (torch.randn(patches, pixels, 6, pd, generator=g, device=device) * 0.1).to(setup.dtype)
    shift, scale = mod[:, :, 0], mod[:, :, 1]  # strided views, as PixelBlock's unbind gives them
    norm = RMSNorm(pd).to(device=device, dtype=setup.dtype)

    def eager() -> torch.Tensor:
        return modulate(norm(x), shift, scale)

    compiled = torch.compile(eager, dynamic=False)
    # read x, shift and scale, write the result: 4 tensors of x's size
    return list(x.shape), 4 * x.numel() * x.element_size(), {"torch": eager, "torch-compile": compiled}


def _copy_case(setup: KernelSetup, device: torch.device) -> tuple[list[int], int, dict[str, Callable]]:
    shape = _pixel_tokens_shape(setup)
    source = torch.zeros(shape, dtype=setup.dtype, device=device)
    target = torch.empty_like(source)
    return shape, 2 * source.numel() * source.element_size(), {"torch": lambda: target.copy_(source)}


def _attention_shape(setup: KernelSetup, operation: str) -> list[int]:
    """[B, heads, L, head_dim] of the patch blocks' or the pixel blocks' attention over L patch tokens."""
    cfg, (height, width) = setup.cfg, setup.image_size
    tokens = (height // cfg.patch_size) * (width // cfg.patch_size)
    if operation == "patch-attention":
        return [setup.batch, cfg.num_heads, tokens, cfg.head_dim]
    return [setup.batch, cfg.pixel_num_heads, tokens, cfg.pixel_head_dim]


def _attention_case(
    setup: KernelSetup, device: torch.device, operation: str
) -> tuple[list[int], int, dict[str, Callable]]:
    shape = _attention_shape(setup, operation)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g, device=device).to(setup.dtype) for _ in range(3))

    def pinned(kernel: str) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            with attention_context(kernel):
                return F.scaled_dot_product_attention(q, k, v)

        return call

    calls = {"torch": lambda: F.scaled_dot_product_attention(q, k, v)}
    calls.update({kernel: pinned(kernel) for kernel in ATTENTION_KERNELS})
    # read q, k, v, write the output: 4 tensors of q's size
    return shape, 4 * q.numel() * q.element_size(), calls


def attention_flops(shape: list[int]) -> int:
    """QK^T and AV: 2 x 2 x B x heads x L x L x head_dim (as model/flops.py counts them)."""
    batch, heads, tokens, head_dim = shape
    return 4 * batch * heads * tokens * tokens * head_dim


CASES: dict[str, Callable[[KernelSetup, torch.device], tuple[list[int], int, dict[str, Callable]]]] = {
    "postprocess": _postprocess_case,
    "pixel-modulation": _pixel_modulation_case,
    "copy": _copy_case,
    "patch-attention": lambda setup, device: _attention_case(setup, device, "patch-attention"),
    "pixel-attention": lambda setup, device: _attention_case(setup, device, "pixel-attention"),
}


def bench_kernels(
    setup: KernelSetup, operations: tuple[str, ...] = DEFAULT_OPERATIONS, impls: tuple[str, ...] | None = None
) -> list[KernelTiming]:
    """Every operation x implementation that runs on the device; impls=None: all of them."""
    device = torch.device(setup.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {setup.device!r} was asked for but CUDA is not available on this machine")
    unknown = [op for op in operations if op not in CASES]
    if unknown:
        raise ValueError(f"unknown operation(s) {unknown}; choose from {', '.join(OPERATIONS)}")
    unknown_impls = [i for i in impls or () if i not in IMPLS]
    if unknown_impls:
        raise ValueError(f"unknown implementation(s) {unknown_impls}; choose from {', '.join(IMPLS)}")
    rows: list[KernelTiming] = []
    for operation in operations:
        runnable = runnable_impls(operation, device)
        chosen = (
            available_impls(operation, device) if impls is None else tuple(i for i in impls if i in runnable)
        )
        if (
            impls is not None
            and "triton" in impls
            and operation == "postprocess"
            and "triton" not in runnable
        ):
            raise ValueError("the triton postprocess kernel needs a CUDA device with Triton installed")
        shape, bytes_moved, calls = CASES[operation](setup, device)
        with torch.inference_mode():
            reference = calls["torch"]()
            for impl in chosen:
                try:
                    result = calls[impl]()
                except RuntimeError as exc:
                    if not (operation.endswith("-attention") and _kernel_refused(exc)):
                        raise
                    # A pinned attention kernel that cannot run this shape, dtype or GPU: say so, go on.
                    log.warning("%s %s skipped: %s", operation, impl, str(exc).splitlines()[0])
                    continue
                diff = _max_abs_diff(result, reference)
                if operation == "postprocess" and diff != 0:
                    raise AssertionError(f"{impl} postprocess differs from the reference by {diff} levels")
                summary = time_call(calls[impl], device, setup.warmup, setup.repeat)
                flops = attention_flops(shape) if operation.endswith("-attention") else 0
                rows.append(
                    KernelTiming(
                        operation=operation,
                        impl=impl,
                        device=str(device),
                        dtype=str(setup.dtype).removeprefix("torch."),
                        shape=shape,
                        ms_median=summary.median * 1e3,
                        ms_p90=summary.p90 * 1e3,
                        bytes_moved=bytes_moved,
                        gbytes_per_s=bytes_moved / summary.median / 1e9,
                        max_abs_diff=diff,
                        flops=flops,
                        tflops_per_s=flops / summary.median / 1e12,
                    )
                )
                log.info("%s %s: %.3f ms", operation, impl, summary.median * 1e3)
    return rows


def _kernel_refused(exc: RuntimeError) -> bool:
    """PyTorch's "this pinned kernel cannot run these inputs" (CUDA, then CPU wording); anything else,
    e.g. a CUDA error that would break every later call, is not skipped."""
    message = str(exc)
    return "No available kernel" in message or "No viable backend" in message


def _max_abs_diff(a: object, b: object) -> float:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return 0.0
    return (a.float() - b.float()).abs().max().item()


def markdown_table(rows: list[KernelTiming]) -> str:
    columns = [
        "operation",
        "impl",
        "device",
        "dtype",
        "shape",
        "ms (median)",
        "p90",
        "GB/s",
        "TFLOP/s",
        "max |diff|",
    ]
    cells = [
        [
            r.operation,
            r.impl,
            r.device,
            r.dtype,
            "x".join(map(str, r.shape)),
            f"{r.ms_median:.3f}",
            f"{r.ms_p90:.3f}",
            f"{r.gbytes_per_s:.1f}",
            f"{r.tflops_per_s:.1f}" if r.flops else "-",
            f"{r.max_abs_diff:.3g}",
        ]
        for r in rows
    ]
    return report.markdown_table(columns, cells)


def write_kernels_report(
    out_dir: Path, rows: list[KernelTiming], *, command: str | None = None
) -> list[Path]:
    """kernels.json and kernels.md; returns the paths."""
    json_path = report.write_report(
        out_dir, "kernels", [asdict(r) for r in rows], markdown_table(rows), command=command
    )
    return [json_path, out_dir / "kernels.md"]
