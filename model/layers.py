"""Small building blocks of the PiD network: norms, embeddings, rotary tables, attention, MLPs.

Numerics follow the official PiD network (see docs/architecture.md): RMSNorm normalises in
float32 and casts back before the weight multiply; rotary embeddings rotate in float32;
position tables are computed once per output size, never per step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# RoPE positions over the patch grid are normalised to [0, ROPE_POSITION_RANGE] on each axis,
# whatever the grid size (both ends included), as in the official network.
ROPE_POSITION_RANGE = 16.0


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
    return x * (1 + scale) + shift


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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention on [B, N, heads, d] tensors (no mask), returned as [B, Nq, heads * d]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)
