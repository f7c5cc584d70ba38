"""The TensorRT build and runtime code against two recording fakes of the `tensorrt` module: one with
exactly the TensorRT 10.x names this code may touch, one with exactly the 11.x names (NVIDIA's 10.x ->
11.x migration guide: the weak-typing builder flags, precision constraints, calibration and
ICudaEngine.device_memory_size are gone; every network is strongly typed and the STRONGLY_TYPED
creation flag's value changed). Using a name either version lacks fails here with AttributeError, which
the type stubs (10.13) cannot catch for 11.x. Mocks only because TensorRT needs an NVIDIA GPU.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

from pidserve.engines import ShapeProfile, trt_support
from pidserve.engines import tensorrt_engine as te
from pidserve.engines.build import tensorrt_build as tb

# BuilderFlag names of each version (the ones a builder config can set or clear).
FLAGS_10 = ("FP16", "BF16", "INT8", "FP8", "INT4", "FP4", "TF32", "REFIT", "OBEY_PRECISION_CONSTRAINTS",
            "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO", "STRIP_PLAN", "WEIGHT_STREAMING")  # fmt: skip
FLAGS_11 = ("TF32", "REFIT", "STRIP_PLAN", "WEIGHT_STREAMING")  # the weak-typing ones removed
STRONGLY_TYPED_BIT = {10: 5, 11: 1}  # NetworkDefinitionCreationFlag.STRONGLY_TYPED: its value changed in 11


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []


def fake_tensorrt(major: int, recorder: Recorder) -> types.ModuleType:
    """A `tensorrt` module with only the names of TensorRT `major` that pidserve's code paths reach."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.13.0.35" if major == 10 else "11.4.0.20"
    record = recorder.calls.append

    class Severity:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    class ILogger:
        def __init__(self) -> None:
            pass

    ILogger.Severity = Severity  # type: ignore[attr-defined]

    class Dims(list):
        pass

    trt.ILogger = ILogger
    trt.Dims = Dims
    trt.BuilderFlag = types.SimpleNamespace(
        **{name: i for i, name in enumerate(FLAGS_10 if major == 10 else FLAGS_11)}
    )
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=STRONGLY_TYPED_BIT[major])
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)
    trt.TensorIOMode = types.SimpleNamespace(INPUT=1, OUTPUT=2)
    trt.ExecutionContextAllocationStrategy = types.SimpleNamespace(
        STATIC=0, ON_PROFILE_CHANGE=1, USER_MANAGED=2
    )

    class Tensor:
        def __init__(self, name: str, shape: list[int]) -> None:
            self.name, self.shape = name, Dims(shape)

    class Network:
        def __init__(self, flags: int) -> None:
            self.inputs = [Tensor("x_t", [-1, 3, 64, 64]), Tensor("t_scaled", [-1])]

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        def get_input(self, i: int) -> Tensor:
            return self.inputs[i]

    class TimingCache:
        def serialize(self) -> bytes:
            return b"cache"

    class Profile:
        def set_shape(self, name, low, opt, high) -> None:
            record(("set_shape", name, list(low), list(opt), list(high)))

    class Config:
        builder_optimization_level = 3

        def create_timing_cache(self, data: bytes) -> TimingCache:
            return TimingCache()

        def set_memory_pool_limit(self, pool, size) -> None:
            record(("set_memory_pool_limit", pool, size))

        def set_flag(self, flag) -> None:
            record(("set_flag", flag))

        def clear_flag(self, flag) -> None:
            record(("clear_flag", flag))

        def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
            return True

        def add_optimization_profile(self, profile) -> int:
            return 0

    class Builder:
        def __init__(self, logger) -> None:
            pass

        def create_builder_config(self) -> Config:
            return Config()

        def create_network(self, flags: int) -> Network:
            record(("create_network", flags))
            return Network(flags)

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network, config) -> bytes:
            return b"plan"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger) -> None:
            pass

        def parse_from_file(self, path: str) -> bool:
            record(("parse_from_file", path))
            return True

    class DataType:
        def __init__(self, name: str) -> None:
            self.name = name

    class Context:
        def set_device_memory(self, ptr: int, size: int) -> None:
            record(("set_device_memory", size))

        def set_input_shape(self, name, shape) -> bool:
            return True

        def set_tensor_address(self, name, ptr) -> bool:
            return True

        def get_tensor_shape(self, name) -> Dims:
            return Dims([2, 3, 64, 64])

    class Engine:
        num_io_tensors = 2
        device_memory_size_v2 = 1 << 20
        if major == 10:
            device_memory_size = 1 << 20  # removed in 11.x

        def get_tensor_name(self, i: int) -> str:
            return ("x_t", "velocity")[i]

        def get_tensor_mode(self, name: str) -> int:
            return 1 if name == "x_t" else 2

        def get_tensor_dtype(self, name: str) -> DataType:
            return DataType("FLOAT")

        def create_execution_context(self, strategy) -> Context:
            record(("create_execution_context", strategy))
            return Context()

    class Runtime:
        def __init__(self, logger) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes) -> Engine:
            return Engine()

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    trt.DataType = DataType
    return trt


