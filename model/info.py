"""What a network or checkpoint is: parameter counts by part and the released variants it fits."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .checkpoints import diff_keys
from .config import PRESETS, PiDConfig
from .network import PiDNet

# Top-level modules of PiDNet that belong to the latent adapter (everything else is backbone).
ADAPTER_PARTS = ("adapter", "gates", "pixel_gate")


def parameter_counts(net: nn.Module) -> dict[str, int]:
    """Parameter counts: "total", "backbone", "adapter", then "part:<module>" per top-level module."""
    by_part: dict[str, int] = {}
    for name, tensor in net.state_dict().items():
        part = name.split(".")[0]
        by_part[part] = by_part.get(part, 0) + tensor.numel()
    adapter = sum(v for k, v in by_part.items() if k in ADAPTER_PARTS)
    total = sum(by_part.values())
    return {
        "total": total,
        "backbone": total - adapter,
        "adapter": adapter,
        **{f"part:{k}": v for k, v in sorted(by_part.items())},
    }


def matching_variants(shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Presets whose network has exactly these tensors (our names), aux head optional.

    Several released variants share one architecture (e.g. 2k_flux, 2k_sd3, 2kto4k_sd3): all
    are returned, in preset order (released variants first).
    """
    found = []
    for name in PRESETS:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in PiDNet(PRESETS[name]).state_dict().items()}
        diff = diff_keys(shapes, expected)
        diff.missing = [k for k in diff.missing if not k.startswith("adapter.aux_rgb_head.")]
        if not diff:
            found.append(name)
    return found


def describe_config(cfg: PiDConfig) -> dict[str, object]:
    """A short, human-readable summary of a config's structure."""
    return {
        "version": cfg.version,
        "latent_space": cfg.latent_space,
        "latent": f"{cfg.latent_channels} ch, 1 cell per {cfg.latent_downsample}x{cfg.latent_downsample} px",
        "sr_scale": cfg.sr_scale,
        "hidden_size": cfg.hidden_size,
        "patch_blocks": cfg.patch_depth,
        "pixel_blocks": cfg.pixel_depth,
        "gates": f"{cfg.num_gates} x {cfg.gate_type}" + (" + pixel gate" if cfg.pixel_gate else ""),
        "rope_reference": f"{cfg.rope_ref_size[0]}x{cfg.rope_ref_size[1]}",
    }
