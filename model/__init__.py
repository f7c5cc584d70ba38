"""The PiD network, its latent spaces, samplers and checkpoint IO.

Public API (other folders use exactly these names; the modules behind them are private):
    the network:  PiDConfig, PRESETS, RELEASED_CHECKPOINTS, parse_image_size, PiDNet, Conditioning,
                  layers the kernel benchmark times (RMSNorm, modulate), to_patches
    checkpoints:  load_checkpoint, save_checkpoint, read_checkpoint, CheckpointError, load_decoder,
                  DEFAULT_CHECKPOINT, load_tiny_autoencoder,
                  official_to_ours, ours_to_official, official_kwargs (the official names and arguments)
    sampling:     sample, sample_tiled (windows of the native size, blended per step), tiled_window_count,
                  Tiling, TILING_OFF, TilePlan, tiled_velocity, Progress (the tiled path of every engine),
                  WindowLatents, window_latents_for, WINDOW_LATENT_MODES, crop_window_latents,
                  CorrectedWindowLatents, image_windows, window_latents_name (what each window is
                  conditioned on),
                  sample_teacher,
                  student_steps, student_timesteps, MAX_STUDENT_STEPS, to_uint8_hwc;
                  the flow-matching pieces training uses: FM_TIMESCALE, flow_noise, predict_x0, shift_time,
                  resolution_shift
    latents:      get_latent_space, LatentSpace, LatentError, validate_sigma, unpack_sequence (the full
                  latent-space API, client layouts included, is pidserve.model.latents: for users' code,
                  as docs/serving.md shows; other folders of this package use the names above)
    the embedded default: DEFAULT_MODEL_NAME, load_default_autoencoder, encode_image, decode_latent_cascade
    tiny-ae:      AutoencoderConfig, TinyAutoencoder, load_autoencoder, save_autoencoder, latent_space_of
    text:         TextEncoder (imports transformers only when it loads a model)
    VAE decoder:  VAE_CONFIGS, VAEDecoder, load_vae_decoder (the cascades `bench cascade` times)
    figures:      decode_flops, parameter_counts, describe_config, matching_variants
"""

from .autoencoder import (
    AutoencoderConfig,
    TinyAutoencoder,
    latent_space_of,
    load_autoencoder,
    save_autoencoder,
)
from .checkpoints import load_checkpoint, official_to_ours, ours_to_official, read_checkpoint, save_checkpoint
from .config import PRESETS, RELEASED_CHECKPOINTS, PiDConfig, official_kwargs, parse_image_size
from .default import DEFAULT_MODEL_NAME, decode_latent_cascade, encode_image, load_default_autoencoder
from .errors import CheckpointError, LatentError
from .flops import decode_flops, tiled_decode_flops
from .info import describe_config, matching_variants, parameter_counts
from .latents import LatentSpace, get_latent_space, unpack_sequence, validate_sigma
from .layers import RMSNorm, modulate, to_patches
from .loading import DEFAULT_CHECKPOINT, load_decoder, load_tiny_autoencoder
from .network import Conditioning, PiDNet
from .sampler import (
    FM_TIMESCALE,
    MAX_STUDENT_STEPS,
    flow_noise,
    predict_x0,
    resolution_shift,
    sample,
    sample_teacher,
    shift_time,
    student_steps,
    student_timesteps,
    to_uint8_hwc,
)
from .text import TextEncoder
from .tiling import OFF as TILING_OFF
from .tiling import Progress, TilePlan, Tiling, sample_tiled, tiled_velocity, tiled_window_count
from .vae_decoder import VAE_CONFIGS, VAEDecoder, load_vae_decoder
from .window_latents import (
    WINDOW_LATENT_MODES,
    CorrectedWindowLatents,
    WindowLatents,
    crop_window_latents,
    image_windows,
    window_latents_for,
    window_latents_name,
)

__all__ = [
    "DEFAULT_CHECKPOINT",
    "DEFAULT_MODEL_NAME",
    "FM_TIMESCALE",
    "MAX_STUDENT_STEPS",
    "PRESETS",
    "RELEASED_CHECKPOINTS",
    "TILING_OFF",
    "VAE_CONFIGS",
    "WINDOW_LATENT_MODES",
    "AutoencoderConfig",
    "CheckpointError",
    "Conditioning",
    "CorrectedWindowLatents",
    "LatentError",
    "LatentSpace",
    "PiDConfig",
    "PiDNet",
    "Progress",
    "RMSNorm",
    "TextEncoder",
    "TilePlan",
    "Tiling",
    "TinyAutoencoder",
    "VAEDecoder",
    "WindowLatents",
    "crop_window_latents",
    "decode_flops",
    "decode_latent_cascade",
    "describe_config",
    "encode_image",
    "flow_noise",
    "get_latent_space",
    "image_windows",
    "latent_space_of",
    "load_autoencoder",
    "load_checkpoint",
    "load_decoder",
    "load_default_autoencoder",
    "load_tiny_autoencoder",
    "load_vae_decoder",
    "matching_variants",
    "modulate",
    "official_kwargs",
    "official_to_ours",
    "ours_to_official",
    "parameter_counts",
    "parse_image_size",
    "predict_x0",
    "read_checkpoint",
    "resolution_shift",
    "sample",
    "sample_teacher",
    "sample_tiled",
    "save_autoencoder",
    "save_checkpoint",
    "shift_time",
    "student_steps",
    "student_timesteps",
    "tiled_decode_flops",
    "tiled_velocity",
    "tiled_window_count",
    "to_patches",
    "to_uint8_hwc",
    "unpack_sequence",
    "validate_sigma",
    "window_latents_for",
    "window_latents_name",
]
