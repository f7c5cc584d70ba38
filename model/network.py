"""PiDNet: the PiD pixel diffusion decoder network, and the transformer blocks it is made of.

    latent, sigma, text  --condition()-->  Conditioning  (once per decode)
    x_t, t, Conditioning --velocity()-->   v             (once per sampler step)

Per step: x_t is cut into 16x16 patches -> 14 dual-stream patch blocks (joint attention with
the text stream; a sigma-aware gate injects adapter features before every 2nd block) -> one
conditioning vector per patch -> per-pixel tokens of x_t run 2 pixel blocks modulated per
pixel by that vector -> RGB velocity. Flow convention: x_t = (1 - t) x0 + t noise, v = noise - x0.
PiDNet's docstring has the shape of every input, stream and output.

Parameter names are the checkpoint format (checkpoints.py maps the official names onto them), so
they stay as they are: in the patch blocks, `_x` / `_img` is the image stream and `_y` / `_txt`
the text stream.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import LatentAdapter, SigmaGate
from .config import PiDConfig
from .errors import LatentError
from .layers import (
    GeluMLP,
    RMSNorm,
    RopeTable,
    SwiGLU,
    TimestepEmbedder,
    apply_rope,
    attention,
    from_patch_pixels,
    grid_rope,
    joint_rope,
    modulate,
    pixel_position_tokens,
    to_patch_pixels,
    to_patches,
)

__all__ = ["Conditioning", "PiDNet", "from_patch_pixels", "to_patch_pixels", "to_patches"]


@dataclass
class Conditioning:
    """Everything a sampler step needs that does not depend on x_t or t; built once per decode."""

    gate_features: list[torch.Tensor]  # one [B, L, D] per gate
    pixel_feature: torch.Tensor | None  # [B, L, D] for the v1.5 pixel gate
    sigma: torch.Tensor  # [B] float32
    text: torch.Tensor  # [B, Lt, D] embedded text tokens (Lt may be 0)
    joint_rope: RopeTable  # cos, sin [Lt + L, 1, head_dim/2]: text then image
    pixel_rope: RopeTable  # cos, sin [L, 1, pixel_head_dim/2]
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
        self.bmm_quantizers: nn.Module | None = None  # FP8 export only (layers.attention)

    def forward(
        self, image: torch.Tensor, text: torch.Tensor, rope: RopeTable, text_out: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """image [B, L, D], text [B, Lt, D] -> (image out [B, L, D], text out [B, Lt, D] or None)."""
        text_len = text.shape[1]
        # Explicit sizes (no -1): the text stream may have 0 tokens, where -1 is ambiguous.
        split = (3, self.heads, self.head_dim)
        q_img, k_img, v_img = self.qkv_x(image).unflatten(-1, split).unbind(2)  # [B, L, heads, d]
        q_txt, k_txt, v_txt = self.qkv_y(text).unflatten(-1, split).unbind(2)  # [B, Lt, heads, d]
        cos, sin = rope
        q = apply_rope(torch.cat([self.q_norm_y(q_txt), self.q_norm_x(q_img)], dim=1), cos, sin)
        k = apply_rope(torch.cat([self.k_norm_y(k_txt), self.k_norm_x(k_img)], dim=1), cos, sin)
        v = torch.cat([v_txt, v_img], dim=1)  # [B, Lt + L, heads, d]
        if not text_out:  # the last block's text output is discarded: only image queries matter
            return self.proj_x(attention(q[:, text_len:], k, v, self.bmm_quantizers)), None
        out = attention(q, k, v, self.bmm_quantizers)
        return self.proj_x(out[:, text_len:]), self.proj_y(out[:, :text_len])


class PatchBlock(nn.Module):
    """Dual-stream (image, text) transformer block, adaLN-modulated by time_cond = SiLU(t_emb)."""

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
        image_tokens: torch.Tensor,
        text_tokens: torch.Tensor,
        time_cond: torch.Tensor,
        rope: RopeTable,
        text_out: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_tokens [B, L, D], text_tokens [B, Lt, D], time_cond [B, 1, D] -> both streams updated.

        With text_out False (the last block) the text stream is returned unchanged.
        """
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation_img(time_cond).chunk(6, dim=-1)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.modulation_txt(time_cond).chunk(
            6, dim=-1
        )
        attn_img, attn_txt = self.attn(
            modulate(self.norm_x1(image_tokens), shift1, scale1),
            modulate(self.norm_y1(text_tokens), t_shift1, t_scale1),
            rope,
            text_out,
        )
        image_tokens = image_tokens + gate1 * attn_img
        image_tokens = image_tokens + gate2 * self.mlp_x(modulate(self.norm_x2(image_tokens), shift2, scale2))
        if attn_txt is None:
            return image_tokens, text_tokens
        text_tokens = text_tokens + t_gate1 * attn_txt
        text_tokens = text_tokens + t_gate2 * self.mlp_y(
            modulate(self.norm_y2(text_tokens), t_shift2, t_scale2)
        )
        return image_tokens, text_tokens


