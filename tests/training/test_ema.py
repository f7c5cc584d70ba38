from __future__ import annotations

import math

import pytest
import torch

from pidserve.training.ema import EMA, power_gamma


def test_power_gamma_matches_edm2():
    # EDM2 (Karras et al. 2024, section 3.1): sigma_rel 0.05 <-> gamma 16.97; 0.10 <-> gamma 6.94.
    assert power_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert power_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    g = power_gamma(0.07)
    assert math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))) == pytest.approx(0.07, rel=1e-9)


def test_power_ema_forgets_the_start_and_plain_ema_lerps():
    lin = torch.nn.Linear(1, 1, bias=False)
    ema = EMA(lin, "power", sigma_rel=0.05)
    assert ema.decay(1) == 0.0  # the first update copies the weights
    for step in range(1, 101):
        with torch.no_grad():
            lin.weight.fill_(float(step))
        ema.update(lin, step)
    # Power EMA of 1..100 averages the recent past: well above the uniform mean 50.5.
    assert 85 < float(ema.shadow["weight"]) < 100
    plain = EMA(lin, "plain", beta=0.5)
    with torch.no_grad():
        lin.weight.fill_(0.0)
    plain.update(lin, 1)
    assert float(plain.shadow["weight"]) == pytest.approx(50.0)
    target = torch.nn.Linear(1, 1, bias=False)
    plain.copy_to(target)
    assert float(target.weight.detach()) == pytest.approx(50.0)
