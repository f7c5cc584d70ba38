"""Teacher training: flow matching with velocity targets (the official PiD recipe).

Per sample (all draws from the sample's seed):
    x0 = high-res crop in [-1, 1], eps ~ N(0, 1), t = shift(sigmoid(N(logit_mean, logit_std)))
    x_t = (1 - t) x0 + t eps,   target v = eps - x0,   loss = |v_pred - v|^2
    latent = encode(degrade(x0)) with the official noise augmentation and latent dropout.
v1.5 teachers add an auxiliary loss: the adapter's aux head predicts each patch's low-res
RGB pixels from the trunk features (it teaches the adapter to keep colour). Optionally
only the adapter and gates train, the backbone frozen (the official v1.5 teacher).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pidserve.model import (
    FM_TIMESCALE,
    PiDConfig,
    PiDNet,
    flow_noise,
    load_checkpoint,
    resolution_shift,
    sample,
    sample_teacher,
    save_checkpoint,
    to_patches,
)

from .config import TeacherTrainConfig, config_dict
from .data import LatentNoise, PhotoCrops, crop_spec, make_loader, per_sample_normal
from .distributed import (
    DistInfo,
    all_mean,
    clip_gradients,
    init_distributed,
    shutdown,
    sync_replicated_grads,
    wrap_model,
)
from .ema import EMA
from .inputs import (
    FrozenEncoder,
    LatentContext,
    latent_inputs,
    logit_normal_times,
    mixed_times,
    pixel_origin,
)
from .loop import Progress, check_finite, save_grid, scheduled_lr, set_lr
from .state import latest_checkpoint, load_training_state, save_training_state

log = logging.getLogger(__name__)

SALT_TIME, SALT_NOISE, SALT_MIX, SALT_ORIGIN = 0x71, 0x72, 0x73, 0x75


def build_net_config(spec: dict) -> PiDConfig:
    """[net] table -> PiDConfig: `preset` names the base, other keys replace its fields."""
    spec = dict(spec)
    base = PiDConfig.preset(spec.pop("preset", "tiny_v1"))
    if "rope_ref_size" in spec:
        spec["rope_ref_size"] = tuple(spec["rope_ref_size"])
    cfg = base.replace(**spec)
    cfg.validate()
    return cfg


class FlowMatchingLoss(nn.Module):
    """Everything with trainable weights in one forward, so DDP/FSDP see a single call per step."""

    def __init__(self, net: PiDNet) -> None:
        super().__init__()
        self.net = net

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        latent: torch.Tensor,
        sigma: torch.Tensor,
        lr: torch.Tensor,
        origin: tuple[int, int] = (0, 0),
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        net = self.net
        size = (x_t.shape[-2], x_t.shape[-1])
        cond = net.condition(latent, sigma, None, image_size=size, pixel_origin=origin)
        v = net.velocity(x_t, t * FM_TIMESCALE, cond)
        aux = None
        if net.adapter.aux_rgb_head is not None:
            grid = (x_t.shape[-2] // net.cfg.patch_size, x_t.shape[-1] // net.cfg.patch_size)
            aux_pred = net.adapter.aux_rgb_head(net.adapter.features(latent.to(net.dtype), grid))
            lr_per_patch = max(1, net.cfg.patch_size // net.cfg.sr_scale)
            aux = F.mse_loss(aux_pred.float(), to_patches(lr, lr_per_patch).float())
        return v, aux


def autocast_for(precision: str, device: torch.device):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


def train_teacher(cfg: TeacherTrainConfig) -> Path:
    """Train (or resume) a teacher in cfg.run_dir; returns the path of the EMA weights file."""
    info = init_distributed(cfg.device)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    net_cfg = build_net_config(cfg.net)
    torch.manual_seed(cfg.seed)  # the initial weights: the same in every process
    net = PiDNet(net_cfg)
    if cfg.init:
        net.load_state_dict(load_checkpoint(cfg.init).state_dict())
    net = net.to(info.device).train()
    if cfg.train_adapter_only:
        for name, p in net.named_parameters():
            p.requires_grad_(name.startswith(("adapter.", "gates.", "pixel_gate.")))
    # Order matters for FSDP2: wrap (shards the parameters in place), then build the optimizer
    # and EMA over the sharded parameters, then restore state into them.
    model = _wrap(FlowMatchingLoss(net), info, cfg.strategy)
    trainable = [p for p in net.parameters() if p.requires_grad]
    encoder = FrozenEncoder(cfg.autoencoder, net_cfg, info.device)
    ema = EMA(net, cfg.ema, cfg.ema_sigma_rel, cfg.ema_beta)
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    step = 0
    if (ckpt := latest_checkpoint(run_dir)) is not None:
        step = load_training_state(ckpt, {"net": net}, {"net": (net, opt)}, {"net": ema})["step"]
        log.info("resumed from %s (step %d)", ckpt, step)

    spec = crop_spec(cfg, net_cfg.sr_scale, step_samples=cfg.batch, cell=net_cfg.output_scale)
    dataset = PhotoCrops(cfg.data, spec, cfg.seed)
    batches = make_loader(dataset, cfg.batch, step, info.rank, info.world_size, cfg.workers)
    noise = LatentNoise(cfg.noise_prob, cfg.noise_max_sigma, cfg.latent_dropout)
    progress = Progress(run_dir, step, cfg.steps, cfg.batch, info.is_main)
    while step < cfg.steps:
        batch = next(batches)
        step += 1
        loss, metrics = teacher_step(model, encoder, batch, noise, cfg, info)
        check_finite(loss, step)
        set_lr(opt, scheduled_lr(step, cfg.lr, cfg))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sync_replicated_grads(model, info)
        metrics["grad_norm"] = clip_gradients(trainable, cfg.grad_clip)
        opt.step()
        ema.update(net, step)
        metrics["loss"] = float(all_mean(loss.detach(), info))
        progress.update(step, metrics, log=step % cfg.log_every == 0)
        if step % cfg.sample_every == 0:
            ema_state = ema.full_state()  # collective under FSDP: every process gathers
            if info.is_main:
                path = run_dir / "samples" / f"step_{step:07d}.png"
                write_samples(net_cfg, ema_state, encoder, dataset, path, info.device)
        if step % cfg.save_every == 0 or step == cfg.steps:
            extra = {"config": config_dict(cfg), "net_config": net_cfg.to_dict()}
            save_training_state(
                run_dir, step, {"net": net}, {"net": (net, opt)}, {"net": ema}, extra, info.is_main
            )
    progress.close()

    final = run_dir / "teacher_ema.safetensors"
    ema_state = ema.full_state()
    if info.is_main:
        export = PiDNet(net_cfg)
        ema.copy_to(export, ema_state)
        save_checkpoint(export, final, extra_metadata={"train_steps": str(cfg.steps), "seed": str(cfg.seed)})
        log.info("wrote %s", final)
    shutdown(info)
    return final


def teacher_step(
    model: nn.Module,
    encoder: FrozenEncoder,
    batch: dict,
    noise: LatentNoise,
    cfg: TeacherTrainConfig,
    info: DistInfo,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The flow-matching loss of one local batch (mean over its samples)."""
    hr, lr, seeds = batch["hr"].to(info.device), batch["lr"].to(info.device), batch["seed"]
    context = LatentContext.of_batch(batch, cfg.latent_context_prob, info.device)
    inputs = latent_inputs(encoder, lr, seeds, noise, context)
    shift = resolution_shift(tuple(hr.shape[-2:]), cfg.shift, cfg.shift_base_size)
    t = logit_normal_times(seeds, cfg.logit_mean, cfg.logit_std, shift, SALT_TIME)
    t = mixed_times(seeds, t, cfg.t_uniform, cfg.t_high, cfg.t_high_min, SALT_MIX).to(info.device)
    origin = pixel_origin(seeds, cfg.position_jitter, SALT_ORIGIN)
    eps = per_sample_normal(seeds, tuple(hr.shape[1:]), SALT_NOISE).to(info.device)
    x_t = flow_noise(hr, t.view(-1, 1, 1, 1), eps)
    with autocast_for(cfg.precision, info.device):
        v, aux = model(x_t, t, inputs.latent, inputs.sigma, lr, origin)
    flow = F.mse_loss(v.float(), eps - hr)
    metrics = {"flow": flow.item()}
    loss = flow
    if aux is not None:
        loss = loss + cfg.aux_rgb_weight * aux
        metrics["aux_rgb"] = aux.item()
    return loss, metrics


