"""Build a TensorRT engine directory from the exported ONNX graphs (condition.onnx, step.onnx).

    ExportedGraphs (export.py; quantize.py for FP8)
        --build_engines()-->  out_dir/condition.plan, out_dir/step.plan, out_dir/manifest.json

Per graph: parse the ONNX file into a strongly typed TensorRT network, add one optimization profile
whose batch axis spans the ShapeProfile's batch sizes (every other dimension is static), set the
workspace limit, build and serialize the plan. Both graphs share one timing cache, loaded from and
saved to a file, so a rebuild on the same GPU and TensorRT version skips most kernel timing.

The same code builds on TensorRT 10.x (>= 10.1) and 11.x: networks are strongly typed on both (10.x:
the STRONGLY_TYPED creation flag; 11.x: always, and the flag's value changed, so it is not passed),
and no weak-typing API (BuilderFlag.BF16/FP16/FP8/INT8, precision constraints) is used: TensorRT 11
removed them. tests/engines/test_tensorrt_versions.py runs this code against recording fakes with
exactly each version's names.

Precision (graph_build_settings) comes from the graph:
    fp32  FP32 graphs, TF32 cleared, so "fp32" means IEEE FP32 math
    bf16  graphs exported from a BF16 network (`pidserve build` casts the network before exporting)
    fp8   quantize.py's export: BF16 graphs with FP8 Q/DQ nodes around the quantized matmuls
          (TensorRT's explicit-quantization guidance)

Everything that needs no GPU (argument checks, profile shapes, flags, file layout, manifest
contents) is a small pure function below; `build_engines` and the `_build_*` helpers are the
GPU part. Not run yet: needs an NVIDIA GPU with TensorRT.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pidserve.model import PiDConfig

from ..base import PRECISIONS, EngineConfigError, ShapeProfile
from ..gpu_classes import (
    ComputeCapability,
    GpuClass,
    check_precision,
    current_gpu,
    format_compute_capability,
    get_gpu_class,
)
from ..manifest import ENGINE_FILES, EngineManifest, profile_to_dict, sha256_file, write_manifest
from ..trt_support import batch_axis, require_tensorrt, strongly_typed_network_flags, tensorrt_logger
from .export import ExportedGraphs

if TYPE_CHECKING:
    import tensorrt as trt

log = logging.getLogger(__name__)

GRAPHS = ("condition", "step")
DEFAULT_OPTIMIZATION_LEVEL = 3  # TensorRT's default; 4-5 search longer for little gain on transformers


class EngineBuildError(RuntimeError):
    """TensorRT could not parse or build a graph; the message carries TensorRT's own errors."""


# ---- pure planning ------------------------------------------------------------------------------
@dataclass(frozen=True)
class GraphBuildSettings:
    """How one graph is built: always a strongly typed network (TensorRT 11 has no other kind; on 10.x
    the STRONGLY_TYPED creation flag), so each layer runs in the type the exported graph gives it;
    `clear_flags` are BuilderFlag names to clear."""

    clear_flags: tuple[str, ...] = ()

    @property
    def strongly_typed(self) -> bool:
        return True


def graph_build_settings(precision: str, weights_dtype: str = "float32") -> GraphBuildSettings:
    """Builder settings for a precision and the dtype the graphs were exported in.

    The precision is in the graph, never in builder flags (TensorRT 11 removed BuilderFlag.BF16/FP16/
    FP8/INT8 and weak typing): bf16 engines are built from a graph exported from a bfloat16 network,
    fp8 from a bfloat16 graph with FP8 Q/DQ nodes, fp32 from an fp32 graph with TF32 cleared (FP32
    math stays IEEE FP32). The FP32 islands the network computes in on purpose (norms, rotary
    embeddings) stay FP32 because the graph says so.
    """
    if precision not in PRECISIONS:
        raise EngineConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    wanted = "float32" if precision == "fp32" else "bfloat16"
    if weights_dtype != wanted:
        raise EngineConfigError(
            f"a {precision} engine is built from graphs exported from a {wanted} network (TensorRT builds "
            f"strongly typed networks only); these graphs hold {weights_dtype} weights: export them again "
            f"from the network in {wanted} (`pidserve build` does)"
        )
    return GraphBuildSettings(clear_flags=("TF32",) if precision == "fp32" else ())


