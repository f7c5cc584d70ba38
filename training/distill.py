"""DMD2 distillation of a PiD teacher into the 4-step student (Yin et al. 2024, "Improved
Distribution Matching Distillation for Fast Image Synthesis").

Networks: the frozen teacher (the "real" score), the student G and the fake score F (both
initialised from the teacher), and a GAN head on the frozen teacher's mid-block image
tokens. Iterations alternate: `fake_updates` updates of F and the GAN head, then one of G.

Student input ("rollout") at one of the sampler's times t_k (k drawn per iteration):
    teacher forcing (official PiD default): x_tk = (1 - t_k) x0 + t_k eps, x0 the real image;
    backward simulation (DMD2): x_tk from running the student's own sampler for k steps.
    x0_gen = x_tk - t_k * G(x_tk, t_k)
The same x0_gen feeds both student losses:
    DMD: noise it to t ~ U[t_min, t_max]; grad = (x0_fake - x0_real) / mean|x0_gen - x0_real|;
         loss = 0.5 |x0_gen - sg(x0_gen - grad)|^2 (the normalised distribution-matching gradient)
    GAN: softplus(-D(teacher_features(noised x0_gen)))
    optional regression (regression_weight > 0, off by default): |x0_gen - x0|^2 against the real image
    optional FFT term (fft_weight > 0, off by default): L1 of |FFT(x0_gen)| - |FFT(x0)|
    optional colour term (cell_mean_weight > 0, off by default): MSE of both averaged per latent cell
A term whose weight is 0 is not computed; with dmd_weight = gan_weight = 0 and fake_updates = 0
the run is a paired fine-tune of the student (e.g. of a distilled student, `student_init`).
Fake/discriminator update: flow matching of F on detached x0_gen; D real vs fake (softplus),
plus the approximate R1 penalty lambda * |D(x_real) - D(x_real + N(0, r1_sigma^2))|^2.

Gradients are averaged across processes by hand (`average_gradients`): the three trainable
networks take turns, which DDP's fixed per-forward reducer does not model; FSDP is not
supported here (the distilled models this project trains fit one device).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pidserve.model import (
    FM_TIMESCALE,
    Conditioning,
    PiDNet,
    flow_noise,
    load_checkpoint,
    predict_x0,
    sample,
    save_checkpoint,
    student_timesteps,
)

from .config import DistillTrainConfig, config_dict
from .data import (
    LatentNoise,
    PhotoCrops,
    crop_spec,
    make_loader,
    per_sample_normal,
    per_sample_uniform,
    sample_seed,
)
from .distributed import DistInfo, all_mean, average_gradients, clip_gradients, init_distributed, shutdown
from .ema import EMA
from .inputs import FrozenEncoder, LatentContext, LatentInputs, latent_inputs, pixel_origin
from .loop import Progress, check_finite, fft_magnitude_l1, save_grid, scheduled_lr, set_lr
from .state import latest_checkpoint, load_training_state, save_training_state
from .teacher import autocast_for

log = logging.getLogger(__name__)

SALT_ROLLOUT, SALT_DMD_T, SALT_DMD_EPS, SALT_REAL_EPS, SALT_R1 = 0x81, 0x82, 0x83, 0x84, 0x85
SALT_ORIGIN = 0x86


class GanHead(nn.Module):
    """Per-token real/fake logit from frozen teacher features [B, L, D], averaged over tokens."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens.float()).mean(dim=(1, 2))


