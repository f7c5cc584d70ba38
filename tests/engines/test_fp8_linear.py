"""FP8 matmuls on the torch backends: quantization error bounds, which layers convert, engine quality."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pidserve.engines import DecodeBatch, EngineConfigError, open_engine
from pidserve.engines.fp8_linear import (
    Float8Linear,
    check_fp8_matmul,
    convert_to_fp8,
    quantize_rowwise,
)
from pidserve.model.default import encode_image as encode_with_tiny_ae
from pidserve.model.default import load_default_autoencoder, load_default_decoder


def _rowwise_fp8_runs_on_cpu() -> bool:
    try:
        check_fp8_matmul(torch.device("cpu"))
    except EngineConfigError:
        return False
    return True


needs_cpu_fp8 = pytest.mark.skipif(
    not _rowwise_fp8_runs_on_cpu(),
    reason=f"torch {torch.__version__} has no row-wise FP8 matmul on the CPU (torch 2.13 has one)",
)


def test_rowwise_quantization_error_is_within_e4m3_rounding() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g) * torch.logspace(-3, 3, 64)[:, None]  # rows of every magnitude
    q, scale = quantize_rowwise(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    restored = q.float() * scale
    # E4M3 keeps 3 mantissa bits: rounding is within 1/16 of a value; below 2**-6 * scale the
    # subnormal step is 2**-9 * scale.
    bound = x.abs() / 16 + scale * 2**-10
    assert ((restored - x).abs() <= bound + 1e-12).all()
    # each row's largest magnitude lands exactly on E4M3's largest value, 448
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((64,), 448.0))


def test_an_all_zero_row_quantizes_to_zeros_with_a_finite_scale() -> None:
    q, scale = quantize_rowwise(torch.zeros(2, 32))
    assert torch.isfinite(scale).all() and not q.float().any()


@needs_cpu_fp8
def test_float8_linear_stays_close_to_the_bf16_layer() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(256, 384).to(torch.bfloat16)
    x = torch.randn(3, 50, 256, dtype=torch.bfloat16)
    fp8 = Float8Linear.from_linear(linear)
    out, ref = fp8(x).float(), linear(x).float()
    assert out.shape == (3, 50, 384) and fp8(x).dtype == torch.bfloat16
    # two E4M3 roundings (weight and activation), each about 2-3 % relative, mostly averaging out
    assert (out - ref).norm() / ref.norm() < 0.05


def test_conversion_keeps_small_excluded_and_per_sample_layers_in_bf16() -> None:
    net = load_default_decoder().to(torch.bfloat16)
    conversion = convert_to_fp8(net)
    converted = set(conversion.converted)
    # the patch blocks' attention matmuls (128 wide in pid-tiny) run in FP8; their MLPs are 341 wide
    assert "patch_blocks.0.attn.qkv_x" in converted and "patch_blocks.3.attn.proj_y" in converted
    assert conversion.kept_bf16["patch_blocks.3.mlp_x.w2"] == (
        "341 -> 128 is not a multiple of 16 (FP8 tensor cores need it)"
    )
    assert isinstance(net.get_submodule("patch_blocks.0.attn.qkv_x"), Float8Linear)
    kept = conversion.kept_bf16
    assert kept["patch_blocks.0.modulation_img"] == "excluded by 'patch_blocks.*.modulation_*'"
    assert kept["final_layer.linear"].startswith("excluded by 'final_layer'")
    assert kept["pixel_blocks.0.mlp.fc1"].startswith("too small (16 -> ")  # pid-tiny v3: pixel width 16
    assert isinstance(net.get_submodule("pixel_blocks.0.mlp.fc1"), nn.Linear)
    assert conversion.summary() == f"{len(converted)} Linear layers in FP8, {len(kept)} kept in BF16"
    # a second pass changes nothing and reports the same layers
    weight = net.get_submodule("patch_blocks.0.attn.qkv_x").weight
    again = convert_to_fp8(net)
    assert again.converted == conversion.converted and again.kept_bf16 == kept
    assert net.get_submodule("patch_blocks.0.attn.qkv_x").weight is weight


def _photo_latents() -> DecodeBatch:
    """Two real latents: tiny-ae encodings of structured 64x64 images (what the default decodes)."""
    ys, xs = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    stripes = torch.stack([(xs * 4) % 256, (ys * 4) % 256, ((xs + ys) * 2) % 256], dim=-1)
    disc = (((xs - 32) ** 2 + (ys - 24) ** 2) < 300).to(torch.int64)[..., None] * torch.tensor([200, 60, 30])
    ae = load_default_autoencoder()
    latents = torch.cat([encode_with_tiny_ae(ae, img.to(torch.uint8)) for img in (stripes, disc + 20)])
    return DecodeBatch(latents, torch.zeros(2), torch.tensor([7, 8]), None, steps=4)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.double() - b.double()).pow(2).mean().item()
    return 10 * torch.log10(torch.tensor(255.0**2 / max(mse, 1e-12))).item()


@needs_cpu_fp8
def test_fp8_engine_decodes_close_to_bf16_on_the_embedded_default() -> None:
    batch = _photo_latents()
    bf16 = open_engine("torch", net=load_default_decoder(), precision="bf16").decode(batch).images
    engine = open_engine("torch", net=load_default_decoder(), precision="fp8")
    assert engine.capabilities.precision == "fp8"
    fp8 = engine.decode(batch).images
    assert fp8.shape == bf16.shape == (2, 256, 256, 3)
    # measured 48.6 dB, as close as bf16 is to fp32 (48.2 dB); the model itself is ~19 dB from a photo
    assert _psnr(fp8, bf16) > 40.0


@needs_cpu_fp8
def test_fp8_torch_compile_matches_fp8_eager_on_cpu() -> None:
    batch = _photo_latents()
    eager = open_engine("torch", net=load_default_decoder(), precision="fp8").decode(batch).images
    compiled = open_engine("torch-compile", net=load_default_decoder(), precision="fp8").decode(batch).images
    assert _psnr(compiled, eager) > 40.0  # fused quantization may round a few values differently


@needs_cpu_fp8
def test_engines_share_a_converted_network_only_in_fp8() -> None:
    """bench engine opens torch and torch-compile on one network; the second finds it converted."""
    net = load_default_decoder()
    open_engine("torch", net=net, precision="fp8")
    weight = net.get_submodule("patch_blocks.0.attn.qkv_x").weight
    open_engine("torch-compile", net=net, precision="fp8")
    assert net.get_submodule("patch_blocks.0.attn.qkv_x").weight.dtype == torch.float8_e4m3fn
    assert torch.equal(weight.float(), net.get_submodule("patch_blocks.0.attn.qkv_x").weight.float())
    with pytest.raises(EngineConfigError, match="converted to FP8 by another engine; load it again for bf16"):
        open_engine("torch", net=net, precision="bf16")


def test_a_device_without_fp8_matmuls_is_refused_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    """What torch 2.11 on the CPU answers (its _scaled_mm takes per-tensor scales only)."""

    def per_tensor_only(*args, **kwargs):
        raise RuntimeError("Now _scaled_mm only supports per-tensor scaling for CPU backend.\nmore")

    monkeypatch.setattr(torch, "_scaled_mm", per_tensor_only)
    with pytest.raises(EngineConfigError, match=r"row-wise FP8 matmuls on cpu .*per-tensor scaling"):
        open_engine("torch", net=load_default_decoder(), precision="fp8")
    with pytest.raises(EngineConfigError, match="use --precision bf16"):
        check_fp8_matmul(torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9)",
)
def test_fp8_on_the_gpu_decodes_close_to_bf16_eager_and_under_cuda_graphs() -> None:
    batch = _photo_latents()
    bf16 = open_engine("torch", net=load_default_decoder(), precision="bf16", device="cuda").decode(batch)
    eager = open_engine("torch", net=load_default_decoder(), precision="fp8", device="cuda").decode(batch)
    compiled = open_engine(
        "torch-compile", net=load_default_decoder(), precision="fp8", device="cuda", compile_mode="default"
    )
    first, replayed = compiled.decode(batch).images, compiled.decode(batch).images  # capture, then replay
    assert torch.equal(first, replayed)
    assert _psnr(eager.images, bf16.images) > 40.0 and _psnr(first, eager.images) > 40.0