def onnx_weights_dtype(path: str | Path) -> str:
    """The floating dtype holding most of an ONNX graph's weights: "float32", "bfloat16" or "float16".

    Reads only the graph (external weight files are not loaded): sizes come from the dims.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = {
        onnx.TensorProto.FLOAT: "float32",
        onnx.TensorProto.BFLOAT16: "bfloat16",
        onnx.TensorProto.FLOAT16: "float16",
    }
    counts: dict[str, int] = {}
    for tensor in model.graph.initializer:
        if tensor.data_type in names:
            size = 1
            for dim in tensor.dims:
                size *= dim
            counts[names[tensor.data_type]] = counts.get(names[tensor.data_type], 0) + size
    if not counts:
        raise EngineBuildError(f"{path} has no floating-point weights")
    return max(counts, key=lambda dtype: counts[dtype])


def profile_shapes(
    input_name: str, network_shape: Sequence[int], batch_sizes: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) shapes of one network input for an optimization profile.

    network_shape is the input's shape in the parsed network, -1 on the dynamic batch axis and
    static elsewhere. min/max span the served batch sizes; opt is the largest, because a
    serving engine spends its time in full batches (and smaller ones are padded up anyway).
    """
    axis = batch_axis(input_name)
    shape = list(network_shape)
    if not 0 <= axis < len(shape) or shape[axis] != -1:
        raise EngineBuildError(
            f"input {input_name!r} has shape {shape}: expected a dynamic batch axis (-1) at dim {axis}; "
            "re-export the ONNX graphs with pidserve (batch is the only dynamic axis)"
        )
    others = [d for i, d in enumerate(shape) if i != axis and d < 0]
    if others:
        raise EngineBuildError(
            f"input {input_name!r} has shape {shape}: only the batch axis may be dynamic "
            "(output size and text length are fixed per engine)"
        )
    if not batch_sizes or min(batch_sizes) < 1:
        raise EngineConfigError(f"batch sizes must be positive, got {list(batch_sizes)}")

    def with_batch(batch: int) -> tuple[int, ...]:
        return tuple(batch if i == axis else d for i, d in enumerate(shape))

    return with_batch(min(batch_sizes)), with_batch(max(batch_sizes)), with_batch(max(batch_sizes))


