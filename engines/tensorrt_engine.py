"""TensorRTEngine: decode with the two TensorRT plans of an engine directory, replayed as CUDA graphs.

Its lifecycle, one method each, in this order:

    check    manifest.json against this GPU and TensorRT  -> EngineConfigError with the rebuild command
    load     both plans deserialized, one scratch ("device memory") buffer for both
    bind     static device buffers, shared by every batch size (views of one flat buffer per tensor);
             one execution context per graph and served batch size, bound to them
    capture  (warmup) the 4-step decode of every built batch size captured as a CUDA graph
             (cuda_graphs.GraphCapture, the helper torch-compile captures with too)

One decode of n samples, served at the smallest built batch size B >= n (rows n..B-1 are padding
whose results are dropped):

    H2D: latents, sigmas (and text) -> the static input buffers          one copy each
    noise: per-sample seeded draws (base.seeded_noises) -> the static noise buffer
    graph replay (captured once per (B, steps)):
        condition plan: latent (+ text) -> gate_features, pixel_feature, text_tokens
        model.sampler.student_steps, whose velocity function copies x_t and t_scaled into the
            step plan's input buffers and runs the step plan (the sampler arithmetic is the one
            every backend shares)
        kernels.postprocess -> the static uint8 [B, H, W, 3] buffer
    D2H: the first n images -> pinned host memory                       one copy

The decode logic (`StaticDecoder`) runs any pair of `GraphRunner`s (trt_support.py) on any device,
so the tests drive it on the CPU with the exported torch graphs; only `TensorRTGraph` touches
TensorRT. This module never imports the builder (build/): what both need is in trt_support.py.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pidserve import kernels
from pidserve.model import (
    MAX_STUDENT_STEPS,
    TILING_OFF,
    PiDConfig,
    TilePlan,
    Tiling,
    WindowLatents,
    student_steps,
    student_timesteps,
)

from .base import (
    DecodeBatch,
    DecodeResult,
    Engine,
    EngineCapabilities,
    EngineConfigError,
    ShapeProfile,
    StageTimer,
    copy_to_host,
    engine_window_latents,
    on_device,
    padded_batch_size,
    seeded_noise_stream,
    seeded_noises,
    stop_if_abandoned,
    warmup_text_tokens,
)
from .cuda_graphs import GraphCapture
from .gpu_classes import check_precision, current_gpu
from .manifest import EngineManifest, check_compatible, read_manifest
from .tiled import decode_tiled
from .trt_support import (
    GraphRunner,
    check_io_names,
    expected_io_names,
    io_shapes,
    require_tensorrt,
    shared_dtypes,
    tensorrt_logger,
    torch_dtype_for,
)

if TYPE_CHECKING:
    import tensorrt as trt

log = logging.getLogger(__name__)

BACKEND = "tensorrt"


# ---- pure helpers ---------------------------------------------------------------------------------
def single_profile(manifest: EngineManifest) -> ShapeProfile:
    """The one ShapeProfile of an engine directory (pidserve build writes one per directory)."""
    profiles = manifest.shape_profiles()
    if len(profiles) != 1:
        raise EngineConfigError(
            f"engine directory holds {len(profiles)} shape profiles; the TensorRT backend serves exactly one"
        )
    return profiles[0]


def capabilities_from_manifest(
    manifest: EngineManifest, device: torch.device | str, tiling: Tiling = TILING_OFF
) -> EngineCapabilities:
    """What an engine directory decodes: one output size and text length, its batch sizes, 1-4 steps;
    tiled, any larger output whose windows are that size."""
    cfg = manifest.pid_config()
    profile = single_profile(manifest)
    height, width = profile.image_size
    return EngineCapabilities(
        backend=BACKEND,
        device=str(device),
        precision=manifest.precision,
        latent_channels=cfg.latent_channels,
        latent_space=cfg.latent_space,
        text_dim=cfg.text_dim,
        output_scale=cfg.output_scale,
        max_batch=profile.max_batch,
        # Built sizes; any n up to max_batch is accepted and padded to the next one.
        batch_sizes=tuple(profile.batch_sizes),
        image_sizes=((height, width),),
        steps=tuple(range(1, MAX_STUDENT_STEPS + 1)),
        text_tokens=(profile.text_tokens,),
        tiling=tiling,
        native_size=(height, width),
    )


def decoder_shapes(cfg: PiDConfig, profile: ShapeProfile, batch: int) -> dict[str, tuple[int, ...]]:
    """io_shapes plus the decoder's own buffers: noise [4, B, 3, H, W] and images uint8 [B, H, W, 3]."""
    height, width = profile.image_size
    shapes = io_shapes(cfg, profile, batch)
    shapes["noise"] = (MAX_STUDENT_STEPS, batch, cfg.in_channels, height, width)
    shapes["images"] = (batch, height, width, cfg.in_channels)
    return shapes


