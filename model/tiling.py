"""Tiled decoding: any output size as overlapping windows of the network's native size, blended at
every sampler step (MultiDiffusion-style), so cost grows with the area and memory with one window batch.

    windows        window origins covering the image: stride tile - overlap, the last window of each
                   axis shifted inward to end at the border (never padded with made-up content),
                   every origin on the latent grid (a window is a whole latent crop)
    blend_weights  per-window weights: 1 inside, ramping down across the overlap, never 0
    sample_tiled   the student rollout on the whole image: at each step every window's x0 comes from
                   the network on that window (its own latent crop and conditioning, the native
                   positions), the x0s are averaged with the normalised weights, then the whole image
                   is re-noised with one draw, as untiled sampling does

The noise is drawn for the whole image from the generator (or given), so a seed's pixels do not
depend on the window layout's batching; with one window covering the image, tiled equals untiled
bit for bit (its normalised weight is exactly 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .network import Conditioning, PiDNet
from .sampler import StepCallback, StepRecord, _noise_source, student_timesteps


def windows(size: int, tile: int, overlap: int, grid: int) -> list[int]:
    """Origins of windows of `tile` pixels covering [0, size) along one axis, on multiples of `grid`."""
    if tile % grid or overlap % grid:
        raise ValueError(f"tile {tile} and overlap {overlap} must be multiples of {grid} output pixels")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap {overlap} must be in [0, tile {tile})")
    if size <= tile:
        return [0]
    stride = tile - overlap
    origins = list(range(0, size - tile, stride))
    return [*origins, size - tile]  # the last window ends at the border (shifted inward)


def tiled_window_count(size: tuple[int, int], tile: tuple[int, int], grid: int, overlap: int = 64) -> int:
    """How many windows sample_tiled runs for an output `size` (the server's cost model counts them)."""
    return math.prod(
        len(windows(full, min(side, full), min(overlap, min(side, full) - grid), grid))
        for full, side in zip(size, tile, strict=True)
    )


def blend_weights(tile: tuple[int, int], overlap: int, device: torch.device) -> torch.Tensor:
    """[1, 1, th, tw] float64: a separable ramp, 1 inside and (i + 1) / (overlap + 1) across the
    overlap at every edge, so that overlapping windows fade into each other and no weight is 0."""
    axes = []
    for length in tile:
        ramp = torch.ones(length, dtype=torch.float64, device=device)
        if overlap:
            edge = torch.arange(1, overlap + 1, dtype=torch.float64, device=device) / (overlap + 1)
            ramp[:overlap] = torch.minimum(ramp[:overlap], edge)
            ramp[-overlap:] = torch.minimum(ramp[-overlap:], edge.flip(0))
        axes.append(ramp)
    return (axes[0][:, None] * axes[1][None, :])[None, None]


def sample_tiled(
    net: PiDNet,
    latent: torch.Tensor,
    sigma: torch.Tensor | float,
    text: torch.Tensor | None = None,
    steps: int = 4,
    tile: tuple[int, int] | None = None,
    overlap: int = 64,
    noises: Sequence[torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    window_batch: int = 4,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Decode `latent` [B, C, h, w] in windows; float32 [B, 3, H, W] in [-1, 1], like `sample`.

    tile: the window's output size (default: the network's native size, `cfg.rope_ref_size`);
    overlap: output pixels neighbouring windows share; window_batch: windows run through the network
    together (a memory bound; any value gives the same windows). Random draws as in `sample`.
    """
    cfg = net.cfg
    scale = cfg.output_scale
    height, width = cfg.output_size(latent.shape[-2], latent.shape[-1])
    tile_h, tile_w = tile or cfg.rope_ref_size
    tile_h, tile_w = min(tile_h, height), min(tile_w, width)
    origins = [
        (top, left)
        for top in windows(height, tile_h, min(overlap, tile_h - scale), scale)
        for left in windows(width, tile_w, min(overlap, tile_w - scale), scale)
    ]
    batch = latent.shape[0]
    sigmas = torch.as_tensor(sigma, dtype=torch.float32).expand(batch).contiguous()
    weight = blend_weights((tile_h, tile_w), min(overlap, tile_h - scale, tile_w - scale), latent.device)
    total = torch.zeros(1, 1, height, width, dtype=torch.float64, device=latent.device)
    for top, left in origins:
        total[..., top : top + tile_h, left : left + tile_w] += weight
    # Normalised per window once: with a single window the weight is exactly 1 (w / w), so tiled
    # equals untiled bit for bit.
    normalised = [weight / total[..., t : t + tile_h, l : l + tile_w] for t, l in origins]
    conds = [
        net.condition(
            latent[..., t // scale : (t + tile_h) // scale, l // scale : (l + tile_w) // scale],
            sigmas,
            text,
            image_size=(tile_h, tile_w),
        )
        for t, l in origins
    ]

    t_list = student_timesteps(steps)
    times = t_list.tolist()
    scaled = (t_list * 1000.0).tolist()
    draw = _noise_source((batch, 3, height, width), latent.device, noises, generator, expected=steps)
    x = draw()
    for k in range(len(times) - 1):
        t_cur, t_next = times[k], times[k + 1]
        x0 = torch.zeros(batch, 3, height, width, dtype=torch.float64, device=latent.device)
        for start in range(0, len(origins), window_batch):
            group = range(start, min(start + window_batch, len(origins)))
            x_w = torch.cat([x[..., t : t + tile_h, l : l + tile_w] for t, l in (origins[i] for i in group)])
            cond = _stack([conds[i] for i in group])
            t_scaled = torch.full((x_w.shape[0],), scaled[k], dtype=torch.float32, device=x.device)
            v = net.velocity(x_w, t_scaled, cond)
            # x0 in float64, as the untiled sampler computes it
            x0_w = x_w.double() - t_cur * v.double()
            for j, i in enumerate(group):
                top, left = origins[i]
                piece = x0_w[j * batch : (j + 1) * batch]
                x0[..., top : top + tile_h, left : left + tile_w] += normalised[i] * piece
        x0 = x0.float()
        if callback is not None:
            callback(StepRecord(index=k, t=t_cur, x_t=x, velocity=torch.empty(0), x0=x0))
        x = (1 - t_next) * x0 + t_next * draw() if t_next > 0 else x0
    return x.clamp(-1, 1)


def _stack(conds: list[Conditioning]) -> Conditioning:
    """Conditionings of windows of one size as one batch, window-major (window 0's B samples, then
    window 1's, ...). The position tables depend only on the window size, so they are shared."""
    if len(conds) == 1:
        return conds[0]
    first = conds[0]
    return Conditioning(
        gate_features=[
            torch.cat([c.gate_features[g] for c in conds]) for g in range(len(first.gate_features))
        ],
        pixel_feature=None if first.pixel_feature is None else torch.cat([c.pixel_feature for c in conds]),
        sigma=torch.cat([c.sigma for c in conds]),
        text=torch.cat([c.text for c in conds]),
        joint_rope=first.joint_rope,
        pixel_rope=first.pixel_rope,
        pixel_positions=first.pixel_positions,
        image_size=first.image_size,
    )
