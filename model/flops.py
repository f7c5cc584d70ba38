"""Analytic FLOP counts of a PiD decode, split by part: the speed-of-light targets for engines.

Counted: 2 x multiply-adds of every matmul, convolution and attention product (QK^T and AV),
exactly what `torch.utils.flop_counter.FlopCounterMode` counts (a test checks the two agree).
Not counted: norms, activations, softmax, RoPE and other elementwise work.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from .config import PiDConfig

if TYPE_CHECKING:
    from .tiling import TilePlan


@dataclass(frozen=True)
class FlopBreakdown:
    """FLOPs of one network evaluation (per_step parts) or of the once-per-decode adapter."""

    patch_attention: int = 0  # QK^T and AV of the joint attention
    patch_linear: int = 0  # qkv/out projections, SwiGLU MLPs, adaLN, embedders, gates
    pixel_blocks: int = 0  # pixel embedding, per-pixel adaLN, compress/expand, patch attention, MLP, final
    adapter: int = 0  # conv trunk + heads, once per decode

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    def __add__(self, other: FlopBreakdown) -> FlopBreakdown:
        return FlopBreakdown(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def scaled(self, k: int) -> FlopBreakdown:
        return FlopBreakdown(**{f.name: getattr(self, f.name) * k for f in fields(self)})

    def as_dict(self) -> dict[str, int]:
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "total": self.total}


def _linear(tokens: int, d_in: int, d_out: int) -> int:
    return 2 * tokens * d_in * d_out


def step_flops(
    cfg: PiDConfig, height: int, width: int, text_len: int | None = None, batch: int = 1
) -> FlopBreakdown:
    """FLOPs of one velocity evaluation (`PiDNet.velocity`) at output size height x width."""
    lt = cfg.text_max_length if text_len is None else text_len
    d, p = cfg.hidden_size, cfg.patch_size
    tokens = (height // p) * (width // p)
    pixels = height * width
    joint = lt + tokens

    # Patch stage.
    attention = 0
    linear = _linear(tokens, cfg.in_channels * p * p, d)  # patch embedding
    linear += _linear(1, 256, d) + _linear(1, d, d)  # timestep MLP
    for i in range(cfg.patch_depth):
        last = i == cfg.patch_depth - 1  # its text output is discarded: image queries only, no text MLP
        queries = tokens if last else joint
        attention += 2 * (2 * queries * joint * d)  # QK^T and AV over all heads
        linear += _linear(tokens, d, 3 * d) + _linear(lt, d, 3 * d)  # qkv both streams
        linear += _linear(tokens, d, d) + (0 if last else _linear(lt, d, d))  # out projections
        mlp = 3 * _linear(1, d, cfg.mlp_hidden)
        linear += mlp * tokens + (0 if last else mlp * lt)
        linear += 2 * _linear(1, d, 6 * d)  # adaLN (one conditioning vector per sample)
    gate_out = d if cfg.gate_type == "per_token_per_dim" else 1
    num_gates = cfg.num_gates + (1 if cfg.pixel_gate else 0)
    linear += num_gates * _linear(tokens, 2 * d, gate_out)

    # Pixel stage.
    pd, da, pix = cfg.pixel_hidden_size, cfg.pixel_attn_hidden_size, p * p
    pixel = _linear(pixels, cfg.in_channels, pd)  # pixel embedding
    for _ in range(cfg.pixel_depth):
        pixel += _linear(tokens, d, 6 * pd * pix)  # per-pixel adaLN
        pixel += _linear(tokens, pix * pd, da) + _linear(tokens, da, pix * pd)  # compress / expand
        pixel += _linear(tokens, da, 3 * da) + _linear(tokens, da, da)  # qkv / proj
        pixel += 2 * (2 * tokens * tokens * da)  # QK^T and AV
        pixel += _linear(pixels, pd, 4 * pd) + _linear(pixels, 4 * pd, pd)  # per-pixel MLP
    pixel += _linear(pixels, pd, cfg.in_channels)  # final layer

    return FlopBreakdown(patch_attention=attention, patch_linear=linear, pixel_blocks=pixel).scaled(batch)


def condition_flops(
    cfg: PiDConfig, height: int, width: int, text_len: int | None = None, batch: int = 1
) -> FlopBreakdown:
    """FLOPs of `PiDNet.condition`: the adapter trunk and heads (and the text projection)."""
    lt = cfg.text_max_length if text_len is None else text_len
    p, hq = cfg.patch_size, cfg.adapter_hidden
    tokens = (height // p) * (width // p)
    conv = 2 * tokens * 9  # one 3x3 conv output position, per in*out channel pair
    adapter = conv * cfg.adapter_in_channels * hq + conv * hq * hq  # stem
    adapter += cfg.adapter_res_blocks * 2 * conv * hq * hq
    heads = cfg.num_gates + (1 if cfg.pixel_gate else 0)
    adapter += heads * _linear(tokens, hq, cfg.hidden_size)
    text = _linear(lt, cfg.text_dim, cfg.hidden_size)
    return FlopBreakdown(adapter=adapter, patch_linear=text).scaled(batch)


def decode_flops(
    cfg: PiDConfig, height: int, width: int, steps: int = 4, text_len: int | None = None, batch: int = 1
) -> FlopBreakdown:
    """FLOPs of a whole decode: conditioning once, then `steps` network evaluations."""
    return condition_flops(cfg, height, width, text_len, batch) + step_flops(
        cfg, height, width, text_len, batch
    ).scaled(steps)


def tiled_decode_flops(
    cfg: PiDConfig, plan: TilePlan, steps: int = 4, text_len: int | None = None, batch: int = 1
) -> FlopBreakdown:
    """FLOPs of a tiled decode (model/tiling.py): every window is a whole decode of the window's size
    (its own conditioning, then `steps` evaluations); the blending is elementwise and not counted."""
    return decode_flops(cfg, *plan.tile, steps=steps, text_len=text_len, batch=batch).scaled(plan.count)
