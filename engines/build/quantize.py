"""FP8 quantization for TensorRT: ModelOpt calibration on latents, export with FP8 Q/DQ nodes.

    net --(bf16, CUDA)--> ModelOpt FP8 (mtq.FP8_DEFAULT_CFG: per-tensor E4M3 weights and inputs of
        every Linear/Conv; plus Q, K, V and the softmax output of every attention, the inputs of its
        two batched matmuls), calibrated by decoding calibration latents with the real sampler
        --> excluded layers' quantizers switched off (they stay BF16)
        --> condition.onnx + step.onnx + export.json (quantization recorded) in out_dir
        --> tensorrt_build.build_engines(graphs, ..., precision="fp8")

Which layers stay BF16 (DEFAULT_EXCLUDE), and why, is the FP8 layer policy both FP8 paths share:
engines/fp8_linear.py states it.

Calibration data: latents from the encoder the model decodes (a safetensors file with
"latents" [N, C, h, w], optional "sigmas" [N] and "text" [N, Lt, text_dim]). Random normal latents
are a documented fallback, used only when asked for explicitly (random_calibration=True): they
match a normalised latent's first two moments but not its structure, so activation ranges,
and with them FP8 scales, differ from real decodes.

The export is export.py's `export_onnx` (torch.export), where ModelOpt's quantizers appear as the
custom op tensorrt::quantize_op; a translation table turns each into ONNX QuantizeLinear/DequantizeLinear
with an FP8 E4M3 zero point (ONNX opset 19), which TensorRT's ONNX parser builds into FP8 kernels.
ModelOpt and TensorRT are imported lazily; a build quantizes on an NVIDIA GPU with compute capability
>= 8.9 (never run there yet: the lent GPU machines have neither TensorRT nor ModelOpt). ModelOpt's fake
quantization also runs on the CPU, so the exclusion plan, the calibration, the Q/DQ export and the
exported graph's agreement with ModelOpt are tested there with the real library.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from pidserve.model import PiDConfig, PiDNet, sample

from ..base import EngineConfigError, ShapeProfile
from ..fp8_linear import DEFAULT_EXCLUDE, FP8_E4M3_MAX, is_excluded
from ..gpu_classes import ComputeCapability, check_precision, current_gpu
from .export import ExportedGraphs, export_onnx

log = logging.getLogger(__name__)

FP8_OPSET = 19  # QuantizeLinear / DequantizeLinear take FLOAT8E4M3FN from opset 19 on
MODELOPT_INSTALL_HINT = 'install NVIDIA ModelOpt with `pip install "pidserve[tensorrt]"`'

QUANTIZABLE_TYPES = (nn.Linear, nn.Conv2d)  # what ModelOpt's FP8 config quantizes in this network
# The quantization points of one attention (model/layers.attention): the inputs of both batched matmuls.
ATTENTION_QUANTIZERS = ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer", "softmax_quantizer")


# ---- which layers are quantized (the policy: fp8_linear.DEFAULT_EXCLUDE) --------------------------
@dataclass
class QuantizationPlan:
    """Which of a network's Linear/Conv layers get FP8 and which stay in BF16."""

    quantized: list[str]
    excluded: list[str]
    unmatched_patterns: list[str]  # patterns that matched nothing (e.g. "pixel_gate" on a v1 net)


def quantization_plan(net: nn.Module, exclude: Sequence[str] = DEFAULT_EXCLUDE) -> QuantizationPlan:
    """Split the network's quantizable layers by the exclusion patterns."""
    layers = [name for name, module in net.named_modules() if isinstance(module, QUANTIZABLE_TYPES)]
    excluded = [name for name in layers if is_excluded(name, exclude)]
    quantized = [name for name in layers if name not in set(excluded)]
    all_modules = [name for name, _ in net.named_modules() if name]
    unmatched = [p for p in exclude if not any(is_excluded(name, [p]) for name in all_modules)]
    return QuantizationPlan(quantized, excluded, unmatched)


def quantizer_filter(exclude: Sequence[str]) -> Callable[[str], bool]:
    """ModelOpt filter: True for quantizers (named "<module>.input_quantizer" etc.) of excluded modules."""

    def excluded(quantizer_name: str) -> bool:
        module_name = quantizer_name.rsplit(".", 1)[0] if "." in quantizer_name else ""
        return bool(module_name) and is_excluded(module_name, exclude)

    return excluded


# ---- ModelOpt -------------------------------------------------------------------------------------
def import_modelopt() -> ModuleType:
    """modelopt.torch.quantization (mtq); EngineConfigError naming the pip extra if it is missing."""
    try:
        import modelopt.torch.quantization as mtq
    except ImportError as exc:
        raise EngineConfigError(
            f"FP8 quantization needs NVIDIA ModelOpt, which is not installed; {MODELOPT_INSTALL_HINT}"
        ) from exc
    return mtq


