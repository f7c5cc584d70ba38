"""The built-in latent spaces, registered when pidserve.model.latents is imported.

    name         channels  /px  noising  normalization                     PiD variants
    flux1        16        8    flow     0.3611 (raw - 0.1159)             2k_flux, 2kto4k_v1pt5_flux
    sd3          16        8    flow     1.5305 (raw - 0.0609)             2k_sd3, 2kto4k_sd3
    sdxl         4         8    vp       0.13025 raw                       2kto4k_sdxl
    flux2        128       16   flow     2x2 patchify, BatchNorm stats     2k_flux2, 2kto4k_v1pt5_flux2
    qwenimage    16        8    flow     per-channel mean / std            2kto4k_v1pt5_qwenimage
    dinov2-rae   768       16   flow     per-position mean / var stats     2k_rae
    siglip2-rae  1152      16   flow     LayerNorm over channels           2k_scale_rae
    tiny-ae      16        8    flow     (raw - TINY_AE_SHIFT) / TINY_AE_STD   pid-tiny

Registration order is the order ``list_latent_spaces()`` reports.
"""

from __future__ import annotations

from .normalization import ChannelLayerNorm, ChannelMeanStd, MeanVarStats, ScaleShift
from .space import LatentSpace, register_latent_space

# Qwen-Image VAE (AutoencoderKLQwenImage) per-channel statistics: the `latents_mean` / `latents_std`
# defaults of diffusers src/diffusers/models/autoencoders/autoencoder_kl_qwenimage.py (huggingface/
# diffusers, AutoencoderKLQwenImage.__init__), the same values as Qwen/Qwen-Image vae/config.json and as
# the Wan-2.1 VAE's mean/std (Wan-Video/Wan2.1 wan/modules/vae.py, class WanVAE).
_QWENIMAGE_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
_QWENIMAGE_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

# tiny-ae (model/autoencoder.py, the embedded default's autoencoder): raw latent mean and std measured
# on 512 training-photo crops when it was trained (stored in its weights' metadata; a test checks them).
TINY_AE_SHIFT = 0.017505
TINY_AE_STD = 1.273424

_BUILTIN_SPACES = (
    LatentSpace(
        name="flux1",
        description="FLUX.1 / Z-Image VAE latent: 16 channels at 1/8, z = 0.3611 (raw - 0.1159)",
        channels=16,
        downsample=8,
        noising="flow",
        normalization=ScaleShift(scale=0.3611, shift=0.1159),
        pid_variants=("2k_flux", "2kto4k_v1pt5_flux"),
        sequence_patch=2,
    ),
    LatentSpace(
        name="sd3",
        description="Stable Diffusion 3 VAE latent: 16 channels at 1/8, z = 1.5305 (raw - 0.0609)",
        channels=16,
        downsample=8,
        noising="flow",
        normalization=ScaleShift(scale=1.5305, shift=0.0609),
        pid_variants=("2k_sd3", "2kto4k_sd3"),
    ),
    LatentSpace(
        name="sdxl",
        description="SDXL VAE latent: 4 channels at 1/8, z = 0.13025 raw, variance-preserving noising",
        channels=4,
        downsample=8,
        noising="vp",
        normalization=ScaleShift(scale=0.13025),
        pid_variants=("2kto4k_sdxl",),
    ),
    LatentSpace(
        name="flux2",
        description=(
            "FLUX.2 / Klein VAE latent: 32 channels at 1/8, 2x2-patchified to 128 channels at 1/16, "
            "then the VAE's eval-mode BatchNorm"
        ),
        channels=128,
        downsample=16,
        noising="flow",
        normalization=MeanVarStats(
            eps=1e-4,
            per_position=False,
            how_to_load="They are the FLUX.2 VAE's BatchNorm running_mean / running_var, [128] each.",
        ),
        pid_variants=("2k_flux2", "2kto4k_v1pt5_flux2"),
        raw_patch=2,
    ),
    LatentSpace(
        name="qwenimage",
        description="Qwen-Image VAE latent (Wan-2.1 VAE statistics): 16 channels at 1/8, per-channel z-score",
        channels=16,
        downsample=8,
        noising="flow",
        normalization=ChannelMeanStd(mean=_QWENIMAGE_LATENTS_MEAN, std=_QWENIMAGE_LATENTS_STD),
        pid_variants=("2kto4k_v1pt5_qwenimage",),
        sequence_patch=2,
    ),
    LatentSpace(
        name="dinov2-rae",
        description=(
            "RAE latent: DINOv2-B-with-registers patch tokens (CLS and 4 registers dropped) as a 32x32 "
            "grid for a 512 image (virtual /16), per-position mean/var normalized"
        ),
        channels=768,
        downsample=16,
        noising="flow",
        normalization=MeanVarStats(
            eps=1e-5,
            per_position=True,
            how_to_load="They come from the RAE project's stats file (mean / var, [768, 32, 32]).",
        ),
        pid_variants=("2k_rae",),
    ),
    LatentSpace(
        name="siglip2-rae",
        description=(
            "RAE latent: SigLIP2-so400m-patch14-224 patch tokens as a 16x16 grid for a 256 image "
            "(virtual /16), affine-free LayerNorm over channels"
        ),
        channels=1152,
        downsample=16,
        noising="flow",
        normalization=ChannelLayerNorm(eps=1e-6),
        pid_variants=("2k_scale_rae",),
    ),
    LatentSpace(
        name="tiny-ae",
        description="pidserve's embedded tiny autoencoder: 16 channels at 1/8, z = (raw - mean) / std",
        channels=16,
        downsample=8,
        noising="flow",
        normalization=ScaleShift(scale=1.0 / TINY_AE_STD, shift=TINY_AE_SHIFT),
        pid_variants=("pid-tiny",),
    ),
)

for _space in _BUILTIN_SPACES:
    register_latent_space(_space)
del _space