def _wrap(module: nn.Module, info: DistInfo, strategy: str) -> nn.Module:
    # The last patch block's text MLP and the text embedder get no gradient without text.
    return wrap_model(module, info, strategy, find_unused_parameters=True)  # type: ignore[arg-type]


@torch.no_grad()
def write_samples(
    net_cfg: PiDConfig,
    ema_state: dict[str, torch.Tensor],
    encoder: FrozenEncoder,
    dataset: PhotoCrops,
    path: Path,
    device: torch.device,
) -> None:
    """Grid: ground truth, tiny-ae decode + bicubic, teacher (EMA, 16 Euler steps), 4-step sampler."""
    probe = PiDNet(net_cfg).to(device).eval()
    probe.load_state_dict(ema_state)
    items = [dataset[2**41 + i] for i in range(6)]  # fixed crops, far from any training index
    hr = torch.stack([it["hr"] for it in items]).to(device)
    lr = torch.stack([it["lr"] for it in items]).to(device)
    z = encoder(lr)
    cascade = F.interpolate(
        encoder.ae.decode(encoder.space.denormalize(z)), scale_factor=net_cfg.sr_scale, mode="bicubic"
    )
    gen = torch.Generator(device=device).manual_seed(0)
    teacher = sample_teacher(probe, z, 0.0, steps=16, generator=gen)
    student = sample(probe, z, 0.0, generator=torch.Generator(device=device).manual_seed(0))
    save_grid(path, [hr, cascade, teacher, student])
