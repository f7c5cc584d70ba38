"""The FLUX.1 / SD3 / SDXL VAE decoder against diffusers' AutoencoderKL, and its weight loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from pidserve.model import CheckpointError
from pidserve.model.vae_decoder import (
    VAE_CONFIGS,
    VAEDecoder,
    VAEDecoderConfig,
    from_diffusers_keys,
    load_vae_decoder,
)

NARROW = (32, 64, 128, 128)  # the real widths are (128, 256, 512, 512): the same structure, 4x narrower


def _diffusers_vae(latent_channels: int, post_quant_conv: bool) -> AutoencoderKL:
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=NARROW,
        layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32,
        use_quant_conv=post_quant_conv,
        use_post_quant_conv=post_quant_conv,
    ).eval()
    with torch.no_grad():  # move norms and biases off their defaults, so every weight matters
        for param in vae.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return vae


def _narrow(latent_space: str) -> VAEDecoderConfig:
    base = VAE_CONFIGS[latent_space]
    return VAEDecoderConfig(base.latent_channels, NARROW, post_quant_conv=base.post_quant_conv)


@pytest.mark.parametrize("latent_space", ["flux1", "sdxl"])
def test_the_decoder_equals_diffusers_autoencoderkl(latent_space: str, tmp_path: Path) -> None:
    cfg = _narrow(latent_space)
    reference = _diffusers_vae(cfg.latent_channels, cfg.post_quant_conv)
    path = tmp_path / "diffusion_pytorch_model.safetensors"  # a diffusers vae/ folder's file: encoder too
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    ours = load_vae_decoder(path, latent_space, cfg)
    z = torch.randn(2, cfg.latent_channels, 8, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference.decode(z).sample
        got = ours.decode(z)
    assert got.shape == (2, 3, 64, 96)
    assert (got - expected).abs().max().item() < 1e-4


def test_flux_ae_safetensors_loads_as_is(tmp_path: Path) -> None:
    """Black Forest Labs' ae.safetensors names its modules like ours, under "encoder." and "decoder."."""
    decoder = VAEDecoder(_narrow("flux1"))
    state = {f"decoder.{k}": v for k, v in decoder.state_dict().items()}
    state["encoder.conv_in.weight"] = torch.zeros(1)  # the encoder half is ignored
    save_file(state, str(tmp_path / "ae.safetensors"))
    loaded = load_vae_decoder(tmp_path / "ae.safetensors", "flux1", _narrow("flux1"))
    z = torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        assert torch.equal(loaded.decode(z), decoder.eval().decode(z))


def test_the_full_size_decoder_has_the_published_size() -> None:
    with torch.device("meta"):
        flux = VAEDecoder(VAE_CONFIGS["flux1"])
        sdxl = VAEDecoder(VAE_CONFIGS["sdxl"])
    assert sum(p.numel() for p in flux.parameters()) == 49_545_475  # FLUX.1's ae decoder half
    assert sum(p.numel() for p in sdxl.parameters()) - sum(p.numel() for p in flux.parameters()) == (
        4 * 4 + 4 - 12 * 512 * 9  # post_quant_conv, and conv_in reads 4 channels instead of 16
    )


def test_diffusers_levels_are_counted_from_the_bottom() -> None:
    renamed = from_diffusers_keys(
        {
            "up_blocks.0.upsamplers.0.conv.weight": torch.zeros(1),
            "up_blocks.3.resnets.0.conv_shortcut.weight": torch.zeros(1),
            "mid_block.attentions.0.to_q.weight": torch.zeros(4, 4),
            "conv_norm_out.bias": torch.zeros(1),
        }
    )
    assert set(renamed) == {
        "up.3.upsample.conv.weight",
        "up.0.block.0.nin_shortcut.weight",
        "mid.attn_1.q.weight",
        "norm_out.bias",
    }
    assert renamed["mid.attn_1.q.weight"].shape == (4, 4, 1, 1)  # a Linear becomes a 1x1 convolution


def test_wrong_files_and_latent_spaces_are_refused(tmp_path: Path) -> None:
    save_file({"decoder.conv_in.weight": torch.zeros(3)}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointError, match=r"does not hold a flux1 VAE decoder: \d+ missing weights"):
        load_vae_decoder(tmp_path / "partial.safetensors", "flux1")
    narrow = VAEDecoder(_narrow("flux1")).state_dict()
    save_file({f"decoder.{k}": v for k, v in narrow.items()}, str(tmp_path / "narrow.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"weights have other shapes \(first: conv_in.weight is \[128, "
    ):
        load_vae_decoder(tmp_path / "narrow.safetensors", "flux1")  # full-size architecture expected
    with pytest.raises(CheckpointError, match=r"not a \.safetensors file"):
        load_vae_decoder(tmp_path / "ae.pth", "flux1")
    with pytest.raises(CheckpointError, match="no VAE decoder for latent space 'flux2'"):
        load_vae_decoder(tmp_path / "partial.safetensors", "flux2")
    with pytest.raises(ValueError, match=r"raw latent \[B, 16, h, w\]"):
        VAEDecoder(_narrow("flux1")).decode(torch.zeros(1, 4, 2, 2))
