"""pidserve: serve PiD, a pixel diffusion decoder, from latents to high-resolution pixels."""

__version__ = "0.1.0"
