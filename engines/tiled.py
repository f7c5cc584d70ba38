"""The tiled decode every backend runs: its network on chunks of window rows, the shared sampler around it.

    plan (model/tiling.py)  ->  per chunk: condition(latent rows, sigma rows, text rows) once
                            ->  per step: velocity(state, x rows, t rows) per chunk, blended
                            ->  student_steps with the whole image's seeded noise (as untiled), drawn
                                step by step so one whole-image draw is held at a time

Each window's latent rows are its crop of the latent, or that crop corrected for the encoder's context
(model/window_latents.py; the engine's `window_latents` option, auto by default: corrected for tiny-ae
latents). A backend supplies only `condition` and `velocity` over rows; chunks hold at most `row_batch` rows
(window x sample pairs), so activation memory is bounded by one chunk whatever the output size. A
fixed-shape backend (ONNX Runtime, TensorRT profiles, CUDA graphs) names its served batch sizes: each
chunk is padded to the next one by repeating its first row (the padding's outputs are dropped), so
one built window shape serves every output size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from pidserve.model import TilePlan, WindowLatents, student_steps, student_timesteps, tiled_velocity

from .base import DecodeBatch, padded_batch_size, stop_if_abandoned

# condition(latent_rows, sigma_rows, text_rows) -> a backend's conditioning state for one chunk
RowCondition = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], Any]
# velocity(state, x_rows, t_scaled_rows) -> v_rows
RowStep = Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]


def decode_tiled(
    plan: TilePlan,
    batch: DecodeBatch,
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    text: torch.Tensor | None,
    draw: Callable[[], torch.Tensor],
    row_batch: int,
    condition: RowCondition,
    velocity: RowStep,
    batch_sizes: Sequence[int] | None = None,
    window_latents: WindowLatents | None = None,
) -> torch.Tensor:
    """float32 x0 [B, 3, H, W] in [-1, 1] on the inputs' device.

    latents/sigmas/text: the batch on the device (B rows); draw: the next whole-image noise draw
    [B, 3, H, W] (base.seeded_noise_stream), called batch.steps times.
    batch_sizes: the only row counts `condition` and `velocity` accept (None: any up to row_batch).
    window_latents: what each window is conditioned on (model/window_latents.py; None: its crop).
    Asks `batch.abandoned` before every chunk of every step and reports `batch.progress`.
    """
    size = latents.shape[0]
    pad = (lambda n: n) if batch_sizes is None else (lambda n: padded_batch_size(n, batch_sizes))
    states = [
        condition(*(_padded(rows, pad) for rows in chunk))
        for chunk in plan.chunk_inputs(latents, sigmas, text, row_batch, window_latents)
    ]

    def velocity_rows(chunk: int, x_rows: torch.Tensor, t_rows: torch.Tensor) -> torch.Tensor:
        stop_if_abandoned(batch)
        n = x_rows.shape[0]
        return velocity(states[chunk], _padded(x_rows, pad), _padded(t_rows, pad))[:n]

    blended = tiled_velocity(plan, size, row_batch, velocity_rows, batch.steps, batch.progress)
    return student_steps(blended, draw, student_timesteps(batch.steps))


def _padded(rows: torch.Tensor | None, pad: Callable[[int], int]) -> torch.Tensor | None:
    """rows [n, ...] grown to pad(n) rows by repeating row 0 (None stays None)."""
    if rows is None:
        return None
    extra = pad(rows.shape[0]) - rows.shape[0]
    if extra == 0:
        return rows
    return torch.cat([rows, rows[:1].expand(extra, *rows.shape[1:])])
