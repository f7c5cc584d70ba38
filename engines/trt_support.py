"""What the TensorRT runtime (tensorrt_engine) and the builder (build/) share, so that the runtime
never imports the builder:

    the TensorRT install    tensorrt_version, require_tensorrt (>= 10.1), one process-wide logger
    the graph contract      the tensor names of condition.onnx and step.onnx, each input's batch
                            axis, every tensor's shape at a batch size (build/export.py writes
                            the graphs; a plan binds exactly these tensors)
    tensor types            TensorRT DataType -> torch dtype of the bound buffer, and the
                            GraphRunner protocol both plans are driven through

Everything here but the logger runs without TensorRT, so the tests check it on the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch

from pidserve.model import PiDConfig, PiDNet

from .base import EngineConfigError, ShapeProfile

if TYPE_CHECKING:
    import tensorrt as trt

TENSORRT_INSTALL_HINT = (
    'install it with `pip install "pidserve[tensorrt]"` on a machine with an NVIDIA GPU and driver'
)


# ---- the TensorRT install -----------------------------------------------------------------------
def tensorrt_version() -> str | None:
    """The installed TensorRT's version, or None when the real package is not installed.

    The type stubs (tensorrt-stubs) install an empty `tensorrt` directory, so `import tensorrt`
    can succeed without TensorRT: the real package is the one that has a Builder.
    """
    try:
        import tensorrt
    except ImportError:
        return None
    if not hasattr(tensorrt, "Builder"):
        return None
    return str(tensorrt.__version__)


def require_tensorrt() -> str:
    """The installed TensorRT version; EngineConfigError naming the install command otherwise."""
    version = tensorrt_version()
    if version is None:
        raise EngineConfigError(
            f"TensorRT is not installed (only its type stubs, at most); {TENSORRT_INSTALL_HINT}"
        )
    # 10.1: set_device_memory(ptr, size) and device_memory_size_v2, which the runtime uses.
    if tuple(int(v) for v in version.split(".")[:2]) < (10, 1):
        raise EngineConfigError(f"pidserve needs TensorRT >= 10.1, found {version}; {TENSORRT_INSTALL_HINT}")
    return version


def tensorrt_major(version: str) -> int:
    """10 for "10.13.0.35", 11 for "11.4.0"."""
    return int(version.split(".")[0])


def strongly_typed_network_flags(trt_module: Any) -> int:
    """The create_network() flags of a strongly typed network on the installed TensorRT: on 10.x the
    STRONGLY_TYPED bit; on 11.x none (every network is strongly typed, and the flag's value changed,
    so passing 10.x's bit would be wrong)."""
    if tensorrt_major(trt_module.__version__) >= 11:
        return 0
    return 1 << int(trt_module.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


_TRT_LOGGER: trt.ILogger | None = None


def tensorrt_logger() -> trt.ILogger:
    """One process-wide TensorRT logger that forwards to Python logging (logger "tensorrt").

    TensorRT keeps the logger it was given for the lifetime of every builder, runtime and engine
    made with it, so it is created once and kept.
    """
    global _TRT_LOGGER
    if _TRT_LOGGER is not None:
        return _TRT_LOGGER
    import tensorrt as trt

    levels = {
        int(trt.ILogger.Severity.INTERNAL_ERROR): logging.CRITICAL,
        int(trt.ILogger.Severity.ERROR): logging.ERROR,
        int(trt.ILogger.Severity.WARNING): logging.WARNING,
        int(trt.ILogger.Severity.INFO): logging.INFO,
        int(trt.ILogger.Severity.VERBOSE): logging.DEBUG,
    }
    trt_log = logging.getLogger("tensorrt")

    class LoggingBridge(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)  # required by the TensorRT Python API for custom loggers

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            trt_log.log(levels.get(int(severity), logging.INFO), "%s", msg)

    _TRT_LOGGER = LoggingBridge()
    return _TRT_LOGGER


# ---- the graph contract (build/export.py's module docstring draws it) ---------------------------
def condition_io_names(net: PiDNet, text_tokens: int) -> tuple[list[str], list[str]]:
    """(inputs, outputs) of condition.onnx."""
    inputs = ["latent"] + (["text"] if text_tokens else [])
    outputs = ["gate_features"] + (["pixel_feature"] if net.cfg.pixel_gate else [])
    return inputs, outputs + (["text_tokens"] if text_tokens else [])


def step_io_names(net: PiDNet, text_tokens: int) -> tuple[list[str], list[str]]:
    """(inputs, outputs) of step.onnx."""
    inputs = ["x_t", "t_scaled", "sigma", "gate_features"]
    inputs += ["pixel_feature"] if net.cfg.pixel_gate else []
    inputs += ["text_tokens"] if text_tokens else []
    return inputs, ["velocity"]


# Where the batch axis of each graph input is (all others: axis 0).
BATCH_AXES = {"gate_features": 1}


def batch_axis(input_name: str) -> int:
    return BATCH_AXES.get(input_name, 0)


def expected_io_names(cfg: PiDConfig, text_tokens: int) -> dict[str, tuple[list[str], list[str]]]:
    """{"condition": (inputs, outputs), "step": (inputs, outputs)} of the export contract."""
    with torch.device("meta"):  # the io names only read the config; a meta net allocates nothing
        net = PiDNet(cfg)
    return {"condition": condition_io_names(net, text_tokens), "step": step_io_names(net, text_tokens)}


def io_shapes(cfg: PiDConfig, profile: ShapeProfile, batch: int) -> dict[str, tuple[int, ...]]:
    """Shapes of every graph input and output at one batch size (the export contract).

    latent [B, C, h, w], text [B, Lt, text_dim], gate_features [G, B, L, D],
    pixel_feature [B, L, D] (v1.5), text_tokens [B, Lt, D], x_t and velocity [B, 3, H, W],
    t_scaled and sigma [B]; L = (H / patch) * (W / patch) patch tokens.
    """
    height, width = profile.image_size
    patches = (height // cfg.patch_size) * (width // cfg.patch_size)
    latent_h, latent_w = profile.latent_size(cfg.output_scale)
    lt = profile.text_tokens
    shapes: dict[str, tuple[int, ...]] = {
        "latent": (batch, cfg.latent_channels, latent_h, latent_w),
        "gate_features": (cfg.num_gates, batch, patches, cfg.hidden_size),
        "x_t": (batch, cfg.in_channels, height, width),
        "t_scaled": (batch,),
        "sigma": (batch,),
        "velocity": (batch, cfg.in_channels, height, width),
    }
    if cfg.pixel_gate:
        shapes["pixel_feature"] = (batch, patches, cfg.hidden_size)
    if lt:
        shapes["text"] = (batch, lt, cfg.text_dim)
        shapes["text_tokens"] = (batch, lt, cfg.hidden_size)
    return shapes


def check_io_names(
    graph: str, inputs: Sequence[str], outputs: Sequence[str], expected: tuple[list[str], list[str]]
) -> None:
    """A plan's tensors must be exactly the export contract's (else it is from another export)."""
    want_in, want_out = expected
    if sorted(inputs) != sorted(want_in) or sorted(outputs) != sorted(want_out):
        raise EngineConfigError(
            f"{graph} plan has inputs {sorted(inputs)} and outputs {sorted(outputs)}; this model's "
            f"export contract has inputs {sorted(want_in)} and outputs {sorted(want_out)}. "
            "Rebuild the engine directory."
        )


# ---- tensor types and graph runners ---------------------------------------------------------------
# TensorRT DataType names -> torch dtypes of the buffers bound to them.
TORCH_DTYPES_BY_TRT_NAME = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT8": torch.int8,
    "UINT8": torch.uint8,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "BOOL": torch.bool,
}


def torch_dtype_for(trt_type_name: str) -> torch.dtype:
    """The torch dtype of a buffer for a TensorRT DataType (by name: "FLOAT", "BF16", ...)."""
    if trt_type_name not in TORCH_DTYPES_BY_TRT_NAME:
        raise EngineConfigError(f"TensorRT tensor type {trt_type_name} has no torch buffer type here")
    return TORCH_DTYPES_BY_TRT_NAME[trt_type_name]


class GraphRunner(Protocol):
    """Runs one exported graph (condition or step) on static buffers, one binding per batch size."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def dtype(self, name: str) -> torch.dtype:
        """The dtype of the buffer bound to tensor `name`."""
        ...

    def bind(self, batch: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Fix the buffers (by tensor name) that runs at this batch size read and write."""
        ...

    def run(self, batch: int) -> None:
        """Enqueue one run at this batch size on the current stream (asynchronous on CUDA)."""
        ...


def shared_dtypes(condition: GraphRunner, step: GraphRunner) -> dict[str, torch.dtype]:
    """dtype of every graph tensor; a condition output that feeds the step must agree on both sides."""
    dtypes = {name: condition.dtype(name) for name in (*condition.input_names, *condition.output_names)}
    for name in (*step.input_names, *step.output_names):
        dtype = step.dtype(name)
        if name in dtypes and dtypes[name] != dtype:
            raise EngineConfigError(
                f"tensor {name!r} is {dtypes[name]} out of the condition plan but {dtype} into the "
                "step plan; export both graphs from the same network (same dtype) and rebuild"
            )
        dtypes[name] = dtype
    return dtypes
