"""TensorRT backend: the build planning and the decode logic on CPU; the TensorRT runs on a GPU.

The decode (`StaticDecoder`) is driven here by torch runners of the exported graphs, so its
buffers, padding, noise and sampler wiring are checked against the model's own sampler without
TensorRT. Tests that need TensorRT itself are marked `gpu` and skip without a GPU and TensorRT.
"""

from __future__ import annotations

import json
import logging
import sys
import types
from collections.abc import Mapping
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from pidserve.engines import DecodeBatch, EngineConfigError, EngineInputError, ShapeProfile
from pidserve.engines import tensorrt_engine as te
from pidserve.engines import trt_support as ts
from pidserve.engines.base import seeded_noises
from pidserve.engines.build import tensorrt_build as tb
from pidserve.engines.build.export import ConditionGraph, ExportedGraphs, StepGraph, example_inputs
from pidserve.engines.gpu_classes import GPU_CLASSES, current_gpu, get_gpu_class
from pidserve.engines.manifest import EngineManifest, profile_to_dict, read_manifest, write_manifest
from pidserve.engines.trt_support import condition_io_names, step_io_names
from pidserve.model import (
    PiDConfig,
    PiDNet,
    Tiling,
    load_checkpoint,
    sample,
    sample_tiled,
    save_checkpoint,
    to_uint8_hwc,
)
from tests.conftest import OFFICIAL

CPU = torch.device("cpu")


def _net(name: str) -> PiDNet:
    return load_checkpoint(OFFICIAL / name / "weights.safetensors", PiDConfig.preset(name))


@pytest.fixture(scope="module")
def tiny_v15() -> PiDNet:
    return _net("tiny_v1.5")


def _real_tensorrt() -> bool:
    return torch.cuda.is_available() and ts.tensorrt_version() is not None