# ---- calibration data ----------------------------------------------------------------------------
@dataclass
class CalibrationData:
    """What the calibration decodes: latents float32 [N, C, h, w], sigmas [N], text [N, Lt, text_dim]."""

    latents: torch.Tensor
    sigmas: torch.Tensor
    text: torch.Tensor | None
    source: str  # a file path, "tensors", or "random"

    @property
    def size(self) -> int:
        return int(self.latents.shape[0])


def load_calibration_file(path: str | Path) -> CalibrationData:
    """Calibration data from a safetensors file: "latents" (required), "sigmas", "text" (optional)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise EngineConfigError(f"calibration file {path} does not exist")
    tensors = load_file(str(path))
    if "latents" not in tensors:
        raise EngineConfigError(f"{path} has no 'latents' tensor (found: {sorted(tensors)})")
    latents = tensors["latents"].float()
    sigmas = tensors.get("sigmas", torch.zeros(latents.shape[0])).float()
    text = tensors["text"].float() if "text" in tensors else None
    return CalibrationData(latents, sigmas, text, source=str(path))


def calibration_data(
    cfg: PiDConfig,
    profile: ShapeProfile,
    data: CalibrationData | None = None,
    *,
    random_calibration: bool = False,
    random_count: int = 32,
    seed: int = 0,
) -> CalibrationData:
    """Checked calibration data for one profile.

    Real latents (`data`) are the norm. Random latents only when random_calibration=True, never
    silently: without both, this raises and says how to provide either.
    """
    if data is not None and random_calibration:
        raise EngineConfigError("pass calibration latents or ask for random calibration, not both")
    if data is None and not random_calibration:
        raise EngineConfigError(
            "FP8 calibration needs latents from the encoder this model decodes (a safetensors file with "
            "'latents' [N, C, h, w]); pass them, or explicitly ask for random normal latents "
            "(random_calibration=True / --random-calibration), which calibrates worse"
        )
    latent_hw = profile.latent_size(cfg.output_scale)
    if data is None:
        log.warning(
            "calibrating FP8 on %d random normal latents (explicitly requested): expect lower FP8 "
            "quality than calibration on real latents",
            random_count,
        )
        generator = torch.Generator().manual_seed(seed)
        latents = torch.randn(random_count, cfg.latent_channels, *latent_hw, generator=generator)
        text = None
        if profile.text_tokens:
            text = torch.randn(random_count, profile.text_tokens, cfg.text_dim, generator=generator)
        return CalibrationData(latents, torch.zeros(random_count), text, source="random")
    _check_calibration_shapes(cfg, profile, data, latent_hw)
    return data


def _check_calibration_shapes(
    cfg: PiDConfig, profile: ShapeProfile, data: CalibrationData, latent_hw: tuple[int, int]
) -> None:
    latents = data.latents
    expected = [cfg.latent_channels, *latent_hw]
    if latents.ndim != 4 or list(latents.shape[1:]) != expected or latents.shape[0] < 1:
        raise EngineConfigError(
            f"calibration latents must be [N, {expected[0]}, {expected[1]}, {expected[2]}] for "
            f"{profile.image_size[0]}x{profile.image_size[1]} outputs (scales depend on the output size); "
            f"got {list(latents.shape)}"
        )
    n = latents.shape[0]
    if data.sigmas.shape != (n,) or bool(((data.sigmas < 0) | (data.sigmas > 1)).any()):
        raise EngineConfigError(f"calibration sigmas must be [{n}] in [0, 1]; got {list(data.sigmas.shape)}")
    if profile.text_tokens:
        want = (n, profile.text_tokens, cfg.text_dim)
        if data.text is None or tuple(data.text.shape) != want:
            got = None if data.text is None else list(data.text.shape)
            raise EngineConfigError(
                f"this profile has {profile.text_tokens} text tokens: calibration text must be "
                f"{list(want)}, got {got}"
            )
    elif data.text is not None:
        raise EngineConfigError("this profile takes no text tokens, but calibration text was given")


def calibration_forward_loop(
    data: CalibrationData, batch_size: int = 1, steps: int = 4, seed: int = 0
) -> Callable[[nn.Module], None]:
    """ModelOpt's forward_loop: decode every calibration latent with the student sampler.

    Each decode runs the condition once and `steps` network evaluations, so the quantizers see
    the activations of every sampler time, as served.
    """

    def forward_loop(model: nn.Module) -> None:
        if not isinstance(model, PiDNet):
            raise TypeError(f"calibration decodes a PiDNet, got {type(model).__name__}")
        device, dtype = model.device, model.dtype
        generator = torch.Generator(device=device).manual_seed(seed)
        batches = math.ceil(data.size / batch_size)
        with torch.no_grad():
            for i in range(batches):
                rows = slice(i * batch_size, (i + 1) * batch_size)
                text = None if data.text is None else data.text[rows].to(device, dtype)
                sample(
                    model,
                    data.latents[rows].to(device),
                    data.sigmas[rows].to(device),
                    text,
                    steps=steps,
                    generator=generator,
                )
                log.info("calibration batch %d/%d", i + 1, batches)

    return forward_loop


# ---- FP8 attention: Q/DQ on both BMMs --------------------------------------------------------------
def attention_modules(net: nn.Module, exclude: Sequence[str] = DEFAULT_EXCLUDE) -> list[str]:
    """The attention modules (those with a `bmm_quantizers` slot) outside the excluded ones."""
    return [
        name
        for name, module in net.named_modules()
        if hasattr(module, "bmm_quantizers") and not is_excluded(name, exclude)
    ]


def attach_attention_quantizers(net: nn.Module, exclude: Sequence[str] = DEFAULT_EXCLUDE) -> list[str]:
    """Give every attention module outside `exclude` its four ModelOpt TensorQuantizers (configured and
    calibrated by mtq.quantize with fp8_config's rules); returns the modules' names."""
    import_modelopt()
    from modelopt.torch.quantization.nn import TensorQuantizer

    names = attention_modules(net, exclude)
    for name in names:
        quantizers = nn.Module()
        for quantizer in ATTENTION_QUANTIZERS:
            setattr(quantizers, quantizer, TensorQuantizer())
        net.get_submodule(name).bmm_quantizers = quantizers
    return names


def fp8_config(mtq: ModuleType, attention: bool = True) -> dict[str, Any]:
    """ModelOpt's FP8_DEFAULT_CFG (per-tensor E4M3 weights and inputs of every Linear/Conv), plus, with
    `attention`, per-tensor E4M3 for the attention BMM quantizers (rules apply in order: appended last,
    they re-enable what the config's leading "*": disabled switches off)."""
    config = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    if attention:
        config["quant_cfg"] = [
            *config["quant_cfg"],
            *(
                {"quantizer_name": f"*{name}", "cfg": {"num_bits": (4, 3), "axis": None}}
                for name in ATTENTION_QUANTIZERS
            ),
        ]
    return config


# ---- quantization (GPU) ---------------------------------------------------------------------------
def quantize_fp8(
    net: PiDNet,
    data: CalibrationData,
    *,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    batch_size: int = 1,
    steps: int = 4,
    compute_capability: ComputeCapability | None = None,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    attention: bool = True,
) -> PiDNet:
    """Quantize `net` in place to FP8 with ModelOpt, calibrated on `data`; excluded layers stay BF16.

    attention: also quantize both batched matmuls of every attention outside `exclude` (Q, K, V and
    the softmax output, per-tensor E4M3: the Q/DQ pattern of TensorRT's FP8 attention); the
    exported attention is then the explicit MatMul/Softmax/MatMul form instead of SDPA.

    The network is moved to `device` in `dtype` first (for a build: the GPU, bfloat16): the layers
    left unquantized run in the dtype of the exported graph. ModelOpt's fake quantization also runs
    on the CPU, which the tests use (fp32, so ONNX Runtime can check the exported graph). Never run
    on a GPU yet (the GPU machines have no ModelOpt): needs compute capability >= 8.9.
    """
    if compute_capability is None:
        gpu_name, compute_capability = current_gpu()
    else:
        gpu_name = "this GPU"
    check_precision("fp8", compute_capability, gpu_name)
    mtq = import_modelopt()
    plan = quantization_plan(net, exclude)
    for pattern in plan.unmatched_patterns:
        log.info("exclusion pattern %r matches no module of this network", pattern)
    log.info(
        "FP8: %d layers quantized, %d kept in BF16; calibrating on %d latents from %s",
        len(plan.quantized),
        len(plan.excluded),
        data.size,
        data.source,
    )
    net = net.to(device=device, dtype=dtype).eval()
    config = fp8_config(mtq, attention)
    if attention:
        # mtq.quantize converts Linear/Conv modules only in a network holding no quantizer yet, and
        # applies the config to the quantizers already there otherwise: convert first (weights only,
        # nothing is decoded), then add the attention quantizers, then configure and calibrate all.
        net = mtq.quantize(net, config, forward_loop=None)
        log.info("FP8 attention in %d modules", len(attach_attention_quantizers(net, exclude)))
    # ModelOpt's documented flow: insert quantizers and calibrate, then switch off the excluded ones.
    quantized = mtq.quantize(net, config, calibration_forward_loop(data, batch_size, steps))
    mtq.disable_quantizer(quantized, quantizer_filter(exclude))
    enabled = [name for name, module in quantized.named_modules() if getattr(module, "is_enabled", False)]
    log.info("FP8 quantizers enabled: %d", len(enabled))
    if not isinstance(quantized, PiDNet):
        raise TypeError(f"ModelOpt returned a {type(quantized).__name__}, expected the PiDNet it was given")
    return quantized


# ---- export with FP8 Q/DQ ------------------------------------------------------------------------
def fp8_qdq_translation() -> Callable[..., Any]:
    """ONNX translation of tensorrt::quantize_op (FP8 E4M3 only): QuantizeLinear -> DequantizeLinear.

    scale = amax / 448 in the input's dtype (DequantizeLinear returns the scale's dtype, so the
    graph keeps its BF16/FP32 type); the FLOAT8E4M3FN zero point makes the quantized type FP8.
    amax is reduced to a scalar: a per-tensor scale is what the FP8 config calibrates.
    """
    import onnx
    from onnxscript import opset19 as op

    zero_point = onnx.helper.make_tensor("fp8_zero_point", onnx.TensorProto.FLOAT8E4M3FN, [], [0])

    def quantize_op(
        inputs: Any,
        amax: Any,
        num_bits: int = 8,
        exponent_bits: int = 4,
        unsigned: bool = False,
        narrow_range: bool = False,
    ) -> Any:
        if (num_bits, exponent_bits) != (8, 4):
            raise ValueError(
                f"only FP8 E4M3 exports to ONNX here, got num_bits={num_bits} exponent_bits={exponent_bits}"
            )
        scale = op.CastLike(
            op.Div(op.ReduceMax(amax, keepdims=0), op.Constant(value_float=FP8_E4M3_MAX)), inputs
        )
        quantized = op.QuantizeLinear(inputs, scale, op.Constant(value=zero_point))
        return op.DequantizeLinear(quantized, scale)

    return quantize_op


def modelopt_quantize_op() -> Any:
    """ModelOpt's quantizer op as torch.export records it (registered when ModelOpt is imported)."""
    import_modelopt()
    return torch.ops.tensorrt.quantize_op.default


def modelopt_export_mode() -> AbstractContextManager[object]:
    """ModelOpt's switch for tracing its quantizers with torch.export. Without it a *disabled*
    quantizer (an excluded layer's) leaves a FakeTensor constant in the exported program, which the
    ONNX exporter's constant folding cannot read (".numpy() is not supported for tensor subclasses");
    found by exporting a really quantized network, ModelOpt 0.47."""
    import_modelopt()
    from modelopt.torch.quantization.utils import export_torch_mode

    return export_torch_mode()


def export_quantized_graphs(
    net: PiDNet,
    out_dir: str | Path,
    profile: ShapeProfile,
    quantize_op: Any = None,
    quantization: dict[str, Any] | None = None,
) -> ExportedGraphs:
    """Export condition.onnx and step.onnx (export.py's export_onnx) with FP8 Q/DQ nodes: opset 19,
    weights always beside the graphs.

    quantize_op: the op the quantizers trace to (default: ModelOpt's tensorrt::quantize_op).
    quantization: what goes into export.json under "quantization" (format "fp8" marks the
    export as an FP8 one for tensorrt_build).
    """
    op = quantize_op if quantize_op is not None else modelopt_quantize_op()
    with modelopt_export_mode() if quantize_op is None else nullcontext():
        return export_onnx(
            net,
            out_dir,
            profile,
            opset=FP8_OPSET,
            translation_table={op: fp8_qdq_translation()},
            external_data=True,
            quantization={"format": "fp8", **(quantization or {})},
        )


def quantize_fp8_and_export(
    net: PiDNet,
    profile: ShapeProfile,
    out_dir: str | Path,
    *,
    calibration: CalibrationData | str | Path | None = None,
    random_calibration: bool = False,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    batch_size: int = 1,
    steps: int = 4,
    attention: bool = True,
) -> ExportedGraphs:
    """Calibrate, quantize and export: the FP8 graphs `build_engines(..., precision="fp8")` builds.
    attention: FP8 attention too (Q/DQ on both BMMs of every attention outside `exclude`).

    calibration: CalibrationData or a safetensors file of latents (see load_calibration_file);
    random_calibration=True (and no calibration) calibrates on random latents instead.
    Not run yet: needs an NVIDIA GPU (compute capability >= 8.9) with ModelOpt.
    """
    if isinstance(calibration, (str, Path)):
        calibration = load_calibration_file(calibration)
    data = calibration_data(net.cfg, profile, calibration, random_calibration=random_calibration)
    quantized = quantize_fp8(
        net, data, exclude=exclude, batch_size=batch_size, steps=steps, attention=attention
    )
    record = {
        "exclude": list(exclude),
        "attention": attention,
        "calibration": {"source": data.source, "samples": data.size, "steps": steps},
    }
    return export_quantized_graphs(quantized, out_dir, profile, quantization=record)
