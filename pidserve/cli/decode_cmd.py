"""`pidserve decode`: a latent file (or an image, encoded with tiny-ae) to PNG, here or on a server.

    IMAGE_OR_LATENT --_read_latent / _encode_image_file--> latent [B, C, h, w] float32, sigma [B] or None
      locally:      open_engine(backend, ...).decode(...) -> uint8 [B, H, W, 3] -> PNG files
      with --url:   pidserve.client.Client.decode(...)     -> PNG files

Latent files are .safetensors (tensor "latent", optional "sigma") or plain .npy; neither is ever
unpickled. Images can only be decoded by a model of the "tiny-ae" latent space (the embedded one).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from pidserve.cli import fail, keep_freed_memory
from pidserve.cli.options import load_model

if TYPE_CHECKING:
    import torch

    from pidserve.model import PiDNet

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
LATENT_SUFFIXES = (".safetensors", ".npy")
# What -o may be, and the format each asks the server for (--url): the bytes match the name.
OUTPUT_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
# Past this many output pixels a local decode needs more memory and time than a laptop has (a 4000x3000
# photo would become 16000x12000: 192 M pixels, tens of GB): refused unless --max-output-pixels says so.
MAX_LOCAL_OUTPUT_PIXELS = 4096 * 4096


def decode(
    latent_file: Annotated[
        Path,
        typer.Argument(
            help="Latent .safetensors (tensor 'latent') or .npy [B,C,h,w]; or an image (PNG/JPEG/WebP), "
            "encoded with tiny-ae for --checkpoint default.",
            metavar="IMAGE_OR_LATENT",
        ),
    ],
    checkpoint: Annotated[
        str, typer.Option(help="'default' (the embedded pid-tiny), ours, or official with --variant.")
    ] = "default",
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="Image path, .png/.jpg/.webp (a batch adds _0, _1, ...), or a directory."
        ),
    ] = Path("decoded.png"),
    variant: Annotated[str | None, typer.Option(help="Preset of an official checkpoint.")] = None,
    backend: Annotated[str, typer.Option(help="torch | torch-compile | onnxruntime | tensorrt")] = "torch",
    device: Annotated[str, typer.Option(help="cpu or cuda[:N].")] = "cpu",
    precision: Annotated[
        str, typer.Option(help="fp32 | bf16 | fp8 (FP8 matmuls, GPUs of cc >= 8.9).")
    ] = "fp32",
    engine_dir: Annotated[Path | None, typer.Option(help="ONNX export or TensorRT engine directory.")] = None,
    attention_backend: Annotated[
        str, typer.Option(help="auto | flash | cudnn | efficient | math (torch backends).")
    ] = "auto",
    seed: Annotated[int, typer.Option(help="Noise seed; sample i of a batch uses seed + i.")] = 0,
    sigma: Annotated[
        float | None, typer.Option(help="The latent's noise level in [0, 1] (default: file or 0).")
    ] = None,
    steps: Annotated[int, typer.Option(help="Student steps, 1-4.")] = 4,
    url: Annotated[
        str | None, typer.Option(help="Decode on a running server (pidserve serve) instead of locally.")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(help="The server's API key (--url).", envvar="PIDSERVE_CLIENT_API_KEY")
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(help="Seconds to wait for the server (--url); it caps this at its --request-timeout-s."),
    ] = None,
    max_output_pixels: Annotated[
        int, typer.Option(help="Refuse a local decode larger than this (memory and time).")
    ] = MAX_LOCAL_OUTPUT_PIXELS,
    tile: Annotated[
        str | None,
        typer.Option(
            help="How outputs are cut into blended windows: auto (windows of the model's native size when "
            "the output is larger; the default here), off, HxW or HxW:OVERLAP, e.g. 256x256:64. With "
            "--url the default is the server's."
        ),
    ] = None,
    window_latents: Annotated[
        str | None,
        typer.Option(
            help="What tiled windows are conditioned on: auto (the default: corrected for tiny-ae latents, "
            "else crop), crop, or corrected (the crop corrected for the encoder's context). Local "
            "decodes only: a server uses its own --window-latents."
        ),
    ] = None,
) -> None:
    """Decode a latent file (or an image, via tiny-ae) to an image; same backend and --seed, same pixels."""
    keep_freed_memory()
    output = _output_path(output, latent_file)  # checked before any decoding, so no work is lost to it
    _check_input_name(latent_file)
    if url is not None:
        if window_latents is not None:
            raise fail("--window-latents is a server setting with --url (pidserve serve --window-latents)")
        _decode_remote(latent_file, url, api_key, output, seed, sigma, steps, timeout, tile)
        return
    import torch
    from PIL import Image

    from pidserve.engines import (
        DecodeBatch,
        EngineConfigError,
        EngineInputError,
        ShapeProfile,
        check_device,
        open_engine,
    )
    from pidserve.model import (
        WINDOW_LATENT_MODES,
        LatentError,
        Tiling,
        get_latent_space,
        validate_sigma,
        window_latents_name,
    )

    try:
        tiling = Tiling.parse(tile or "auto")
    except ValueError as exc:
        raise fail(f"--tile: {exc}") from None
    window_latents = window_latents or "auto"
    if window_latents not in WINDOW_LATENT_MODES:
        raise fail(f"--window-latents {window_latents!r} is not one of {', '.join(WINDOW_LATENT_MODES)}")

    try:
        check_device(device)
    except EngineConfigError as exc:
        raise fail(exc) from None
    net = load_model(checkpoint, variant)
    if latent_file.suffix.lower() in IMAGE_SUFFIXES:
        latent, file_sigma = _encode_image_file(latent_file, checkpoint, net), None
    else:
        latent, file_sigma = _read_latent(latent_file)
    batch_size = latent.shape[0]
    try:
        get_latent_space(net.cfg.latent_space).validate(latent)
        sigmas = validate_sigma(
            sigma if sigma is not None else (file_sigma if file_sigma is not None else 0.0), batch_size
        )
    except LatentError as exc:
        raise fail(exc) from None
    size = net.cfg.output_size(latent.shape[-2], latent.shape[-1])
    if batch_size * size[0] * size[1] > max_output_pixels:
        raise fail(
            f"this decode would write {batch_size} x {size[1]}x{size[0]} pixels "
            f"({batch_size * size[0] * size[1] / 1e6:.0f} M), over --max-output-pixels "
            f"({max_output_pixels:,}), and need many GB and minutes: shrink the input (the output is "
            f"{net.cfg.sr_scale}x the encoded image per side) or raise --max-output-pixels"
        )
    try:
        # An ONNX export made here is of the one shape it runs: the window's when the output is tiled.
        plan = tiling.plan(size, net.cfg.native_size, net.cfg.output_scale)
        window = size if plan is None else plan.tile
        rows = batch_size if plan is None else min(plan.count * batch_size, 8)
        engine = open_engine(
            backend,
            net=net,
            device=device,
            precision=precision,
            max_batch=rows,
            engine_dir=engine_dir,
            profile=ShapeProfile(window, tuple(range(1, rows + 1))),
            attention_backend=attention_backend,
            tiling=tiling,
            window_latents=window_latents,
        )
        seeds = torch.arange(batch_size, dtype=torch.int64) + seed
        with _progress_bar(plan) as progress:
            result = engine.decode(DecodeBatch(latent, sigmas, seeds, None, steps, progress=progress))
    except (EngineConfigError, EngineInputError, ValueError) as exc:
        raise fail(exc) from None
    paths = (
        [output]
        if batch_size == 1
        else [output.with_name(f"{output.stem}_{i}{output.suffix}") for i in range(batch_size)]
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    for image, path in zip(result.images, paths, strict=True):
        Image.fromarray(image.numpy()).save(path)
    timings = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in result.timings.items())
    windows = (
        ""
        if result.windows == 1
        else f", {result.windows} windows of {window[0]}x{window[1]}, "
        f"{window_latents_name(engine.window_latents)} window latents"
    )
    typer.echo(
        f"wrote {', '.join(map(str, paths))} ({size[0]}x{size[1]}{windows}, backend {engine.backend}; "
        f"{timings})"
    )


@contextmanager
def _progress_bar(plan) -> Iterator:
    """A progress callback drawing a bar on stderr for tiled decodes (None: untiled, nothing to show)."""
    if plan is None:
        yield None
        return
    from tqdm import tqdm

    with tqdm(desc=f"decoding {plan.count} windows", unit="chunk", leave=False, disable=None) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        yield progress


def _output_path(output: Path, source: Path) -> Path:
    """-o as a file to write: a directory gets <input name>.png; a name must say its format."""
    if output.is_dir() or str(output).endswith(("/", "\\")):
        return output / f"{source.stem}.png"
    if output.suffix.lower() not in OUTPUT_FORMATS:
        raise fail(
            f"-o {output}: name the image format with its extension ({', '.join(OUTPUT_FORMATS)}), "
            "or give a directory"
        )
    return output


def _check_input_name(path: Path) -> None:
    if path.suffix.lower() not in (*IMAGE_SUFFIXES, *LATENT_SUFFIXES):
        raise fail(
            f"{path.name}: give an image ({', '.join(IMAGE_SUFFIXES)}) or a latent file "
            "(.safetensors with tensor 'latent', optional 'sigma'; or .npy)"
        )


def _decode_remote(
    path: Path,
    url: str,
    api_key: str | None,
    output: Path,
    seed: int,
    sigma: float | None,
    steps: int,
    timeout: float | None,
    tile: str | None,
) -> None:
    """`pidserve decode --url`: send the latent (images: encoded here with tiny-ae) to a server."""
    import httpx

    from pidserve.client import Client, ServerError

    # The HTTP wait outlasts the server's deadline a little, so the server's own 504 (which names its
    # limit) arrives rather than a bare client timeout.
    http_timeout = 300.0 if timeout is None else timeout + 10
    with Client(url, api_key=api_key, timeout=http_timeout) as client:
        try:
            served = client.models()["models"][0]
            if path.suffix.lower() in IMAGE_SUFFIXES:
                if not path.is_file():
                    raise fail(f"{path} does not exist")
                if served.get("latent_space") != "tiny-ae":
                    raise fail(
                        f"the server decodes '{served.get('latent_space')}' latents; images can only be sent "
                        "to a tiny-ae model: encode the image with that model's VAE and send the latent file"
                    )
                latent, file_sigma = _encode_image_file(path, "default", load_model("default", None)), None
            else:
                latent, file_sigma = _read_latent(path)
            chosen_sigma = sigma if sigma is not None else file_sigma
            result = client.decode(
                latent,
                sigma=chosen_sigma,
                seed=seed,
                steps=steps,
                format=OUTPUT_FORMATS[output.suffix.lower()],
                timeout=timeout,
                tile=tile,
            )
        except ServerError as exc:
            raise fail(f"the server refused the request: {exc}") from None
        except httpx.TimeoutException:
            raise fail(
                f"{url} did not answer within {http_timeout:g} s; pass a longer --timeout (the server caps "
                "it at its --request-timeout-s), or send a smaller latent"
            ) from None
        except httpx.HTTPError as exc:
            raise fail(f"could not reach {url}: {exc}") from None
    output.parent.mkdir(parents=True, exist_ok=True)
    paths = result.save(output)
    timings = ", ".join(f"{k} {v:.1f} ms" for k, v in result.timings_ms.items())
    typer.echo(f"wrote {', '.join(map(str, paths))} (server {url}, request {result.request_id}; {timings})")


def _encode_image_file(path: Path, checkpoint: str, net: PiDNet) -> torch.Tensor:
    """An image file -> its tiny-ae latent [1, 16, H/8, W/8] (the embedded default's latent space)."""
    import numpy as np
    from PIL import Image

    from pidserve.model import encode_image, load_default_autoencoder

    if not path.is_file():
        raise fail(f"{path} does not exist")
    if net.cfg.latent_space != "tiny-ae":
        raise fail(
            f"images can only be encoded for models of the 'tiny-ae' latent space (--checkpoint default); "
            f"{checkpoint} decodes '{net.cfg.latent_space}' latents: encode the image with that VAE and pass "
            "the latent file"
        )
    try:
        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"))
    except OSError as exc:
        raise fail(f"could not read {path} as an image: {exc}") from None
    height, width = (pixels.shape[0] // 8) * 8, (pixels.shape[1] // 8) * 8
    if height == 0 or width == 0:
        raise fail(f"{path} is {pixels.shape[1]}x{pixels.shape[0]}; images need at least 8x8 pixels")
    if (height, width) != pixels.shape[:2]:
        typer.echo(
            f"cropping {path.name} from {pixels.shape[1]}x{pixels.shape[0]} to {width}x{height} "
            "(tiny-ae needs multiples of 8)"
        )
    return encode_image(load_default_autoencoder(), np.ascontiguousarray(pixels[:height, :width]))


def _read_latent(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A latent file -> (latent [B, C, h, w] float32, sigma [B] or None). Never unpickles."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    if not path.is_file():
        raise fail(f"{path} does not exist")
    if path.suffix == ".safetensors":
        tensors = load_file(str(path))
        if "latent" not in tensors:
            raise fail(f"{path} has no tensor named 'latent' (found: {', '.join(tensors) or 'none'})")
        latent, sigma = tensors["latent"], tensors.get("sigma")
    elif path.suffix == ".npy":
        try:
            latent, sigma = torch.from_numpy(np.load(path, allow_pickle=False)), None
        except ValueError as exc:
            raise fail(f"could not read {path} as a plain .npy array: {exc}") from None
    else:  # _check_input_name let only the two through
        raise AssertionError(path)
    latent = latent.float()
    if latent.ndim == 3:
        latent = latent[None]
    return latent, (None if sigma is None else sigma.float().reshape(-1))
