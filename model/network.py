"""PiDNet: the PiD pixel diffusion decoder network.

    latent, sigma, text  --condition()-->  Conditioning  (once per decode)
    x_t, t, Conditioning --velocity()-->   v             (once per sampler step)

Per step: x_t is cut into 16x16 patches -> 14 dual-stream patch blocks (joint attention with
the text stream; a sigma-aware gate injects adapter features before every 2nd block) -> one
conditioning vector per patch -> per-pixel tokens of x_t run 2 pixel blocks modulated per
pixel by that vector -> RGB velocity. Flow convention: x_t = (1 - t) x0 + t noise, v = noise - x0.

Tensors: x_t [B, 3, H, W] pixels in [-1, 1] (plus noise); t_scaled [B] = t * 1000;
latent [B, C, h, w] normalised latent; sigma [B] in [0, 1]; text [B, Lt, text_dim] or None.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import LatentAdapter, SigmaGate
from .config import PiDConfig, ntk_theta
from .latents import LatentError
from .layers import (
    GeluMLP,
    RMSNorm,
    SwiGLU,
    TimestepEmbedder,
    apply_rope,
    attention,
    modulate,
    pixel_position_table,
    rope_angles_1d,
    rope_angles_2d,
)


@dataclass
class Conditioning:
    """Everything a sampler step needs that does not depend on x_t or t; built once per decode."""

    gate_features: list[torch.Tensor]  # one [B, L, D] per gate
    pixel_feature: torch.Tensor | None  # [B, L, D] for the v1.5 pixel gate
    sigma: torch.Tensor  # [B] float32
    text: torch.Tensor  # [B, Lt, D] embedded text (Lt may be 0)
    joint_rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin [Lt + L, 1, head_dim/2]: text then image
    pixel_rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin [L, 1, pixel_head_dim/2]
    pixel_positions: torch.Tensor  # [L, P*P, pixel_hidden] in the working dtype
    image_size: tuple[int, int]  # (H, W)


class JointAttention(nn.Module):
    """Attention over [text; image] tokens with separate projections and q/k norms per stream."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim = dim // heads
        self.qkv_x = nn.Linear(dim, 3 * dim, bias=False)
        self.qkv_y = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm_x, self.k_norm_x = RMSNorm(head_dim), RMSNorm(head_dim)
        self.q_norm_y, self.k_norm_y = RMSNorm(head_dim), RMSNorm(head_dim)
        self.proj_x = nn.Linear(dim, dim)
        self.proj_y = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], text_out: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, L, D] image, y [B, Lt, D] text -> (image out, text out or None if not wanted)."""
        text_len = y.shape[1]
        # Explicit sizes (no -1): the text stream may have 0 tokens, where -1 is ambiguous.
        split = (3, self.heads, self.head_dim)
        qx, kx, vx = self.qkv_x(x).unflatten(-1, split).unbind(2)
        qy, ky, vy = self.qkv_y(y).unflatten(-1, split).unbind(2)
        cos, sin = rope
        q = apply_rope(torch.cat([self.q_norm_y(qy), self.q_norm_x(qx)], dim=1), cos, sin)
        k = apply_rope(torch.cat([self.k_norm_y(ky), self.k_norm_x(kx)], dim=1), cos, sin)
        v = torch.cat([vy, vx], dim=1)
        if not text_out:  # the last block's text output is discarded: only image queries matter
            return self.proj_x(attention(q[:, text_len:], k, v)), None
        out = attention(q, k, v)
        return self.proj_x(out[:, text_len:]), self.proj_y(out[:, :text_len])


class PatchBlock(nn.Module):
    """Dual-stream (image, text) transformer block with adaLN modulation from c = SiLU(t_emb)."""

    def __init__(self, cfg: PiDConfig) -> None:
        super().__init__()
        dim = cfg.hidden_size
        self.norm_x1, self.norm_x2 = RMSNorm(dim), RMSNorm(dim)
        self.norm_y1, self.norm_y2 = RMSNorm(dim), RMSNorm(dim)
        self.attn = JointAttention(dim, cfg.num_heads)
        self.mlp_x = SwiGLU(dim, cfg.mlp_hidden)
        self.mlp_y = SwiGLU(dim, cfg.mlp_hidden)
        self.modulation_img = nn.Linear(dim, 6 * dim)
        self.modulation_txt = nn.Linear(dim, 6 * dim)

    def forward(
        self,
        s: torch.Tensor,
        y: torch.Tensor,
        c: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        text_out: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation_img(c).chunk(6, dim=-1)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.modulation_txt(c).chunk(6, dim=-1)
        attn_img, attn_txt = self.attn(
            modulate(self.norm_x1(s), shift1, scale1),
            modulate(self.norm_y1(y), t_shift1, t_scale1),
            rope,
            text_out,
        )
        s = s + gate1 * attn_img
        s = s + gate2 * self.mlp_x(modulate(self.norm_x2(s), shift2, scale2))
        if attn_txt is None:
            return s, y
        y = y + t_gate1 * attn_txt
        y = y + t_gate2 * self.mlp_y(modulate(self.norm_y2(y), t_shift2, t_scale2))
        return s, y


class PatchSelfAttention(nn.Module):
    """Self-attention over the patch tokens of one image, with q/k RMSNorm and 2D RoPE."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm, self.k_norm = RMSNorm(dim // heads), RMSNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).unbind(2)
        cos, sin = rope
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        return self.proj(attention(q, k, v))


