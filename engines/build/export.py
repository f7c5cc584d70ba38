"""ONNX export of PiD as two graphs per output size: `condition.onnx` and `step.onnx`.

A decode runs `condition` once (adapter trunk + heads, text projection) and `step` once per
sampler step; the sampler arithmetic between steps stays outside the graphs (in torch), so
every backend shares one implementation of it (`pidserve.model.sampler.student_steps`).

Graph contract (names are what ONNX Runtime and TensorRT bind; B is dynamic, all else static):
  condition.onnx
    inputs : latent [B, C, h, w] f32, text [B, Lt, text_dim] f32 (only if Lt > 0)
    outputs: gate_features [G, B, L, D], pixel_feature [B, L, D] (v1.5 only),
             text_tokens [B, Lt, D] (only if Lt > 0)
  step.onnx
    inputs : x_t [B, 3, H, W] f32, t_scaled [B] f32, sigma [B] f32, gate_features,
             pixel_feature (v1.5), text_tokens (Lt > 0)
    outputs: velocity [B, 3, H, W] f32
Position tables (RoPE, pixel sin-cos) depend only on the static sizes and are stored in the
step graph as constants. The names and batch axes live in trt_support (the TensorRT runtime binds
them without importing this module).

One export, with options: the plain one (fp32 or bf16 graphs; opset 18 splits attention, opset 23
keeps it one `Attention` op: opset_for_tensorrt) and quantize.py's FP8 one
(opset 19, ModelOpt's quantizer op translated to Q/DQ nodes, weights beside the graphs, the
quantization recorded in export.json) are the same `export_onnx`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pidserve.model import Conditioning, PiDNet

from ..base import ShapeProfile
from ..trt_support import batch_axis, condition_io_names, step_io_names

log = logging.getLogger(__name__)
# The exporter's optimiser logs every pass at INFO; keep a user's console for what matters.
for _noisy in ("onnxscript", "onnx_ir"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)

# Attention in the graphs. At opset 18 scaled_dot_product_attention exports split into MatMul, Softmax,
# MatMul; from opset 23 as ONNX's `Attention` op, which TensorRT >= 10.14 maps onto its fused
# attention layer (IAttention) and onnxruntime (1.32 here) runs on the CPU. Over half of a 2k decode's
# FLOPs are attention, so the fused form is what a TensorRT build wants where the TensorRT has it.
OPSET = 18
ATTENTION_OP_OPSET = 23
ATTENTION_OP_TENSORRT = (10, 14)  # the first TensorRT that parses the ONNX Attention op


def opset_for_tensorrt(trt_version: str) -> int:
    """The export opset for a TensorRT version: the Attention op where it has it, else the split form."""
    major_minor = tuple(int(part) for part in trt_version.split(".")[:2])
    return ATTENTION_OP_OPSET if major_minor >= ATTENTION_OP_TENSORRT else OPSET


class ConditionGraph(nn.Module):
    """`PiDNet.condition` as a module of plain tensors (what an exported graph can return)."""

    def __init__(self, net: PiDNet, image_size: tuple[int, int]) -> None:
        super().__init__()
        self.net = net
        self.image_size = image_size
        self.train(net.training)  # a fresh wrapper is in training mode; the exporter warns about it

    def forward(self, latent: torch.Tensor, text: torch.Tensor | None = None):
        # sigma only enters the gates (in the step graph); condition() just carries it along.
        sigma = latent.new_zeros(latent.shape[0])
        cond = self.net.condition(latent, sigma, text, image_size=self.image_size)
        outputs = [torch.stack(cond.gate_features)]
        if cond.pixel_feature is not None:
            outputs.append(cond.pixel_feature)
        if text is not None:
            outputs.append(cond.text)
        return tuple(outputs)


class StepGraph(nn.Module):
    """`PiDNet.velocity` for one static output size and text length, tables held as buffers."""

    def __init__(self, net: PiDNet, image_size: tuple[int, int], text_tokens: int) -> None:
        super().__init__()
        self.net = net
        self.image_size = image_size
        self.text_tokens = text_tokens
        grid = (image_size[0] // net.cfg.patch_size, image_size[1] // net.cfg.patch_size)
        device = net.device
        joint_cos, joint_sin = net.joint_rope_table(grid, text_tokens, device)
        pixel_cos, pixel_sin = net.pixel_rope_table(grid, device)
        self.register_buffer("joint_cos", joint_cos, persistent=False)
        self.register_buffer("joint_sin", joint_sin, persistent=False)
        self.register_buffer("pixel_cos", pixel_cos, persistent=False)
        self.register_buffer("pixel_sin", pixel_sin, persistent=False)
        self.register_buffer(
            "pixel_positions", net.pixel_position_features(*image_size, device), persistent=False
        )
        self.train(net.training)

    def conditioning(
        self,
        sigma: torch.Tensor,
        gate_features: torch.Tensor,
        pixel_feature: torch.Tensor | None,
        text_tokens: torch.Tensor | None,
    ) -> Conditioning:
        if text_tokens is None:
            batch = gate_features.shape[1]
            text_tokens = gate_features.new_zeros(batch, 0, gate_features.shape[-1])
        return Conditioning(
            gate_features=list(gate_features.unbind(0)),
            pixel_feature=pixel_feature,
            sigma=sigma,
            text=text_tokens,
            joint_rope=(self.joint_cos, self.joint_sin),
            pixel_rope=(self.pixel_cos, self.pixel_sin),
            pixel_positions=self.pixel_positions,
            image_size=self.image_size,
        )

    def forward(
        self,
        x_t: torch.Tensor,
        t_scaled: torch.Tensor,
        sigma: torch.Tensor,
        gate_features: torch.Tensor,
        pixel_feature: torch.Tensor | None = None,
        text_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cond = self.conditioning(sigma, gate_features, pixel_feature, text_tokens)
        return self.net.velocity(x_t, t_scaled, cond).float()


def _needs_external_data(module: nn.Module) -> bool:
    """ONNX protobufs stop at 2 GB: store weights beside the graph for full-size models."""
    size = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    return size > 1_500_000_000


@dataclass(frozen=True)
class ExportedGraphs:
    directory: Path
    profile: ShapeProfile
    condition: Path
    step: Path


def example_inputs(
    net: PiDNet, profile: ShapeProfile, batch: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Named example inputs of the condition and step graphs (random values, right shapes)."""
    cfg = net.cfg
    h, w = profile.latent_size(cfg.output_scale)
    device = net.device
    cond_inputs = {"latent": torch.randn(batch, cfg.latent_channels, h, w, device=device)}
    if profile.text_tokens:
        cond_inputs["text"] = torch.randn(batch, profile.text_tokens, cfg.text_dim, device=device)
    with torch.no_grad():
        cond_outputs = ConditionGraph(net, profile.image_size)(**cond_inputs)
    _, out_names = condition_io_names(net, profile.text_tokens)
    step_inputs = {
        "x_t": torch.randn(batch, 3, *profile.image_size, device=device),
        "t_scaled": torch.full((batch,), 500.0, device=device),
        "sigma": torch.full((batch,), 0.25, device=device),
        **dict(zip(out_names, cond_outputs, strict=True)),
    }
    return cond_inputs, step_inputs


