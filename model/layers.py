"""Small building blocks of the PiD network: norms, MLPs, embeddings, position tables, attention.

    modules        RMSNorm, SwiGLU, GeluMLP, TimestepEmbedder; modulate (adaLN), attention
    rotary tables  rope_angles_2d / rope_angles_1d (angles), apply_rope (rotation), grid_rope and
                   joint_rope (the cos / sin tables PiDNet.condition builds once per decode)
    pixel table    pixel_position_table (sin-cos over pixel coordinates), pixel_position_tokens
    patch layout   to_patches, to_patch_pixels, from_patch_pixels

Numerics follow the official PiD network (see docs/architecture.md): RMSNorm normalises in
float32 and casts back before the weight multiply; rotary embeddings rotate in float32;
position tables are computed once per output size, never per step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ntk_theta

# RoPE positions over the patch grid are normalised to [0, ROPE_POSITION_RANGE] on each axis,
# whatever the grid size (both ends included), as in the official network.
ROPE_POSITION_RANGE = 16.0
# The patch grid's 2D RoPE base before its NTK-aware rescaling to the grid size (ntk_theta).
GRID_ROPE_BASE = 10000.0

RopeTable = tuple[torch.Tensor, torch.Tensor]  # cos, sin: float32 [N, 1, head_dim / 2]


class RMSNorm(nn.Module):
    """y = (x / sqrt(mean(x^2) + eps)) * weight, normalised in float32 and cast back first."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Written out (not F.rms_norm) so that it exports to every ONNX opset and TensorRT version;
        # compilers fuse it back into one kernel.
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return normed * self.weight.to(x.dtype)


class SwiGLU(nn.Module):
    """w2(SiLU(w1 x) * w3 x), no biases."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GeluMLP(nn.Module):
    """fc2(GELU_erf(fc1 x)): the per-pixel MLP of the pixel blocks."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TimestepEmbedder(nn.Module):
    """t_scaled (= t * 1000) -> [B, D]: a 256-d sinusoid with max period 10, then a SiLU MLP."""

    def __init__(self, hidden: int, frequency_dim: int = 256, max_period: float = 10.0) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.max_period = max_period
        self.fc1 = nn.Linear(frequency_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def sinusoid(self, t_scaled: torch.Tensor) -> torch.Tensor:
        """[B] float -> [B, frequency_dim] float32, cosines first."""
        half = self.frequency_dim // 2
        steps = torch.arange(half, dtype=torch.float32, device=t_scaled.device)
        freqs = torch.exp(-math.log(self.max_period) * steps / half)
        args = t_scaled.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t_scaled: torch.Tensor) -> torch.Tensor:
        emb = self.sinusoid(t_scaled).to(self.fc1.weight.dtype)
        return self.fc2(F.silu(self.fc1(emb)))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: x * (1 + scale) + shift."""
    return x * (1 + scale) + shift


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, quantizers: nn.Module | None = None
) -> torch.Tensor:
    """Softmax attention on [B, N, heads, d] tensors (no mask), returned as [B, Nq, heads * d].

    quantizers: the FP8 export's quantization points (attached by engines/build/quantize.py; None
    everywhere else): the attention is then written out as its two batched matmuls, Q and K entering
    the first through q_bmm_quantizer / k_bmm_quantizer, the softmax and V entering the second through
    softmax_quantizer / v_bmm_quantizer: Q/DQ on both BMMs, the pattern TensorRT fuses into FP8 attention.
    """
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if quantizers is None:
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
    scores = quantizers.q_bmm_quantizer(q) @ quantizers.k_bmm_quantizer(k).transpose(-2, -1)
    probs = (scores * q.shape[-1] ** -0.5).softmax(dim=-1)
    out = quantizers.softmax_quantizer(probs) @ quantizers.v_bmm_quantizer(v)
    return out.transpose(1, 2).flatten(2)


# ---- rotary position embeddings -------------------------------------------------------------
def rope_angles_2d(
    grid_h: int, grid_w: int, head_dim: int, theta_h: float, theta_w: float, device: torch.device
) -> torch.Tensor:
    """Rotation angles [grid_h * grid_w, head_dim / 2] (float32) for 2D RoPE over a patch grid.

    Tokens are row-major. Rotation pairs alternate axes: pair 2k rotates by x * f_k(theta_w),
    pair 2k+1 by y * f_k(theta_h), with f_k = theta^(-4k / head_dim) and normalised positions.
    """
    axis_dim = head_dim // 2
    exponents = torch.arange(0, axis_dim, 2, dtype=torch.float32, device=device) / axis_dim
    # Python-float bases enter the float32 pow as float32 (no tensor is copied from the host,
    # so this also runs inside a CUDA graph capture).
    freq_w = 1.0 / (theta_w**exponents)
    freq_h = 1.0 / (theta_h**exponents)
    xs = torch.linspace(0, ROPE_POSITION_RANGE, grid_w, dtype=torch.float32, device=device)
    ys = torch.linspace(0, ROPE_POSITION_RANGE, grid_h, dtype=torch.float32, device=device)
    angle_x = (xs[:, None] * freq_w[None]).expand(grid_h, grid_w, -1)  # [h, w, d/4]
    angle_y = (ys[:, None] * freq_h[None])[:, None].expand(grid_h, grid_w, -1)
    return torch.stack([angle_x, angle_y], dim=-1).reshape(grid_h * grid_w, axis_dim)


def rope_angles_1d(length: int, head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """Rotation angles [length, head_dim / 2] (float32) for 1D RoPE at integer positions."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    freqs = 1.0 / (theta**exponents)
    positions = torch.arange(length, dtype=torch.float32, device=device)
    return positions[:, None] * freqs[None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of x [B, N, heads, d] by angles given as cos/sin [N, 1, d/2]."""
    pairs = x.float().unflatten(-1, (x.shape[-1] // 2, 2))
    u, w = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([u * cos - w * sin, u * sin + w * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def grid_rope_angles(
    grid: tuple[int, int], head_dim: int, ref_grid: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """2D RoPE angles [grid_h * grid_w, head_dim / 2] over a patch grid, NTK-rescaled per axis.

    ref_grid: the patch grid the network was trained at (rope_ref_size / patch_size); each axis's
    base grows with grid / ref_grid (ntk_theta), the positions stay in [0, ROPE_POSITION_RANGE].
    """
    theta_h = ntk_theta(GRID_ROPE_BASE, grid[0], ref_grid[0], head_dim // 2)
    theta_w = ntk_theta(GRID_ROPE_BASE, grid[1], ref_grid[1], head_dim // 2)
    return rope_angles_2d(grid[0], grid[1], head_dim, theta_h, theta_w, device)


def rope_table(angles: torch.Tensor) -> RopeTable:
    """Angles [N, d/2] -> (cos, sin) [N, 1, d/2], the form apply_rope broadcasts over heads."""
    return angles.cos()[:, None], angles.sin()[:, None]


def grid_rope(
    grid: tuple[int, int], head_dim: int, ref_grid: tuple[int, int], device: torch.device
) -> RopeTable:
    """The patch grid's RoPE table [grid_h * grid_w, 1, head_dim / 2] (the pixel blocks' attention)."""
    return rope_table(grid_rope_angles(grid, head_dim, ref_grid, device))


def joint_rope(
    grid: tuple[int, int],
    text_len: int,
    head_dim: int,
    ref_grid: tuple[int, int],
    text_theta: float,
    device: torch.device,
) -> RopeTable:
    """The joint attention's RoPE table [text_len + L, 1, head_dim / 2]: 1D text positions, then the grid."""
    text_angles = rope_angles_1d(text_len, head_dim, text_theta, device)
    return rope_table(torch.cat([text_angles, grid_rope_angles(grid, head_dim, ref_grid, device)]))


