"""GPU classes: the GPUs pidserve builds TensorRT engines for, and what fits on each.

A TensorRT plan is compiled for one GPU architecture (its CUDA compute capability) and one
TensorRT version, so engines are built per *GPU class*. A class names:

    rtx5090  GeForce RTX 5090, Blackwell consumer   compute capability 12.0,  32 GB GDDR7
    gb200    GB200 superchip GPU (B200 die)         compute capability 10.0, ~186 GB HBM3e
    h100     H100 (SXM 80GB, PCIe, NVL)             compute capability  9.0,  80 GB HBM3

and, per class, the output sizes and batch sizes engines are built for by default, the default
precision and the TensorRT workspace limit. The batch limits are estimates from the activation
memory of one 4-step decode (about 2-3 GB per image at 2048x2048 in bf16, 4x that at 4096x4096,
plus ~2.7 GB of weights); measured numbers belong in bench/ once the engines have run.

Names are matched against what torch (and NVML) report, e.g. "NVIDIA H100 80GB HBM3",
"NVIDIA GeForce RTX 5090", "NVIDIA GB200".
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch

from .base import PRECISIONS, EngineConfigError, ShapeProfile

log = logging.getLogger(__name__)

ComputeCapability = tuple[int, int]

# FP8 (E4M3) tensor cores arrived with Ada (8.9) and Hopper (9.0); BF16 with Ampere (8.0).
FP8_MIN_COMPUTE_CAPABILITY: ComputeCapability = (8, 9)
BF16_MIN_COMPUTE_CAPABILITY: ComputeCapability = (8, 0)

GIB = 1 << 30


@dataclass(frozen=True)
class OutputSize:
    """One default output size of a GPU class and the largest batch built for it."""

    image_size: tuple[int, int]  # (H, W) pixels
    max_batch: int
    only_2kto4k: bool = False  # built only for the "2kto4k_*" variants (trained up to 4096x4096)


@dataclass(frozen=True)
class GpuClass:
    """A family of GPUs that share one TensorRT build: same architecture, similar memory."""

    name: str
    description: str
    product_patterns: tuple[str, ...]  # regexes searched (case-insensitive) in the product name
    compute_capability: ComputeCapability
    memory_gib: float
    default_precision: str
    workspace_bytes: int  # TensorRT builder workspace (scratch for layer tactics) limit
    output_sizes: tuple[OutputSize, ...]

    def matches(self, product_name: str) -> bool:
        """Whether a product name, as torch.cuda.get_device_name() reports it, is this class."""
        return any(re.search(pattern, product_name, re.IGNORECASE) for pattern in self.product_patterns)

    @property
    def default_max_batch(self) -> int:
        """The largest default batch at the smallest default output size (2048x2048)."""
        return self.output_sizes[0].max_batch

    def sizes_for(self, variant: str | None) -> tuple[OutputSize, ...]:
        """Default output sizes for a variant (a preset name such as "2kto4k_sd3"; None: any)."""
        allow_4k = variant is not None and variant.startswith("2kto4k")
        return tuple(size for size in self.output_sizes if allow_4k or not size.only_2kto4k)

    def default_profiles(self, variant: str | None, text_tokens: int = 0) -> list[ShapeProfile]:
        """The ShapeProfiles `pidserve build` uses when no size or batch is given."""
        return [
            ShapeProfile(size.image_size, batch_ladder(size.max_batch), text_tokens)
            for size in self.sizes_for(variant)
        ]


GPU_CLASSES: dict[str, GpuClass] = {
    "rtx5090": GpuClass(
        name="rtx5090",
        description="NVIDIA GeForce RTX 5090 (Blackwell, 32 GB)",
        # "RTX 5090 D" (same chip, same memory) is included; "RTX 5090 Laptop" is a smaller chip.
        product_patterns=(r"\bRTX 5090\b(?! Laptop)",),
        compute_capability=(12, 0),
        memory_gib=32.0,
        default_precision="bf16",
        workspace_bytes=8 * GIB,
        # No 4096x4096 default: one 4k decode needs ~12 GB of activations and ~0.7 PFLOP.
        output_sizes=(OutputSize((2048, 2048), max_batch=4),),
    ),
    "gb200": GpuClass(
        name="gb200",
        description="NVIDIA GB200 (Blackwell B200 GPU of a Grace-Blackwell superchip, ~186 GB)",
        product_patterns=(r"\bGB200\b",),
        compute_capability=(10, 0),
        memory_gib=186.0,
        default_precision="bf16",
        workspace_bytes=32 * GIB,
        output_sizes=(
            OutputSize((2048, 2048), max_batch=16),
            OutputSize((4096, 4096), max_batch=4, only_2kto4k=True),
        ),
    ),
    "h100": GpuClass(
        name="h100",
        description="NVIDIA H100 (Hopper, 80 GB)",
        product_patterns=(r"\bH100\b",),
        compute_capability=(9, 0),
        memory_gib=80.0,
        default_precision="bf16",
        workspace_bytes=16 * GIB,
        output_sizes=(
            OutputSize((2048, 2048), max_batch=8),
            OutputSize((4096, 4096), max_batch=2, only_2kto4k=True),
        ),
    ),
}


def batch_ladder(max_batch: int) -> tuple[int, ...]:
    """Batch sizes served up to max_batch: powers of two, then max_batch itself (6 -> 1, 2, 4, 6).

    Each size gets its own CUDA graph; a batch of n runs at the smallest size >= n, so a ladder
    wastes at most half a batch of padding while keeping the number of graphs small.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = []
    size = 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return (*sizes, max_batch)