class PatchSelfAttention(nn.Module):
    """Self-attention over the patch tokens of one image, with q/k RMSNorm and 2D RoPE."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm, self.k_norm = RMSNorm(dim // heads), RMSNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)
        self.bmm_quantizers: nn.Module | None = None  # FP8 export only (layers.attention)

    def forward(self, x: torch.Tensor, rope: RopeTable) -> torch.Tensor:
        """x [B, L, dim] -> [B, L, dim]."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).unbind(2)
        cos, sin = rope
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        return self.proj(attention(q, k, v, self.bmm_quantizers))


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
        self, pixel_tokens: torch.Tensor, patch_cond: torch.Tensor, batch: int, rope: RopeTable
    ) -> torch.Tensor:
        """pixel_tokens [B*L, P*P, pd], patch_cond [B*L, D] (one vector per patch) -> [B*L, P*P, pd]."""
        num_patches = pixel_tokens.shape[0]
        mod = self.modulation(patch_cond).view(num_patches, self.pixels, 6, -1)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(2)  # each [B*L, P*P, pd]
        attn_in = modulate(self.norm1(pixel_tokens), shift1, scale1).reshape(batch, num_patches // batch, -1)
        attn_out = self.expand_from_attn(self.attn(self.compress_to_attn(attn_in), rope))  # [B, L, P*P*pd]
        pixel_tokens = pixel_tokens + gate1 * attn_out.view_as(pixel_tokens)
        return pixel_tokens + gate2 * self.mlp(modulate(self.norm2(pixel_tokens), shift2, scale2))


class FinalLayer(nn.Module):
    """Pixel tokens [..., pd] -> RGB velocity [..., out_channels]: RMSNorm, then a linear map."""

    def __init__(self, pd: int, out_channels: int) -> None:
        super().__init__()
        self.norm = RMSNorm(pd)
        self.linear = nn.Linear(pd, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))


class TextEmbedder(nn.Module):
    """Text encoder states [B, Lt, text_dim] -> text tokens [B, Lt, D]: a linear map, then RMSNorm."""

    def __init__(self, text_dim: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(text_dim, hidden)
        self.norm = RMSNorm(hidden)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(text))