def export_graph(
    module: nn.Module,
    inputs: dict[str, torch.Tensor],
    input_names: Sequence[str],
    output_names: Sequence[str],
    path: Path,
    translation_table: dict[Any, Callable[..., Any]] | None = None,
    max_batch: int = 1,
    *,
    opset: int = OPSET,
    external_data: bool | None = None,
) -> Path:
    """torch.export one module to ONNX with a dynamic batch axis (the one exporter call we make).

    translation_table: custom op -> ONNX translations (the FP8 export maps ModelOpt's quantize op).
    external_data: store weights beside the graph (default: only past ~1.5 GB, the protobuf limit).
    """
    batch = torch.export.Dim("batch", min=1, max=max(64, max_batch))
    shapes = {name: {batch_axis(name): batch} for name in input_names}
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            (),
            kwargs=inputs,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_shapes=shapes,
            opset_version=opset,
            dynamo=True,
            custom_translation_table=translation_table,
            verbose=False,
        )
    if program is None:
        raise RuntimeError(f"torch.onnx.export returned no program for {path}")
    program.save(
        str(path), external_data=_needs_external_data(module) if external_data is None else external_data
    )
    log.info("exported %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path


def export_onnx(
    net: PiDNet,
    out_dir: str | Path,
    profile: ShapeProfile,
    *,
    opset: int = OPSET,
    translation_table: dict[Any, Callable[..., Any]] | None = None,
    external_data: bool | None = None,
    quantization: dict[str, Any] | None = None,
) -> ExportedGraphs:
    """Export condition.onnx and step.onnx for one profile into out_dir (batch axis dynamic), and
    export.json (profile, config, opset; and `quantization` when given).

    opset, translation_table, external_data: as export_graph takes them. quantization: the record
    of a quantized export (quantize.py's FP8 export: {"format": "fp8", ...}, which tensorrt_build
    reads to tell FP8 graphs from plain ones); None for a plain export.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    net = net.eval()
    cond_inputs, step_inputs = example_inputs(net, profile, batch=max(2, profile.max_batch))
    cond_in, cond_out = condition_io_names(net, profile.text_tokens)
    step_in, step_out = step_io_names(net, profile.text_tokens)
    paths = {}
    for name, module, inputs, in_names, out_names in (
        ("condition", ConditionGraph(net, profile.image_size), cond_inputs, cond_in, cond_out),
        ("step", StepGraph(net, profile.image_size, profile.text_tokens), step_inputs, step_in, step_out),
    ):
        paths[name] = export_graph(
            module,
            inputs,
            in_names,
            out_names,
            out_dir / f"{name}.onnx",
            translation_table,
            profile.max_batch,
            opset=opset,
            external_data=external_data,
        )
    meta: dict[str, Any] = {"profile": asdict(profile), "config": net.cfg.to_dict(), "opset": opset}
    if quantization is not None:
        meta["quantization"] = quantization
    (out_dir / "export.json").write_text(json.dumps(meta, indent=2))
    return ExportedGraphs(out_dir, profile, paths["condition"], paths["step"])


def verify_export(net: PiDNet, graphs: ExportedGraphs, batch: int = 2) -> float:
    """Max |velocity difference| between ONNX Runtime (CPU) and PyTorch on random inputs.

    The inputs go through both graphs (condition, then step), exactly as a decode uses them.
    """
    import onnxruntime as ort

    cond_inputs, step_inputs = example_inputs(net, graphs.profile, batch)
    providers = ["CPUExecutionProvider"]
    condition = ort.InferenceSession(str(graphs.condition), providers=providers)
    step = ort.InferenceSession(str(graphs.step), providers=providers)
    features = condition.run(None, {k: v.cpu().numpy() for k, v in cond_inputs.items()})
    names = [o.name for o in condition.get_outputs()]
    feeds = {k: v.cpu().numpy() for k, v in step_inputs.items()}
    feeds.update(dict(zip(names, features, strict=True)))
    ours = step.run(None, feeds)[0]
    with torch.no_grad():
        reference = net(
            step_inputs["x_t"],
            step_inputs["t_scaled"],
            cond_inputs["latent"],
            step_inputs["sigma"],
            cond_inputs.get("text"),
        )
    return float(abs(torch.from_numpy(ours) - reference.float().cpu()).max())
