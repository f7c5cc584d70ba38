"""Samplers: the distilled few-step student sampler and a many-step teacher solver.

    student   student_timesteps (the distilled schedule), student_steps (the rollout any backend
              runs with its own velocity function), sample (PiDNet + student_steps)
    flow      flow_noise, predict_x0: the convention x_t = (1 - t) x0 + t eps, v = eps - x0
    teacher   shift_time, resolution_shift, teacher_timesteps (schedule); euler_step, heun_step,
              cfg_velocity (pure step functions); sample_euler, sample_heun (loops over a
              schedule, k-diffusion style); sample_teacher (PiDNet + guidance + one solver)
    output    to_uint8_hwc

Everything works in the flow convention (t = 1: pure noise) on pixels [B, 3, H, W] in [-1, 1];
the network reads t * FM_TIMESCALE. Training uses these schedules and constants too. Every
random draw comes from an explicit `torch.Generator` (or is passed in through `noises`), so a
seed reproduces a decode bit for bit on the same backend. The adapter trunk and text embedding
run once per decode (`PiDNet.condition`), not per step.
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
# velocity(x_t [B, 3, H, W], t) -> v [B, 3, H, W]; the teacher solvers pass t as a 0-d tensor.
Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---- student ---------------------------------------------------------------------------------
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
    draw = noise_source(shape, latent.device, noises, generator, expected=steps)
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


def noise_source(
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


# ---- the flow convention, shared with training -----------------------------------------------
def flow_noise(x0: torch.Tensor, t: float | torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps; t a float, a 0-d tensor or [B, 1, 1, 1]."""
    return (1 - t) * x0 + t * eps


def predict_x0(x_t: torch.Tensor, t: float | torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The clean image a velocity implies: x0 = x_t - t v (v = eps - x0)."""
    return x_t - t * v


# ---- teacher: time schedule, step functions, guidance, solver loops ---------------------------
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


def teacher_timesteps(steps: int, shift: float = 1.0, device: torch.device | None = None) -> torch.Tensor:
    """The teacher's times [steps + 1] (float32): 1 to 0 evenly spaced, then shift_time."""
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32, device=device), shift)


def cfg_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: v_uncond + scale (v_cond - v_uncond); scale 1 gives v_cond."""
    return v_uncond + scale * (v_cond - v_uncond)


def euler_step(x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One Euler step of dx/dt = v from t to t_next."""
    return x + (t_next - t) * v


def heun_step(
    velocity: Velocity, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """One Heun (2nd order) step: Euler, then the trapezoid of v at both ends. v = velocity(x, t).

    A step ending at t_next = 0 stays Euler (no evaluation at t = 0), as in k-diffusion.
    """
    x_euler = euler_step(x, t, t_next, v)
    if t_next > 0:
        return x + (t_next - t) * 0.5 * (v + velocity(x_euler, t_next))
    return x_euler


def sample_euler(
    velocity: Velocity, x: torch.Tensor, times: torch.Tensor, callback: StepCallback | None = None
) -> torch.Tensor:
    """Integrate from times[0] to times[-1] with Euler steps (1 evaluation per step); not clamped."""
    for k in range(len(times) - 1):
        t, t_next = times[k], times[k + 1]
        v = velocity(x, t)
        _report(callback, k, t, x, v)
        x = euler_step(x, t, t_next, v)
    return x


def sample_heun(
    velocity: Velocity, x: torch.Tensor, times: torch.Tensor, callback: StepCallback | None = None
) -> torch.Tensor:
    """Integrate from times[0] to times[-1] with Heun steps (2 evaluations per step, 1 for the last)."""
    for k in range(len(times) - 1):
        t, t_next = times[k], times[k + 1]
        v = velocity(x, t)
        _report(callback, k, t, x, v)
        x = heun_step(velocity, x, t, t_next, v)
    return x


TEACHER_SOLVERS: dict[str, Callable[..., torch.Tensor]] = {"euler": sample_euler, "heun": sample_heun}


def _report(callback: StepCallback | None, k: int, t: torch.Tensor, x: torch.Tensor, v: torch.Tensor) -> None:
    if callback is not None:
        callback(StepRecord(index=k, t=float(t), x_t=x, velocity=v, x0=predict_x0(x, t, v)))


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

    solver "euler" (1 evaluation per step) or "heun" (2nd order, 2 per step except the last), over
    teacher_timesteps(steps, shift). cfg_scale != 1 uses classifier-free guidance against
    `negative_text` (None: no text tokens). The initial noise is `noise`, else drawn from `generator`.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if solver not in TEACHER_SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(map(repr, TEACHER_SOLVERS))}, got {solver!r}")
    sigma = torch.as_tensor(sigma)
    cond = net.condition(latent, sigma, text)
    uncond = net.condition(latent, sigma, negative_text) if cfg_scale != 1.0 else None
    batch = latent.shape[0]
    shape = (batch, 3, *cond.image_size)
    x = noise_source(shape, latent.device, None if noise is None else [noise], generator, expected=1)()

    def velocity(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t_scaled = (t * FM_TIMESCALE).expand(batch)
        v = net.velocity(x_t, t_scaled, cond).float()
        if uncond is None:
            return v
        return cfg_velocity(v, net.velocity(x_t, t_scaled, uncond).float(), cfg_scale)

    times = teacher_timesteps(steps, shift, latent.device)
    return TEACHER_SOLVERS[solver](velocity, x, times, callback).clamp(-1, 1)


# ---- output conversion ---------------------------------------------------------------------------
def to_uint8_hwc(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float [B, 3, H, W] -> uint8 [B, H, W, 3]: (x + 1) * 127.5, truncated (not rounded).

    Truncation matches the official image conversion (numpy astype), so uint8 outputs agree
    exactly. The one definition lives in pidserve.kernels (its plain-torch reference).
    """
    return postprocess_reference(images)
