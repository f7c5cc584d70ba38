"""Backends against each other: the same seed and inputs give the same image on every backend."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pidserve.engines import (
    DecodeAbandoned,
    DecodeBatch,
    EngineConfigError,
    EngineInputError,
    ShapeProfile,
    open_engine,
)
from pidserve.engines.base import seeded_noises
from pidserve.engines.build import export_onnx, opset_for_tensorrt, verify_export
from pidserve.engines.build.export import ATTENTION_OP_OPSET
from pidserve.model import PiDConfig, PiDNet, load_checkpoint, sample, to_uint8_hwc
from tests.conftest import OFFICIAL


def _net(name: str) -> PiDNet:
    return load_checkpoint(OFFICIAL / name / "weights.safetensors", PiDConfig.preset(name))


def _batch(
    cfg: PiDConfig, size: int = 2, text_tokens: int = 0, image_hw: tuple[int, int] = (64, 64)
) -> DecodeBatch:
    g = torch.Generator().manual_seed(42)
    scale = cfg.latent_downsample * cfg.sr_scale
    latents = torch.randn(size, cfg.latent_channels, image_hw[0] // scale, image_hw[1] // scale, generator=g)
    text = torch.randn(size, text_tokens, cfg.text_dim, generator=g) if text_tokens else None
    sigmas = torch.linspace(0, 0.6, size)
    return DecodeBatch(latents, sigmas, torch.arange(size, dtype=torch.int64) + 100, text, steps=4)


def _agree(a: torch.Tensor, b: torch.Tensor) -> None:
    """Within 1 uint8 level on more than 99.9% of the values (and never more than 2 levels)."""
    assert a.shape == b.shape and a.dtype == b.dtype == torch.uint8
    diff = (a.int() - b.int()).abs()
    assert (diff <= 1).float().mean().item() > 0.999
    assert diff.max().item() <= 2


@pytest.fixture(scope="module")
def tiny_v15() -> PiDNet:
    return _net("tiny_v1.5")


def test_torch_engine_equals_the_model_sampler(tiny_v15: PiDNet) -> None:
    engine = open_engine("torch", net=tiny_v15)
    batch = _batch(tiny_v15.cfg, text_tokens=3)
    result = engine.decode(batch)
    assert result.images.shape == (2, 64, 64, 3) and result.images.dtype == torch.uint8
    assert {"h2d", "noise", "condition", "steps", "postprocess", "d2h", "total"} <= set(result.timings)
    noises = seeded_noises(batch.seeds, (2, 3, 64, 64), 4, torch.device("cpu"))
    with torch.no_grad():
        expected = to_uint8_hwc(sample(tiny_v15, batch.latents, batch.sigmas, batch.text, noises=noises))
    assert torch.equal(result.images, expected)


def test_a_sample_decodes_the_same_alone_or_in_a_batch(tiny_v15: PiDNet) -> None:
    engine = open_engine("torch", net=tiny_v15)
    batch = _batch(tiny_v15.cfg, size=3)
    together = engine.decode(batch).images
    alone = engine.decode(DecodeBatch(batch.latents[1:2], batch.sigmas[1:2], batch.seeds[1:2])).images
    # Same noise (per-sample seeds); only float rounding of batched matmuls may differ (BLAS blocks
    # by batch size), so pixels agree to 1 level — bit-exact only for identical batch composition.
    _agree(together[1:2], alone)
    assert torch.equal(
        alone, engine.decode(DecodeBatch(batch.latents[1:2], batch.sigmas[1:2], batch.seeds[1:2])).images
    )
    other_seed = engine.decode(
        DecodeBatch(batch.latents[1:2], batch.sigmas[1:2], batch.seeds[1:2] + 1)
    ).images
    assert not torch.equal(alone, other_seed)


def test_capabilities_reject_what_the_engine_cannot_decode(tiny_v15: PiDNet) -> None:
    engine = open_engine("torch", net=tiny_v15, max_batch=2)
    cfg = tiny_v15.cfg
    good = _batch(cfg)
    cases = [
        (
            DecodeBatch(torch.randn(1, 16, 2, 2), torch.zeros(1), torch.zeros(1, dtype=torch.int64)),
            "128, h, w",
        ),
        (_batch(cfg, size=3), r"batch size 3 is outside 1\.\.2"),
        (DecodeBatch(good.latents, good.sigmas, good.seeds, steps=5), "steps=5 is not supported"),
        (DecodeBatch(good.latents, torch.zeros(3), good.seeds), r"sigmas and seeds must have shape \[2\]"),
        (DecodeBatch(good.latents, good.sigmas, good.seeds, text=torch.randn(2, 32)), "text must be"),
    ]
    for batch, message in cases:
        with pytest.raises(EngineInputError, match=message):
            engine.decode(batch)
    assert engine.decode(good).images.shape[0] == 2  # the engine still works afterwards


def test_backend_and_precision_choices_are_explicit(tiny_v15: PiDNet) -> None:
    with pytest.raises(EngineConfigError, match="unknown backend 'tensorflow'"):
        open_engine("tensorflow", net=tiny_v15)
    with pytest.raises(EngineConfigError, match="runs precision fp32, bf16, fp8, not 'fp16'"):
        open_engine("torch", net=tiny_v15, precision="fp16")
    with pytest.raises(EngineConfigError, match="compile_mode is for the torch-compile backend only"):
        open_engine("torch", net=tiny_v15, compile_mode="reduce-overhead")
    with pytest.raises(EngineConfigError, match="engine directory built by `pidserve build`"):
        open_engine("tensorrt")
    with pytest.raises(EngineConfigError, match="runs on the CPU in fp32"):
        open_engine("onnxruntime", net=tiny_v15, device="cuda")
    if not torch.cuda.is_available():
        with pytest.raises(EngineConfigError, match="CUDA is not available"):
            open_engine("torch", net=tiny_v15, device="cuda")


def test_bf16_torch_engine_stays_close_to_fp32() -> None:
    net = _net("tiny_v1")
    batch = _batch(net.cfg)
    fp32 = open_engine("torch", net=net).decode(batch).images
    bf16 = open_engine("torch", net=_net("tiny_v1"), precision="bf16").decode(batch).images
    assert (fp32.int() - bf16.int()).abs().float().mean() < 4.0


@pytest.fixture(scope="module")
def onnx_export(tiny_v15: PiDNet, tmp_path_factory: pytest.TempPathFactory):
    profile = ShapeProfile(image_size=(64, 64), batch_sizes=(1, 2), text_tokens=3)
    return export_onnx(tiny_v15, tmp_path_factory.mktemp("onnx"), profile)


def test_onnx_export_matches_pytorch(tiny_v15: PiDNet, onnx_export) -> None:
    assert verify_export(tiny_v15, onnx_export, batch=2) < 1e-4
    assert verify_export(tiny_v15, onnx_export, batch=1) < 1e-4  # the batch axis is dynamic


def test_onnxruntime_engine_matches_torch(tiny_v15: PiDNet, onnx_export) -> None:
    batch = _batch(tiny_v15.cfg, text_tokens=3)
    ort_images = open_engine("onnxruntime", engine_dir=onnx_export.directory).decode(batch).images
    _agree(ort_images, open_engine("torch", net=tiny_v15).decode(batch).images)


def test_onnxruntime_engine_only_serves_its_profile(onnx_export) -> None:
    engine = open_engine("onnxruntime", engine_dir=onnx_export.directory)
    caps = engine.capabilities
    assert caps.image_sizes == ((64, 64),) and caps.text_tokens == (3,) and caps.max_batch == 2
    with pytest.raises(
        EngineInputError, match="output size 128x128 is not built into this engine; built: 64x64"
    ):
        engine.decode(_batch(PiDConfig.preset("tiny_v1.5"), size=1, text_tokens=3, image_hw=(128, 128)))
    with pytest.raises(EngineInputError, match="0 text tokens given; this engine was built for"):
        engine.decode(
            DecodeBatch(torch.randn(1, 128, 1, 1), torch.zeros(1), torch.zeros(1, dtype=torch.int64))
        )


def test_onnxruntime_engine_needs_an_export(tmp_path: Path) -> None:
    with pytest.raises(EngineConfigError, match="not an ONNX export"):
        open_engine("onnxruntime", engine_dir=tmp_path)


def test_torch_compile_matches_eager_on_cpu() -> None:
    net = _net("tiny_v1")
    batch = _batch(net.cfg)
    eager = open_engine("torch", net=net).decode(batch).images
    compiled = open_engine("torch-compile", net=_net("tiny_v1")).decode(batch).images
    _agree(compiled, eager)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_compile_cuda_graph_replays_match_eager_on_gpu() -> None:
    net = _net("tiny_v1")
    batch = _batch(net.cfg)
    eager = open_engine("torch", net=net, device="cuda").decode(batch).images
    # mode "default", explicitly: max-autotune-no-cudagraphs autotunes every matmul shape, 139 s for
    # this tiny network on an H100; this test is about graph capture and replay.
    engine = open_engine("torch-compile", net=_net("tiny_v1"), device="cuda", compile_mode="default")
    first = engine.decode(batch).images  # captures
    again = engine.decode(batch).images  # replays
    assert torch.equal(first, again)
    _agree(first, eager)
    # The result is the caller's own pinned copy, not a view of the graph's static output buffer.
    assert first.is_pinned()
    snapshot = first.clone()
    engine.decode(DecodeBatch(batch.latents, batch.sigmas, batch.seeds + 1))
    assert torch.equal(first, snapshot)


def test_served_batch_sizes_pad_partial_batches(tiny_v15: PiDNet) -> None:
    engine = open_engine("torch", net=tiny_v15, batch_sizes=(1, 2, 4), image_sizes=((64, 64),))
    caps = engine.capabilities
    assert caps.batch_sizes == (1, 2, 4) and caps.max_batch == 4
    batch = _batch(tiny_v15.cfg, size=3)
    padded = engine.decode(batch).images  # runs at batch 4, returns 3 images
    assert padded.shape[0] == 3
    _agree(padded, open_engine("torch", net=tiny_v15).decode(batch).images)
    with pytest.raises(EngineInputError, match="output size 128x128 is not built into this engine"):
        engine.decode(_batch(tiny_v15.cfg, size=1, image_hw=(128, 128)))


def test_torch_compile_warmup_needs_served_sizes(tiny_v15: PiDNet, caplog: pytest.LogCaptureFixture) -> None:
    engine = open_engine("torch-compile", net=tiny_v15)
    engine.warmup()  # nothing to warm without served sizes: it says so instead of guessing a shape
    assert "no served image sizes" in caplog.text


def test_warmup_uses_the_text_length_requests_will_carry(tiny_v15: PiDNet, monkeypatch) -> None:
    # A server with a text encoder sends text_max_length tokens with every request: warm exactly that
    # shape, or torch.compile / CUDA-graph capture would happen on the first real request.
    engine = open_engine("torch-compile", net=tiny_v15, batch_sizes=(1, 2), image_sizes=((64, 64),))
    seen: list[tuple[int, int | None]] = []
    monkeypatch.setattr(
        engine, "decode", lambda b: seen.append((b.size, None if b.text is None else b.text.shape[1]))
    )
    engine.warmup(text_tokens=7)
    assert seen == [(1, 7), (2, 7)]
    seen.clear()
    engine.warmup()
    assert seen == [(1, None), (2, None)]


def test_warmup_refuses_a_text_length_the_engine_was_not_built_for(tiny_v15: PiDNet, tmp_path: Path) -> None:
    profile = ShapeProfile((64, 64), (1,), text_tokens=0)
    engine = open_engine("onnxruntime", net=tiny_v15, profile=profile, cache_dir=tmp_path)
    with pytest.raises(EngineConfigError, match="rebuild it with --text-tokens 5"):
        engine.warmup(text_tokens=5)
    engine.warmup(text_tokens=0)  # the built length is fine


def test_warmup_covers_every_batch_size_up_to_max_when_none_are_listed(tiny_v15: PiDNet, monkeypatch) -> None:
    # Found by `bench http` on torch-compile: only batch 1 was warmed, so the first batch of 2, 3, 4
    # compiled under live traffic (20 s p90). Every size a request mix can produce is warmed now.
    engine = open_engine("torch-compile", net=tiny_v15, max_batch=3, image_sizes=((64, 64),))
    seen: list[int] = []
    monkeypatch.setattr(engine, "decode", lambda b: seen.append(b.size))
    engine.warmup()
    assert seen == [1, 2, 3]
    eager = open_engine("torch", net=tiny_v15, max_batch=2)
    sizes: list[int] = []
    monkeypatch.setattr(eager, "decode", lambda b: sizes.append(b.size))
    eager.warmup()
    assert sizes == [1, 2]


def test_attention_backend_choices_are_checked_up_front(tiny_v15: PiDNet, tmp_path: Path) -> None:
    with pytest.raises(EngineConfigError, match="unknown attention backend 'fa3'; choose one of auto, flash"):
        open_engine("torch", net=tiny_v15, attention_backend="fa3")
    with pytest.raises(
        EngineConfigError, match="cudnn attention does not run on cpu; there: auto, flash, math"
    ):
        open_engine("torch-compile", net=tiny_v15, attention_backend="cudnn")
    with pytest.raises(EngineConfigError, match="chosen by the torch backends only; the onnxruntime backend"):
        open_engine("onnxruntime", net=tiny_v15, attention_backend="flash", cache_dir=tmp_path)
    with pytest.raises(EngineConfigError, match="captures its own CUDA graphs"):
        open_engine("torch-compile", net=tiny_v15, compile_mode="reduce-overhead")


def test_the_chosen_attention_backend_is_in_force_while_the_network_runs(tiny_v15: PiDNet) -> None:
    # sdpa_kernel switches torch's process-wide SDPA flags; read them from inside the network's forward.
    seen: list[tuple[bool, bool]] = []

    def record(module: torch.nn.Module, args: object) -> None:
        seen.append((torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()))

    hook = tiny_v15.patch_blocks[0].register_forward_pre_hook(record)
    try:
        batch = _batch(tiny_v15.cfg, text_tokens=3)
        images = {}
        for choice in ("auto", "math", "flash"):
            seen.clear()
            images[choice] = open_engine("torch", net=tiny_v15, attention_backend=choice).decode(batch).images
            assert len(seen) == 4  # one velocity evaluation per step
            flags = set(seen)
            assert (
                flags
                == {
                    "auto": {(True, True)},
                    "math": {(False, True)},
                    "flash": {(True, False)},
                }[choice]
            ), choice
        # the flags are restored after each decode
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    finally:
        hook.remove()
    _agree(images["math"], images["auto"])
    _agree(images["flash"], images["auto"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cudnn_attention_decodes_like_flash_attention_on_gpu() -> None:
    # The decision to prefer cuDNN attention needs it to be right as well as fast: same seed, same
    # inputs, bf16, eager and under torch-compile's CUDA graph; and the pinned kernel must be the one that
    # actually ran. torch-compile is profiled on its second decode, a graph replay (CUPTI reports the
    # kernels of a replayed graph one by one), so that compilation and capture run unprofiled.
    from torch.profiler import ProfilerActivity, profile

    def kernels_of(engine, batch: DecodeBatch) -> tuple[torch.Tensor, str]:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            images = engine.decode(batch).images
        return images, " ".join(event.name.lower() for event in prof.events())

    net = _net("tiny_v1")
    batch = _batch(net.cfg)
    flash = open_engine("torch", net=net, device="cuda", precision="bf16", attention_backend="flash")
    reference, flash_kernels = kernels_of(flash, batch)
    assert "flash" in flash_kernels and "cudnn" not in flash_kernels
    for backend in ("torch", "torch-compile"):
        engine = open_engine(
            backend, net=_net("tiny_v1"), device="cuda", precision="bf16", attention_backend="cudnn"
        )
        if backend == "torch-compile":
            engine.decode(batch)  # compiles and captures
        images, kernels = kernels_of(engine, batch)
        assert "cudnn" in kernels and "flash_fwd" not in kernels, backend
        assert images.is_pinned()  # the device-to-host copy lands in pinned memory
        diff = (images.int() - reference.int()).abs()
        # bf16 through 4 steps: two kernels that sum in different orders drift by a level or two here
        # and there (the bf16-vs-fp32 test allows a mean of 4 levels), never systematically
        assert diff.float().mean() < 1.0 and (diff <= 2).float().mean() > 0.99, backend


@pytest.mark.parametrize("backend", ["torch", "torch-compile", "onnxruntime"])
def test_an_abandoned_batch_stops_between_sampler_steps(tiny_v15: PiDNet, onnx_export, backend) -> None:
    """`DecodeBatch.abandoned` is asked before every step; the first True stops the decode there."""
    asked: list[int] = []

    def abandoned_after_one_step() -> bool:
        asked.append(1)
        return len(asked) >= 2

    kwargs = {"engine_dir": onnx_export.directory} if backend == "onnxruntime" else {"net": tiny_v15}
    engine = open_engine(backend, **kwargs)
    batch = _batch(tiny_v15.cfg, text_tokens=3)
    batch.abandoned = abandoned_after_one_step
    with pytest.raises(DecodeAbandoned):
        engine.decode(batch)
    assert len(asked) == 2  # asked before step 1 (go on) and before step 2 (stop): 3 steps never ran
    batch.abandoned = lambda: False
    assert engine.decode(batch).images.shape == (2, 64, 64, 3)  # the engine is fine afterwards


@pytest.fixture(scope="module")
def attention_op_export(tiny_v15: PiDNet, tmp_path_factory: pytest.TempPathFactory):
    profile = ShapeProfile(image_size=(64, 64), batch_sizes=(1, 2), text_tokens=3)
    return export_onnx(tiny_v15, tmp_path_factory.mktemp("onnx23"), profile, opset=ATTENTION_OP_OPSET)


def test_the_attention_op_export_keeps_attention_fused_and_matches_pytorch(
    tiny_v15: PiDNet, onnx_export, attention_op_export
) -> None:
    """Opset 23: every attention is one ONNX `Attention` node (TensorRT >= 10.14's fused layer); opset 18
    splits it. onnxruntime runs both on the CPU, within float rounding of PyTorch."""
    import collections

    import onnx

    def ops(path) -> collections.Counter:
        return collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node)

    fused, split = ops(attention_op_export.step), ops(onnx_export.step)
    assert fused["Attention"] >= tiny_v15.cfg.patch_depth and fused["Softmax"] == 0
    assert split["Attention"] == 0 and split["Softmax"] >= tiny_v15.cfg.patch_depth
    assert verify_export(tiny_v15, attention_op_export, batch=2) < 1e-4
    batch = _batch(tiny_v15.cfg, text_tokens=3)
    images = open_engine("onnxruntime", engine_dir=attention_op_export.directory).decode(batch).images
    _agree(images, open_engine("torch", net=tiny_v15).decode(batch).images)


@pytest.mark.parametrize(
    ("version", "opset"), [("10.8.0.43", 18), ("10.13.3.9", 18), ("10.14.1", 23), ("11.4.0", 23)]
)
def test_the_export_opset_follows_the_tensorrt_version(version: str, opset: int) -> None:
    assert opset_for_tensorrt(version) == opset


def test_auto_attention_pins_the_measured_fastest_kernel_where_one_was_measured(monkeypatch) -> None:
    from pidserve.engines import attention

    for capability, row in attention.MEASURED_FASTEST.items():  # every row is a real kernel with figures
        assert row.kernel in attention.SDPA_BACKENDS and row.tflops > row.runner_up_tflops > 0, capability
        assert row.date and row.command.startswith("pidserve bench kernels")
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(attention, "MEASURED_FASTEST", {})
    assert attention.resolve_attention_backend("auto", cuda) == "auto"  # nothing measured: PyTorch decides
    row = attention.KernelMeasurement(
        "cudnn", 400.0, "flash", 320.0, "H100", "2026-12-02", "pidserve bench kernels"
    )
    monkeypatch.setattr(attention, "MEASURED_FASTEST", {(9, 0): row})
    assert attention.resolve_attention_backend("auto", cuda) == "cudnn"
    assert attention.resolve_attention_backend("flash", cuda) == "flash"  # a pin is never overridden
    assert attention.resolve_attention_backend("auto", torch.device("cpu")) == "auto"
