"""What each window of a tiled decode is conditioned on: its crop of the latent, or that crop
corrected for the encoder's context.

Why a correction: an encoder with GroupNorm (tiny-ae's; FLUX.1's, SD3's and SDXL's have it too)
normalises over its whole input and zero-pads at its borders, so a window cut from the latent of a
whole image is not the latent of the window's own pixels, and a decoder trained on latents of whole
crops never saw the former. pid-tiny's tiled 1024² decodes were 7.7 levels off the input's mean
colour for that reason, against 3.0 when each window was given its own pixels' encoding
(docs/quality.md, "Where the tiled cast comes from"). A server has the latent, not the pixels, so:

    crop       the window's crop of the latent (plan.latent_rows): any latent space
    corrected  crop + E(window of D(z)) - crop(E(D(z))): the difference the encoder's context makes,
               measured on the autoencoder's decode D(z) of the whole latent, added to the given
               latent. The given latent keeps all its information (replacing it by E(window of D(z))
               would lose what the autoencoder's round trip loses: measured worse). Needs the latent
               space's own encoder and decoder, so it exists for tiny-ae only.
    auto       corrected where the latent space has its autoencoder here (tiny-ae), else crop

Measured on pid-tiny's tiled 1024² decodes of held-out photos: 7.7 -> 3.4 levels, PSNR +0.6 dB
(docs/quality.md, "Tiled decodes with corrected window latents").

Cost of `corrected`: one autoencoder decode and encode of the whole low-res image plus one encode per
window, once per decode (not per step); memory grows with the low-res image (1/16 of the output's
pixels for a 4x decoder), not bounded by one window batch (bench/RESULTS.md).
"""

from __future__ import annotations

import torch

from .autoencoder import TinyAutoencoder
from .latents import LatentSpace, get_latent_space
from .tiling import TilePlan, WindowLatents

WINDOW_LATENT_MODES = ("auto", "crop", "corrected")
# The latent spaces whose autoencoder pidserve holds (the embedded default's, model/weights/)
CORRECTABLE_SPACES = ("tiny-ae",)
ENCODE_CHUNK = 64  # windows encoded together: bounds the per-window encodes' memory


def crop_window_latents(plan: TilePlan, latents: torch.Tensor) -> torch.Tensor:
    """Every window's crop of the latent: what the network sees when nothing is corrected."""
    return plan.latent_rows(latents)


class CorrectedWindowLatents:
    """Window latents corrected for the encoder's context (see the module docstring).

    autoencoder: the latent space's own (encoder and decoder), or None to load the embedded tiny-ae
    on first use; space: the latents' normalisation. The autoencoder is moved to the latents' device
    (float32) when first used there."""

    def __init__(self, autoencoder: TinyAutoencoder | None = None, space: LatentSpace | None = None) -> None:
        self._autoencoder = autoencoder
        self.space = space or get_latent_space("tiny-ae")

    def autoencoder(self, device: torch.device) -> TinyAutoencoder:
        if self._autoencoder is None:
            from .default import load_default_autoencoder

            self._autoencoder = load_default_autoencoder()
        if next(self._autoencoder.parameters()).device != device:
            self._autoencoder = self._autoencoder.to(device)
        return self._autoencoder

    @torch.no_grad()
    def __call__(self, plan: TilePlan, latents: torch.Tensor) -> torch.Tensor:
        ae = self.autoencoder(latents.device)
        z = latents.float()
        image = ae.decode(self.space.denormalize(z)).clamp(-1, 1)  # D(z): the low-res image
        context = self._encode(ae, image)  # E(D(z)): encoded whole, as the user's latent was
        crops = image_windows(plan, image, ae.cfg.downsample)
        alone = []  # E(window of D(z)): each window encoded on its own, window-major
        for start in range(0, len(crops), ENCODE_CHUNK):
            alone.append(self._encode(ae, torch.cat(crops[start : start + ENCODE_CHUNK])))
        correction = torch.cat(alone) - plan.latent_rows(context)
        return (plan.latent_rows(z) + correction).to(latents.dtype)

    def _encode(self, ae: TinyAutoencoder, image: torch.Tensor) -> torch.Tensor:
        return self.space.normalize(ae.encode(image).float())


def window_latents_name(window_latents: WindowLatents) -> str:
    """'crop' or 'corrected': what a resolved WindowLatents does (for reports and the CLI)."""
    return "corrected" if isinstance(window_latents, CorrectedWindowLatents) else "crop"


def image_windows(plan: TilePlan, image: torch.Tensor, pixels: int) -> list[torch.Tensor]:
    """Every window's region of an image [B, 3, H, W] that has `pixels` pixels per latent cell (the
    autoencoder's low-res image: its downsampling factor), in window order."""
    (th, tw), grid = plan.tile, plan.grid
    return [
        image[
            ...,
            t // grid * pixels : (t + th) // grid * pixels,
            l // grid * pixels : (l + tw) // grid * pixels,
        ]
        for t, l in plan.origins
    ]


def window_latents_for(mode: str, latent_space: str) -> WindowLatents:
    """The window latents `mode` names for latents of `latent_space`; ValueError says what fits."""
    if mode not in WINDOW_LATENT_MODES:
        raise ValueError(f"window latents {mode!r} is not one of {', '.join(WINDOW_LATENT_MODES)}")
    correctable = latent_space in CORRECTABLE_SPACES
    if mode == "corrected" and not correctable:
        raise ValueError(
            f"window latents 'corrected' needs the latent space's own autoencoder, which pidserve has "
            f"for {', '.join(CORRECTABLE_SPACES)} only, not '{latent_space}': use crop or auto"
        )
    if mode == "crop" or not correctable:
        return crop_window_latents
    return CorrectedWindowLatents(space=get_latent_space(latent_space))


__all__ = [
    "CORRECTABLE_SPACES",
    "WINDOW_LATENT_MODES",
    "CorrectedWindowLatents",
    "WindowLatents",
    "crop_window_latents",
    "image_windows",
    "window_latents_for",
    "window_latents_name",
]
