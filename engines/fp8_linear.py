"""FP8 matmuls for the PyTorch backends (`--precision fp8` on torch and torch-compile), and the FP8
layer policy every FP8 path shares (which layers stay BF16, and why).

The network runs in BF16 except its big matmuls, which run on FP8 (E4M3) tensor cores through
`torch._scaled_mm`:

    weight      quantized once, when the engine opens: E4M3 with one scale per output channel
    activation  quantized on the fly, per call: E4M3 with one scale per row (per token),
                scale = max|row| / 448, so each token uses the whole E4M3 range
    output      (x_q @ w_q.T) * scale_x * scale_w, accumulated in FP32, written in BF16; + bias

Dynamic, per-row scaling needs no calibration data. That is the difference from the TensorRT FP8
path (engines/build/quantize.py), whose per-tensor scales are static, calibrated by ModelOpt on
latents. Both keep the same sensitive layers in BF16 (DEFAULT_EXCLUDE, below). FP8 pays where
matrix multiplies dominate, which in PiD are the patch blocks' attention projections and SwiGLU
MLPs (and the pixel blocks' patch-level attention). The rest is small or sensitive:
    patch_embedder, pixel_embedder   first layers, reading raw pixels (pixel_embedder has K = 3)
    time_embedder, text_embedder     tiny, and they set every modulation of every block
    adapter                          the latent trunk runs once per decode, in the condition graph
    gates, pixel_gate                sigma-aware injection of the latent: small, and its scale
                                     decides how much of the latent reaches the image
    pixel_blocks.*.modulation        per-pixel shift/scale/gate (x 6 * 16 * 256 outputs): errors
                                     here land directly on individual pixels
    final_layer                      writes the velocity itself (16 -> 3)
Here (TORCH_FP8_EXCLUDE), in addition:
    patch_blocks.*.modulation_*   read one conditioning vector per sample (M = batch size):
                                  nothing for FP8 tensor cores to speed up
    layers with a dimension < MIN_FEATURES, or not a multiple of 16
                                  FP8 tensor cores take multiples of 16, and small matmuls (the
                                  pixel blocks' per-pixel 16 -> 64 -> 16 MLP) are memory bound:
                                  quantizing their input would cost more than the matmul saves

Under torch.compile, Inductor fuses the activation quantization (abs-max, divide, cast) into
one pass and lowers `_scaled_mm` to cuBLASLt (or its own Triton template in max-autotune).

Row-wise scales need torch's row-wise `_scaled_mm`: CUDA GPUs of compute capability >= 8.9
(Ada, Hopper, Blackwell), and the CPU in torch 2.13 (torch 2.11's CPU kernel takes only per-tensor
scales). `check_fp8_matmul` tries one tiny product on the device at engine start and
refuses the device with a clear message where it fails; there is no fallback to BF16.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .base import EngineConfigError
from .gpu_classes import check_precision, current_gpu

FP8_DTYPE = torch.float8_e4m3fn
FP8_E4M3_MAX = 448.0  # the largest E4M3 value
MIN_FEATURES = 128
# Matmul dimensions FP8 tensor cores (and cuBLASLt's FP8 kernels) require to be multiples of.
FP8_ALIGNMENT = 16
# Keeps an all-zero row's scale finite (its quantized values are then all zero, as they should be).
_MIN_AMAX = 1e-12

# ---- the FP8 layer policy ---------------------------------------------------------------------------
# Module-name patterns (fnmatch; a pattern that names a module covers everything inside it).
DEFAULT_EXCLUDE: tuple[str, ...] = (
    "patch_embedder",
    "pixel_embedder",
    "time_embedder",
    "text_embedder",
    "adapter",
    "gates",
    "pixel_gate",
    "pixel_blocks.*.modulation",
    "final_layer",
)
TORCH_FP8_EXCLUDE: tuple[str, ...] = (*DEFAULT_EXCLUDE, "patch_blocks.*.modulation_*")


def is_excluded(module_name: str, patterns: Sequence[str]) -> bool:
    """Whether a module, or one of the modules containing it, matches an exclusion pattern.

    "adapter" excludes "adapter.trunk.0"; "pixel_blocks.*.modulation" excludes
    "pixel_blocks.1.modulation" only.
    """
    parts = module_name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes for pattern in patterns)


# ---- FP8 Linear layers on the torch backends --------------------------------------------------------
class Float8Linear(nn.Module):
    """A Linear layer whose matmul runs in FP8: E4M3 weights (per output channel scales) and E4M3
    activations (per row scales, computed on each call). Input and output are BF16."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        """weight: E4M3 [out, in]; scale: float32 [1, out] (dequantization multipliers); bias: [out]."""
        super().__init__()
        self.in_features = int(weight.shape[1])
        self.out_features = int(weight.shape[0])
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Float8Linear:
        """Quantize a Linear layer's weight (per output channel); the bias is kept in BF16."""
        weight, scale = quantize_rowwise(linear.weight.detach())
        bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        return cls(weight, scale.reshape(1, -1), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] == 0:  # e.g. the text stream of a request without text; _scaled_mm refuses M = 0
            return x.new_zeros(*x.shape[:-1], self.out_features)
        x_fp8, x_scale = quantize_rowwise(rows)
        out = torch._scaled_mm(
            x_fp8,
            self.weight.t(),  # [in, out], column-major: the layout _scaled_mm takes for its second operand
            scale_a=x_scale,
            scale_b=self.weight_scale,
            out_dtype=torch.bfloat16,
        )
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (E4M3 [M, K], float32 [M, 1]) with x ~= x_fp8 * scale, row by row.

    The math is in float32: scale = max|row| / 448, then x / scale rounded to the nearest E4M3 value
    (the cast saturates nothing: |x / scale| <= 448 by construction, clamped against rounding).
    """
    x = x.float()
    amax = x.abs().amax(dim=1, keepdim=True).clamp(min=_MIN_AMAX)
    scale = amax / FP8_E4M3_MAX
    quantized = (x / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)
    return quantized, scale


@dataclass
class Fp8Conversion:
    """What `convert_to_fp8` did: which Linear layers run in FP8, and which stayed BF16 and why."""

    converted: list[str]
    kept_bf16: dict[str, str]  # layer name -> reason

    def summary(self) -> str:
        return f"{len(self.converted)} Linear layers in FP8, {len(self.kept_bf16)} kept in BF16"


def fp8_eligible(name: str, linear: nn.Linear, exclude: tuple[str, ...] = TORCH_FP8_EXCLUDE) -> str | None:
    """None when this Linear layer should run in FP8; otherwise the reason it stays BF16."""
    if is_excluded(name, exclude):
        pattern = next(p for p in exclude if is_excluded(name, [p]))
        return f"excluded by {pattern!r}"
    dims = (linear.in_features, linear.out_features)
    if min(dims) < MIN_FEATURES:
        return f"too small ({dims[0]} -> {dims[1]}; FP8 pays from {MIN_FEATURES} features)"
    if any(d % FP8_ALIGNMENT for d in dims):
        return f"{dims[0]} -> {dims[1]} is not a multiple of {FP8_ALIGNMENT} (FP8 tensor cores need it)"
    return None


def convert_to_fp8(net: nn.Module, exclude: tuple[str, ...] = TORCH_FP8_EXCLUDE) -> Fp8Conversion:
    """Replace, in place, every eligible nn.Linear of a BF16 network by a Float8Linear.

    Call it after the network is on its device and in BF16 (a later `.to(dtype)` would cast the
    FP8 weights). Layers already converted are left as they are (and listed as converted), so
    converting twice is harmless.
    """
    converted: list[str] = []
    kept: dict[str, str] = {}
    for name, module in list(net.named_modules()):
        if isinstance(module, Float8Linear):  # converted by an earlier call
            converted.append(name)
            continue
        if not isinstance(module, nn.Linear):
            continue
        reason = fp8_eligible(name, module, exclude)
        if reason is not None:
            kept[name] = reason
            continue
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        setattr(parent, child, Float8Linear.from_linear(module))
        converted.append(name)
    return Fp8Conversion(converted, kept)


def has_fp8_layers(net: nn.Module) -> bool:
    """Whether `convert_to_fp8` has already run on this network."""
    return any(isinstance(module, Float8Linear) for module in net.modules())


def check_fp8_matmul(device: torch.device) -> None:
    """Raise EngineConfigError unless row-wise FP8 matmuls run on `device` with this torch build."""
    if device.type == "cuda":
        name, capability = current_gpu(device)
        check_precision("fp8", capability, name)
    a = torch.ones(FP8_ALIGNMENT, FP8_ALIGNMENT, device=device)
    try:
        product = Float8Linear.from_linear(_probe_linear(device))(a.to(torch.bfloat16))
    except (RuntimeError, NotImplementedError) as exc:
        raise EngineConfigError(
            f"torch {torch.__version__} cannot run row-wise FP8 matmuls on {device} "
            f"({str(exc).splitlines()[0][:200]}). FP8 on the torch backends needs a CUDA GPU of compute "
            "capability >= 8.9 (or torch 2.13 on the CPU); use --precision bf16."
        ) from exc
    if not torch.isfinite(product).all():
        raise EngineConfigError(
            f"FP8 matmul self-test on {device} gave non-finite values; use --precision bf16"
        )


def _probe_linear(device: torch.device) -> nn.Linear:
    linear = nn.Linear(FP8_ALIGNMENT, FP8_ALIGNMENT, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.fill_(0.5)
        linear.bias.zero_()
    return linear