needs_tensorrt = pytest.mark.skipif(
    not _real_tensorrt(), reason="needs an NVIDIA GPU with TensorRT installed"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ---- TensorRT availability --------------------------------------------------------------------
def test_stub_namespace_is_not_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    # What tensorrt-stubs leaves behind: an importable `tensorrt` with nothing in it.
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    assert ts.tensorrt_version() is None
    with pytest.raises(EngineConfigError, match=r"TensorRT is not installed.*pidserve\[tensorrt\]"):
        ts.require_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import raises ImportError
    assert ts.tensorrt_version() is None


def test_tensorrt_version_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("tensorrt")
    fake.Builder = object  # type: ignore[attr-defined]
    fake.__version__ = "8.6.1"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    with pytest.raises(EngineConfigError, match=r"TensorRT >= 10\.1, found 8\.6\.1"):
        ts.require_tensorrt()
    fake.__version__ = "10.0.1.6"  # type: ignore[attr-defined]
    with pytest.raises(EngineConfigError, match=r"TensorRT >= 10\.1, found 10\.0\.1\.6"):
        ts.require_tensorrt()
    fake.__version__ = "10.13.0.35"  # type: ignore[attr-defined]
    assert ts.require_tensorrt() == "10.13.0.35"


# ---- build planning ----------------------------------------------------------------------------
def test_profile_shapes_batch_first_and_gate_features() -> None:
    assert tb.profile_shapes("x_t", (-1, 3, 64, 64), (1, 2, 4)) == (
        (1, 3, 64, 64),
        (4, 3, 64, 64),
        (4, 3, 64, 64),
    )
    assert tb.profile_shapes("t_scaled", [-1], (2, 8)) == ((2,), (8,), (8,))
    # gate_features is [G, B, L, D]: batch on axis 1.
    assert tb.profile_shapes("gate_features", (7, -1, 16384, 1536), (1, 8)) == (
        (7, 1, 16384, 1536),
        (7, 8, 16384, 1536),
        (7, 8, 16384, 1536),
    )


def test_profile_shapes_rejects_other_dynamic_axes() -> None:
    with pytest.raises(tb.EngineBuildError, match="dynamic batch axis"):
        tb.profile_shapes("x_t", (2, 3, 64, 64), (1, 2))
    with pytest.raises(tb.EngineBuildError, match="dynamic batch axis"):
        tb.profile_shapes("gate_features", (-1, 2, 16, 32), (1, 2))
    with pytest.raises(tb.EngineBuildError, match="only the batch axis"):
        tb.profile_shapes("x_t", (-1, 3, -1, 64), (1, 2))
    with pytest.raises(EngineConfigError, match="positive"):
        tb.profile_shapes("x_t", (-1, 3, 64, 64), (0, 2))


def test_batch_axes_follow_the_export_contract(tiny_v15: PiDNet) -> None:
    # Every graph input's batch axis, as the export's example inputs lay them out (batch = 3).
    profile = ShapeProfile((64, 64), (1, 5), text_tokens=2)
    cond_inputs, step_inputs = example_inputs(tiny_v15, profile, batch=5)
    for name, tensor in {**cond_inputs, **step_inputs}.items():
        axis = ts.batch_axis(name)
        assert tensor.shape[axis] == 5, name
        assert 5 not in [d for i, d in enumerate(tensor.shape) if i != axis], name


def test_graph_build_settings() -> None:
    """Strongly typed always (TensorRT 11 has nothing else): the precision comes from the exported
    graph's dtype, never from a builder flag."""
    assert tb.graph_build_settings("fp32") == tb.GraphBuildSettings(clear_flags=("TF32",))
    assert tb.graph_build_settings("bf16", "bfloat16") == tb.GraphBuildSettings()
    assert tb.graph_build_settings("fp8", "bfloat16") == tb.GraphBuildSettings()
    assert tb.GraphBuildSettings().strongly_typed
    with pytest.raises(EngineConfigError, match="exported from a float32 network"):
        tb.graph_build_settings("fp32", "bfloat16")
    with pytest.raises(EngineConfigError, match="exported from a bfloat16 network"):
        tb.graph_build_settings("bf16")  # an fp32 export: TensorRT 10 once took BuilderFlag.BF16 for it
    with pytest.raises(EngineConfigError, match="unknown precision"):
        tb.graph_build_settings("fp16")


def _tiny_onnx(path: Path, dtype: int = onnx.TensorProto.FLOAT) -> None:
    """A valid one-MatMul ONNX graph whose weights have `dtype` (plus a small float bias)."""
    weight = onnx.helper.make_tensor("w", dtype, [8, 8], [0.0] * 64)
    bias = onnx.helper.make_tensor("b", onnx.TensorProto.FLOAT, [8], [0.0] * 8)
    nodes = [
        onnx.helper.make_node("Cast", ["w"], ["wf"], to=onnx.TensorProto.FLOAT),
        onnx.helper.make_node("MatMul", ["x", "wf"], ["xw"]),
        onnx.helper.make_node("Add", ["xw", "b"], ["y"]),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "tiny",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 8])],
        [weight, bias],
    )
    onnx.save(onnx.helper.make_model(graph), str(path))


def test_onnx_weights_dtype(tmp_path: Path) -> None:
    _tiny_onnx(tmp_path / "f32.onnx")
    _tiny_onnx(tmp_path / "bf16.onnx", onnx.TensorProto.BFLOAT16)
    assert tb.onnx_weights_dtype(tmp_path / "f32.onnx") == "float32"
    assert tb.onnx_weights_dtype(tmp_path / "bf16.onnx") == "bfloat16"  # 64 bf16 weights outweigh 8 floats