def get_gpu_class(name: str) -> GpuClass:
    """The GPU class called `name`; EngineConfigError listing the known classes otherwise."""
    if name not in GPU_CLASSES:
        raise EngineConfigError(f"unknown GPU class {name!r}; known classes: {', '.join(GPU_CLASSES)}")
    return GPU_CLASSES[name]


def match_gpu_class(product_name: str, compute_capability: ComputeCapability) -> GpuClass | None:
    """The class of a GPU from its product name and compute capability, or None if it has none.

    Both must agree: a name that matches with another compute capability (a renamed or
    virtualised device) is reported and not classified, since its plans would not load.
    """
    for gpu_class in GPU_CLASSES.values():
        if not gpu_class.matches(product_name):
            continue
        if tuple(compute_capability) != gpu_class.compute_capability:
            log.warning(
                "GPU %r looks like class %s but reports compute capability %s (expected %s)",
                product_name,
                gpu_class.name,
                format_compute_capability(compute_capability),
                format_compute_capability(gpu_class.compute_capability),
            )
            return None
        return gpu_class
    return None


def current_gpu(device: torch.device | int | None = None) -> tuple[str, ComputeCapability]:
    """(product name, compute capability) of a CUDA device; EngineConfigError without one."""
    if not torch.cuda.is_available():
        raise EngineConfigError(
            "no CUDA GPU is visible (torch.cuda.is_available() is False); TensorRT engines need an NVIDIA GPU"
        )
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), (int(major), int(minor))


def detect_gpu_class(device: torch.device | int | None = None) -> GpuClass | None:
    """The class of the current CUDA GPU; None without a GPU or for a GPU of no known class."""
    if not torch.cuda.is_available():
        return None
    name, capability = current_gpu(device)
    gpu_class = match_gpu_class(name, capability)
    if gpu_class is None:
        log.info(
            "GPU %r (compute capability %s) is of no known class", name, format_compute_capability(capability)
        )
    return gpu_class


def fp8_supported(compute_capability: ComputeCapability) -> bool:
    """Whether a GPU of this compute capability has FP8 tensor cores (Ada 8.9, Hopper 9.0, later)."""
    return tuple(compute_capability) >= FP8_MIN_COMPUTE_CAPABILITY


def check_precision(
    precision: str, compute_capability: ComputeCapability, gpu_name: str = "this GPU"
) -> None:
    """Raise EngineConfigError if `precision` is unknown or the GPU cannot run it."""
    if precision not in PRECISIONS:
        raise EngineConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    cc = format_compute_capability(compute_capability)
    if precision == "fp8" and not fp8_supported(compute_capability):
        raise EngineConfigError(
            f"FP8 needs compute capability >= {format_compute_capability(FP8_MIN_COMPUTE_CAPABILITY)} "
            f"(Ada, Hopper, Blackwell); {gpu_name} has {cc}. Use --precision bf16."
        )
    if precision == "bf16" and tuple(compute_capability) < BF16_MIN_COMPUTE_CAPABILITY:
        raise EngineConfigError(
            f"BF16 needs compute capability >= {format_compute_capability(BF16_MIN_COMPUTE_CAPABILITY)} "
            f"(Ampere or later); {gpu_name} has {cc}. Use --precision fp32."
        )


def format_compute_capability(compute_capability: ComputeCapability) -> str:
    """(9, 0) -> "9.0"."""
    major, minor = compute_capability
    return f"{major}.{minor}"


def parse_compute_capability(text: str) -> ComputeCapability:
    """ "9.0" -> (9, 0); ValueError for anything else."""
    match = re.fullmatch(r"(\d+)\.(\d+)", text.strip())
    if match is None:
        raise ValueError(f"compute capability must look like '9.0', got {text!r}")
    return int(match.group(1)), int(match.group(2))
