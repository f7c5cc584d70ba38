"""Everything the decode service can be told, in one place: `PIDSERVE_*` variables and `pidserve serve` flags.

The CLI builds a `ServerSettings` from its flags on top of the environment, so the defaults below are the
only defaults (DESIGN: one source of defaults).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pidserve.model import Tiling, parse_image_size

OutputFormat = Literal["png", "jpeg", "webp", "raw", "safetensors"]


class RequestLimits(NamedTuple):
    output_pixels: int  # pixels of all of a request's images together: what its decode holds in memory
    pixel_steps: int  # output pixels x steps at the native size's cost per pixel, summed: the compute


# The request-cost defaults, per device type and precision: what one request may make the worker do.
# Pixel-steps are counted at the native size (service.charged_pixel_steps: tiled decodes pay for every
# window, untiled ones above the native size for their global attention). CPU: this project's 2-core
# machine decodes ~0.75 M such pixel-steps per second with pid-tiny v3 (bench/RESULTS.md, bench tiles),
# so a request at the limit (e.g. one 2048x2048 output in 121 windows at 4 steps: 43-45 s for the engine
# alone, 52-53 s through `make serve`) finishes inside the 60 s default deadline, in under 1 GB tiled.
# CUDA: 16 images of 2048x2048 at 4 steps (bf16, fp8; a few seconds on an H100-class GPU); fp32 runs
# several times slower, a quarter of that.
LIMITS: dict[tuple[str, str], RequestLimits] = {
    ("cpu", "fp32"): RequestLimits(output_pixels=2**22, pixel_steps=2**25),
    ("cpu", "bf16"): RequestLimits(output_pixels=2**22, pixel_steps=2**25),
    ("cuda", "fp32"): RequestLimits(output_pixels=2**26, pixel_steps=2**26),
    ("cuda", "bf16"): RequestLimits(output_pixels=2**26, pixel_steps=2**28),
    ("cuda", "fp8"): RequestLimits(output_pixels=2**26, pixel_steps=2**28),
}


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PIDSERVE_", extra="forbid")

    # ---- the model and the engine ----
    checkpoint: str = Field("default", description="'default' (embedded pid-tiny), ours, or official.")
    variant: str | None = Field(None, description="Preset of an official checkpoint (pidserve info --list).")
    model_name: str | None = Field(
        None, description="Name in /v1/models and /v2/models; default: the variant."
    )
    backend: str = Field("torch", description="torch | torch-compile | onnxruntime | tensorrt")
    device: str = "cpu"
    precision: str = "fp32"
    engine_dir: Path | None = Field(None, description="ONNX export or TensorRT engine directory.")
    attention_backend: Literal["auto", "flash", "cudnn", "efficient", "math"] = Field(
        "auto",
        description="Attention kernel of the torch backends (docs/engines.md); auto: PyTorch's choice.",
    )
    max_batch: int = Field(4, ge=1, le=64, description="Largest batch the worker runs.")
    batch_sizes: list[int] | None = Field(
        None, description="Served batch sizes (partial batches padded); default: every size up to max_batch."
    )
    image_sizes: list[str] | None = Field(
        None, description="Output sizes HEIGHTxWIDTH the engine is built and warmed for (torch-compile)."
    )
    tile: str = Field(
        "auto",
        description="How outputs are cut into blended windows (model/tiling.py), unless a request says: "
        "auto (windows of the model's native size, or of a fixed-shape engine's built size, for larger "
        "outputs), off, HxW or HxW:OVERLAP.",
    )
    window_latents: Literal["auto", "crop", "corrected"] = Field(
        "auto",
        description="What each window of a tiled decode is conditioned on (model/window_latents.py): "
        "crop (its crop of the latent), corrected (that crop corrected for the encoder's context, "
        "tiny-ae latents only) or auto (corrected where possible, else crop).",
    )
    text_encoder: str | None = Field(
        None, description="Gemma-2 text encoder (local directory or hub id) for prompts; none: no prompts."
    )
    prompt_cache_size: int = Field(256, ge=0)

    # ---- batching and deadlines (Triton's dynamic batcher semantics) ----
    max_queue_delay_ms: float = Field(5.0, ge=0, description="How long a batch waits for more requests.")
    max_queue_size: int = Field(64, ge=1, description="Queued latents beyond this get 429.")
    request_timeout_s: float = Field(60.0, gt=0, description="Default and largest per-request deadline.")

    # ---- limits ----
    max_body_bytes: int = Field(64 * 2**20, ge=1024)
    max_output_pixels: int | None = Field(
        None, ge=1, description="Output pixels per request (memory); default per device (LIMITS)."
    )
    max_pixel_steps: int | None = Field(
        None,
        ge=1,
        description="Output pixels x sampler steps per request (compute), at the native size's cost per "
        "pixel (service.charged_pixel_steps); default per device and precision.",
    )
    max_request_latents: int = Field(16, ge=1, description="Latents in one request.")

    # ---- encoding ----
    encode_workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    png_encoder: Literal["fpng", "pillow"] = Field(
        "fpng", description="fpng (fast, ~10% larger files) or pillow (zlib, png_level)."
    )
    png_level: int = Field(1, ge=0, le=9, description="zlib level of the pillow PNG encoder.")
    default_format: OutputFormat = "png"
    default_quality: int = Field(90, ge=1, le=100, description="JPEG/WebP quality.")

    # ---- security ----
    api_key: SecretStr | None = Field(None, description="Require 'Authorization: Bearer <key>'.")
    api_key_file: Path | None = Field(None, description="A file holding the API key (a mounted secret).")

    # ---- the HTTP server ----
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Also serve /metrics on this port (no API key); /metrics on the API port stays.",
    )
    grpc_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Also serve KServe v2 over gRPC on this port (needs pidserve[grpc]).",
    )
    graceful_shutdown_s: float = Field(30.0, ge=0)
    log_level: str = "info"

    @field_validator("api_key")
    @classmethod
    def _not_empty(cls, key: SecretStr | None) -> SecretStr | None:
        # An empty PIDSERVE_API_KEY (a template left blank, a missing secret) must not turn auth off.
        if key is not None and not key.get_secret_value().strip():
            raise ValueError("the API key is set but empty; unset PIDSERVE_API_KEY to serve without a key")
        return key

    @field_validator("batch_sizes")
    @classmethod
    def _sorted_positive(cls, sizes: list[int] | None) -> list[int] | None:
        if sizes is not None and (not sizes or min(sizes) < 1):
            raise ValueError("batch_sizes must be positive integers, e.g. [1, 2, 4]")
        return None if sizes is None else sorted(set(sizes))

    def parsed_image_sizes(self) -> tuple[tuple[int, int], ...] | None:
        if not self.image_sizes:
            return None
        return tuple(parse_image_size(text, "an image size") for text in self.image_sizes)

    def parsed_tiling(self) -> Tiling:
        """The tile setting as a Tiling; ValueError names the setting and the accepted forms."""
        try:
            return Tiling.parse(self.tile)
        except ValueError as exc:
            raise ValueError(f"--tile / PIDSERVE_TILE: {exc}") from None

    def request_limits(self) -> RequestLimits:
        """The per-request limits: the flags where given, else LIMITS for this device and precision."""
        device_type = self.device.split(":")[0]
        default = LIMITS.get((device_type, self.precision), LIMITS[("cpu", "fp32")])
        return RequestLimits(
            output_pixels=self.max_output_pixels or default.output_pixels,
            pixel_steps=self.max_pixel_steps or default.pixel_steps,
        )

    def resolved_api_key(self) -> bytes | None:
        """The API key (variable first, then the secret file), or None when auth is off."""
        if self.api_key is not None:
            return self.api_key.get_secret_value().strip().encode()
        if self.api_key_file is not None:
            try:
                key = self.api_key_file.read_text().strip()
            except OSError as exc:
                raise ValueError(f"could not read the API key file {self.api_key_file}: {exc}") from None
            if not key:
                raise ValueError(f"the API key file {self.api_key_file} is empty")
            return key.encode()
        return None