def read_export_meta(directory: Path) -> dict[str, Any]:
    """export.json of an ONNX export directory (profile, config, opset, quantization)."""
    path = directory / "export.json"
    if not path.is_file():
        raise EngineConfigError(
            f"{directory} has no export.json: export the graphs with `pidserve export` first"
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EngineConfigError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or "config" not in meta:
        raise EngineConfigError(f"{path} has no 'config'; re-export the graphs")
    return meta


def validate_build_request(graphs: ExportedGraphs, gpu_class: GpuClass, precision: str) -> dict[str, Any]:
    """Check a build request before any GPU work; returns the export's metadata.

    - the precision is known and the class's GPUs run it (FP8 needs compute capability >= 8.9);
    - both ONNX files exist;
    - FP8 builds use a quantized export (quantize.py), and other builds do not;
    - the batch sizes fit the class's default limit for this size (a warning only: the limits
      are estimates, and a user may know better).
    """
    check_precision(precision, gpu_class.compute_capability, gpu_class.description)
    for name, path in (("condition", graphs.condition), ("step", graphs.step)):
        if not Path(path).is_file():
            raise EngineConfigError(f"{name} graph {path} does not exist; export the ONNX graphs first")
    meta = read_export_meta(Path(graphs.directory))
    quantization = (meta.get("quantization") or {}).get("format")
    if precision == "fp8" and quantization != "fp8":
        raise EngineConfigError(
            f"an FP8 build needs graphs with FP8 Q/DQ nodes, and {graphs.directory} holds an "
            "unquantized export: quantize first (pidserve.engines.build.quantize_fp8_and_export, "
            "calibrated on latents)"
        )
    if precision != "fp8" and quantization is not None:
        raise EngineConfigError(
            f"{graphs.directory} holds {quantization}-quantized graphs; "
            f"build them with --precision {quantization}"
        )
    height, width = graphs.profile.image_size
    limits = {size.image_size: size.max_batch for size in gpu_class.output_sizes}
    limit = limits.get((height, width))
    if limit is not None and graphs.profile.max_batch > limit:
        log.warning(
            "batch %d at %dx%d exceeds the %s default of %d; the engine may not fit in memory",
            graphs.profile.max_batch,
            *graphs.profile.image_size,
            gpu_class.name,
            limit,
        )
    return meta


def check_build_gpu(gpu_class: GpuClass, gpu_name: str, compute_capability: ComputeCapability) -> None:
    """TensorRT builds for the GPU it runs on: refuse a build for class X on a GPU of another kind."""
    if tuple(compute_capability) != gpu_class.compute_capability:
        raise EngineConfigError(
            f"--gpu-class {gpu_class.name} builds for compute capability "
            f"{format_compute_capability(gpu_class.compute_capability)}, but this machine's GPU is "
            f"{gpu_name} ({format_compute_capability(compute_capability)}). TensorRT compiles for the "
            "GPU it runs on: "
            f"build on a {gpu_class.description}."
        )
    if not gpu_class.matches(gpu_name):
        log.warning("building for class %s on %s (same compute capability)", gpu_class.name, gpu_name)


def plan_paths(out_dir: str | Path) -> dict[str, Path]:
    """Where the two plans go: {"condition": out_dir/condition.plan, "step": out_dir/step.plan}."""
    return {graph: Path(out_dir) / filename for graph, filename in ENGINE_FILES.items()}


def default_timing_cache_path(gpu_name: str, trt_version: str) -> Path:
    """A timing cache per GPU model and TensorRT version, shared by every build on this machine.

    Timing results are only valid for the device and TensorRT version that measured them.
    """
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pidserve" / "tensorrt"
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-").lower()
    return base / f"timing-{gpu}-trt{trt_version}.cache"


def build_flags_record(
    precision: str, weights_dtype: str, workspace_bytes: int, optimization_level: int
) -> dict[str, Any]:
    """The build flags as they are written into manifest.json."""
    settings = graph_build_settings(precision, weights_dtype)
    return {
        "onnx_weights_dtype": weights_dtype,
        "workspace_bytes": workspace_bytes,
        "builder_optimization_level": optimization_level,
        "strongly_typed": settings.strongly_typed,
        "clear_flags": list(settings.clear_flags),
        "opt_batch": "max",
    }


def make_manifest(
    *,
    checkpoint: str | Path,
    config: PiDConfig,
    variant: str | None,
    precision: str,
    profile: ShapeProfile,
    trt_version: str,
    gpu_class: GpuClass,
    gpu_name: str,
    compute_capability: ComputeCapability,
    workspace_bytes: int,
    optimization_level: int,
    out_dir: str | Path,
    weights_dtype: str = "float32",
) -> EngineManifest:
    """The manifest of a build (hashes the checkpoint file: a few seconds for a full-size model)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise EngineConfigError(f"checkpoint {checkpoint} does not exist (its hash goes into the manifest)")
    return EngineManifest(
        model_sha256=sha256_file(checkpoint),
        checkpoint=str(checkpoint.resolve()),
        variant=variant,
        config=config.to_dict(),
        precision=precision,
        profiles=[profile_to_dict(profile)],
        tensorrt_version=trt_version,
        gpu_class=gpu_class.name,
        gpu_name=gpu_name,
        compute_capability=format_compute_capability(compute_capability),
        build_flags=build_flags_record(precision, weights_dtype, workspace_bytes, optimization_level),
        engine_dir=str(Path(out_dir).resolve()),
    )


# ---- the build (GPU) ------------------------------------------------------------------------------
def build_engines(
    graphs: ExportedGraphs,
    out_dir: str | Path,
    gpu_class: GpuClass | str,
    precision: str,
    *,
    checkpoint: str | Path,
    variant: str | None = None,
    timing_cache: str | Path | None = None,
    workspace_bytes: int | None = None,
    optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL,
) -> EngineManifest:
    """Build condition.plan and step.plan for graphs.profile into out_dir, then write manifest.json.

    graphs: the ONNX export (export.export_onnx; quantize.quantize_fp8_and_export for fp8).
    gpu_class: "rtx5090" | "gb200" | "h100" (or a GpuClass); must be the GPU this runs on.
    timing_cache: file to load and update (default: one per GPU model and TensorRT version
        under ~/.cache/pidserve/tensorrt).
    workspace_bytes: builder workspace limit (default: the class's).

    Not run yet: needs an NVIDIA GPU with TensorRT.
    """
    gpu_class = get_gpu_class(gpu_class) if isinstance(gpu_class, str) else gpu_class
    meta = validate_build_request(graphs, gpu_class, precision)
    if not Path(checkpoint).is_file():  # checked now: its hash goes into the manifest after the build
        raise EngineConfigError(f"checkpoint {checkpoint} does not exist")
    config = PiDConfig.from_dict(meta["config"])
    weights_dtype = onnx_weights_dtype(graphs.step)
    settings = graph_build_settings(precision, weights_dtype)
    trt_version = require_tensorrt()
    gpu_name, capability = current_gpu()
    check_build_gpu(gpu_class, gpu_name, capability)
    workspace = workspace_bytes or gpu_class.workspace_bytes
    cache_path = Path(timing_cache) if timing_cache else default_timing_cache_path(gpu_name, trt_version)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log.info(
        "building TensorRT %s engines for %s (%s) at %s, batch %s, TensorRT %s",
        precision,
        gpu_class.name,
        gpu_name,
        graphs.profile.tag,
        list(graphs.profile.batch_sizes),
        trt_version,
    )
    paths = plan_paths(out)
    session = _BuildSession(cache_path)
    for graph, onnx_path in (("condition", graphs.condition), ("step", graphs.step)):
        plan = session.build_plan(
            Path(onnx_path), graph, graphs.profile, settings, workspace, optimization_level
        )
        _write_atomic(paths[graph], plan)
        log.info("wrote %s (%.1f MB)", paths[graph], paths[graph].stat().st_size / 1e6)
    session.save_timing_cache()
    manifest = make_manifest(
        checkpoint=checkpoint,
        config=config,
        variant=variant,
        precision=precision,
        profile=graphs.profile,
        trt_version=trt_version,
        gpu_class=gpu_class,
        gpu_name=gpu_name,
        compute_capability=capability,
        workspace_bytes=workspace,
        optimization_level=optimization_level,
        out_dir=out,
        weights_dtype=weights_dtype,
    )
    write_manifest(manifest, out)
    log.info("engine directory %s is ready", out)
    return manifest


class _BuildSession:
    """One TensorRT builder and the timing cache both graphs share (loaded from and saved to a file)."""

    def __init__(self, cache_path: Path) -> None:
        import tensorrt as trt

        self.cache_path = cache_path
        self.builder = trt.Builder(tensorrt_logger())
        # A timing cache is created through a builder config; keep that config alive with it.
        self._cache_owner = self.builder.create_builder_config()
        data = cache_path.read_bytes() if cache_path.is_file() else b""
        self.timing_cache = self._cache_owner.create_timing_cache(data)
        log.info("timing cache %s (%s)", cache_path, f"{len(data) / 1e6:.1f} MB loaded" if data else "new")

    def build_plan(
        self,
        onnx_path: Path,
        graph: str,
        profile: ShapeProfile,
        settings: GraphBuildSettings,
        workspace_bytes: int,
        optimization_level: int,
    ) -> trt.IHostMemory:
        """Parse one ONNX graph and build its serialized plan."""
        import tensorrt as trt

        started = time.perf_counter()
        network = self.builder.create_network(strongly_typed_network_flags(trt))
        parser = trt.OnnxParser(network, tensorrt_logger())
        log.info("[%s] parsing %s", graph, onnx_path)
        # parse_from_file (not parse(bytes)) so weights stored as external data beside the graph load too.
        if not parser.parse_from_file(str(onnx_path)):
            errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineBuildError(f"TensorRT could not parse {onnx_path}:\n{errors}")

        config = self.builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
        config.builder_optimization_level = optimization_level
        for flag in settings.clear_flags:
            config.clear_flag(getattr(trt.BuilderFlag, flag))
        if not config.set_timing_cache(self.timing_cache, ignore_mismatch=False):
            raise EngineBuildError(
                f"TensorRT refused the timing cache {self.cache_path}; delete it and retry"
            )

        optimization_profile = self.builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            dims = tensor.shape
            low, opt, high = profile_shapes(
                tensor.name, [dims[d] for d in range(len(dims))], profile.batch_sizes
            )
            optimization_profile.set_shape(
                tensor.name, trt.Dims(list(low)), trt.Dims(list(opt)), trt.Dims(list(high))
            )
            log.info("[%s] input %s: min %s opt %s max %s", graph, tensor.name, low, opt, high)
        if config.add_optimization_profile(optimization_profile) < 0:
            raise EngineBuildError(f"TensorRT rejected the optimization profile of {graph}")

        log.info("[%s] building (%s); this takes minutes without a warm timing cache", graph, settings)
        plan = self.builder.build_serialized_network(network, config)
        if plan is None:
            raise EngineBuildError(
                f"TensorRT failed to build {graph} from {onnx_path}; see the 'tensorrt' log above"
            )
        log.info("[%s] built in %.0f s", graph, time.perf_counter() - started)
        return plan

    def save_timing_cache(self) -> None:
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.cache_path, self.timing_cache.serialize())
        log.info("saved timing cache %s", self.cache_path)


def _write_atomic(path: Path, data: trt.IHostMemory | bytes) -> None:
    """Write a file so that readers see the old file or the new one, never a partial one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(memoryview(data))
    os.replace(tmp, path)
