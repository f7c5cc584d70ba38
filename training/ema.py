"""Exponential moving averages of weights: plain (fixed beta) or EDM2's power-function EMA.

The power-function EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics
of Diffusion Models") uses beta_t = (1 - 1/t)^(gamma + 1) at step t: early weights are
forgotten quickly, so the average is useful from the first hundred steps, which a short
CPU run needs. It is parameterised by sigma_rel, the average's width relative to the
training length; gamma follows from sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn


def power_gamma(sigma_rel: float) -> float:
    """gamma of the power-function EMA with relative width sigma_rel (solved by bisection)."""
    if not 0 < sigma_rel < 0.28:  # sigma_rel -> 0.2887 as gamma -> -1
        raise ValueError(f"sigma_rel must be in (0, 0.28); got {sigma_rel}")

    def width(gamma: float) -> float:
        return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))

    lo, hi = -0.999, 1e6  # width() decreases in gamma
    for _ in range(200):
        mid = math.sqrt((lo + 1.001) * (hi + 1.001)) - 1.001  # bisection in log(gamma + 1)
        lo, hi = (mid, hi) if width(mid) > sigma_rel else (lo, mid)
    return (lo + hi) / 2


class EMA:
    """Shadow copy of a module's floating-point parameters and buffers, updated after each step."""

    def __init__(
        self,
        module: nn.Module,
        kind: Literal["power", "plain"] = "power",
        sigma_rel: float = 0.05,
        beta: float = 0.999,
    ) -> None:
        if kind not in ("power", "plain"):
            raise ValueError(f"EMA kind must be 'power' or 'plain'; got {kind!r}")
        self.kind, self.sigma_rel, self.beta = kind, sigma_rel, beta
        self.gamma = power_gamma(sigma_rel) if kind == "power" else None
        self.shadow = {
            k: v.detach().clone().float() for k, v in module.state_dict().items() if v.is_floating_point()
        }

    def decay(self, step: int) -> float:
        """beta used for the update after optimizer step `step` (1-based)."""
        if self.kind == "plain":
            return self.beta
        return (1 - 1 / step) ** (self.gamma + 1) if step > 1 else 0.0

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        beta = self.decay(step)
        for name, value in module.state_dict().items():
            if name in self.shadow:
                self.shadow[name].lerp_(value.detach().float(), 1 - beta)

    def full_state(self) -> dict[str, torch.Tensor]:
        """The averaged weights as full CPU tensors (gathers FSDP shards: every process must call it)."""
        from torch.distributed.tensor import DTensor

        return {
            k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
            for k, v in self.shadow.items()
        }

    def copy_to(self, module: nn.Module, full_state: dict[str, torch.Tensor] | None = None) -> None:
        """Load the averaged weights into a plain `module` (e.g. a fresh copy for evaluation or export)."""
        full_state = self.full_state() if full_state is None else full_state
        state = module.state_dict()
        state.update({k: v.to(device=state[k].device, dtype=state[k].dtype) for k, v in full_state.items()})
        module.load_state_dict(state)
