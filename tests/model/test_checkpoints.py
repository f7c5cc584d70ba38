"""Checkpoint IO: official .pth/.safetensors files, EMA selection, our format, and readable errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pidserve.model import CheckpointError, PiDConfig, PiDNet, load_checkpoint, save_checkpoint
from pidserve.model.checkpoints import read_checkpoint
from pidserve.model.info import matching_variants
from tests.conftest import OFFICIAL, load_tensors

V1 = OFFICIAL / "tiny_v1" / "weights.safetensors"
V15 = OFFICIAL / "tiny_v1.5" / "weights.safetensors"


def _official_pth(path: Path, weights: dict[str, torch.Tensor], prefix: str = "net.", **extra) -> Path:
    """Write a file the way the official release does: torch.save of {"net." + name: bf16 tensor}."""
    state = {prefix + k: v.to(torch.bfloat16) for k, v in weights.items()}
    state.update(extra)
    torch.save(state, path)
    return path


def _inputs(cfg: PiDConfig) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(5)
    latent = torch.randn(1, cfg.latent_channels, 2, 2, generator=g)
    h, w = cfg.output_size(2, 2)
    return torch.randn(1, 3, h, w, generator=g), torch.tensor([500.0]), latent, torch.tensor([0.2])


def _same_outputs(a: PiDNet, b: PiDNet) -> bool:
    inputs = _inputs(a.cfg)
    with torch.no_grad():
        return torch.equal(a(*inputs), b(*inputs))


def test_official_pth_loads_with_bf16_values_and_ignores_other_networks(tmp_path: Path) -> None:
    weights = load_tensors(V1)
    noise = {"fake_score.x": torch.zeros(3), "discriminator.y": torch.zeros(2)}
    path = _official_pth(tmp_path / "model_ema_bf16.pth", weights, **noise)
    net = load_checkpoint(path, PiDConfig.preset("tiny_v1"))
    assert net.dtype == torch.float32 and not net.training
    # The loaded values are the bf16-rounded official weights, upcast to float32.
    rounded = {k: v.to(torch.bfloat16).float() for k, v in weights.items()}
    reference = load_checkpoint(_official_safetensors(tmp_path, rounded), PiDConfig.preset("tiny_v1"))
    assert _same_outputs(net, reference)


def _official_safetensors(tmp_path: Path, weights: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "official.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    return path


def test_ema_weights_are_preferred(tmp_path: Path) -> None:
    weights = load_tensors(V1)
    garbage = {"net." + k: torch.zeros_like(v) for k, v in weights.items()}
    path = _official_pth(tmp_path / "ema.pth", weights, prefix="net_ema.", **garbage)
    net = load_checkpoint(path, PiDConfig.preset("tiny_v1"))
    assert torch.equal(
        net.patch_embedder.weight, weights["s_embedder.proj.weight"].to(torch.bfloat16).float()
    )


def test_v15_checkpoint_without_the_training_only_aux_head_loads(tmp_path: Path) -> None:
    weights = {k: v for k, v in load_tensors(V15).items() if "lq_aux_rgb_head" not in k}
    net = load_checkpoint(_official_pth(tmp_path / "v15.pth", weights), PiDConfig.preset("tiny_v1.5"))
    full = load_checkpoint(
        _official_pth(tmp_path / "v15_full.pth", load_tensors(V15)), PiDConfig.preset("tiny_v1.5")
    )
    assert _same_outputs(net, full)  # the aux head never takes part in a decode


def test_version_mismatch_is_reported(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"v1 checkpoint but the config describes a v1\.5 network"):
        load_checkpoint(V1, PiDConfig.preset("tiny_v1.5"))


def test_shape_mismatch_gives_a_readable_diff() -> None:
    cfg = PiDConfig.preset("tiny_v1").replace(latent_channels=4, patch_depth=6)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(V1, cfg)
    message = str(err.value)
    assert "missing from the checkpoint" in message and "patch_blocks.4." in message
    assert "wrong shape" in message and "adapter.trunk.0.weight: [32, 16, 3, 3] vs [32, 4, 3, 3]" in message
    assert "Traceback" not in message


def test_unexpected_keys_are_listed(tmp_path: Path) -> None:
    weights = load_tensors(V1)
    weights["some_new_module.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match=r"1 unexpected:\n  - some_new_module\.weight"):
        load_checkpoint(_official_pth(tmp_path / "x.pth", weights), PiDConfig.preset("tiny_v1"))


def test_official_file_needs_a_config() -> None:
    with pytest.raises(CheckpointError, match=r"carries no config.*pidserve convert"):
        load_checkpoint(V1)


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"net.x": torch.zeros(1), "obj": _Payload()}, path)
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_checkpoint(path, PiDConfig.preset("tiny_v1"))


class _Payload:
    """Any class instance: weights_only loading must refuse to rebuild it."""


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors", PiDConfig.preset("tiny_v1"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="could not read"):
        load_checkpoint(bad, PiDConfig.preset("tiny_v1"))
    other = tmp_path / "weights.npz"
    other.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint type"):
        load_checkpoint(other, PiDConfig.preset("tiny_v1"))
    listy = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listy)
    with pytest.raises(CheckpointError, match="not a flat dict of tensors"):
        load_checkpoint(listy, PiDConfig.preset("tiny_v1"))


def test_our_format_round_trips_with_its_config(tmp_path: Path) -> None:
    net = load_checkpoint(V15, PiDConfig.preset("tiny_v1.5"))
    path = tmp_path / "ours.safetensors"
    save_checkpoint(net, path)
    raw = read_checkpoint(path)
    assert raw.config == net.cfg and not raw.official
    again = load_checkpoint(path)  # no config needed: it is in the metadata
    assert _same_outputs(net, again)
    with pytest.raises(CheckpointError, match="different config"):
        load_checkpoint(path, PiDConfig.preset("tiny_v1.5").replace(sr_scale=8))


def test_bf16_save_halves_the_file(tmp_path: Path) -> None:
    net = load_checkpoint(V1, PiDConfig.preset("tiny_v1"))
    save_checkpoint(net, tmp_path / "f32.safetensors")
    save_checkpoint(net, tmp_path / "bf16.safetensors", dtype=torch.bfloat16)
    ratio = (tmp_path / "bf16.safetensors").stat().st_size / (tmp_path / "f32.safetensors").stat().st_size
    assert 0.45 < ratio < 0.55
    assert load_checkpoint(tmp_path / "bf16.safetensors").dtype == torch.float32  # upcast on load


def test_matching_variants_recognises_architectures() -> None:
    import json

    from pidserve.model.checkpoints import official_to_ours

    info = json.loads((OFFICIAL / "full_size_keys.json").read_text())
    shapes = {official_to_ours(n): tuple(s) for n, s in info["2k_flux"]["params"]}
    assert set(matching_variants(shapes)) == {"2k_flux", "2k_sd3", "2kto4k_sd3"}
    shapes = {official_to_ours(n): tuple(s) for n, s in info["2kto4k_v1pt5_flux2"]["params"]}
    shapes = {k: v for k, v in shapes.items() if "aux_rgb_head" not in k}
    assert matching_variants(shapes) == ["2kto4k_v1pt5_flux2"]
