"""`pidserve serve`: start the decode service (pidserve.server) from flags and PIDSERVE_* variables.

A flag left out leaves the setting to its PIDSERVE_* variable, then to ServerSettings' default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pidserve.cli import fail, keep_freed_memory


def serve(
    checkpoint: Annotated[
        str | None, typer.Option(help="'default' (the embedded pid-tiny), ours, or official with --variant.")
    ] = None,
    variant: Annotated[str | None, typer.Option(help="Preset of an official checkpoint.")] = None,
    model_name: Annotated[str | None, typer.Option(help="Name in /v1/models and /v2/models.")] = None,
    backend: Annotated[str | None, typer.Option(help="torch, torch-compile, onnxruntime, tensorrt")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda[:N].")] = None,
    precision: Annotated[
        str | None, typer.Option(help="fp32 | bf16 | fp8 (FP8 matmuls, GPUs of cc >= 8.9).")
    ] = None,
    engine_dir: Annotated[Path | None, typer.Option(help="ONNX export or TensorRT engine directory.")] = None,
    attention_backend: Annotated[
        str | None, typer.Option(help="auto | flash | cudnn | efficient | math (torch backends).")
    ] = None,
    max_batch: Annotated[int | None, typer.Option(help="Largest batch the worker runs.")] = None,
    batch_size: Annotated[
        list[int] | None, typer.Option("--batch-size", help="A served batch size (repeat); default 1..max.")
    ] = None,
    image_size: Annotated[
        list[str] | None, typer.Option("--image-size", help="Output size HxW to build and warm (repeat).")
    ] = None,
    tile: Annotated[
        str | None,
        typer.Option(help="Default tiling of larger outputs: auto (the default), off, HxW or HxW:OVERLAP."),
    ] = None,
    window_latents: Annotated[
        str | None,
        typer.Option(
            help="What tiled windows are conditioned on: auto (the default), crop, or corrected "
            "(tiny-ae latents: the crop corrected for the encoder's context)."
        ),
    ] = None,
    text_encoder: Annotated[str | None, typer.Option(help="Gemma-2 text encoder for prompts.")] = None,
    max_queue_delay_ms: Annotated[float | None, typer.Option(help="Batching delay.")] = None,
    max_queue_size: Annotated[int | None, typer.Option(help="Queued latents before 429.")] = None,
    request_timeout_s: Annotated[float | None, typer.Option(help="Default and largest deadline.")] = None,
    max_output_pixels: Annotated[
        int | None, typer.Option(help="Output pixels per request (default per device: docs/serving.md).")
    ] = None,
    max_pixel_steps: Annotated[
        int | None,
        typer.Option(
            help="Output pixels x steps per request, at the native size's cost per pixel (tiled: every "
            "window; docs/serving.md); default per device and precision."
        ),
    ] = None,
    max_request_latents: Annotated[int | None, typer.Option(help="Latents in one request (16).")] = None,
    encode_workers: Annotated[int | None, typer.Option(help="Encoder pool size (default: cores).")] = None,
    png_encoder: Annotated[str | None, typer.Option(help="fpng | pillow")] = None,
    api_key_file: Annotated[Path | None, typer.Option(help="File holding the API key.")] = None,
    host: Annotated[str | None, typer.Option(help="Interface to listen on (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000).")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Also serve /metrics on this port.")] = None,
    grpc_port: Annotated[
        int | None, typer.Option(help="Also serve KServe v2 over gRPC on this port (pidserve[grpc]).")
    ] = None,
) -> None:
    """Start the decode service (flags override PIDSERVE_* variables; see docs/serving.md)."""
    keep_freed_memory()
    from pydantic import ValidationError

    from pidserve.server import ServerSettings, bind, check_settings, run

    flags = {
        "checkpoint": checkpoint, "variant": variant, "model_name": model_name, "backend": backend,
        "device": device, "precision": precision, "engine_dir": engine_dir,
        "attention_backend": attention_backend, "max_batch": max_batch,
        "batch_sizes": batch_size or None, "image_sizes": image_size or None, "text_encoder": text_encoder,
        "tile": tile, "window_latents": window_latents,
        "max_queue_delay_ms": max_queue_delay_ms, "max_queue_size": max_queue_size,
        "request_timeout_s": request_timeout_s, "max_output_pixels": max_output_pixels,
        "max_pixel_steps": max_pixel_steps, "max_request_latents": max_request_latents,
        "encode_workers": encode_workers, "png_encoder": png_encoder,
        "api_key_file": api_key_file, "host": host, "port": port, "metrics_port": metrics_port,
        "grpc_port": grpc_port,
    }  # fmt: skip
    try:
        settings = ServerSettings(**{k: v for k, v in flags.items() if v is not None})
        settings.parsed_image_sizes()
        settings.parsed_tiling()
        settings.resolved_api_key()
        check_settings(settings)
    except (ValidationError, ValueError) as exc:
        raise fail(f"invalid server settings: {exc}") from None
    try:
        sock = bind(settings.host, settings.port)  # before any model work: a taken port fails at once
    except OSError as exc:
        raise fail(exc) from None
    run(settings, sock)
