"""Samplers: the distilled few-step student sampler and a many-step teacher solver.

Both work in the flow convention x_t = (1 - t) x0 + t * noise (t = 1: pure noise), on pixels
[B, 3, H, W] in [-1, 1]. Every random draw comes from an explicit `torch.Generator` (or is
passed in through `noises`), so a seed reproduces a decode bit for bit on the same backend.
The adapter trunk and text embedding run once per decode (`PiDNet.condition`), not per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from pidserve.kernels import postprocess_reference

from .network import Conditioning, PiDNet

# The distilled student's schedule, as float32 values (0.999 is 0.99900001287... in float32).
STUDENT_T_LIST = (0.999, 0.866, 0.634, 0.342, 0.0)
FM_TIMESCALE = 1000.0  # the network reads t * 1000
MAX_STUDENT_STEPS = len(STUDENT_T_LIST) - 1


@dataclass
class StepRecord:
    """What one sampler step saw and produced (for tests, debugging and progress reports)."""

    index: int
    t: float
    x_t: torch.Tensor  # float32 [B, 3, H, W]
    velocity: torch.Tensor  # in the net's dtype
    x0: torch.Tensor  # float32


StepCallback = Callable[[StepRecord], None]


def student_timesteps(steps: int = 4) -> torch.Tensor:
    """The student's times [steps + 1] (float32), ending at 0.

    4 steps: the distilled list. 2-3 steps: a subset t_list[round(linspace(0, 4, n + 1))].
    1 step: [1.0, 0.0] (the student's single-step time is 1.0, not 0.999).
    """
    if not 1 <= steps <= MAX_STUDENT_STEPS:
        raise ValueError(f"the distilled student runs 1 to {MAX_STUDENT_STEPS} steps, got steps={steps}")
    if steps == 1:
        return torch.tensor([1.0, 0.0], dtype=torch.float32)
    full = torch.tensor(STUDENT_T_LIST, dtype=torch.float32)
    index = torch.linspace(0, MAX_STUDENT_STEPS, steps + 1).round().long()
    return full[index]


def sample(
    net: PiDNet,
    latent: torch.Tensor,
    sigma: torch.Tensor | float,
    text: torch.Tensor | None = None,
    steps: int = 4,
    noises: Sequence[torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    cond: Conditioning | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Decode a latent with the distilled student sampler; returns float32 [B, 3, H, W] in [-1, 1].

    latent [B, C, h, w] (normalised, possibly noisy), sigma its noise level ([B] or a float),
    text [B, Lt, text_dim] or None. Random draws: `noises` = [initial noise, then one fresh
    draw after each step but the last] (steps tensors of [B, 3, H, W]), else from `generator`
    in that order. Pass `cond` to reuse a Conditioning already built for this latent.
    """
    t_list = student_timesteps(steps)
    cond = cond or net.condition(latent, torch.as_tensor(sigma), text)
    height, width = cond.image_size
    shape = (latent.shape[0], 3, height, width)
    draw = _noise_source(shape, latent.device, noises, generator, expected=steps)
    return student_steps(lambda x, t_scaled: net.velocity(x, t_scaled, cond), draw, t_list, callback)


def student_steps(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    draw: Callable[[], torch.Tensor],
    t_list: torch.Tensor,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """The student's stochastic rollout, for any velocity function (eager net, ONNX, TensorRT).

    velocity(x_t [B,3,H,W], t_scaled [B]) -> v; draw() -> the next N(0, 1) tensor [B,3,H,W]
    (first the initial noise, then one per re-noising); t_list float32 [steps + 1].
    Returns float32 [B, 3, H, W] clamped to [-1, 1]. The times become Python floats up front
    (exact float32 values), so the loop never syncs with the device and can be graph-captured.
    """
    times = t_list.float().cpu()
    scaled = (times * FM_TIMESCALE).tolist()  # t * 1000 rounded in float32: 999, 866, 634, 342
    times = times.tolist()
    x = draw()
    batch = x.shape[0]
    for k in range(len(times) - 1):
        t_cur, t_next = times[k], times[k + 1]
        v = velocity(x, torch.full((batch,), scaled[k], dtype=torch.float32, device=x.device))
        # x0 in float64 (x, v and the float32 t upcast), as the official sampler computes it.
        x0 = (x.double() - t_cur * v.double()).float()
        if callback is not None:
            callback(StepRecord(index=k, t=t_cur, x_t=x, velocity=v, x0=x0))
        # (1 - t_next) and t_next enter as float32 scalars, like the official float32 tensors.
        x = (1 - t_next) * x0 + t_next * draw() if t_next > 0 else x0
    return x.clamp(-1, 1)


def _noise_source(
    shape: tuple[int, ...],
    device: torch.device,
    noises: Sequence[torch.Tensor] | None,
    generator: torch.Generator | None,
    expected: int,
) -> Callable[[], torch.Tensor]:
    """A function returning the next standard-normal draw of `shape` (float32)."""
    if noises is not None:
        if len(noises) != expected:
            raise ValueError(
                f"noises must hold {expected} tensors (initial + one per re-noising), got {len(noises)}"
            )
        for i, n in enumerate(noises):
            if tuple(n.shape) != shape:
                raise ValueError(f"noises[{i}] has shape {list(n.shape)}, expected {list(shape)}")
        queue = iter(noises)
        return lambda: next(queue).to(device=device, dtype=torch.float32)
    return lambda: torch.randn(shape, generator=generator, device=device, dtype=torch.float32)


# ---- teacher solver ----------------------------------------------------------------------------
def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Time shift t' = shift * t / (1 + (shift - 1) * t): shift > 1 spends more steps at high noise."""
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(image_size: tuple[int, int], base_shift: float, base_size: int) -> float:
    """Resolution-dependent shift: base_shift at base_size^2 pixels, scaled by sqrt(pixels) ratio.

    The official training configs record (base_shift, base_size) pairs (e.g. 6.0 @ 2048); the
    scaling rule with image area is ours (linear in side length, as SD3-style shifts).
    """
    height, width = image_size
    return base_shift * math.sqrt(height * width) / base_size


def sample_teacher(
    net: PiDNet,
    latent: torch.Tensor,
    sigma: torch.Tensor | float,
    text: torch.Tensor | None = None,
    steps: int = 50,
    solver: Literal["euler", "heun"] = "euler",
    shift: float = 1.0,
    cfg_scale: float = 1.0,
    negative_text: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Integrate the teacher's flow ODE from t = 1 (noise) to t = 0; returns [-1, 1] float32.

    solver "euler" (1 evaluation per step) or "heun" (2nd order, 2 per step except the last).
    cfg_scale > 1 uses classifier-free guidance against `negative_text` (None: no text tokens).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if solver not in ("euler", "heun"):
        raise ValueError(f"solver must be 'euler' or 'heun', got {solver!r}")
    sigma = torch.as_tensor(sigma)
    cond = net.condition(latent, sigma, text)
    uncond = net.condition(latent, sigma, negative_text) if cfg_scale != 1.0 else None
    batch = latent.shape[0]
    shape = (batch, 3, *cond.image_size)
    x = _noise_source(shape, latent.device, None if noise is None else [noise], generator, expected=1)()

    def velocity(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t_scaled = (t * FM_TIMESCALE).expand(batch)
        v = net.velocity(x_t, t_scaled, cond).float()
        if uncond is not None:
            v_uncond = net.velocity(x_t, t_scaled, uncond).float()
            v = v_uncond + cfg_scale * (v - v_uncond)
        return v

    times = shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32, device=latent.device), shift)
    for k in range(steps):
        t_cur, t_next = times[k], times[k + 1]
        v = velocity(x, t_cur)
        if callback is not None:
            callback(StepRecord(index=k, t=float(t_cur), x_t=x, velocity=v, x0=x - t_cur * v))
        x_next = x + (t_next - t_cur) * v
        if solver == "heun" and t_next > 0:
            x_next = x + (t_next - t_cur) * 0.5 * (v + velocity(x_next, t_next))
        x = x_next
    return x.clamp(-1, 1)


# ---- output conversion ---------------------------------------------------------------------------
def to_uint8_hwc(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float [B, 3, H, W] -> uint8 [B, H, W, 3]: (x + 1) * 127.5, truncated (not rounded).

    Truncation matches the official image conversion (numpy astype), so uint8 outputs agree
    exactly. The one definition lives in pidserve.kernels (its plain-torch reference).
    """
    return postprocess_reference(images)