class PixelBlock(nn.Module):
    """Per-pixel transformer block: pixels of a patch are modulated per pixel by the patch's vector.

    Attention runs at patch level: each patch's P*P pixel features are compressed to one token,
    attended over the image's patches, and expanded back.
    """

    def __init__(self, cfg: PiDConfig) -> None:
        super().__init__()
        pd, pixels = cfg.pixel_hidden_size, cfg.patch_size**2
        self.pixels = pixels
        self.norm1, self.norm2 = RMSNorm(pd), RMSNorm(pd)
        self.compress_to_attn = nn.Linear(pixels * pd, cfg.pixel_attn_hidden_size)
        self.attn = PatchSelfAttention(cfg.pixel_attn_hidden_size, cfg.pixel_num_heads)
        self.expand_from_attn = nn.Linear(cfg.pixel_attn_hidden_size, pixels * pd)
        self.mlp = GeluMLP(pd, 4 * pd)
        # One (shift, scale, gate) x 2 per pixel of the patch: output index pixel*6pd + chunk*pd + ch.
        self.modulation = nn.Linear(cfg.hidden_size, 6 * pd * pixels)

    def forward(
        self, x: torch.Tensor, s_cond: torch.Tensor, batch: int, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """x [B*L, P*P, pd] pixel tokens, s_cond [B*L, D] per-patch conditioning."""
        num_patches = x.shape[0]
        mod = self.modulation(s_cond).view(num_patches, self.pixels, 6, -1)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(2)
        u = modulate(self.norm1(x), shift1, scale1).reshape(batch, num_patches // batch, -1)
        attn_out = self.expand_from_attn(self.attn(self.compress_to_attn(u), rope))
        x = x + gate1 * attn_out.view_as(x)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, pd: int, out_channels: int) -> None:
        super().__init__()
        self.norm = RMSNorm(pd)
        self.linear = nn.Linear(pd, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))


class TextEmbedder(nn.Module):
    def __init__(self, text_dim: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(text_dim, hidden)
        self.norm = RMSNorm(hidden)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(text))