# ---- pixel position table ------------------------------------------------------------------
def pixel_position_table(
    height: int,
    width: int,
    dim: int,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float64,
    origin: tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """Fixed 2D sin-cos table [height, width, dim] over integer pixel coordinates.

    The first dim/2 features encode the column, the last dim/2 the row; each half is
    [sin(pos * w_i), cos(pos * w_i)] with w_i = 10000^(-i / (dim / 4)). Sines and cosines are
    computed in float64 (per row and per column only), then cast to `dtype` and broadcast.
    Built on `device` directly: no host-to-device copy, so it can run inside a CUDA graph.
    `origin` (row, column) is the coordinate of the top-left pixel: (0, 0) at inference, as in the
    official network; trainers shift it so that no absolute position is special (see
    training/teacher.py), which is what lets a small model decode sizes larger than its crops.
    """
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)

    def encode(n: int, start: int) -> torch.Tensor:
        positions = torch.arange(start, start + n, dtype=torch.float64, device=device)
        angles = positions[:, None] * omega[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1).to(dtype)  # [n, dim/2]

    cols = encode(width, origin[1])[None].expand(height, width, dim // 2)
    rows = encode(height, origin[0])[:, None].expand(height, width, dim // 2)
    return torch.cat([cols, rows], dim=-1)


def pixel_position_tokens(
    height: int,
    width: int,
    dim: int,
    patch: int,
    device: torch.device,
    dtype: torch.dtype,
    origin: tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """The pixel position table laid out as per-patch pixel tokens [L, P*P, dim] (see to_patch_pixels)."""
    table = pixel_position_table(height, width, dim, device, dtype, origin)
    return to_patch_pixels(table.permute(2, 0, 1)[None], patch)[0]


# ---- patch layout ------------------------------------------------------------------------------
def to_patches(x: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, C*P*P], features ordered (channel, row-in-patch, col-in-patch)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def to_patch_pixels(x: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, P*P, C]: each patch's pixels (row-major in the patch) as tokens."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch, c)


def from_patch_pixels(x: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """Inverse of to_patch_pixels: [B, L, P*P, C] -> [B, C, H, W]."""
    b, c = x.shape[0], x.shape[-1]
    x = x.reshape(b, height // patch, width // patch, patch, patch, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, height, width)
