"""Training checkpoints: safetensors for every tensor, JSON for everything else. No pickle.

    <run>/checkpoints/step_0001200/
        weights.safetensors   "<model>.<param>" and "ema.<model>.<param>" (full, unsharded tensors)
        optim.safetensors     "<optimizer>.<param name>.<state key>" (AdamW exp_avg, exp_avg_sq, step)
        state.json            step, param groups, the run's config, anything the trainer adds
    <run>/checkpoints/latest  name of the newest complete checkpoint

State dicts go through torch.distributed.checkpoint's `get_/set_model_state_dict` and
`get_/set_optimizer_state_dict`, so one format serves a plain module, DDP and FSDP2 (whose
sharded tensors are gathered to full ones on save and re-sharded on load); optimizer state is
keyed by parameter name, not position. Every process calls save (gathering is collective);
only the main process writes. A checkpoint directory is written under a temporary name and
renamed when complete, and `latest` is replaced atomically after that: a run killed mid-save
resumes from the previous one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor

from .ema import EMA

log = logging.getLogger(__name__)

# optimizer name -> (the module holding exactly its parameters, the optimizer)
Optimizers = dict[str, tuple[nn.Module, torch.optim.Optimizer]]


def _options(strict: bool = True) -> StateDictOptions:
    # Full (gathered) state dicts only matter when tensors may be sharded across processes.
    if dist.is_available() and dist.is_initialized():
        return StateDictOptions(full_state_dict=True, cpu_offload=True, strict=strict)
    return StateDictOptions(strict=strict)


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().contiguous()


def save_training_state(
    run_dir: Path,
    step: int,
    models: dict[str, nn.Module],
    optimizers: Optimizers,
    emas: dict[str, EMA],
    extra: dict,
    is_main: bool = True,
    keep: int = 2,
) -> Path:
    """Gather (all processes) and write (main process) one checkpoint; returns its directory."""
    # Gathering is collective (every process takes part); with full state dicts only the main
    # process receives the tensors.
    options = _options()
    model_sds = {m: get_model_state_dict(model, options=options) for m, model in models.items()}
    ema_sds = {m: {k: _full(v) for k, v in ema.shadow.items()} for m, ema in emas.items()}
    optim_sds = {
        o: get_optimizer_state_dict(owner, opt, options=options) for o, (owner, opt) in optimizers.items()
    }
    ckpt_root = Path(run_dir) / "checkpoints"
    final = ckpt_root / f"step_{step:07d}"
    if not is_main:
        return final

    weights = {f"{m}.{k}": _full(v) for m, sd in model_sds.items() for k, v in sd.items()}
    weights.update({f"ema.{m}.{k}": v for m, sd in ema_sds.items() for k, v in sd.items()})
    optim_tensors, groups = {}, {}
    for o, osd in optim_sds.items():
        groups[o] = osd["param_groups"]
        for name, per_param in osd["state"].items():
            for key, value in per_param.items():
                optim_tensors[f"{o}.{name}.{key}"] = _full(torch.as_tensor(value))
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(weights, str(tmp / "weights.safetensors"))
    save_file(optim_tensors, str(tmp / "optim.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "param_groups": groups, **extra}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    latest_tmp = ckpt_root / ".latest.tmp"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, ckpt_root / "latest")
    for old in sorted(ckpt_root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("saved checkpoint %s", final)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_training_state(
    ckpt: Path, models: dict[str, nn.Module], optimizers: Optimizers, emas: dict[str, EMA]
) -> dict:
    """Restore everything saved by `save_training_state` in place (every process reads the files)."""
    options = _options()
    weights = load_file(str(ckpt / "weights.safetensors"))
    for m, model in models.items():
        prefix = f"{m}."
        sd = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        set_model_state_dict(model, sd, options=options)
    for m, ema in emas.items():
        for k, shadow in ema.shadow.items():
            full = weights[f"ema.{m}.{k}"].to(shadow.device if not isinstance(shadow, DTensor) else "cpu")
            if isinstance(shadow, DTensor):
                full = distribute_tensor(full, shadow.device_mesh, shadow.placements)
            ema.shadow[k] = full.clone()
    state = json.loads((ckpt / "state.json").read_text())
    optim_tensors = load_file(str(ckpt / "optim.safetensors"))
    for o, (owner, opt) in optimizers.items():
        per_param: dict[str, dict] = {}
        for key, value in optim_tensors.items():
            if key.startswith(f"{o}."):
                name, field = key[len(o) + 1 :].rsplit(".", 1)
                per_param.setdefault(name, {})[field] = value
        groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in state["param_groups"][o]]
        # Not strict: parameters that never got a gradient (e.g. the last block's text MLP when
        # training without text) have no AdamW state to restore.
        osd = {"state": per_param, "param_groups": groups}
        set_optimizer_state_dict(owner, opt, osd, options=_options(strict=False))
    return state
