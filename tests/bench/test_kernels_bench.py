"""`pidserve bench kernels` on the CPU: the implementations that run here, their bytes, the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pidserve.bench.kernels import KernelSetup, available_impls, bench_kernels
from pidserve.cli import app
from pidserve.model import PiDConfig


def _setup(**overrides) -> KernelSetup:
    fields = dict(cfg=PiDConfig.preset("pid-tiny"), image_size=(64, 96), batch=2, warmup=1, repeat=2)
    return KernelSetup(**(fields | overrides))


def test_every_runnable_implementation_is_timed_and_checked_against_the_reference() -> None:
    rows = bench_kernels(_setup())
    assert [(r.operation, r.impl) for r in rows] == [
        ("postprocess", "torch"),
        ("postprocess", "torch-compile"),
        ("pixel-modulation", "torch"),
        ("pixel-modulation", "torch-compile"),
        ("copy", "torch"),
    ]
    post, _, modulation, compiled_modulation, copy = rows
    # bf16 [2, 3, 64, 96] read once, uint8 [2, 64, 96, 3] written once
    assert post.shape == [2, 3, 64, 96] and post.bytes_moved == 2 * 3 * 64 * 96 * 2 + 2 * 64 * 96 * 3
    assert post.max_abs_diff == 0.0
    # pid-tiny (v3): 8x8 patches of 16 channels; 2 * (64/8) * (96/8) = 192 patches
    assert modulation.shape == [192, 64, 16] and modulation.bytes_moved == 4 * 192 * 64 * 16 * 2
    assert compiled_modulation.max_abs_diff < 0.1  # bf16 rounding of a differently fused computation
    assert copy.bytes_moved == 2 * 192 * 64 * 16 * 2 and copy.max_abs_diff == 0.0
    for row in rows:
        assert 0 < row.ms_median <= row.ms_p90
        assert row.gbytes_per_s == pytest.approx(row.bytes_moved / (row.ms_median / 1e3) / 1e9)


def test_the_triton_kernel_is_offered_only_on_a_gpu() -> None:
    assert "triton" not in available_impls("postprocess", torch.device("cpu"))
    with pytest.raises(ValueError, match="triton postprocess kernel needs a CUDA device"):
        bench_kernels(_setup(), ("postprocess",), ("triton",))
    with pytest.raises(ValueError, match=r"unknown operation\(s\) \['softmax'\]"):
        bench_kernels(_setup(), ("softmax",))


def test_bench_kernels_command_writes_its_report(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["bench", "kernels", "--size", "64x64", "--repeat", "2", "--warmup", "1"]
    result = runner.invoke(
        app, [*args, "--operations", "postprocess", "--impls", "torch", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "kernels.json").read_text())
    assert [(r["operation"], r["impl"]) for r in report["results"]] == [("postprocess", "torch")]
    assert "| postprocess | torch | cpu | bfloat16 | 1x3x64x64 |" in (tmp_path / "kernels.md").read_text()

    refused = runner.invoke(app, [*args, "--impls", "triton", "--out", str(tmp_path)])
    assert refused.exit_code == 2 and "needs a CUDA device with Triton" in refused.output
    refused = runner.invoke(app, [*args, "--precision", "fp8"])
    assert refused.exit_code == 2 and "--precision must be fp32 or bf16" in refused.output


def test_attention_kernels_are_timed_in_tflops_at_the_models_shapes() -> None:
    # On the CPU: PyTorch's own choice (the reference), flash and math, at pid-tiny's attention shapes.
    cfg = PiDConfig.preset("pid-tiny")
    rows = bench_kernels(_setup(), ("patch-attention", "pixel-attention"))
    assert [(r.operation, r.impl) for r in rows] == [
        ("patch-attention", "torch"),
        ("patch-attention", "flash"),
        ("patch-attention", "math"),
        ("pixel-attention", "torch"),
        ("pixel-attention", "flash"),
        ("pixel-attention", "math"),
    ]
    tokens = (64 // cfg.patch_size) * (96 // cfg.patch_size)
    patch, pixel = rows[0], rows[3]
    assert patch.shape == [2, cfg.num_heads, tokens, cfg.head_dim]
    assert pixel.shape == [2, cfg.pixel_num_heads, tokens, cfg.pixel_head_dim]
    # as model/flops.py counts them: 2 x 2 x L x L x (heads x head_dim) per image
    assert patch.flops == 2 * 2 * 2 * tokens * tokens * cfg.hidden_size
    for row in rows:
        assert row.tflops_per_s == pytest.approx(row.flops / (row.ms_median / 1e3) / 1e12)
        assert row.max_abs_diff < 0.05  # bf16 rounding of another kernel's summation order


def test_attention_kernels_that_cannot_run_are_skipped_with_a_reason(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # cudnn and efficient exist only on CUDA: asked for on the CPU, they are not offered at all ...
    rows = bench_kernels(_setup(), ("patch-attention",), ("torch", "cudnn"))
    assert [r.impl for r in rows] == ["torch"]
    with pytest.raises(ValueError, match=r"unknown implementation\(s\) \['fa3'\]"):
        bench_kernels(_setup(), ("patch-attention",), ("fa3",))
    # ... and a kernel that refuses the shape (as cuDNN does some head dims on some GPUs) is logged and
    # skipped. Simulated on the CPU by pinning "flash" to a kernel the CPU does not have.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pidserve.bench import kernels

    monkeypatch.setattr(
        kernels, "attention_context", lambda kernel: sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION)
    )
    rows = bench_kernels(_setup(), ("patch-attention",), ("torch", "flash"))
    assert [r.impl for r in rows] == ["torch"]
    assert "patch-attention flash skipped: No viable backend" in caplog.text

    # Any other error (on a GPU, e.g. an illegal memory access that breaks every later call) stops the run.
    def broken(kernel: str):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(kernels, "attention_context", broken)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        bench_kernels(_setup(), ("patch-attention",), ("torch", "flash"))