class Distiller:
    """Holds the four networks and computes the two phases' losses for one local batch."""

    def __init__(
        self, teacher: PiDNet, cfg: DistillTrainConfig, device: torch.device, student: PiDNet | None = None
    ) -> None:
        """`student`: its starting weights (default: a copy of the teacher)."""
        self.cfg = cfg
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        self.student = _copy(student or teacher).to(device).train().requires_grad_(True)
        self.fake = _copy(teacher).to(device).train().requires_grad_(True)
        self.head = GanHead(teacher.cfg.hidden_size).to(device)
        depth = len(teacher.patch_blocks)
        self.gan_depth = cfg.gan_block or max(1, depth // 2)
        self.t_list = student_timesteps(4).tolist()

    # ---- shared pieces ------------------------------------------------------------------------
    def rollout(
        self,
        inputs: LatentInputs,
        hr: torch.Tensor,
        seeds: torch.Tensor,
        k: int,
        cond: Conditioning,
        grad: bool,
    ) -> torch.Tensor:
        """x0_gen: the student's clean-image prediction at sampler step k (see the module docstring)."""
        t_list = self.t_list
        if self.cfg.student_mode == "teacher_forcing":
            eps = per_sample_normal(seeds, tuple(hr.shape[1:]), SALT_ROLLOUT + 16 * k).to(hr.device)
            x = flow_noise(hr, t_list[k], eps)
        elif self.cfg.student_mode == "backward_simulation":
            x = per_sample_normal(seeds, tuple(hr.shape[1:]), SALT_ROLLOUT).to(hr.device)
            with torch.no_grad():
                for j in range(k):
                    x0 = predict_x0(x, t_list[j], self.student.velocity(x, _t(t_list[j], x), cond).float())
                    eps = per_sample_normal(seeds, tuple(hr.shape[1:]), SALT_ROLLOUT + 16 * (j + 1)).to(
                        hr.device
                    )
                    x = flow_noise(x0, t_list[j + 1], eps)
        else:
            raise ValueError(
                f"student_mode must be teacher_forcing or backward_simulation, got {self.cfg.student_mode!r}"
            )
        with torch.set_grad_enabled(grad):
            return predict_x0(x, t_list[k], self.student.velocity(x, _t(t_list[k], x), cond).float())

    def noised(self, x0: torch.Tensor, seeds: torch.Tensor, salt_t: int, salt_eps: int) -> tuple:
        t = self.cfg.dmd_t_min + (self.cfg.dmd_t_max - self.cfg.dmd_t_min) * per_sample_uniform(seeds, salt_t)
        t = t.to(x0.device)
        eps = per_sample_normal(seeds, tuple(x0.shape[1:]), salt_eps).to(x0.device)
        return flow_noise(x0, t.view(-1, 1, 1, 1), eps), t, eps

    def logits(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.head(self.teacher.patch_tokens(x_t, t * FM_TIMESCALE, cond, self.gan_depth))

    # ---- phase 1: fake score and discriminator --------------------------------------------------
    def fake_loss(self, hr: torch.Tensor, inputs: LatentInputs, seeds: torch.Tensor, k: int) -> tuple:
        cfg = self.cfg
        size = tuple(hr.shape[-2:])
        origin = pixel_origin(seeds, cfg.position_jitter, SALT_ORIGIN)
        s_cond = self.student.condition(inputs.latent, inputs.sigma, image_size=size, pixel_origin=origin)
        x0_gen = self.rollout(inputs, hr, seeds, k, s_cond, grad=False).detach()
        x_t, t, eps = self.noised(x0_gen, seeds, SALT_DMD_T, SALT_DMD_EPS)
        f_cond = self.fake.condition(inputs.latent, inputs.sigma, image_size=size, pixel_origin=origin)
        v_fake = self.fake.velocity(x_t, t * FM_TIMESCALE, f_cond).float()
        fake_fm = F.mse_loss(v_fake, eps - x0_gen)

        t_cond = self.teacher.condition(inputs.latent, inputs.sigma, image_size=size, pixel_origin=origin)
        real_eps = per_sample_normal(seeds, tuple(hr.shape[1:]), SALT_REAL_EPS).to(hr.device)
        real_t = flow_noise(hr, t.view(-1, 1, 1, 1), real_eps)
        logit_real = self.logits(real_t, t, t_cond)
        logit_fake = self.logits(x_t, t, t_cond)
        d_loss = F.softplus(-logit_real).mean() + F.softplus(logit_fake).mean()
        jitter = cfg.r1_sigma * per_sample_normal(seeds, tuple(hr.shape[1:]), SALT_R1).to(hr.device)
        r1 = (logit_real - self.logits(real_t + jitter, t, t_cond)).pow(2).mean()
        loss = fake_fm + cfg.gan_fake_weight * (d_loss + cfg.r1_weight * r1)
        return loss, {"fake_fm": fake_fm.item(), "d_loss": d_loss.item(), "r1": r1.item()}

    # ---- phase 2: student ---------------------------------------------------------------------
    def student_loss(self, hr: torch.Tensor, inputs: LatentInputs, seeds: torch.Tensor, k: int) -> tuple:
        cfg = self.cfg
        size = tuple(hr.shape[-2:])
        origin = pixel_origin(seeds, cfg.position_jitter, SALT_ORIGIN)
        s_cond = self.student.condition(inputs.latent, inputs.sigma, image_size=size, pixel_origin=origin)
        x0_gen = self.rollout(inputs, hr, seeds, k, s_cond, grad=True)
        loss = x0_gen.new_zeros(())
        metrics: dict[str, float] = {}
        if cfg.dmd_weight > 0 or cfg.gan_weight > 0:
            x_t, t, _ = self.noised(x0_gen, seeds, SALT_DMD_T, SALT_DMD_EPS)
            t_cond = self.teacher.condition(inputs.latent, inputs.sigma, image_size=size, pixel_origin=origin)
        if cfg.dmd_weight > 0:
            with torch.no_grad():
                x_in = x_t.detach()
                t4 = t.view(-1, 1, 1, 1)
                x0_real = predict_x0(x_in, t4, self.teacher.velocity(x_in, t * FM_TIMESCALE, t_cond).float())
                f_cond = self.fake.condition(
                    inputs.latent, inputs.sigma, image_size=size, pixel_origin=origin
                )
                x0_fake = predict_x0(x_in, t4, self.fake.velocity(x_in, t * FM_TIMESCALE, f_cond).float())
                weight = (x0_gen.detach() - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
                grad = (x0_fake - x0_real) / weight
            dmd = 0.5 * F.mse_loss(x0_gen, (x0_gen - grad).detach())
            loss = loss + cfg.dmd_weight * dmd
            metrics["dmd"] = dmd.item()
        if cfg.gan_weight > 0:
            gan = F.softplus(-self.logits(x_t, t, t_cond)).mean()
            loss = loss + cfg.gan_weight * gan
            metrics["gan_g"] = gan.item()
        if cfg.regression_weight > 0:
            # Optional paired term (not part of DMD2): a decoder has the ground truth of every latent.
            regression = F.mse_loss(x0_gen, hr)
            loss = loss + cfg.regression_weight * regression
            metrics["regression"] = regression.item()
        if cfg.fft_weight > 0:
            fft = fft_magnitude_l1(x0_gen, hr)
            loss = loss + cfg.fft_weight * fft
            metrics["fft"] = fft.item()
        if cfg.cell_mean_weight > 0:
            cell = self.student.cfg.output_scale
            cell_mean = F.mse_loss(F.avg_pool2d(x0_gen, cell), F.avg_pool2d(hr, cell))
            loss = loss + cfg.cell_mean_weight * cell_mean
            metrics["cell_mean"] = cell_mean.item()
        if not metrics:
            raise ValueError(
                "every student loss weight is 0: set dmd_weight, gan_weight, regression_weight or fft_weight"
            )
        return loss, metrics


def train_distill(cfg: DistillTrainConfig) -> Path:
    """Distill (or resume) in cfg.run_dir; returns the path of the student's weights file."""
    if cfg.strategy != "ddp":
        raise ValueError(
            "distillation averages gradients itself; use strategy = 'ddp' (FSDP is not supported)"
        )
    if not cfg.teacher:
        raise ValueError("set `teacher` to the teacher's .safetensors (from `pidserve train teacher`)")
    info = init_distributed(cfg.device)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    _check_objective(cfg)
    teacher = load_checkpoint(cfg.teacher)
    net_cfg = teacher.cfg
    d = Distiller(teacher, cfg, info.device, _student_init(cfg.student_init, teacher))
    encoder = FrozenEncoder(cfg.autoencoder, net_cfg, info.device)
    student_params = list(d.student.parameters())
    fake_params = list(d.fake.parameters()) + list(d.head.parameters())
    opt_g = torch.optim.AdamW(student_params, lr=cfg.lr, betas=(0.0, 0.99), weight_decay=cfg.weight_decay)
    opt_f = torch.optim.AdamW(fake_params, lr=cfg.fake_lr, betas=(0.0, 0.99), weight_decay=cfg.weight_decay)
    ema = EMA(d.student, cfg.ema, cfg.ema_sigma_rel, cfg.ema_beta)
    models = {"student": d.student, "fake": d.fake, "head": d.head}
    optimizers = {
        "student": (d.student, opt_g),
        "fake": (nn.ModuleDict({"fake": d.fake, "head": d.head}), opt_f),
    }
    step = 0
    if (ckpt := latest_checkpoint(run_dir)) is not None:
        step = load_training_state(ckpt, models, optimizers, {"student": ema})["step"]
        log.info("resumed from %s (step %d)", ckpt, step)

    per_step = cfg.fake_updates + 1  # data iterations per student step
    spec = crop_spec(cfg, net_cfg.sr_scale, step_samples=cfg.batch * per_step, cell=net_cfg.output_scale)
    dataset = PhotoCrops(cfg.data, spec, cfg.seed)
    batches = make_loader(dataset, cfg.batch, step * per_step, info.rank, info.world_size, cfg.workers)
    noise = LatentNoise(cfg.noise_prob, cfg.noise_max_sigma, cfg.latent_dropout)
    progress = Progress(run_dir, step, cfg.steps, cfg.batch * per_step, info.is_main)
    while step < cfg.steps:
        step += 1
        # the rollout step, shared by every process
        k = cfg.rollout_steps[sample_seed(cfg.seed, step) % len(cfg.rollout_steps)]
        metrics: dict[str, float] = {"k": float(k)}
        with autocast_for(cfg.precision, info.device):
            for _ in range(cfg.fake_updates):
                hr, inputs, seeds = _batch(next(batches), encoder, noise, info, cfg.latent_context_prob)
                loss_f, m = d.fake_loss(hr, inputs, seeds, k)
                check_finite(loss_f, step)
                set_lr(opt_f, scheduled_lr(step, cfg.fake_lr, cfg))
                opt_f.zero_grad(set_to_none=True)
                loss_f.backward()
                average_gradients(fake_params, info)
                clip_gradients(fake_params, cfg.grad_clip)
                opt_f.step()
                metrics |= m
            hr, inputs, seeds = _batch(next(batches), encoder, noise, info, cfg.latent_context_prob)
            loss_g, m = d.student_loss(hr, inputs, seeds, k)
        check_finite(loss_g, step)
        set_lr(opt_g, scheduled_lr(step, cfg.lr, cfg))
        opt_g.zero_grad(set_to_none=True)
        d.fake.zero_grad(set_to_none=True)
        d.head.zero_grad(set_to_none=True)
        loss_g.backward()
        average_gradients(student_params, info)
        metrics["grad_norm"] = clip_gradients(student_params, cfg.grad_clip)
        opt_g.step()
        ema.update(d.student, step)
        metrics |= m
        metrics["loss"] = float(all_mean(loss_g.detach(), info))
        progress.update(step, metrics, log=step % cfg.log_every == 0)
        if info.is_main and step % cfg.sample_every == 0:
            _samples(d, ema, encoder, dataset, run_dir / "samples" / f"step_{step:07d}.png", info.device)
        if step % cfg.save_every == 0 or step == cfg.steps:
            extra = {"config": config_dict(cfg), "net_config": net_cfg.to_dict()}
            save_training_state(run_dir, step, models, optimizers, {"student": ema}, extra, info.is_main)
    progress.close()

    final = run_dir / "student.safetensors"
    ema_state = ema.full_state()
    if info.is_main:
        # The aux RGB head is a training-only part of the teacher: the student ships without it
        # (as the official distilled checkpoints do).
        export = PiDNet(net_cfg.replace(aux_rgb_head=False))
        weights = ema_state if cfg.ema_student else d.student.state_dict()
        export.load_state_dict({k: v for k, v in weights.items() if not k.startswith("adapter.aux_rgb_head")})
        save_checkpoint(
            export, final, extra_metadata={"distill_steps": str(cfg.steps), "seed": str(cfg.seed)}
        )
        log.info("wrote %s", final)
    shutdown(info)
    return final


def _check_objective(cfg: DistillTrainConfig) -> None:
    """Refuse recipes that would train nothing, or train against a fake score that never learns."""
    if not cfg.rollout_steps or any(k not in range(4) for k in cfg.rollout_steps):
        raise ValueError(f"rollout_steps must list sampler steps in 0..3, got {cfg.rollout_steps}")
    if cfg.fake_updates < 0:
        raise ValueError(f"fake_updates must be >= 0, got {cfg.fake_updates}")
    if cfg.fake_updates == 0 and (cfg.dmd_weight > 0 or cfg.gan_weight > 0):
        raise ValueError(
            "fake_updates = 0 leaves the fake score and the GAN head untrained: "
            "set dmd_weight = 0 and gan_weight = 0 (a paired fine-tune), or fake_updates >= 1"
        )


def _student_init(path: str, teacher: PiDNet) -> PiDNet | None:
    """The student's starting weights from `path` (None: start from the teacher).

    A distilled student ships without the teacher's training-only aux RGB head; its other
    tensors must match the teacher's architecture exactly, since the student replaces it.
    """
    if not path:
        return None
    init = load_checkpoint(path)
    if init.cfg.replace(aux_rgb_head=False) != teacher.cfg.replace(aux_rgb_head=False):
        raise ValueError(
            f"student_init {path} is not the teacher's architecture: {init.cfg} vs {teacher.cfg}"
        )
    student = _copy(teacher)
    missing, unexpected = student.load_state_dict(init.state_dict(), strict=False)
    leftover = [k for k in missing if not k.startswith("adapter.aux_rgb_head.")]
    if leftover or unexpected:
        raise ValueError(
            f"student_init {path} does not fit the teacher: missing {leftover}, unexpected {unexpected}"
        )
    return student


def _batch(
    batch: dict, encoder: FrozenEncoder, noise: LatentNoise, info: DistInfo, context_prob: float
) -> tuple:
    hr, lr, seeds = batch["hr"].to(info.device), batch["lr"].to(info.device), batch["seed"]
    context = LatentContext.of_batch(batch, context_prob, info.device)
    return hr, latent_inputs(encoder, lr, seeds, noise, context), seeds


def _t(t: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t * FM_TIMESCALE, dtype=torch.float32, device=x.device)


def _copy(net: PiDNet) -> PiDNet:
    clone = PiDNet(net.cfg)
    clone.load_state_dict(net.state_dict())
    return clone


@torch.no_grad()
def _samples(
    d: Distiller, ema: EMA, encoder: FrozenEncoder, dataset: PhotoCrops, path: Path, device: torch.device
) -> None:
    """Grid: ground truth, teacher with the 4-step sampler, student (EMA) with the 4-step sampler."""
    probe = _copy(d.student).to(device).eval()
    ema.copy_to(probe)
    items = [dataset[2**41 + i] for i in range(6)]
    hr = torch.stack([it["hr"] for it in items]).to(device)
    z = encoder(torch.stack([it["lr"] for it in items]).to(device))
    teacher4 = sample(d.teacher, z, 0.0, generator=torch.Generator(device=device).manual_seed(0))
    student4 = sample(probe, z, 0.0, generator=torch.Generator(device=device).manual_seed(0))
    save_grid(path, [hr, teacher4, student4])
