"""Training checkpoints: safetensors for every tensor, JSON for everything else. No pickle.

    <run>/checkpoints/step_0001200/
        weights.safetensors   "<model>.<param>" and "ema.<model>.<param>"
        optim.safetensors     "<optimizer>.<param index>.<state key>" (exp_avg, exp_avg_sq, step)
        state.json            step, param groups, the run's config, anything the trainer adds
    <run>/checkpoints/latest  name of the newest complete checkpoint

A checkpoint directory is written under a temporary name and renamed when complete, and
`latest` is replaced atomically after that: a run killed mid-save resumes from the previous one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .ema import EMA

log = logging.getLogger(__name__)


def save_training_state(
    run_dir: Path,
    step: int,
    models: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    emas: dict[str, EMA],
    extra: dict,
    keep: int = 2,
) -> Path:
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    tmp = ckpt_root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()

    weights = {
        f"{m}.{k}": v.detach().cpu().contiguous()
        for m, model in models.items()
        for k, v in _plain(model).state_dict().items()
    }
    weights.update(
        {f"ema.{m}.{k}": v.cpu().contiguous() for m, ema in emas.items() for k, v in ema.shadow.items()}
    )
    save_file(weights, str(tmp / "weights.safetensors"))

    optim_tensors, groups = {}, {}
    for o, opt in optimizers.items():
        sd = opt.state_dict()
        groups[o] = sd["param_groups"]
        for index, per_param in sd["state"].items():
            for key, value in per_param.items():
                optim_tensors[f"{o}.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    save_file(optim_tensors, str(tmp / "optim.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "param_groups": groups, **extra}, indent=1))

    final = ckpt_root / name
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    latest_tmp = ckpt_root / ".latest.tmp"
    latest_tmp.write_text(name)
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
    ckpt: Path,
    models: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    emas: dict[str, EMA],
) -> dict:
    """Restore everything saved by `save_training_state` in place; returns state.json's dict."""
    weights = load_file(str(ckpt / "weights.safetensors"))
    for m, model in models.items():
        prefix = f"{m}."
        _plain(model).load_state_dict(
            {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        )
    for m, ema in emas.items():
        prefix = f"ema.{m}."
        for k in ema.shadow:
            ema.shadow[k] = weights[prefix + k].clone()
    state = json.loads((ckpt / "state.json").read_text())
    optim_tensors = load_file(str(ckpt / "optim.safetensors"))
    for o, opt in optimizers.items():
        per_param: dict[int, dict] = {}
        for key, value in optim_tensors.items():
            owner, index, name = key.split(".", 2)
            if owner == o:
                per_param.setdefault(int(index), {})[name] = value
        opt.load_state_dict({"state": per_param, "param_groups": state["param_groups"][o]})
    return state


def _plain(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (checkpoints never carry the "module." prefix)."""
    return model.module if hasattr(model, "module") else model
