"""Open an engine by backend name — the one place the CLI and the server choose a backend.

The backend is always explicit: nothing here falls back to another backend when one fails.
Backends are imported when opened. The one build-time step a run can take is here: the onnxruntime
backend, given a model instead of an export directory, exports it once into a cache (build/export.py).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from pidserve.model import TILING_OFF, PiDNet, Tiling

from .base import Engine, EngineConfigError, ShapeProfile

log = logging.getLogger(__name__)

BACKENDS = ("torch", "torch-compile", "onnxruntime", "tensorrt")
DEFAULT_CACHE = Path.home() / ".cache" / "pidserve"


def open_engine(
    backend: str,
    *,
    net: PiDNet | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    max_batch: int = 8,
    batch_sizes: tuple[int, ...] | None = None,
    image_sizes: tuple[tuple[int, int], ...] | None = None,
    engine_dir: str | Path | None = None,
    profile: ShapeProfile | None = None,
    cache_dir: str | Path | None = None,
    compile_mode: str | None = None,
    attention_backend: str = "auto",
    tiling: Tiling | str | None = None,
    window_latents: str = "auto",
) -> Engine:
    """Open `backend`.

    torch, torch-compile: run `net` on `device` in `precision`; optionally only the served
        `batch_sizes` (partial batches padded) and `image_sizes` (needed by torch-compile's warmup).
        torch-compile takes torch.compile's `compile_mode` (default: "default"). Both take the
        `attention_backend` (attention.py; default auto: PyTorch's choice).
    onnxruntime: run `engine_dir` (an ONNX export); or export `net` for `profile` into a cache
        directory keyed by the weights and the profile, then run it.
    tensorrt: run the built engine directory `engine_dir` (`pidserve build`).
    Every backend takes `tiling` ('off', 'auto', 'HxW[:overlap]' or a Tiling; default off): the default
    of batches that name none. Larger outputs decode in blended windows (model/tiling.py); fixed-shape
    engines (onnxruntime, tensorrt) tile in windows of the one size they were built for.
    `window_latents` ('auto', 'crop', 'corrected'): what each window is conditioned on
    (model/window_latents.py); auto corrects tiny-ae latents for the encoder's context.
    """
    tiling = parse_tiling(tiling)
    if backend not in BACKENDS:
        raise EngineConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend not in ("torch", "torch-compile") and attention_backend != "auto":
        raise EngineConfigError(
            f"the attention backend is chosen by the torch backends only; the {backend} backend uses auto"
        )
    if backend in ("torch", "torch-compile"):
        if net is None:
            raise EngineConfigError(f"the {backend} backend needs a model (a checkpoint)")
        from .torch_engine import TorchCompileEngine, TorchEngine

        if backend == "torch":
            if compile_mode is not None:
                raise EngineConfigError("compile_mode is for the torch-compile backend only")
            return TorchEngine(
                net, device, precision, max_batch, batch_sizes, image_sizes, attention_backend, tiling,
                window_latents,
            )  # fmt: skip
        return TorchCompileEngine(
            net,
            device=device,
            precision=precision,
            max_batch=max_batch,
            compile_mode=compile_mode,
            batch_sizes=batch_sizes,
            image_sizes=image_sizes,
            attention_backend=attention_backend,
            tiling=tiling,
            window_latents=window_latents,
        )
    if backend == "onnxruntime":
        if device != "cpu" or precision != "fp32":
            raise EngineConfigError(
                "the onnxruntime backend runs on the CPU in fp32 (--device cpu --precision fp32)"
            )
        from .onnxruntime_engine import OnnxRuntimeEngine

        if engine_dir is None:
            if net is None or profile is None:
                raise EngineConfigError(
                    "the onnxruntime backend needs an export directory, or a model and a size"
                )
            engine_dir = exported_for(net, profile, cache_dir)
        return OnnxRuntimeEngine(engine_dir, tiling=tiling, window_latents=window_latents)
    if engine_dir is None:
        raise EngineConfigError("the tensorrt backend needs an engine directory built by `pidserve build`")
    from .tensorrt_engine import TensorRTEngine

    return TensorRTEngine(engine_dir, tiling=tiling, window_latents=window_latents)


def parse_tiling(tiling: Tiling | str | None) -> Tiling:
    """A Tiling from its text form ('off', 'auto', 'HxW', 'HxW:overlap'); None: off."""
    if tiling is None:
        return TILING_OFF
    if isinstance(tiling, Tiling):
        return tiling
    try:
        return Tiling.parse(tiling)
    except ValueError as exc:
        raise EngineConfigError(str(exc)) from None


def weights_digest(net: PiDNet) -> str:
    """A short hash of a network's config and weights (identifies cached exports)."""
    digest = hashlib.sha256(net.cfg.to_json().encode())
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def exported_for(net: PiDNet, profile: ShapeProfile, cache_dir: str | Path | None = None) -> Path:
    """The ONNX export of `net` for `profile`, exporting it into the cache on first use."""
    from .build import export_onnx

    root = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE / "onnx"
    target = root / weights_digest(net) / f"{profile.tag}_b{profile.max_batch}"
    if (target / "export.json").is_file():
        log.info("using cached ONNX export %s", target)
        return target
    log.info("exporting ONNX for %s into %s (once per model and size)", profile.tag, target)
    export_onnx(net, target, profile)
    return target
