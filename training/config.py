"""Training configurations: dataclasses with defaults, loaded from TOML and `key=value` overrides.

    pidserve train teacher --config recipes/pid_tiny_teacher.toml --set steps=200 --set lr=1e-4

Nested PiD network fields live under [net] (PiDConfig field names) with `preset` naming the
base preset. Unknown keys are errors, so a typo never trains the wrong model silently.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar


@dataclass
class CommonConfig:
    run_dir: str = "runs/unnamed"
    data: str = "data/photos/train"
    seed: int = 0
    steps: int = 1000  # optimizer steps (of the model being trained; the student for distillation)
    batch: int = 16  # global batch over all processes
    crop: int = 256  # high-resolution crop side (the decoder's output size)
    crop_cycle: list[int] = field(default_factory=list)  # e.g. [128, 128, 128, 256]: size per step, cycled
    short_side: int = 640  # photos are resized once so that their short side is this
    # False: photos smaller than short_side keep their size (enlarging them would teach soft
    # detail); only those smaller than the largest crop are enlarged to it.
    upscale: bool = True
    workers: int = 1  # DataLoader worker processes per training process
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    strategy: str = "ddp"  # ddp | fsdp (multi-process only)
    log_every: int = 10
    save_every: int = 200
    sample_every: int = 200
    warmup: int = 100
    lr_schedule: str = "constant"  # constant | cosine (decays to lr * lr_min_ratio at the last step)
    lr_min_ratio: float = 0.05
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    ema: str = "power"  # power | plain
    ema_sigma_rel: float = 0.05
    ema_beta: float = 0.999


@dataclass
class AutoencoderTrainConfig(CommonConfig):
    lr: float = 1e-3
    sr_scale: int = 4  # the autoencoder trains on the low-res images PiD's latents come from
    latent_l2: float = 1e-4
    fft_weight: float = 0.1  # L1 on FFT magnitudes: keeps the decoder from blurring
    widths: list[int] = field(default_factory=lambda: [32, 64, 96, 128])
    latent_channels: int = 16
    # Held-out photo folder: every `eval_every` steps the EMA weights reconstruct its fixed grid
    # crops (low-res, as trained) and the PSNR goes to <run_dir>/holdout.jsonl (0: never).
    holdout: str = ""
    eval_every: int = 0
    eval_crops_per_photo: int = 6


@dataclass
class TeacherTrainConfig(CommonConfig):
    net: dict[str, Any] = field(default_factory=lambda: {"preset": "tiny_v1"})
    autoencoder: str = ""  # tiny-ae .safetensors (latent space "tiny-ae"); the encoder of the latent space
    lr: float = 1e-4
    logit_mean: float = 0.0  # official logit-normal time: t = sigmoid(N(logit_mean, logit_std))
    logit_std: float = 1.0
    shift: float = 6.0  # time shift at base_size; scaled with the output side (resolution-dependent)
    shift_base_size: int = 2048
    # Time mixture (0, 0 = the official logit-normal only): a fraction `t_uniform` of the samples
    # take t ~ U[0, 1) and a fraction `t_high` take t ~ U[t_high_min, 1), where every sampler
    # starts (t_high = 1, t_high_min = 0.999 trains a pure latent -> image regression).
    t_uniform: float = 0.0
    t_high: float = 0.0
    t_high_min: float = 0.95
    # Pixel position table origin drawn per step in [0, position_jitter) px on each axis (0: the
    # official fixed origin). Makes positions beyond the training crops look familiar.
    position_jitter: int = 0
    # Latent context (1: off): crops come from regions latent_context times their side, and a
    # fraction latent_context_prob of the samples read their crop's latent cut from the region's
    # encoding, as a tiled decode's windows do (training/inputs.py). Needs short_side >= crop x k.
    latent_context: int = 1
    latent_context_prob: float = 0.5
    noise_prob: float = 0.75  # official latent noise augmentation
    noise_max_sigma: float = 0.8
    latent_dropout: float = 0.1
    caption_dropout: float = 0.1
    aux_rgb_weight: float = 0.1  # v1.5 auxiliary low-res RGB loss (needs net.aux_rgb_head)
    train_adapter_only: bool = False  # freeze the backbone (official v1.5 teacher)
    init: str = ""  # optional starting weights (.safetensors of ours)


@dataclass
class DistillTrainConfig(CommonConfig):
    teacher: str = ""  # the teacher's .safetensors (ours); student and fake score start from it
    # Optional starting weights of the student (an earlier student's .safetensors): continue a
    # distilled student under a new objective instead of starting it from the teacher.
    student_init: str = ""
    autoencoder: str = ""
    # Learning rates and weights: DMD2's published recipe (Yin et al. 2024) unless overridden.
    lr: float = 5e-7  # student
    fake_lr: float = 5e-7  # fake score network and GAN head
    # fake-score / discriminator updates per student update; 0 (only with dmd_weight = gan_weight = 0)
    # trains the student on its paired terms alone, without the fake score's cost
    fake_updates: int = 5
    student_mode: str = "teacher_forcing"  # teacher_forcing (official PiD default) | backward_simulation
    # The sampler steps k (0..3) whose x0 prediction the student is trained on, one drawn per step.
    rollout_steps: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    dmd_weight: float = 1.0
    gan_weight: float = 5e-3  # generator's GAN loss weight
    gan_fake_weight: float = 1e-2  # discriminator loss weight in the fake-score update
    r1_weight: float = (
        100.0  # approximate R1 (Lin et al. 2025, APT): lambda |D(x) - D(x + N(0, r1_sigma^2))|^2
    )
    r1_sigma: float = 0.01
    # Not in DMD2: an MSE pull of the student's x0 towards the real image (a decoder has paired
    # data). 0 = pure DMD2 + GAN. Useful when the teacher is weak (short CPU runs).
    regression_weight: float = 0.0
    # Not in DMD2 either: L1 between the FFT magnitudes of x0 and of the real image (as the
    # autoencoder's fft_weight), which keeps a regression-weighted student from blurring.
    fft_weight: float = 0.0
    # Not in DMD2: MSE between x0 and the real image averaged over each latent cell's output pixels
    # (32 x 32 for pid-tiny): the low-frequency colour the latent carries, i.e. the colour cast.
    cell_mean_weight: float = 0.0
    position_jitter: int = 0  # as in the teacher config: pixel position table origin per step
    latent_context: int = 1  # as in the teacher config: latents cut from a larger region's encoding
    latent_context_prob: float = 0.5
    dmd_t_min: float = 0.02  # diffusion times at which the score difference is measured
    dmd_t_max: float = 0.98
    gan_block: int = 0  # number of teacher patch blocks whose output feeds the GAN head (0: half of them)
    ema_student: bool = True
    noise_prob: float = 0.75
    noise_max_sigma: float = 0.8
    latent_dropout: float = 0.0  # the student always sees its latent
    caption_dropout: float = 0.1


C = TypeVar("C", bound=CommonConfig)


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Defaults <- TOML file <- `key=value` overrides (values parsed as JSON, else kept as strings)."""
    values: dict[str, Any] = {}
    if path:
        with open(path, "rb") as f:
            values.update(tomllib.load(f))
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        target = values
        *parents, leaf = key.strip().split(".")
        for p in parents:
            target = target.setdefault(p, {})
        target[leaf] = value
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} keys: {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    for name, value in values.items():
        default = known[name].default
        if isinstance(default, float) and isinstance(value, int):
            values[name] = float(value)
    return cls(**values)


def config_dict(cfg: CommonConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
