"""Checkpoint IO: official PiD checkpoints (.pth / .safetensors) and ours (.safetensors + config).

Official files are flat dicts {"net." + PidNet state_dict name: bf16 tensor}, possibly with
EMA copies ("net_ema.") or training-only networks ("fake_score.", "discriminator.") beside
them. We map official names onto ours (`official_to_ours`), never unpickle arbitrary objects
(`torch.load(..., weights_only=True)`), and report a mismatch as a readable diff.
Our format: safetensors with metadata {"format": "pidserve", "config": PiDConfig JSON}.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import PiDConfig
from .errors import CheckpointError
from .network import PiDNet

log = logging.getLogger(__name__)

FORMAT_TAG = "pidserve"

# Official parameter-name pieces -> ours, applied in order as regex substitutions.
_RENAMES: list[tuple[str, str]] = [
    (r"^y_pos_embedding$", "text_pos_embedding"),
    (r"^s_embedder\.proj\.", "patch_embedder."),
    (r"^pixel_embedder\.proj\.", "pixel_embedder."),
    (r"^t_embedder\.mlp\.0\.", "time_embedder.fc1."),
    (r"^t_embedder\.mlp\.2\.", "time_embedder.fc2."),
    (r"^y_embedder\.", "text_embedder."),
    (r"\.adaLN_modulation_img\.0\.", ".modulation_img."),
    (r"\.adaLN_modulation_txt\.0\.", ".modulation_txt."),
    (r"\.adaLN_modulation\.0\.", ".modulation."),
    (r"^lq_proj\.latent_proj\.", "adapter.trunk."),
    (r"^lq_proj\.output_heads\.", "adapter.heads."),
    (r"^lq_proj\.pit_head\.", "adapter.pixel_head."),
    (r"^lq_proj\.lq_aux_rgb_head\.", "adapter.aux_rgb_head."),
    (r"^lq_proj\.gate_modules\.", "gates."),
    (r"^pit_lq_gate\.", "pixel_gate."),
]
_COMPILED = [(re.compile(pattern), repl) for pattern, repl in _RENAMES]
# Prefixes of official checkpoint entries that belong to other networks of a training run.
_FOREIGN_PREFIXES = ("net_ema.", "fake_score.", "discriminator.")
_AUX_HEAD = "adapter.aux_rgb_head."


def official_to_ours(name: str) -> str:
    """Map one official PidNet state_dict name (without "net.") onto our parameter name."""
    for pattern, repl in _COMPILED:
        name = pattern.sub(repl, name)
    return name


# The same renames backwards: our name pieces -> official, applied in reverse order.
def _reversed_rename(pattern: str, repl: str) -> tuple[re.Pattern[str], str]:
    anchored = (
        ("^" if pattern.startswith("^") else "") + re.escape(repl) + ("$" if pattern.endswith("$") else "")
    )
    return re.compile(anchored), pattern.strip("^$").replace("\\", "")


_REVERSED = [_reversed_rename(pattern, repl) for pattern, repl in reversed(_RENAMES)]


def ours_to_official(name: str) -> str:
    """official_to_ours's inverse: our parameter name -> the official PidNet state_dict name."""
    for pattern, repl in _REVERSED:
        name = pattern.sub(repl, name)
    return name


@dataclass
class KeyDiff:
    """What differs between a checkpoint's tensors and a network's parameters (our names)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    wrong_shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.wrong_shape)

    def report(self, limit: int = 20) -> str:
        lines = []
        for title, items in (("missing from the checkpoint", self.missing), ("unexpected", self.unexpected)):
            if items:
                lines.append(f"{len(items)} {title}:")
                lines += [f"  - {name}" for name in _abbreviate(items, limit)]
        if self.wrong_shape:
            lines.append(f"{len(self.wrong_shape)} with the wrong shape (checkpoint vs network):")
            lines += [f"  - {n}: {list(a)} vs {list(b)}" for n, a, b in self.wrong_shape[:limit]]
            if len(self.wrong_shape) > limit:
                lines.append(f"  ... and {len(self.wrong_shape) - limit} more")
        return "\n".join(lines)


def _abbreviate(items: list[str], limit: int) -> list[str]:
    return items if len(items) <= limit else [*items[:limit], f"... and {len(items) - limit} more"]


def diff_keys(tensors: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]) -> KeyDiff:
    """Compare {name: shape} of a checkpoint against {name: shape} of a network."""
    diff = KeyDiff()
    diff.missing = sorted(set(expected) - set(tensors))
    diff.unexpected = sorted(set(tensors) - set(expected))
    diff.wrong_shape = [
        (name, tuple(tensors[name]), tuple(expected[name]))
        for name in sorted(set(tensors) & set(expected))
        if tuple(tensors[name]) != tuple(expected[name])
    ]
    return diff


# ---- reading ---------------------------------------------------------------------------------
@dataclass
class RawCheckpoint:
    tensors: dict[str, torch.Tensor]  # our names
    config: PiDConfig | None  # present in our own files
    official: bool


def read_checkpoint(path: str | Path) -> RawCheckpoint:
    """Read a checkpoint file into {our name: tensor}, detecting official vs our format."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        tensors, metadata = _read_safetensors(path)
        if metadata.get("format") == FORMAT_TAG:
            config = PiDConfig.from_dict(json.loads(metadata["config"]))
            return RawCheckpoint(tensors=tensors, config=config, official=False)
        return RawCheckpoint(tensors=_from_official(tensors, path), config=None, official=True)
    if path.suffix in (".pth", ".pt", ".bin"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # weights_only refuses pickled code: say so instead of a stack trace
            raise CheckpointError(
                f"could not read {path} as a weights-only torch file ({exc.__class__.__name__}: {exc}); "
                "pidserve never unpickles arbitrary objects — convert it to .safetensors first"
            ) from exc
        if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
            state = state["model"]
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path} is not a flat dict of tensors (an official PiD checkpoint is)")
        return RawCheckpoint(tensors=_from_official(dict(state), path), config=None, official=True)
    raise CheckpointError(
        f"unknown checkpoint type {path.suffix!r} for {path}: expected .pth or .safetensors"
    )


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            # clone: memory-mapped tensors at unaligned offsets take other CPU kernel paths.
            tensors = {name: f.get_tensor(name).clone() for name in f.keys()}  # noqa: SIM118
    except Exception as exc:
        raise CheckpointError(f"could not read {path} as safetensors: {exc}") from exc
    return tensors, metadata