def _fake_export(
    directory: Path,
    profile: ShapeProfile,
    quantization: str | None = None,
    dtype: int = onnx.TensorProto.BFLOAT16,
) -> ExportedGraphs:
    """An export directory with stand-in ONNX graphs (weights in `dtype`) and a real export.json."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("condition", "step"):
        _tiny_onnx(directory / f"{name}.onnx", dtype)
    meta: dict[str, object] = {
        "profile": profile_to_dict(profile),
        "config": PiDConfig.preset("tiny_v1").to_dict(),
    }
    if quantization:
        meta["quantization"] = {"format": quantization}
    (directory / "export.json").write_text(json.dumps(meta))
    return ExportedGraphs(directory, profile, directory / "condition.onnx", directory / "step.onnx")


def test_validate_build_request(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    h100 = get_gpu_class("h100")
    plain = _fake_export(tmp_path / "plain", ShapeProfile((2048, 2048), (1, 2, 4, 8)))
    quantized = _fake_export(tmp_path / "fp8", ShapeProfile((2048, 2048), (1, 2)), quantization="fp8")
    assert tb.validate_build_request(plain, h100, "bf16")["config"]["hidden_size"] == 32
    tb.validate_build_request(quantized, h100, "fp8")
    with pytest.raises(EngineConfigError, match="FP8 build needs graphs with FP8 Q/DQ"):
        tb.validate_build_request(plain, h100, "fp8")
    with pytest.raises(EngineConfigError, match="build them with --precision fp8"):
        tb.validate_build_request(quantized, h100, "bf16")
    with pytest.raises(EngineConfigError, match="unknown precision"):
        tb.validate_build_request(plain, h100, "int8")
    (tmp_path / "plain" / "step.onnx").unlink()
    with pytest.raises(EngineConfigError, match=r"step graph .* does not exist"):
        tb.validate_build_request(plain, h100, "bf16")
    big = _fake_export(tmp_path / "big", ShapeProfile((2048, 2048), (1, 32)))
    with caplog.at_level(logging.WARNING):
        tb.validate_build_request(big, h100, "bf16")
    assert "exceeds the h100 default of 8" in caplog.text


def test_export_without_metadata_is_refused(tmp_path: Path) -> None:
    graphs = _fake_export(tmp_path, ShapeProfile((64, 64)))
    (tmp_path / "export.json").unlink()
    with pytest.raises(EngineConfigError, match=r"no export\.json"):
        tb.validate_build_request(graphs, get_gpu_class("h100"), "bf16")


def test_build_gpu_must_be_the_class_gpu(caplog: pytest.LogCaptureFixture) -> None:
    h100 = get_gpu_class("h100")
    with pytest.raises(EngineConfigError, match=r"compiles for the GPU it runs on: build on a NVIDIA H100"):
        tb.check_build_gpu(h100, "NVIDIA GeForce RTX 5090", (12, 0))
    with caplog.at_level(logging.WARNING):
        tb.check_build_gpu(h100, "NVIDIA H200", (9, 0))  # same architecture: allowed, noted
    assert "NVIDIA H200" in caplog.text
    tb.check_build_gpu(GPU_CLASSES["gb200"], "NVIDIA GB200", (10, 0))


def test_file_layout_and_timing_cache_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert tb.plan_paths(tmp_path) == {
        "condition": tmp_path / "condition.plan",
        "step": tmp_path / "step.plan",
    }
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = tb.default_timing_cache_path("NVIDIA H100 80GB HBM3", "10.13.0.35")
    assert path == tmp_path / "pidserve" / "tensorrt" / "timing-nvidia-h100-80gb-hbm3-trt10.13.0.35.cache"


def test_manifest_of_a_build(tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.safetensors"
    save_checkpoint(PiDNet(PiDConfig.preset("tiny_v1")), checkpoint)
    manifest = tb.make_manifest(
        checkpoint=checkpoint,
        config=PiDConfig.preset("tiny_v1"),
        variant="tiny_v1",
        precision="fp8",
        profile=ShapeProfile((64, 64), (1, 2, 4), 3),
        weights_dtype="bfloat16",
        trt_version="10.13.0.35",
        gpu_class=get_gpu_class("h100"),
        gpu_name="NVIDIA H100 80GB HBM3",
        compute_capability=(9, 0),
        workspace_bytes=1 << 30,
        optimization_level=3,
        out_dir=tmp_path / "engines",
    )
    write_manifest(manifest, tmp_path / "engines")
    loaded = read_manifest(tmp_path / "engines")
    assert loaded == manifest
    assert loaded.compute_capability == "9.0" and loaded.gpu_class == "h100"
    assert loaded.build_flags["strongly_typed"] is True and loaded.build_flags["workspace_bytes"] == 1 << 30
    assert loaded.build_flags["onnx_weights_dtype"] == "bfloat16"
    assert loaded.shape_profiles() == [ShapeProfile((64, 64), (1, 2, 4), 3)]
    assert loaded.checkpoint == str(checkpoint.resolve())
    assert loaded.engine_dir == str((tmp_path / "engines").resolve())
    assert len(loaded.model_sha256) == 64
    with pytest.raises(EngineConfigError, match="does not exist"):
        tb.make_manifest(**{**_manifest_args(tmp_path), "checkpoint": tmp_path / "missing.pth"})


def _manifest_args(tmp_path: Path) -> dict[str, object]:
    return {
        "checkpoint": tmp_path / "model.safetensors",
        "config": PiDConfig.preset("tiny_v1"),
        "variant": None,
        "precision": "bf16",
        "profile": ShapeProfile((64, 64)),
        "trt_version": "10.13.0.35",
        "gpu_class": get_gpu_class("h100"),
        "gpu_name": "NVIDIA H100",
        "compute_capability": (9, 0),
        "workspace_bytes": 1,
        "optimization_level": 3,
        "out_dir": tmp_path,
    }


def test_build_checks_arguments_then_needs_tensorrt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    graphs = _fake_export(tmp_path / "onnx", ShapeProfile((64, 64), (1, 2)))
    checkpoint = tmp_path / "model.safetensors"
    with pytest.raises(EngineConfigError, match="unknown GPU class 'a100'"):
        tb.build_engines(graphs, tmp_path / "out", "a100", "bf16", checkpoint=checkpoint)
    with pytest.raises(EngineConfigError, match="FP8 build needs graphs"):
        tb.build_engines(graphs, tmp_path / "out", "h100", "fp8", checkpoint=checkpoint)
    with pytest.raises(EngineConfigError, match=r"checkpoint .* does not exist"):
        tb.build_engines(graphs, tmp_path / "out", "h100", "bf16", checkpoint=checkpoint)
    checkpoint.write_bytes(b"weights")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(EngineConfigError, match="TensorRT is not installed"):
        tb.build_engines(graphs, tmp_path / "out", "h100", "bf16", checkpoint=checkpoint)
    assert not (tmp_path / "out").exists()


# ---- engine: pure parts ------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "size"), [(1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (8, 8)])
def test_padded_batch_size(n: int, size: int) -> None:
    assert te.padded_batch_size(n, (1, 2, 4, 8)) == size


def test_padded_batch_size_out_of_range() -> None:
    with pytest.raises(EngineInputError, match=r"batch size 9 is outside 1\.\.8"):
        te.padded_batch_size(9, (1, 2, 4, 8))
    with pytest.raises(EngineInputError):
        te.padded_batch_size(0, (1, 2))


@pytest.mark.parametrize(("preset", "text_tokens"), [("tiny_v1", 0), ("tiny_v1.5", 3)])
def test_io_shapes_match_the_export_contract(preset: str, text_tokens: int) -> None:
    net = PiDNet(PiDConfig.preset(preset)).eval()
    profile = ShapeProfile((64, 128), (1, 3), text_tokens)
    cond_inputs, step_inputs = example_inputs(net, profile, batch=3)
    actual = {name: tuple(t.shape) for name, t in {**cond_inputs, **step_inputs}.items()}
    with torch.no_grad():
        actual["velocity"] = tuple(StepGraph(net, profile.image_size, text_tokens)(**step_inputs).shape)
    assert ts.io_shapes(net.cfg, profile, 3) == actual
    expected_names = ts.expected_io_names(net.cfg, text_tokens)
    assert expected_names == {
        "condition": condition_io_names(net, text_tokens),
        "step": step_io_names(net, text_tokens),
    }
    names = {n for ins, outs in expected_names.values() for n in (*ins, *outs)}
    assert names == set(actual)


def test_static_views_share_one_buffer() -> None:
    cfg, profile = PiDConfig.preset("tiny_v1"), ShapeProfile((64, 64), (1, 2, 4))
    largest = te.decoder_shapes(cfg, profile, 4)
    flat = {name: torch.zeros(int(torch.Size(shape).numel())) for name, shape in largest.items()}
    small = te.static_views(flat, te.decoder_shapes(cfg, profile, 2))
    assert small["gate_features"].shape == (2, 2, 16, 32) and small["gate_features"].is_contiguous()
    assert small["noise"].shape == (4, 2, 3, 64, 64) and small["images"].shape == (2, 64, 64, 3)
    small["x_t"].fill_(1.0)
    assert flat["x_t"][: 2 * 3 * 64 * 64].eq(1).all() and flat["x_t"][2 * 3 * 64 * 64 :].eq(0).all()
    with pytest.raises(ValueError, match="holds"):
        te.static_views(flat, te.decoder_shapes(cfg, profile, 8))


def _manifest(profiles: list[ShapeProfile], precision: str = "bf16") -> EngineManifest:
    return EngineManifest(
        model_sha256="0" * 64,
        checkpoint="/ckpt.safetensors",
        variant=None,
        config=PiDConfig.preset("tiny_v1.5").to_dict(),
        precision=precision,
        profiles=[profile_to_dict(p) for p in profiles],
        tensorrt_version="10.13.0.35",
        gpu_class="h100",
        gpu_name="NVIDIA H100 80GB HBM3",
        compute_capability="9.0",
        build_flags={},
        engine_dir="/engines",
    )


def test_capabilities_from_the_manifest() -> None:
    caps = te.capabilities_from_manifest(_manifest([ShapeProfile((64, 128), (1, 2, 4), 3)], "fp8"), "cuda:0")
    assert caps.backend == "tensorrt" and caps.device == "cuda:0" and caps.precision == "fp8"
    assert caps.latent_channels == 128 and caps.latent_space == "flux2" and caps.output_scale == 64
    assert caps.max_batch == 4 and caps.batch_sizes == (1, 2, 4)
    assert caps.image_sizes == ((64, 128),) and caps.text_tokens == (3,) and caps.steps == (1, 2, 3, 4)
    good = DecodeBatch(
        torch.zeros(2, 128, 1, 2), torch.zeros(2), torch.zeros(2, dtype=torch.int64), torch.zeros(2, 3, 32)
    )
    caps.check(good)
    with pytest.raises(EngineInputError, match="64x64 is not built into this engine; built: 64x128"):
        caps.check(DecodeBatch(torch.zeros(2, 128, 1, 1), good.sigmas, good.seeds, good.text))
    with pytest.raises(EngineInputError, match=r"outside 1\.\.4"):
        caps.check(DecodeBatch(torch.zeros(5, 128, 1, 2), torch.zeros(5), torch.zeros(5, dtype=torch.int64)))
    with pytest.raises(EngineInputError, match=r"0 text tokens given; this engine was built for \[3\]"):
        caps.check(DecodeBatch(good.latents, good.sigmas, good.seeds))
    with pytest.raises(EngineConfigError, match="exactly one"):
        te.capabilities_from_manifest(_manifest([ShapeProfile((64, 64)), ShapeProfile((128, 128))]), "cuda")


def test_io_name_and_dtype_checks() -> None:
    ts.check_io_names("step", ["x_t", "sigma"], ["velocity"], (["sigma", "x_t"], ["velocity"]))
    with pytest.raises(EngineConfigError, match="Rebuild the engine directory"):
        ts.check_io_names("step", ["x_t"], ["velocity"], (["sigma", "x_t"], ["velocity"]))
    condition = _FakeRunner(("latent",), ("gate_features",), torch.bfloat16)
    step = _FakeRunner(("x_t", "gate_features"), ("velocity",), torch.float32)
    with pytest.raises(EngineConfigError, match=r"'gate_features' is torch\.bfloat16 out of the condition"):
        ts.shared_dtypes(condition, step)
    assert ts.torch_dtype_for("BF16") is torch.bfloat16 and ts.torch_dtype_for("FLOAT") is torch.float32
    with pytest.raises(EngineConfigError, match="FP4"):
        ts.torch_dtype_for("FP4")


class _FakeRunner:
    def __init__(self, inputs: tuple[str, ...], outputs: tuple[str, ...], dtype: torch.dtype) -> None:
        self.input_names, self.output_names, self._dtype = inputs, outputs, dtype

    def dtype(self, name: str) -> torch.dtype:
        return self._dtype

    def bind(self, batch: int, tensors: Mapping[str, torch.Tensor]) -> None: ...

    def run(self, batch: int) -> None: ...


# ---- engine: the decode, driven by torch runners --------------------------------------------------
class TorchGraph:
    """A GraphRunner over an exported torch graph (ConditionGraph / StepGraph): what the plans compute."""

    def __init__(self, module: nn.Module, inputs: list[str], outputs: list[str], dtype: torch.dtype) -> None:
        self.module = module
        self.input_names, self.output_names = tuple(inputs), tuple(outputs)
        self._dtype = dtype
        self._bound: dict[int, Mapping[str, torch.Tensor]] = {}
        self.runs: list[int] = []

    def dtype(self, name: str) -> torch.dtype:
        return (
            torch.float32
            if name in ("latent", "text", "x_t", "t_scaled", "sigma", "velocity")
            else self._dtype
        )

    def bind(self, batch: int, tensors: Mapping[str, torch.Tensor]) -> None:
        self._bound[batch] = tensors

    def run(self, batch: int) -> None:
        tensors = self._bound[batch]
        outputs = self.module(**{name: tensors[name] for name in self.input_names})
        outputs = (outputs,) if isinstance(outputs, torch.Tensor) else outputs
        for name, value in zip(self.output_names, outputs, strict=True):
            tensors[name].copy_(value)
        self.runs.append(batch)


def _decoder(
    net: PiDNet, profile: ShapeProfile, device: torch.device = CPU, cuda_graphs: bool = False
) -> tuple[te.StaticDecoder, TorchGraph, TorchGraph]:
    cond_in, cond_out = condition_io_names(net, profile.text_tokens)
    step_in, step_out = step_io_names(net, profile.text_tokens)
    condition = TorchGraph(ConditionGraph(net, profile.image_size), cond_in, cond_out, net.dtype)
    step = TorchGraph(StepGraph(net, profile.image_size, profile.text_tokens), step_in, step_out, net.dtype)
    return te.StaticDecoder(net.cfg, profile, condition, step, device, cuda_graphs), condition, step


def _batch(cfg: PiDConfig, size: int, text_tokens: int, steps: int = 4) -> DecodeBatch:
    g = torch.Generator().manual_seed(7)
    scale = cfg.latent_downsample * cfg.sr_scale
    latents = torch.randn(size, cfg.latent_channels, 64 // scale, 64 // scale, generator=g)
    text = torch.randn(size, text_tokens, cfg.text_dim, generator=g) if text_tokens else None
    return DecodeBatch(latents, torch.linspace(0, 0.5, size), torch.arange(size) + 11, text, steps)


def _reference(net: PiDNet, batch: DecodeBatch, device: torch.device = CPU) -> torch.Tensor:
    # The noise comes from per-sample generators on the decoding device: a CUDA generator draws other
    # numbers than a CPU one for the same seed, so a GPU decode is checked against a GPU reference.
    net = net.to(device)
    noises = seeded_noises(batch.seeds, (batch.size, 3, 64, 64), batch.steps, device)
    text = None if batch.text is None else batch.text.to(device)
    with torch.no_grad():
        x = sample(
            net, batch.latents.to(device), batch.sigmas.to(device), text, steps=batch.steps, noises=noises
        )
    return to_uint8_hwc(x).cpu()


def _agree(a: torch.Tensor, b: torch.Tensor) -> None:
    """Within 1 uint8 level on more than 99.9% of the values (batched matmuls may round differently)."""
    assert a.shape == b.shape and a.dtype == b.dtype == torch.uint8
    diff = (a.int() - b.int()).abs()
    assert (diff <= 1).float().mean().item() > 0.999
    assert diff.max().item() <= 2


@pytest.mark.parametrize("steps", [4, 2])
def test_static_decode_equals_the_model_sampler(tiny_v15: PiDNet, steps: int) -> None:
    profile = ShapeProfile((64, 64), (1, 2, 4), text_tokens=3)
    decoder, condition, step = _decoder(tiny_v15, profile)
    batch = _batch(tiny_v15.cfg, 4, text_tokens=3, steps=steps)
    result = decoder.decode(batch)
    assert result.images.shape == (4, 64, 64, 3) and result.images.dtype == torch.uint8
    assert {"h2d", "noise", "decode", "d2h", "total"} <= set(result.timings)
    assert condition.runs == [4] and step.runs == [4] * steps
    # A full built batch computes exactly what the model's sampler computes.
    assert torch.equal(result.images, _reference(tiny_v15, batch))


def test_a_partial_batch_is_padded_to_the_next_built_size(tiny_v15: PiDNet) -> None:
    profile = ShapeProfile((64, 64), (1, 2, 4), text_tokens=3)
    decoder, condition, step = _decoder(tiny_v15, profile)
    batch = _batch(tiny_v15.cfg, 3, text_tokens=3)
    result = decoder.decode(batch)
    assert result.images.shape == (3, 64, 64, 3)
    assert condition.runs == [4] and step.runs == [4] * 4  # 3 samples run at the built size 4
    _agree(result.images, _reference(tiny_v15, batch))


def test_padding_rows_do_not_change_a_sample(tiny_v15: PiDNet) -> None:
    profile = ShapeProfile((64, 64), (1, 2, 4), text_tokens=3)
    decoder, _, _ = _decoder(tiny_v15, profile)
    batch = _batch(tiny_v15.cfg, 3, text_tokens=3)
    assert batch.text is not None
    together = decoder.decode(batch).images
    alone = decoder.decode(
        DecodeBatch(batch.latents[1:2], batch.sigmas[1:2], batch.seeds[1:2], batch.text[1:2])
    ).images
    _agree(together[1:2], alone)
    # A second decode at the same size reuses the buffers and gives the same bytes ...
    again = decoder.decode(batch).images
    assert torch.equal(again, together)
    # ... and a result is the caller's own: the next decode into the same buffers does not change it.
    snapshot = again.clone()
    decoder.decode(DecodeBatch(batch.latents, batch.sigmas, batch.seeds + 7, batch.text))
    assert torch.equal(again, snapshot)


def test_a_static_decoder_tiles_larger_outputs_in_its_built_window(tiny_v15: PiDNet) -> None:
    """A 192x192 output through an engine built for 64x64: 9 windows, 3 rows per chunk, the condition
    and step plans run per chunk and step on the buffers of one built batch size."""
    profile = ShapeProfile((64, 64), (1, 3), text_tokens=3)
    decoder, condition, step = _decoder(tiny_v15, profile)
    g = torch.Generator().manual_seed(3)
    batch = DecodeBatch(
        torch.randn(1, 128, 3, 3, generator=g), torch.tensor([0.2]), torch.tensor([5]),
        torch.randn(1, 3, tiny_v15.cfg.text_dim, generator=g),
    )  # fmt: skip
    plan = Tiling(True, (64, 64), 0).plan((192, 192), (64, 64), tiny_v15.cfg.output_scale)
    assert plan is not None and plan.count == 9
    result = decoder.decode_tiled(plan, batch)
    assert result.images.shape == (1, 192, 192, 3) and result.windows == 9
    assert condition.runs == step.runs == [3] * 12  # 3 chunks of 3 windows x 4 steps
    noises = seeded_noises(batch.seeds, (1, 3, 192, 192), 4, CPU)
    with torch.no_grad():
        expected = sample_tiled(
            tiny_v15, batch.latents, batch.sigmas, batch.text, 4, (64, 64), 0, noises, window_batch=3
        )
    _agree(result.images, to_uint8_hwc(expected))


def test_decoder_warmup_runs_every_batch_size() -> None:
    net = PiDNet(PiDConfig.preset("tiny_v1")).eval()
    decoder, condition, step = _decoder(net, ShapeProfile((64, 64), (1, 2)))
    decoder.warmup(steps=4)
    assert condition.runs == [1, 2] and step.runs == [1] * 4 + [2] * 4


def test_engine_checks_the_manifest_first(tmp_path: Path) -> None:
    with pytest.raises(EngineConfigError, match=r"no manifest\.json"):
        te.TensorRTEngine(tmp_path)
    write_manifest(_manifest([ShapeProfile((64, 64), (1, 2))]), tmp_path)
    with pytest.raises(EngineConfigError, match="runs on a CUDA device, not cpu"):
        te.TensorRTEngine(tmp_path, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without a GPU")
def test_engine_without_a_gpu(tmp_path: Path) -> None:
    write_manifest(_manifest([ShapeProfile((64, 64), (1, 2))]), tmp_path)
    with pytest.raises(EngineConfigError, match="no CUDA GPU"):
        te.TensorRTEngine(tmp_path)


# ---- on a GPU -----------------------------------------------------------------------------------
@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_replay_equals_eager_decode() -> None:
    net = _net("tiny_v1.5").cuda()
    profile = ShapeProfile((64, 64), (1, 2, 4), text_tokens=3)
    eager, _, _ = _decoder(net, profile, torch.device("cuda"), cuda_graphs=False)
    graphed, condition, _ = _decoder(net, profile, torch.device("cuda"), cuda_graphs=True)
    batch = _batch(net.cfg, 3, text_tokens=3)
    first = graphed.decode(batch).images  # captures (batch 4, 4 steps), then replays
    assert first.is_pinned()
    _agree(first, eager.decode(batch).images)
    runs = len(condition.runs)
    assert torch.equal(graphed.decode(batch).images, first)
    assert len(condition.runs) == runs  # the second decode replayed the graph: no Python-side run
    other = _batch(net.cfg, 2, text_tokens=3)
    _agree(graphed.decode(other).images, eager.decode(other).images)
    _agree(first, _reference(_net("tiny_v1.5"), batch, torch.device("cuda")))


@pytest.mark.gpu
@needs_tensorrt
def test_tensorrt_engine_end_to_end(tmp_path: Path) -> None:
    from pidserve.engines.build import export_onnx

    net = _net("tiny_v1.5").eval()
    _, capability = current_gpu()
    gpu_class = next((c for c in GPU_CLASSES.values() if c.compute_capability == capability), None)
    if gpu_class is None:
        pytest.skip(f"no GPU class has compute capability {capability}")
    checkpoint = tmp_path / "model.safetensors"
    save_checkpoint(net, checkpoint)
    profile = ShapeProfile((64, 64), (1, 2, 4), text_tokens=3)
    graphs = export_onnx(net, tmp_path / "onnx", profile)
    manifest = tb.build_engines(
        graphs,
        tmp_path / "engine",
        gpu_class,
        "fp32",
        checkpoint=checkpoint,
        timing_cache=tmp_path / "t.cache",
    )
    assert (tmp_path / "engine" / "condition.plan").is_file() and (tmp_path / "t.cache").is_file()
    assert manifest.precision == "fp32" and read_manifest(tmp_path / "engine") == manifest
    engine = te.TensorRTEngine(tmp_path / "engine")
    engine.warmup()
    batch = _batch(net.cfg, 3, text_tokens=3)
    images = engine.decode(batch).images
    _agree(images, _reference(net, batch))
    assert torch.equal(engine.decode(batch).images, images)
    engine.close()
