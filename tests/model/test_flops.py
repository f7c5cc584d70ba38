"""The analytic FLOP count equals what torch's FLOP counter measures on a real forward."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import pidserve.model.network as network
from pidserve.model import PiDConfig, PiDNet
from pidserve.model.flops import condition_flops, decode_flops, step_flops


def _explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, quantizers=None) -> torch.Tensor:
    """Attention as plain matmuls, so that the FLOP counter sees them on CPU."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return (weights @ v).transpose(1, 2).flatten(2)


@pytest.mark.parametrize("name", ["tiny_v1", "tiny_v1.5"])
def test_counted_flops_match_the_flop_counter(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(network, "attention", _explicit_attention)
    cfg = PiDConfig.preset(name)
    net = PiDNet(cfg).eval()
    height, width, batch, text_len = 128, 192, 2, 10
    cells = cfg.latent_downsample * cfg.sr_scale
    latent = torch.randn(batch, cfg.latent_channels, height // cells, width // cells)
    with torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            cond = net.condition(latent, torch.tensor([0.1, 0.2]), torch.randn(batch, text_len, cfg.text_dim))
        assert counter.get_total_flops() == condition_flops(cfg, height, width, text_len, batch).total
        counter = FlopCounterMode(display=False)
        with counter:
            net.velocity(torch.randn(batch, 3, height, width), torch.full((batch,), 500.0), cond)
        assert counter.get_total_flops() == step_flops(cfg, height, width, text_len, batch).total


def test_decode_is_conditioning_plus_steps() -> None:
    cfg = PiDConfig.preset("2k_flux")
    four = decode_flops(cfg, 2048, 2048, steps=4)
    assert four.total == condition_flops(cfg, 2048, 2048).total + 4 * step_flops(cfg, 2048, 2048).total
    # Attention over 16k patch tokens dominates the full-size decode at 2048^2.
    assert four.patch_attention > four.patch_linear > four.pixel_blocks > four.adapter