class PiDNet(nn.Module):
    """The PiD decoder: a velocity field over pixels, conditioned on a (noisy) latent and text.

    `condition` runs once per decode, `velocity` once per sampler step; `forward` is both in one
    call (the official network's signature). Sizes: B batch, C latent channels, h x w latent cells,
    H x W output pixels (config.output_size), P patch_size, L = (H/P)(W/P) patches, Lt text tokens
    (at most text_max_length), D hidden_size, pd pixel_hidden_size.

        inputs   latent        [B, C, h, w]        normalised latent (model/latents)
                 sigma         [B]                 its noise level in [0, 1] (or a float)
                 text          [B, Lt, text_dim]   text encoder states, or None (no text tokens)
                 x_t           [B, 3, H, W]        noisy pixels, (1 - t) x0 + t noise
                 t_scaled      [B]                 t * 1000 (FM_TIMESCALE in sampler.py)
        streams  image_tokens  [B, L, D]           one token per P x P patch, through the patch blocks
                 text_tokens   [B, Lt, D]          embedded text, through the patch blocks
                 time_cond     [B, 1, D]           SiLU(time embedding): the patch blocks' adaLN input
                 patch_cond    [B*L, D]            SiLU(t_emb + image_tokens), gated: per-patch vector
                 pixel_tokens  [B*L, P*P, pd]      one token per pixel, through the pixel blocks
        output   velocity      [B, 3, H, W]        noise - x0, in the network's dtype
    """

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
        # Pixel position tables still in use, by (size, origin, device, dtype): every chunk of a tiled
        # decode conditions windows of one size, so they share one table (4 MB per chunk for pid-tiny,
        # 128 MB in bf16 for the 2k variants) instead of holding a copy each. Weak values: a table
        # lives only as long as some Conditioning holds it, so nothing stays allocated between decodes.
        self._position_tables: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedder.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedder.weight.device

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
        text_tokens = self.text_embedder(text) + self.text_pos_embedding[:, :text_len]  # [B, Lt, D]

        return Conditioning(
            gate_features=gate_features,
            pixel_feature=pixel_feature,
            sigma=sigma,
            text=text_tokens,
            joint_rope=self.joint_rope_table(grid, text_len, latent.device),
            pixel_rope=self.pixel_rope_table(grid, latent.device),
            pixel_positions=self.pixel_position_features(height, width, latent.device, pixel_origin),
            image_size=(height, width),
        )

    # ---- once per step ----------------------------------------------------------------------
    def velocity(self, x_t: torch.Tensor, t_scaled: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Predicted velocity [B, 3, H, W] (in the net's dtype) for noisy pixels x_t at time t_scaled."""
        cfg = self.cfg
        batch, _, height, width = x_t.shape
        if (height, width) != cond.image_size:
            raise ValueError(f"x_t is {height}x{width} but the conditioning was built for {cond.image_size}")
        x_t = x_t.to(self.dtype)
        image_tokens, time_emb = self._patch_stream(x_t, t_scaled, cond, len(self.patch_blocks))
        patch_cond = F.silu(time_emb + image_tokens)  # [B, L, D]
        if self.pixel_gate is not None:
            patch_cond = self.pixel_gate(patch_cond, cond.pixel_feature, cond.sigma)

        pixel_tokens = self.pixel_embedder(to_patch_pixels(x_t, cfg.patch_size))  # [B, L, P*P, pd]
        pixel_tokens = (pixel_tokens + cond.pixel_positions).flatten(0, 1)  # [B*L, P*P, pd]
        patch_cond = patch_cond.flatten(0, 1)  # [B*L, D]
        for block in self.pixel_blocks:
            pixel_tokens = block(pixel_tokens, patch_cond, batch, cond.pixel_rope)
        out = self.final_layer(pixel_tokens).unflatten(0, (batch, -1))  # [B, L, P*P, 3]
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
        """image_tokens [B, L, D] after `depth` patch blocks, and the time embedding [B, 1, D]."""
        cfg = self.cfg
        batch = x_t.shape[0]
        t_scaled = torch.as_tensor(t_scaled, dtype=torch.float32, device=x_t.device).reshape(-1).expand(batch)
        image_tokens = self.patch_embedder(to_patches(x_t, cfg.patch_size))  # [B, L, D]
        time_emb = self.time_embedder(t_scaled)[:, None]  # [B, 1, D]
        time_cond = F.silu(time_emb)  # [B, 1, D]
        text_tokens = cond.text  # [B, Lt, D]
        last = len(self.patch_blocks) - 1
        for i, block in enumerate(self.patch_blocks[:depth]):
            if i % cfg.gate_interval == 0:
                gate = i // cfg.gate_interval
                image_tokens = self.gates[gate](image_tokens, cond.gate_features[gate], cond.sigma)
            image_tokens, text_tokens = block(
                image_tokens, text_tokens, time_cond, cond.joint_rope, text_out=i < last
            )
        return image_tokens, time_emb

    # ---- position tables: once per output size (condition; engines bake them for static shapes) --
    def joint_rope_table(self, grid: tuple[int, int], text_len: int, device: torch.device) -> RopeTable:
        """cos, sin [Lt + L, 1, head_dim / 2] for the patch blocks' joint attention (layers.joint_rope)."""
        cfg = self.cfg
        return joint_rope(grid, text_len, cfg.head_dim, self._rope_ref_grid(), cfg.text_rope_theta, device)

    def pixel_rope_table(self, grid: tuple[int, int], device: torch.device) -> RopeTable:
        """cos, sin [L, 1, pixel_head_dim / 2] for the pixel blocks' patch attention (layers.grid_rope)."""
        return grid_rope(grid, self.cfg.pixel_head_dim, self._rope_ref_grid(), device)

    def pixel_position_features(
        self, height: int, width: int, device: torch.device, origin: tuple[int, int] = (0, 0)
    ) -> torch.Tensor:
        """The fixed pixel position table as per-patch pixel tokens [L, P*P, pixel_hidden] (read-only:
        tables of one size are shared while in use)."""
        cfg = self.cfg
        if _tracing():  # an export or a compiled graph computes its own
            return pixel_position_tokens(
                height, width, cfg.pixel_hidden_size, cfg.patch_size, device, self.dtype, origin
            )
        key = (height, width, tuple(origin), str(torch.device(device)), self.dtype)
        table = self._position_tables.get(key)
        if table is None:
            table = pixel_position_tokens(
                height, width, cfg.pixel_hidden_size, cfg.patch_size, device, self.dtype, origin
            )
            self._position_tables[key] = table
        return table

    def _rope_ref_grid(self) -> tuple[int, int]:
        """The patch grid of the RoPE reference size (the NTK rescaling's reference)."""
        ref_h, ref_w = self.cfg.rope_ref_size
        return ref_h // self.cfg.patch_size, ref_w // self.cfg.patch_size


def _tracing() -> bool:
    """True while torch.compile, torch.export / ONNX export or TorchScript traces the network."""
    return (
        torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or torch.onnx.is_in_onnx_export()
        or torch.jit.is_tracing()
    )
