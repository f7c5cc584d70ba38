"""Engines: one interface (`Engine.decode(batch) -> uint8 images + timings`) and its backends.

Run time (this package's modules) and build time (`pidserve.engines.build`: ONNX export, FP8
quantization, the TensorRT build) are separate: run-time modules never import build-time ones, but
for the factory's on-demand ONNX export of the onnxruntime backend (a model given, no export).

Public API (other folders use exactly these names):
    Engine, EngineCapabilities, DecodeBatch, DecodeResult, DecodeAbandoned, EngineInputError,
    EngineConfigError, ShapeProfile, StageTimer, BACKENDS, open_engine, MAX_SEED (seeds: 0..MAX_SEED),
    PRECISIONS, check_device
    attention kernels: ATTENTION_BACKENDS, RUNS_ON, SDPA_BACKENDS, attention_context,
        check_attention_backend
    GPU classes and engine directories: GPU_CLASSES, GpuClass, batch_ladder, get_gpu_class,
        check_precision, EngineManifest, read_manifest, sha256_file, stale_reasons, require_tensorrt
    process: keep_freed_memory (glibc keeps freed memory: faster CPU decodes; cpu_allocator.py)
"""

from .attention import ATTENTION_BACKENDS, RUNS_ON, SDPA_BACKENDS, attention_context, check_attention_backend
from .base import (
    MAX_SEED,
    PRECISIONS,
    DecodeAbandoned,
    DecodeBatch,
    DecodeResult,
    Engine,
    EngineCapabilities,
    EngineConfigError,
    EngineInputError,
    ShapeProfile,
    StageTimer,
    check_device,
)
from .cpu_allocator import keep_freed_memory
from .factory import BACKENDS, open_engine
from .gpu_classes import GPU_CLASSES, GpuClass, batch_ladder, check_precision, get_gpu_class
from .manifest import EngineManifest, read_manifest, sha256_file, stale_reasons
from .trt_support import require_tensorrt

__all__ = [
    "ATTENTION_BACKENDS",
    "BACKENDS",
    "GPU_CLASSES",
    "MAX_SEED",
    "PRECISIONS",
    "RUNS_ON",
    "SDPA_BACKENDS",
    "DecodeAbandoned",
    "DecodeBatch",
    "DecodeResult",
    "Engine",
    "EngineCapabilities",
    "EngineConfigError",
    "EngineInputError",
    "EngineManifest",
    "GpuClass",
    "ShapeProfile",
    "StageTimer",
    "attention_context",
    "batch_ladder",
    "check_attention_backend",
    "check_device",
    "check_precision",
    "get_gpu_class",
    "keep_freed_memory",
    "open_engine",
    "read_manifest",
    "require_tensorrt",
    "sha256_file",
    "stale_reasons",
]