class PiDNet(nn.Module):
    def __init__(self, cfg: PiDConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        dim, patch = cfg.hidden_size, cfg.patch_size
        self.text_pos_embedding = nn.Parameter(torch.zeros(1, cfg.text_max_length, dim))
        self.pixel_embedder = nn.Linear(cfg.in_channels, cfg.pixel_hidden_size)
        self.patch_embedder = nn.Linear(cfg.in_channels * patch * patch, dim)
        self.time_embedder = TimestepEmbedder(dim)
        self.text_embedder = TextEmbedder(cfg.text_dim, dim)
        self.patch_blocks = nn.ModuleList(PatchBlock(cfg) for _ in range(cfg.patch_depth))
        self.pixel_blocks = nn.ModuleList(PixelBlock(cfg) for _ in range(cfg.pixel_depth))
        self.final_layer = FinalLayer(cfg.pixel_hidden_size, cfg.in_channels)
        self.adapter = LatentAdapter(cfg)
        per_dim = cfg.gate_type == "per_token_per_dim"
        self.gates = nn.ModuleList(SigmaGate(dim, per_dim) for _ in range(cfg.num_gates))
        self.pixel_gate = SigmaGate(dim, per_dim) if cfg.pixel_gate else None

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedder.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedder.weight.device

    # ---- once per decode ------------------------------------------------------------------
    def condition(
        self,
        latent: torch.Tensor,
        sigma: torch.Tensor,
        text: torch.Tensor | None = None,
        image_size: tuple[int, int] | None = None,
        pixel_origin: tuple[int, int] = (0, 0),
    ) -> Conditioning:
        """Run everything that does not depend on x_t or t: adapter trunk, text embedding, tables.

        latent [B, C, h, w]; sigma [B] (or a float); text [B, Lt, text_dim] or None (no text
        tokens); image_size (H, W) defaults to the config's output size for this latent.
        pixel_origin: the pixel coordinate of the top-left pixel in the pixel position table;
        (0, 0) at inference (official), shifted by trainers (`pixel_position_features`).
        """
        cfg = self.cfg
        if latent.ndim != 4 or latent.shape[1] != cfg.latent_channels:
            raise LatentError(
                f"this network decodes '{cfg.latent_space}' latents of shape "
                f"[B, {cfg.latent_channels}, h, w]; got {list(latent.shape)}"
            )
        batch = latent.shape[0]
        height, width = image_size or cfg.output_size(latent.shape[-2], latent.shape[-1])
        if height % cfg.patch_size or width % cfg.patch_size:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {cfg.patch_size}"
            )
        grid = (height // cfg.patch_size, width // cfg.patch_size)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=latent.device).reshape(-1).expand(batch)

        gate_features, pixel_feature = self.adapter(latent.to(self.dtype), grid)
        if text is None:
            text = torch.zeros(batch, 0, cfg.text_dim, device=latent.device)
        text = text[:, : cfg.text_max_length].to(self.dtype)
        text_len = text.shape[1]
        text_tokens = self.text_embedder(text) + self.text_pos_embedding[:, :text_len]

        return Conditioning(
            gate_features=gate_features,
            pixel_feature=pixel_feature,
            sigma=sigma,
            text=text_tokens,
            joint_rope=self._joint_rope(grid, text_len, latent.device),
            pixel_rope=self._grid_rope(grid, cfg.pixel_head_dim, latent.device),
            pixel_positions=self.pixel_position_features(height, width, latent.device, pixel_origin),
            image_size=(height, width),
        )

    def _grid_rope(
        self, grid: tuple[int, int], head_dim: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        angles = self._grid_angles(grid, head_dim, device)
        return angles.cos()[:, None], angles.sin()[:, None]

    def _grid_angles(self, grid: tuple[int, int], head_dim: int, device: torch.device) -> torch.Tensor:
        cfg = self.cfg
        ref_h, ref_w = (r // cfg.patch_size for r in cfg.rope_ref_size)
        base = 10000.0
        theta_h = ntk_theta(base, grid[0], ref_h, head_dim // 2)
        theta_w = ntk_theta(base, grid[1], ref_w, head_dim // 2)
        return rope_angles_2d(grid[0], grid[1], head_dim, theta_h, theta_w, device)

    def _joint_rope(
        self, grid: tuple[int, int], text_len: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        head_dim = self.cfg.head_dim
        text_angles = rope_angles_1d(text_len, head_dim, self.cfg.text_rope_theta, device)
        angles = torch.cat([text_angles, self._grid_angles(grid, head_dim, device)])
        return angles.cos()[:, None], angles.sin()[:, None]

    def pixel_position_features(
        self, height: int, width: int, device: torch.device, origin: tuple[int, int] = (0, 0)
    ) -> torch.Tensor:
        """The fixed pixel position table as per-patch pixel tokens [L, P*P, pixel_hidden]."""
        table = pixel_position_table(height, width, self.cfg.pixel_hidden_size, device, self.dtype, origin)
        return to_patch_pixels(table.permute(2, 0, 1)[None], self.cfg.patch_size)[0]

    # ---- once per step ----------------------------------------------------------------------
    def velocity(self, x_t: torch.Tensor, t_scaled: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Predicted velocity [B, 3, H, W] (in the net's dtype) for noisy pixels x_t at time t_scaled."""
        cfg = self.cfg
        batch, _, height, width = x_t.shape
        if (height, width) != cond.image_size:
            raise ValueError(f"x_t is {height}x{width} but the conditioning was built for {cond.image_size}")
        x_t = x_t.to(self.dtype)
        s, t_emb = self._patch_stream(x_t, t_scaled, cond, len(self.patch_blocks))
        s = F.silu(t_emb + s)
        if self.pixel_gate is not None:
            s = self.pixel_gate(s, cond.pixel_feature, cond.sigma)

        pixels = self.pixel_embedder(to_patch_pixels(x_t, cfg.patch_size))  # [B, L, P*P, pd]
        pixels = (pixels + cond.pixel_positions).flatten(0, 1)  # [B*L, P*P, pd]
        s_cond = s.flatten(0, 1)
        for block in self.pixel_blocks:
            pixels = block(pixels, s_cond, batch, cond.pixel_rope)
        out = self.final_layer(pixels).unflatten(0, (batch, -1))
        return from_patch_pixels(out, height, width, cfg.patch_size)

    def patch_tokens(
        self, x_t: torch.Tensor, t_scaled: torch.Tensor, cond: Conditioning, depth: int
    ) -> torch.Tensor:
        """Image tokens [B, L, hidden] after the first `depth` patch blocks (features for a GAN head)."""
        if not 1 <= depth <= len(self.patch_blocks):
            raise ValueError(f"depth must be in 1..{len(self.patch_blocks)}, got {depth}")
        return self._patch_stream(x_t.to(self.dtype), t_scaled, cond, depth)[0]

    def _patch_stream(
        self, x_t: torch.Tensor, t_scaled: torch.Tensor, cond: Conditioning, depth: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch tokens after `depth` blocks, and the time embedding [B, 1, D]."""
        cfg = self.cfg
        batch = x_t.shape[0]
        t_scaled = torch.as_tensor(t_scaled, dtype=torch.float32, device=x_t.device).reshape(-1).expand(batch)
        s = self.patch_embedder(to_patches(x_t, cfg.patch_size))
        t_emb = self.time_embedder(t_scaled)[:, None]
        c = F.silu(t_emb)
        y = cond.text
        last = len(self.patch_blocks) - 1
        for i, block in enumerate(self.patch_blocks[:depth]):
            if i % cfg.gate_interval == 0:
                s = self.gates[i // cfg.gate_interval](
                    s, cond.gate_features[i // cfg.gate_interval], cond.sigma
                )
            s, y = block(s, y, c, cond.joint_rope, text_out=i < last)
        return s, t_emb

    def forward(
        self,
        x_t: torch.Tensor,
        t_scaled: torch.Tensor,
        latent: torch.Tensor,
        sigma: torch.Tensor,
        text: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One network evaluation, official convention: velocity for x_t at t_scaled = t * 1000."""
        cond = self.condition(latent, sigma, text, image_size=(x_t.shape[-2], x_t.shape[-1]))
        return self.velocity(x_t, t_scaled, cond)


# ---- patch layout helpers ---------------------------------------------------------------------
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
