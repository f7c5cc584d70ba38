"""Train tiny-ae: the small autoencoder whose latents pid-tiny decodes.

It learns the low-resolution images PiD's latents come from: high-res crop -> official
degradation (antialiased bicubic /scale) -> encode -> decode, loss L1 + FFT-magnitude L1 +
a small L2 on the latent (keeps its scale bounded). When training ends, the latent's
mean and std over fresh training crops are measured and stored in the file's metadata:
they are the "tiny-ae" latent space's shift and scale (model/latents/builtin.py).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from pidserve.model import AutoencoderConfig, TinyAutoencoder, save_autoencoder

from .config import AutoencoderTrainConfig, config_dict
from .data import CropSpec, PhotoCrops, degrade, grid_crops, make_loader
from .distributed import all_mean, init_distributed, shutdown, wrap_model
from .ema import EMA
from .loop import Progress, check_finite, fft_magnitude_l1, save_grid, scheduled_lr, set_lr
from .state import latest_checkpoint, load_training_state, save_training_state

log = logging.getLogger(__name__)


def autoencoder_loss(ae: torch.nn.Module, image: torch.Tensor, cfg: AutoencoderTrainConfig) -> tuple:
    latent = ae.encoder(image)
    recon = ae.decoder(latent)
    l1 = (recon - image).abs().mean()
    fft_l1 = fft_magnitude_l1(recon, image)
    reg = latent.float().pow(2).mean()
    loss = l1 + cfg.fft_weight * fft_l1 + cfg.latent_l2 * reg
    metrics = {"l1": l1.item(), "fft": fft_l1.item(), "latent_rms": reg.sqrt().item()}
    return loss, metrics, recon


def train_autoencoder(cfg: AutoencoderTrainConfig) -> Path:
    """Train (or resume) in cfg.run_dir; returns the path of the final weights file."""
    info = init_distributed(cfg.device)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    ae = TinyAutoencoder(AutoencoderConfig(cfg.latent_channels, tuple(cfg.widths))).to(info.device)
    ema = EMA(ae, cfg.ema, cfg.ema_sigma_rel, cfg.ema_beta)
    opt = torch.optim.AdamW(ae.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = 0
    if (ckpt := latest_checkpoint(run_dir)) is not None:
        step = load_training_state(ckpt, {"ae": ae}, {"ae": (ae, opt)}, {"ae": ema})["step"]
        log.info("resumed from %s (step %d)", ckpt, step)
    model = wrap_model(ae, info, cfg.strategy)

    spec = CropSpec(cfg.crop, cfg.sr_scale, cfg.short_side, upscale=cfg.upscale, caption_dropout=0.0)
    dataset = PhotoCrops(cfg.data, spec, cfg.seed)
    batches = make_loader(dataset, cfg.batch, step, info.rank, info.world_size, cfg.workers)
    progress = Progress(run_dir, step, cfg.steps, cfg.batch, info.is_main)
    holdout = None
    if cfg.holdout and cfg.eval_every > 0 and info.is_main:
        hr = grid_crops(cfg.holdout, cfg.crop, cfg.eval_crops_per_photo, cfg.short_side, cfg.upscale)
        holdout = degrade(hr, cfg.sr_scale)
    while step < cfg.steps:
        batch = next(batches)
        image = batch["lr"].to(info.device)
        step += 1
        set_lr(opt, scheduled_lr(step, cfg.lr, cfg))
        loss, metrics, recon = autoencoder_loss(model, image, cfg)
        check_finite(loss, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(ae, step)
        metrics["loss"] = float(all_mean(loss.detach(), info))
        progress.update(step, metrics, log=step % cfg.log_every == 0)
        if info.is_main and step % cfg.sample_every == 0:
            save_grid(run_dir / "samples" / f"step_{step:07d}.png", [image[:8], recon[:8].detach()])
        if holdout is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
            record = {"step": step, "images": step * cfg.batch, "time": time.time()}
            record["psnr"] = holdout_psnr(ae, ema, holdout, info.device)
            with open(run_dir / "holdout.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        if info.is_main and (step % cfg.save_every == 0 or step == cfg.steps):
            save_training_state(
                run_dir, step, {"ae": ae}, {"ae": (ae, opt)}, {"ae": ema}, {"config": config_dict(cfg)}
            )
    progress.close()

    final = run_dir / "tiny-ae.safetensors"
    ema_state = ema.full_state()
    if info.is_main:
        ema.copy_to(ae, ema_state)
        stats = latent_statistics(ae, dataset, info.device)
        save_autoencoder(ae, final, {"latent_stats": stats, "train_steps": cfg.steps, "seed": cfg.seed})
        log.info("wrote %s (latent mean %.4f, std %.4f)", final, stats["mean"], stats["std"])
    shutdown(info)
    return final


@torch.no_grad()
def holdout_psnr(ae: TinyAutoencoder, ema: EMA, images: torch.Tensor, device: torch.device) -> float:
    """Mean PSNR (dB, peak 1) of the EMA weights reconstructing `images` [N, 3, H, W] in [-1, 1]."""
    probe = TinyAutoencoder(ae.cfg).to(device).eval()
    ema.copy_to(probe, ema.full_state())
    values = []
    for start in range(0, len(images), 16):
        chunk = images[start : start + 16].to(device)
        recon = probe(chunk).clamp(-1, 1)
        mse = ((recon - chunk) / 2).pow(2).mean(dim=(1, 2, 3)).double()
        values.append(10 * torch.log10(1.0 / mse))
    return float(torch.cat(values).mean())


@torch.no_grad()
def latent_statistics(
    ae: TinyAutoencoder, dataset: PhotoCrops, device: torch.device, count: int = 512
) -> dict:
    """Mean and std of the raw latent over `count` crops not used in training (index range far away)."""
    ae.eval()
    values = []
    for start in range(0, count, 64):
        images = torch.stack([dataset[2**40 + i]["lr"] for i in range(start, start + 64)]).to(device)
        values.append(ae.encode(images).float().flatten())
    z = torch.cat(values)
    return {"mean": float(z.mean()), "std": float(z.std()), "crops": count}