@pytest.fixture(params=[10, 11], ids=["trt10", "trt11"])
def tensorrt(request, monkeypatch):
    recorder = Recorder()
    module = fake_tensorrt(request.param, recorder)
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    monkeypatch.setattr(trt_support, "_TRT_LOGGER", None)  # a logger of the fake's ILogger
    return request.param, module, recorder


@pytest.mark.parametrize(
    "precision, weights", [("fp32", "float32"), ("bf16", "bfloat16"), ("fp8", "bfloat16")]
)
def test_a_graph_builds_strongly_typed_on_both_versions(tensorrt, tmp_path: Path, precision, weights) -> None:
    major, trt, recorder = tensorrt
    assert trt_support.require_tensorrt() == trt.__version__
    session = tb._BuildSession(tmp_path / "timing.cache")
    settings = tb.graph_build_settings(precision, weights)
    profile = ShapeProfile((64, 64), (1, 2))
    plan = session.build_plan(
        tmp_path / "step.onnx", "step", profile, settings, workspace_bytes=1 << 30, optimization_level=3
    )
    session.save_timing_cache()
    assert plan == b"plan" and (tmp_path / "timing.cache").read_bytes() == b"cache"
    (create,) = [call for call in recorder.calls if call[0] == "create_network"]
    assert create[1] == (1 << STRONGLY_TYPED_BIT[10] if major == 10 else 0)
    assert not [call for call in recorder.calls if call[0] == "set_flag"]  # no precision flags, ever
    cleared = [call[1] for call in recorder.calls if call[0] == "clear_flag"]
    assert cleared == ([trt.BuilderFlag.TF32] if precision == "fp32" else [])
    assert ("set_shape", "x_t", [1, 3, 64, 64], [2, 3, 64, 64], [2, 3, 64, 64]) in recorder.calls


def test_the_runtime_binds_a_plan_on_both_versions(tensorrt) -> None:
    _, trt, recorder = tensorrt
    engine = trt.Runtime(trt_support.tensorrt_logger()).deserialize_cuda_engine(b"plan")
    scratch = torch.empty(engine.device_memory_size_v2, dtype=torch.uint8)
    graph = te.TensorRTGraph("step", engine, torch.device("cpu"), scratch)
    assert graph.input_names == ("x_t",) and graph.output_names == ("velocity",)
    assert graph.dtype("x_t") == torch.float32
    graph.bind(2, {"x_t": torch.zeros(2, 3, 64, 64), "velocity": torch.zeros(2, 3, 64, 64)})
    assert ("create_execution_context", trt.ExecutionContextAllocationStrategy.USER_MANAGED) in recorder.calls
    assert ("set_device_memory", 1 << 20) in recorder.calls


def test_the_fakes_reject_what_their_version_removed() -> None:
    """The fakes themselves: 11.x has no weak-typing flags and no device_memory_size, 10.x has them."""
    eleven, ten = fake_tensorrt(11, Recorder()), fake_tensorrt(10, Recorder())
    for name in ("BF16", "FP16", "FP8", "INT8", "OBEY_PRECISION_CONSTRAINTS"):
        assert hasattr(ten.BuilderFlag, name) and not hasattr(eleven.BuilderFlag, name)
    assert not hasattr(eleven.Runtime(None).deserialize_cuda_engine(b""), "device_memory_size")


def test_no_removed_tensorrt_name_appears_in_the_code() -> None:
    """A grep backstop for paths the fakes do not reach: the API TensorRT 11 removed, as code uses it."""
    flags = ("FP16", "BF16", "INT8", "FP8", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS",
             "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO")  # fmt: skip
    removed = [f"trt.BuilderFlag.{flag}" for flag in flags]
    removed += [
        "int8_calibrator",
        "set_quantization_flag",
        "set_calibration_profile",
        "platform_has_fast_fp16",
    ]
    root = Path(__file__).resolve().parents[2]
    sources = [*root.glob("engines/**/*.py"), *root.glob("pidserve/**/*.py"), *root.glob("bench/**/*.py")]
    for path in sources:
        text = path.read_text()
        for name in removed:
            assert name not in text, f"{path}: {name}"
        # ICudaEngine.device_memory_size is gone (device_memory_size_v2 stays)
        assert re.search(r"\.device_memory_size(?!_v2)\b", text) is None, path