def _from_official(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Strip "net.", prefer EMA weights, drop other training networks, rename to ours."""
    has_ema = any(k.startswith("net_ema.") for k in state)
    prefix = "net_ema." if has_ema else "net."
    if has_ema:
        log.info("%s holds EMA weights: loading net_ema.* and ignoring net.*", path)
    out: dict[str, torch.Tensor] = {}
    dropped = 0
    for key, tensor in state.items():
        if key.startswith(prefix):
            key = key[len(prefix) :]
        elif key.startswith(("net.", *_FOREIGN_PREFIXES)):
            dropped += 1
            continue
        out[official_to_ours(key)] = tensor
    if dropped:
        log.info("ignored %d tensors of other training networks in %s", dropped, path)
    return out


def detect_version(tensors: Mapping[str, torch.Tensor]) -> str:
    """ "v1.5" when the checkpoint has the pixel gate (pit_lq_gate), else "v1"."""
    return "v1.5" if any(k.startswith("pixel_gate.") for k in tensors) else "v1"


# ---- loading into a network --------------------------------------------------------------
def load_checkpoint(
    path: str | Path,
    cfg: PiDConfig | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> PiDNet:
    """Load an official or pidserve checkpoint into a PiDNet in eval mode.

    `cfg` is required for official files (they carry no config) and, for our files, must
    match the stored config if given. A wrong variant raises CheckpointError with a diff.
    """
    raw = read_checkpoint(path)
    if raw.config is not None:
        if cfg is not None and cfg != raw.config:
            raise CheckpointError(
                f"{path} was saved with a different config than the one given:\n"
                + _config_diff(raw.config, cfg)
            )
        cfg = raw.config
    if cfg is None:
        raise CheckpointError(
            f"{path} is an official checkpoint ({detect_version(raw.tensors)}) and carries no config: "
            "pass a PiDConfig, e.g. PiDConfig.preset('2k_flux'), or convert it with "
            "`pidserve convert FILE --variant NAME -o model.safetensors`"
        )
    version = detect_version(raw.tensors)
    if raw.official and version != cfg.version:
        raise CheckpointError(
            f"{path} is a {version} checkpoint but the config describes a {cfg.version} network; "
            "pick a preset of the matching version"
        )
    with torch.device("meta"):
        net = PiDNet(cfg)
    expected = {name: tuple(p.shape) for name, p in net.state_dict().items()}
    tensors = dict(raw.tensors)
    diff = diff_keys({k: tuple(v.shape) for k, v in tensors.items()}, expected)
    # The v1.5 training-only aux head is absent from released distilled files: tolerate that.
    aux_missing = [k for k in diff.missing if k.startswith(_AUX_HEAD)]
    diff.missing = [k for k in diff.missing if not k.startswith(_AUX_HEAD)]
    if diff:
        raise CheckpointError(f"{path} does not fit the {_describe(cfg)} network:\n{diff.report()}")
    net = net.to_empty(device="cpu")
    if aux_missing:
        log.info("%s has no training-only aux RGB head; it stays randomly initialised (unused)", path)
        net.adapter.aux_rgb_head.apply(_reset)
        tensors.update({k: v for k, v in net.state_dict().items() if k in aux_missing})
    net.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()}, strict=True)
    return net.to(device=device, dtype=dtype).eval()


def _reset(module: torch.nn.Module) -> None:
    if hasattr(module, "reset_parameters"):
        module.reset_parameters()


def _describe(cfg: PiDConfig) -> str:
    return (
        f"{cfg.version} (latent {cfg.latent_channels} ch, adapter {cfg.adapter_hidden}, "
        f"{cfg.gate_type} gates)"
    )


def _config_diff(a: PiDConfig, b: PiDConfig) -> str:
    da, db = a.to_dict(), b.to_dict()
    return "\n".join(f"  - {k}: file {da[k]!r} vs given {db[k]!r}" for k in da if da[k] != db[k])


# ---- saving ----------------------------------------------------------------------------------
def save_checkpoint(
    net: PiDNet,
    path: str | Path,
    dtype: torch.dtype | None = None,
    extra_metadata: dict[str, str] | None = None,
) -> None:
    """Write our format: safetensors of the state dict (optionally cast) + the config as metadata."""
    tensors = {
        name: (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous().cpu()
        for name, t in net.state_dict().items()
    }
    metadata = {"format": FORMAT_TAG, "config": net.cfg.to_json(), **(extra_metadata or {})}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