def static_views(
    flat: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """Contiguous views of the first numel(shape) elements of each flat buffer.

    Every batch size gets contiguous tensors (what TensorRT binds) that share the memory of the
    largest one: only one decode runs at a time, so no two batch sizes need their own copy.
    """
    views = {}
    for name, shape in shapes.items():
        buffer = flat[name]
        numel = math.prod(shape)
        if numel > buffer.numel():
            raise ValueError(f"buffer {name!r} holds {buffer.numel()} elements, {list(shape)} needs {numel}")
        views[name] = buffer[:numel].view(shape)
    return views


# ---- one plan as a graph runner -------------------------------------------------------------------
class TensorRTGraph:
    """One TensorRT plan as a GraphRunner: an execution context per batch size.

    Each context keeps its input shapes and tensor addresses, so a CUDA graph captured with it
    stays valid; all contexts share one scratch ("device memory") buffer, which is safe because
    the decoder runs one plan at a time on one stream. Not run yet: needs an NVIDIA GPU with TensorRT.
    """

    def __init__(
        self, name: str, engine: trt.ICudaEngine, device: torch.device, scratch: torch.Tensor
    ) -> None:
        import tensorrt as trt

        self.name = name
        self._engine = engine
        self._device = device
        self._scratch = scratch
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = tuple(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_names = tuple(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self._contexts: dict[int, trt.IExecutionContext] = {}

    def dtype(self, name: str) -> torch.dtype:
        return torch_dtype_for(self._engine.get_tensor_dtype(name).name)

    def bind(self, batch: int, tensors: Mapping[str, torch.Tensor]) -> None:
        import tensorrt as trt

        # USER_MANAGED: the context uses our scratch buffer instead of allocating its own.
        context = self._engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise EngineConfigError(f"TensorRT could not create an execution context for {self.name}")
        context.set_device_memory(self._scratch.data_ptr(), self._scratch.numel())
        for name in self.input_names:
            if not context.set_input_shape(name, tuple(tensors[name].shape)):
                raise EngineConfigError(
                    f"{self.name}: TensorRT refused shape {list(tensors[name].shape)} for {name!r} "
                    "(outside the engine's optimization profile?)"
                )
        for name in (*self.input_names, *self.output_names):
            if not context.set_tensor_address(name, tensors[name].data_ptr()):
                raise EngineConfigError(f"{self.name}: TensorRT refused the address of {name!r}")
        for name in self.output_names:
            dims = context.get_tensor_shape(name)
            shape = tuple(dims[i] for i in range(len(dims)))
            if shape != tuple(tensors[name].shape):
                raise EngineConfigError(
                    f"{self.name}: output {name!r} has shape {list(shape)} at batch {batch}, "
                    f"the buffer {list(tensors[name].shape)}"
                )
        self._contexts[batch] = context

    def run(self, batch: int) -> None:
        stream = torch.cuda.current_stream(self._device).cuda_stream
        if not self._contexts[batch].execute_async_v3(stream):
            raise RuntimeError(f"TensorRT failed to enqueue {self.name} at batch {batch}")

    def close(self) -> None:
        self._contexts.clear()
        # Drop our scratch reference too, so that the engine's close() really frees that memory.
        self._scratch = torch.empty(0, dtype=torch.uint8)


# ---- the decode on static buffers ---------------------------------------------------------------
class StaticDecoder:
    """The whole decode on preallocated buffers, for any condition/step GraphRunner pair.

    On CUDA (with cuda_graphs=True) each (batch size, steps) decode is captured once as a CUDA
    graph and replayed; elsewhere it runs eagerly with the same code.
    """

    def __init__(
        self,
        cfg: PiDConfig,
        profile: ShapeProfile,
        condition: GraphRunner,
        step: GraphRunner,
        device: torch.device,
        cuda_graphs: bool = True,
    ) -> None:
        self.cfg = cfg
        self.profile = profile
        self.device = device
        self.batch_sizes = tuple(sorted(profile.batch_sizes))
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        self._condition = condition
        self._step = step
        dtypes = shared_dtypes(condition, step)
        dtypes["noise"] = torch.float32
        dtypes["images"] = torch.uint8
        largest = decoder_shapes(cfg, profile, max(self.batch_sizes))
        missing = sorted(set(dtypes) - set(largest))
        if missing:
            raise EngineConfigError(f"graph tensors {missing} are not part of the export contract")
        # zeros, not empty: padding rows are computed too, and should hold finite numbers.
        self._flat = {
            name: torch.zeros(math.prod(shape), dtype=dtypes[name], device=device)
            for name, shape in largest.items()
        }
        self._views = {b: static_views(self._flat, decoder_shapes(cfg, profile, b)) for b in self.batch_sizes}
        for b, views in self._views.items():
            condition.bind(b, views)
            step.bind(b, views)
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._window_graphs: dict[int, torch.cuda.CUDAGraph] = {}  # tiled decodes, per batch size
        # One pool and one capture stream for every graph (cuda_graphs.py); no graph output lives in
        # the pool: outputs land in the static buffers above.
        self._capture = GraphCapture(device) if self.cuda_graphs else None
        total = sum(t.numel() * t.element_size() for t in self._flat.values())
        log.info("static buffers: %.1f MB for batch sizes %s", total / 1e6, list(self.batch_sizes))

    @property
    def image_size(self) -> tuple[int, int]:
        return self.profile.image_size

    def decode(self, batch: DecodeBatch) -> DecodeResult:
        """Decode a batch already checked against the engine's capabilities."""
        n = batch.size
        size = padded_batch_size(n, self.batch_sizes)
        views = self._views[size]
        height, width = self.image_size
        timer = StageTimer(self.device)
        with torch.no_grad():
            with timer.stage("h2d"):
                views["latent"][:n].copy_(batch.latents, non_blocking=True)
                views["sigma"][:n].copy_(batch.sigmas, non_blocking=True)
                if batch.text is not None and "text" in views:
                    views["text"][:n].copy_(batch.text, non_blocking=True)
            with timer.stage("noise"):
                shape = (n, self.cfg.in_channels, height, width)
                for k, draw in enumerate(seeded_noises(batch.seeds, shape, batch.steps, self.device)):
                    views["noise"][k, :n].copy_(draw)
            with timer.stage("decode"):
                self._run(size, batch.steps)
            with timer.stage("d2h"):
                images = copy_to_host(views["images"][:n])
        return DecodeResult(images=images, timings=timer.result())

    def decode_tiled(
        self, plan: TilePlan, batch: DecodeBatch, window_latents: WindowLatents | None = None
    ) -> DecodeResult:
        """A larger output in windows of the built size (engines/tiled.py): per step and chunk of
        window rows, the condition and step plans run on the static buffers of the chunk's batch size.

        The condition plan runs again at every step (its outputs live in the one set of static
        buffers), which keeps device memory at one chunk's whatever the output size. On CUDA each
        batch size's condition + step pair is one CUDA graph, shared by every output size."""
        timer = StageTimer(self.device)
        height, width = plan.output
        with torch.no_grad():
            with timer.stage("h2d"):
                latents = batch.latents.to(self.device, non_blocking=True)
                sigmas = batch.sigmas.to(self.device, non_blocking=True)
                text = None if batch.text is None else batch.text.to(self.device, non_blocking=True)
            shape = (batch.size, self.cfg.in_channels, height, width)
            draw = seeded_noise_stream(batch.seeds, shape, self.device)  # drawn step by step, in "tiled"

            def velocity(rows: tuple, x_rows: torch.Tensor, t_rows: torch.Tensor) -> torch.Tensor:
                latent_rows, sigma_rows, text_rows = rows
                size = x_rows.shape[0]
                views = self._views[size]
                views["latent"].copy_(latent_rows)
                views["sigma"].copy_(sigma_rows)
                if text_rows is not None and "text" in views:
                    views["text"].copy_(text_rows)
                views["x_t"].copy_(x_rows)
                views["t_scaled"].copy_(t_rows)
                self._run_window(size)
                return views["velocity"]  # read (blended) before the next chunk overwrites it

            with on_device(self.device), timer.stage("tiled"):
                x0 = decode_tiled(
                    plan,
                    batch,
                    latents,
                    sigmas,
                    text,
                    draw,
                    max(self.batch_sizes),
                    lambda *rows: rows,  # conditioned again with every step (see above)
                    velocity,
                    self.batch_sizes,
                    window_latents,
                )
            with timer.stage("postprocess"):
                pixels = kernels.postprocess(x0)
            with timer.stage("d2h"):
                images = copy_to_host(pixels)
        return DecodeResult(images=images, timings=timer.result(), windows=plan.count)

    def _run_window(self, size: int) -> None:
        """condition + step on the static buffers of batch `size` (one CUDA graph per size on CUDA)."""

        def window() -> None:
            self._condition.run(size)
            self._step.run(size)

        if self._capture is None:
            window()
            return
        graph = self._window_graphs.get(size)
        if graph is None:
            log.info("capturing the window step (condition + step) at batch %d as a CUDA graph", size)
            graph, _ = self._capture.capture(window)
            self._window_graphs[size] = graph
        graph.replay()

    def warmup(self, steps: int = MAX_STUDENT_STEPS) -> None:
        """Run (and on CUDA capture) the decode of every batch size once, on the current buffers."""
        with torch.no_grad():
            for size in self.batch_sizes:
                self._run(size, steps)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def _run(self, size: int, steps: int) -> None:
        with on_device(self.device):
            if self._capture is None:
                self._decode_on_device(size, steps)
                return
            graph = self._graphs.get((size, steps)) or self._capture_graph(self._capture, size, steps)
            graph.replay()

    def _decode_on_device(self, size: int, steps: int) -> None:
        """condition -> student steps -> post-process, reading and writing only the static buffers."""
        views = self._views[size]
        self._condition.run(size)
        draws = iter(range(steps))

        def draw() -> torch.Tensor:
            return views["noise"][next(draws)]

        def velocity(x_t: torch.Tensor, t_scaled: torch.Tensor) -> torch.Tensor:
            views["x_t"].copy_(x_t)
            views["t_scaled"].copy_(t_scaled)
            self._step.run(size)
            # The sampler reads v before the next step overwrites this buffer.
            return views["velocity"]

        x0 = student_steps(velocity, draw, student_timesteps(steps))
        kernels.postprocess(x0, out=views["images"])

    def _capture_graph(self, capture: GraphCapture, size: int, steps: int) -> torch.cuda.CUDAGraph:
        log.info("capturing the %d-step decode at batch %d as a CUDA graph", steps, size)
        # The warm-up run on a side stream lets Triton compile the post-process, TensorRT finish its
        # lazy per-context setup, and the allocator settle -- none of which may happen in capture.
        graph, _ = capture.capture(lambda: self._decode_on_device(size, steps))
        self._graphs[(size, steps)] = graph
        return graph

    def close(self) -> None:
        self._graphs.clear()
        self._window_graphs.clear()
        self._views.clear()
        self._flat.clear()


# ---- the engine ---------------------------------------------------------------------------------
class TensorRTEngine(Engine):
    """Decode with a `pidserve build` engine directory on an NVIDIA GPU.

    Opening runs `check`, `load` and `bind`; `warmup()` runs `capture`. Not run yet: needs an NVIDIA
    GPU with TensorRT.
    """

    backend = BACKEND

    def __init__(
        self,
        engine_dir: str | Path,
        device: str | torch.device = "cuda",
        cuda_graphs: bool = True,
        tiling: Tiling = TILING_OFF,
        window_latents: str = "auto",
    ) -> None:
        """tiling: the default of batches that name none; windows are the built image size.
        window_latents: what each window is conditioned on (model/window_latents.py)."""
        self.engine_dir = Path(engine_dir)
        self.tiling = tiling
        self.window_latents_mode = window_latents
        self.check(device)
        self.load()
        self.bind(cuda_graphs)
        log.info(
            "engine: backend=tensorrt dir=%s %s %s batch %s, TensorRT %s, scratch %.0f MB",
            self.engine_dir,
            self.manifest.precision,
            self.profile.tag,
            list(self.profile.batch_sizes),
            self.trt_version,
            self._scratch.numel() / 1e6,
        )

    def check(self, device: str | torch.device = "cuda") -> None:
        """Read manifest.json and check it against this GPU and TensorRT before TensorRT loads anything.

        Sets manifest, device (an indexed CUDA device), trt_version, cfg, profile and the capabilities.
        EngineConfigError when the plans cannot run here, with the rebuild command where one helps.
        """
        self.manifest = read_manifest(self.engine_dir)
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise EngineConfigError(f"the tensorrt backend runs on a CUDA device, not {self.device}")
        if self.device.index is None:
            self.device = torch.device(
                "cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0
            )
        gpu_name, capability = current_gpu(self.device)
        self.trt_version = require_tensorrt()
        check_compatible(self.manifest, gpu_name, capability, self.trt_version, engine_dir=self.engine_dir)
        check_precision(self.manifest.precision, capability, gpu_name)
        self._caps = capabilities_from_manifest(self.manifest, self.device, self.tiling)
        self.cfg = self.manifest.pid_config()
        self.profile = single_profile(self.manifest)
        self.window_latents = engine_window_latents(self.window_latents_mode, self.cfg.latent_space)

    def load(self) -> None:
        """Deserialize both plans with one TensorRT runtime, and allocate the scratch memory they share."""
        import tensorrt as trt

        torch.cuda.set_device(self.device)
        self._runtime = trt.Runtime(tensorrt_logger())
        self._engines = {graph: self._load_plan(graph) for graph in ("condition", "step")}
        scratch_bytes = max(engine.device_memory_size_v2 for engine in self._engines.values())
        self._scratch = torch.empty(scratch_bytes, dtype=torch.uint8, device=self.device)

    def _load_plan(self, graph: str) -> trt.ICudaEngine:
        path = self.engine_dir / self.manifest.files[graph]
        if not path.is_file():
            raise EngineConfigError(f"{path} is missing from the engine directory; rebuild it")
        engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise EngineConfigError(
                f"TensorRT could not deserialize {path}; see the 'tensorrt' log, and rebuild"
            )
        return engine

    def bind(self, cuda_graphs: bool = True) -> None:
        """Check each plan's tensors against the export contract, then allocate the static buffers and
        bind them to one execution context per plan and built batch size (the StaticDecoder)."""
        runners = {
            graph: TensorRTGraph(graph, engine, self.device, self._scratch)
            for graph, engine in self._engines.items()
        }
        for graph, expected in expected_io_names(self.cfg, self.profile.text_tokens).items():
            check_io_names(graph, runners[graph].input_names, runners[graph].output_names, expected)
        self._runners = runners
        self._decoder = StaticDecoder(
            self.cfg, self.profile, runners["condition"], runners["step"], self.device, cuda_graphs
        )

    def capture(self, steps: int = MAX_STUDENT_STEPS) -> None:
        """Capture the `steps`-step decode of every built batch size as a CUDA graph (other step counts
        are captured on first use)."""
        self._decoder.warmup(steps)

    @property
    def capabilities(self) -> EngineCapabilities:
        return self._caps

    def decode(self, batch: DecodeBatch) -> DecodeResult:
        self._caps.check(batch)
        plan = self._caps.plan(batch)
        if plan is not None:  # window by window: asks batch.abandoned before every chunk
            return self._decoder.decode_tiled(plan, batch, self.window_latents)
        stop_if_abandoned(batch)  # one graph replay: it can only be skipped before it starts
        return self._decoder.decode(batch)

    def warmup(self, text_tokens: int | None = None) -> None:
        """Capture the 4-step decode of every built batch size (other step counts on first use).

        The text length is fixed by the build; asking for another one is refused with the rebuild hint.
        """
        warmup_text_tokens(self._caps, text_tokens)
        self.capture(MAX_STUDENT_STEPS)

    def close(self) -> None:
        self._decoder.close()
        for runner in self._runners.values():
            runner.close()
        self._runners.clear()
        self._engines.clear()
        self._scratch = torch.empty(0, dtype=torch.uint8)  # drop the scratch memory; close() may repeat
        torch.cuda.empty_cache()
