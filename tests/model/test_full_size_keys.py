"""Every released variant: our network, built on the meta device and mapped through the loader's
name mapping, covers exactly the official key/shape list — nothing missing, nothing unexpected."""

from __future__ import annotations

import json

import pytest
import torch

from pidserve.model import PiDConfig, PiDNet
from pidserve.model.checkpoints import diff_keys, official_to_ours
from pidserve.model.config import PRESETS, RELEASED_CHECKPOINTS
from tests.conftest import OFFICIAL

RELEASED = json.loads((OFFICIAL / "full_size_keys.json").read_text())
VARIANTS = [k for k in RELEASED if not k.startswith("_")]


def test_every_released_variant_has_a_preset() -> None:
    assert set(VARIANTS) == set(RELEASED_CHECKPOINTS)
    assert set(VARIANTS) <= set(PRESETS)


@pytest.mark.parametrize("variant", VARIANTS)
def test_meta_network_covers_the_official_keys_exactly(variant: str) -> None:
    info = RELEASED[variant]
    cfg = PiDConfig.preset(variant)
    with torch.device("meta"):
        net = PiDNet(cfg)
    ours = {name: tuple(t.shape) for name, t in net.state_dict().items()}
    official = {official_to_ours(name): tuple(shape) for name, shape in info["params"]}
    assert len(official) == info["num_tensors"]  # the mapping is one-to-one
    diff = diff_keys(official, ours)
    assert not diff, diff.report()
    assert sum(t.numel() for t in net.state_dict().values()) == info["param_count_total"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_official_kwargs_give_the_preset(variant: str) -> None:
    cfg = PiDConfig.from_official(RELEASED[variant]["net_kwargs"], latent_space=PRESETS[variant].latent_space)
    # The trained output size is not among the official constructor arguments: the preset knows it
    # from the release (2k or 2k -> 4k).
    assert cfg == PiDConfig.preset(variant).replace(trained_size=None)


def test_backbone_and_adapter_parameter_counts() -> None:
    from pidserve.model.info import parameter_counts

    for variant in VARIANTS:
        with torch.device("meta"):
            counts = parameter_counts(PiDNet(PiDConfig.preset(variant)))
        expected = RELEASED[variant]["param_counts"]
        assert counts["backbone"] == expected["backbone"], variant
        assert counts["adapter"] == expected["adapter_total"], variant


@pytest.mark.parametrize("variant", VARIANTS)
def test_preset_latent_space_is_registered_and_consistent(variant: str) -> None:
    from pidserve.model import get_latent_space

    cfg = PiDConfig.preset(variant)
    space = get_latent_space(cfg.latent_space)
    assert space.channels == cfg.latent_channels
    assert space.downsample == cfg.latent_downsample
    assert variant in space.pid_variants
