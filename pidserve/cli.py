"""The `pidserve` command line: one Typer app, one subcommand per job."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="pidserve",
    help="Serve PiD, a pixel diffusion decoder: latents in, high-resolution pixels out.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
log = logging.getLogger("pidserve")


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug details.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


def _parse_size(size: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise _fail(f"--size must look like 2048x2048 (HEIGHTxWIDTH), got {size!r}") from None
    return height, width


@app.command()
def convert(
    checkpoint: Annotated[Path, typer.Argument(help="Official PiD checkpoint (.pth or .safetensors).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write our .safetensors file.")],
    variant: Annotated[
        str | None, typer.Option(help="Released variant, e.g. 2k_flux (see `pidserve info --list`).")
    ] = None,
    dtype: Annotated[
        str, typer.Option(help="Stored dtype: bfloat16 (lossless for official files) or float32.")
    ] = ("bfloat16"),
) -> None:
    """Convert an official checkpoint into pidserve's format (safetensors + config metadata)."""
    import torch

    from pidserve.model import CheckpointError, PiDConfig, load_checkpoint, save_checkpoint
    from pidserve.model.checkpoints import read_checkpoint
    from pidserve.model.config import PRESETS
    from pidserve.model.info import matching_variants

    dtypes = {"bfloat16": torch.bfloat16, "float32": torch.float32}
    if dtype not in dtypes:
        raise _fail(f"--dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    try:
        if variant is None:
            raw = read_checkpoint(checkpoint)
            candidates = matching_variants({k: tuple(v.shape) for k, v in raw.tensors.items()})
            if len(candidates) != 1:
                found = ", ".join(candidates) or "none"
                raise _fail(f"pass --variant: the file's architecture fits these presets: {found}")
            variant = candidates[0]
        if variant not in PRESETS:
            raise _fail(f"unknown variant {variant!r}; known: {', '.join(sorted(PRESETS))}")
        typer.echo(f"loading {checkpoint} as {variant} ...", err=True)
        net = load_checkpoint(checkpoint, PiDConfig.preset(variant))
    except CheckpointError as exc:
        raise _fail(str(exc)) from None
    save_checkpoint(net, output, dtype=dtypes[dtype], extra_metadata={"variant": variant})
    typer.echo(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB, {dtype}, variant {variant})")


@app.command()
def info(
    checkpoint: Annotated[Path | None, typer.Argument(help="A checkpoint (official or ours).")] = None,
    preset: Annotated[str | None, typer.Option(help="Describe a preset instead of a file.")] = None,
    variant: Annotated[str | None, typer.Option(help="Variant of an official file (else detected).")] = None,
    size: Annotated[str, typer.Option(help="Output size HEIGHTxWIDTH for the FLOP count.")] = "2048x2048",
    steps: Annotated[int, typer.Option(help="Sampler steps for the FLOP count.")] = 4,
    text_tokens: Annotated[int | None, typer.Option(help="Text tokens (default: the net's maximum).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    list_presets: Annotated[bool, typer.Option("--list", help="List the presets and exit.")] = False,
) -> None:
    """Describe a checkpoint or preset: variant, parameters by part, dtype, FLOPs of one decode."""
    import torch

    from pidserve.model import CheckpointError, PiDConfig, PiDNet
    from pidserve.model.checkpoints import read_checkpoint
    from pidserve.model.config import PRESETS, RELEASED_CHECKPOINTS
    from pidserve.model.flops import decode_flops
    from pidserve.model.info import describe_config, matching_variants, parameter_counts

    if list_presets:
        for name in PRESETS:
            tag = f"released: {RELEASED_CHECKPOINTS[name]}" if name in RELEASED_CHECKPOINTS else "test model"
            typer.echo(f"{name:26s} {tag}")
        return
    if (checkpoint is None) == (preset is None):
        raise _fail("give either a CHECKPOINT or --preset NAME")
    height, width = _parse_size(size)
    report: dict[str, object] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise _fail(f"unknown preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
        cfg = PiDConfig.preset(preset)
        report["preset"] = preset
    else:
        try:
            raw = read_checkpoint(checkpoint)
        except CheckpointError as exc:
            raise _fail(str(exc)) from None
        shapes = {k: tuple(v.shape) for k, v in raw.tensors.items()}
        report["file"] = str(checkpoint)
        report["format"] = "official" if raw.official else "pidserve"
        report["stored_dtypes"] = dict(
            Counter(str(v.dtype).removeprefix("torch.") for v in raw.tensors.values())
        )
        if raw.config is not None:
            cfg = raw.config
        else:
            candidates = [variant] if variant else matching_variants(shapes)
            report["variants"] = candidates
            if not candidates:
                raise _fail(
                    f"{checkpoint} fits no preset (see `pidserve info --list`): "
                    "its tensors differ from every known architecture"
                )
            cfg = PiDConfig.preset(candidates[0])
    report["config"] = describe_config(cfg)
    with torch.device("meta"):
        report["parameters"] = parameter_counts(PiDNet(cfg))
    if height % cfg.patch_size or width % cfg.patch_size:
        raise _fail(f"--size must be a multiple of the patch size {cfg.patch_size}")
    flops = decode_flops(cfg, height, width, steps=steps, text_len=text_tokens)
    report["decode"] = {"size": f"{height}x{width}", "steps": steps, "flops": flops.as_dict()}

    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    _print_report(report)


def _load_model(checkpoint: str, variant: str | None):
    """A PiDNet from our checkpoint (config inside) or an official one (--variant needed)."""
    from pidserve.model import CheckpointError, PiDConfig, load_checkpoint

    if checkpoint == "default":
        from pidserve.model.default import load_default_decoder

        try:
            return load_default_decoder()
        except FileNotFoundError as exc:
            raise _fail(str(exc)) from None
    try:
        return load_checkpoint(checkpoint, PiDConfig.preset(variant) if variant else None)
    except (CheckpointError, KeyError) as exc:
        raise _fail(str(exc).strip('"')) from None


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _encode_image_file(path: Path, checkpoint: str, net):
    """An image file -> its tiny-ae latent [1, 16, H/8, W/8] (the embedded default's latent space)."""
    import numpy as np
    from PIL import Image

    from pidserve.model.default import encode_image, load_default_autoencoder

    if net.cfg.latent_space != "tiny-ae":
        raise _fail(
            f"images can only be encoded for models of the 'tiny-ae' latent space (--checkpoint default); "
            f"{checkpoint} decodes '{net.cfg.latent_space}' latents: encode the image with that VAE and pass "
            "the latent file"
        )
    try:
        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"))
    except OSError as exc:
        raise _fail(f"could not read {path} as an image: {exc}") from None
    height, width = (pixels.shape[0] // 8) * 8, (pixels.shape[1] // 8) * 8
    if height == 0 or width == 0:
        raise _fail(f"{path} is {pixels.shape[1]}x{pixels.shape[0]}; images need at least 8x8 pixels")
    if (height, width) != pixels.shape[:2]:
        typer.echo(
            f"cropping {path.name} from {pixels.shape[1]}x{pixels.shape[0]} to {width}x{height} "
            "(tiny-ae needs multiples of 8)"
        )
    return encode_image(load_default_autoencoder(), np.ascontiguousarray(pixels[:height, :width]))


def _read_latent(path: Path):
    """A latent file -> (latent [B, C, h, w] float32, sigma [B] or None). Never unpickles."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    if not path.is_file():
        raise _fail(f"{path} does not exist")
    if path.suffix == ".safetensors":
        tensors = load_file(str(path))
        if "latent" not in tensors:
            raise _fail(f"{path} has no tensor named 'latent' (found: {', '.join(tensors) or 'none'})")
        latent, sigma = tensors["latent"], tensors.get("sigma")
    elif path.suffix == ".npy":
        try:
            latent, sigma = torch.from_numpy(np.load(path, allow_pickle=False)), None
        except ValueError as exc:
            raise _fail(f"could not read {path} as a plain .npy array: {exc}") from None
    else:
        raise _fail(
            f"latent files are .safetensors (tensor 'latent', optional 'sigma') or .npy, got {path.name}"
        )
    latent = latent.float()
    if latent.ndim == 3:
        latent = latent[None]
    return latent, (None if sigma is None else sigma.float().reshape(-1))


@app.command()
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
        Path, typer.Option("--output", "-o", help="PNG path (a batch adds _0, _1, ...).")
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
) -> None:
    """Decode a latent file (or an image, via tiny-ae) to PNG; same backend and --seed, same pixels."""
    if url is not None:
        _decode_remote(latent_file, url, api_key, output, seed, sigma, steps)
        return
    import torch
    from PIL import Image

    from pidserve.engines import DecodeBatch, EngineConfigError, EngineInputError, ShapeProfile, open_engine
    from pidserve.model import LatentError, get_latent_space
    from pidserve.model.latents import validate_sigma

    net = _load_model(checkpoint, variant)
    if latent_file.suffix.lower() in IMAGE_SUFFIXES:
        if not latent_file.is_file():
            raise _fail(f"{latent_file} does not exist")
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
        raise _fail(str(exc)) from None
    size = net.cfg.output_size(latent.shape[-2], latent.shape[-1])
    try:
        engine = open_engine(
            backend,
            net=net,
            device=device,
            precision=precision,
            max_batch=batch_size,
            engine_dir=engine_dir,
            profile=ShapeProfile(size, (batch_size,)),
            attention_backend=attention_backend,
        )
        seeds = torch.arange(batch_size, dtype=torch.int64) + seed
        result = engine.decode(DecodeBatch(latent, sigmas, seeds, None, steps))
    except (EngineConfigError, EngineInputError) as exc:
        raise _fail(str(exc)) from None
    paths = (
        [output]
        if batch_size == 1
        else [output.with_name(f"{output.stem}_{i}{output.suffix}") for i in range(batch_size)]
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    for image, path in zip(result.images, paths, strict=True):
        Image.fromarray(image.numpy()).save(path)
    timings = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in result.timings.items())
    typer.echo(
        f"wrote {', '.join(map(str, paths))} ({size[0]}x{size[1]}, backend {engine.backend}; {timings})"
    )


def _decode_remote(
    path: Path, url: str, api_key: str | None, output: Path, seed: int, sigma: float | None, steps: int
) -> None:
    """`pidserve decode --url`: send the latent (images: encoded here with tiny-ae) to a server."""
    import httpx

    from pidserve.client import Client, ServerError

    with Client(url, api_key=api_key) as client:
        try:
            served = client.models()["models"][0]
            if path.suffix.lower() in IMAGE_SUFFIXES:
                if not path.is_file():
                    raise _fail(f"{path} does not exist")
                if served.get("latent_space") != "tiny-ae":
                    raise _fail(
                        f"the server decodes '{served.get('latent_space')}' latents; images can only be sent "
                        "to a tiny-ae model: encode the image with that model's VAE and send the latent file"
                    )
                from pidserve.model.default import load_default_decoder

                latent, file_sigma = _encode_image_file(path, "default", load_default_decoder()), None
            else:
                latent, file_sigma = _read_latent(path)
            chosen_sigma = sigma if sigma is not None else file_sigma
            result = client.decode(latent, sigma=chosen_sigma, seed=seed, steps=steps)
        except ServerError as exc:
            raise _fail(f"the server refused the request: {exc}") from None
        except httpx.HTTPError as exc:
            raise _fail(f"could not reach {url}: {exc}") from None
    output.parent.mkdir(parents=True, exist_ok=True)
    paths = result.save(output)
    timings = ", ".join(f"{k} {v:.1f} ms" for k, v in result.timings_ms.items())
    typer.echo(f"wrote {', '.join(map(str, paths))} (server {url}, request {result.request_id}; {timings})")


@app.command()
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
    text_encoder: Annotated[str | None, typer.Option(help="Gemma-2 text encoder for prompts.")] = None,
    max_queue_delay_ms: Annotated[float | None, typer.Option(help="Batching delay.")] = None,
    max_queue_size: Annotated[int | None, typer.Option(help="Queued latents before 429.")] = None,
    request_timeout_s: Annotated[float | None, typer.Option(help="Default and largest deadline.")] = None,
    encode_workers: Annotated[int | None, typer.Option(help="Encoder pool size (default: cores).")] = None,
    png_encoder: Annotated[str | None, typer.Option(help="fpng | pillow")] = None,
    api_key_file: Annotated[Path | None, typer.Option(help="File holding the API key.")] = None,
    host: Annotated[str | None, typer.Option(help="Interface to listen on (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000).")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Also serve /metrics on this port.")] = None,
) -> None:
    """Start the decode service (flags override PIDSERVE_* variables; see docs/serving.md)."""
    from pydantic import ValidationError

    from pidserve.server import ServerSettings, run

    flags = {
        "checkpoint": checkpoint, "variant": variant, "model_name": model_name, "backend": backend,
        "device": device, "precision": precision, "engine_dir": engine_dir,
        "attention_backend": attention_backend, "max_batch": max_batch,
        "batch_sizes": batch_size or None, "image_sizes": image_size or None, "text_encoder": text_encoder,
        "max_queue_delay_ms": max_queue_delay_ms, "max_queue_size": max_queue_size,
        "request_timeout_s": request_timeout_s, "encode_workers": encode_workers, "png_encoder": png_encoder,
        "api_key_file": api_key_file, "host": host, "port": port, "metrics_port": metrics_port,
    }  # fmt: skip
    try:
        settings = ServerSettings(**{k: v for k, v in flags.items() if v is not None})
        settings.parsed_image_sizes()
        settings.resolved_api_key()
    except (ValidationError, ValueError) as exc:
        raise _fail(f"invalid server settings: {exc}") from None
    run(settings)


@app.command()
def export(
    checkpoint: Annotated[str, typer.Option(help="Model checkpoint (ours, or official with --variant).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Export directory.")],
    variant: Annotated[str | None, typer.Option(help="Preset of an official checkpoint.")] = None,
    size: Annotated[str, typer.Option(help="Output size HEIGHTxWIDTH.")] = "2048x2048",
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes, e.g. 1,2,4.")] = "1",
    text_tokens: Annotated[int, typer.Option(help="Text tokens of the served requests (0: none).")] = 0,
    verify: Annotated[bool, typer.Option(help="Check the graphs against PyTorch with onnxruntime.")] = True,
) -> None:
    """Export the network as ONNX (condition.onnx + step.onnx) for one output size."""
    from pidserve.engines import ShapeProfile
    from pidserve.engines.export import export_onnx, verify_export

    net = _load_model(checkpoint, variant)
    try:
        sizes = tuple(sorted({int(b) for b in batch_sizes.split(",")}))
    except ValueError:
        raise _fail(f"--batch-sizes must be comma-separated integers, got {batch_sizes!r}") from None
    profile = ShapeProfile(_parse_size(size), sizes, text_tokens)
    graphs = export_onnx(net, output, profile)
    typer.echo(f"wrote {graphs.condition} and {graphs.step}")
    if verify:
        error = verify_export(net, graphs)
        typer.echo(f"onnxruntime vs PyTorch: max |velocity difference| = {error:.2e}")


@app.command()
def build(
    checkpoint: Annotated[Path, typer.Option(help="Model checkpoint (ours, or official with --variant).")],
    gpu_class: Annotated[str, typer.Option(help="rtx5090 | gb200 | h100: the GPU this runs on.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Engine directory to write.")],
    precision: Annotated[str, typer.Option(help="bf16 or fp8 (compute capability >= 8.9).")] = "bf16",
    size: Annotated[str, typer.Option(help="Output size HEIGHTxWIDTH.")] = "2048x2048",
    max_batch: Annotated[int | None, typer.Option(help="Largest batch (default: the class's).")] = None,
    text_tokens: Annotated[int, typer.Option(help="Text tokens of the served requests (0: none).")] = 0,
    variant: Annotated[str | None, typer.Option(help="Preset of an official checkpoint.")] = None,
    calibration_latents: Annotated[
        Path | None, typer.Option(help="fp8: safetensors of calibration latents (see docs/engines.md).")
    ] = None,
    random_calibration: Annotated[
        bool, typer.Option(help="fp8: calibrate on random latents (worse quality; explicit opt-in).")
    ] = False,
    timing_cache: Annotated[Path | None, typer.Option(help="TensorRT timing cache file.")] = None,
    if_stale: Annotated[
        bool, typer.Option(help="Skip the build when OUTPUT's manifest matches (init containers).")
    ] = False,
) -> None:
    """Build TensorRT engines (condition.plan, step.plan, manifest.json) for one GPU class.

    Runs on the target GPU with TensorRT installed; checks both before exporting anything.
    """
    from pidserve.engines import EngineConfigError, ShapeProfile
    from pidserve.engines.export import export_onnx
    from pidserve.engines.gpu_classes import batch_ladder, check_precision, get_gpu_class
    from pidserve.engines.tensorrt_build import build_engines, require_tensorrt

    try:
        target = get_gpu_class(gpu_class)
        check_precision(precision, target.compute_capability, f"the {target.name} class")
        trt_version = require_tensorrt()  # fail before a long export, not after
    except EngineConfigError as exc:
        raise _fail(str(exc)) from None
    profile = ShapeProfile(
        _parse_size(size), batch_ladder(max_batch or target.default_max_batch), text_tokens
    )
    if if_stale:
        import torch

        from pidserve.engines.manifest import sha256_file, stale_reasons

        if not checkpoint.is_file():
            raise _fail(f"{checkpoint} does not exist")
        reasons = stale_reasons(
            output,
            model_sha256=sha256_file(checkpoint),
            precision=precision,
            gpu_class=target.name,
            profile=profile,
            gpu_name=torch.cuda.get_device_name(),
            compute_capability=torch.cuda.get_device_capability(),
            trt_version=trt_version,
        )
        if not reasons:
            typer.echo(f"{output} is current ({precision}, {profile.tag}); nothing to build")
            return
        typer.echo(f"building {output}: " + "; ".join(reasons))
    net = _load_model(str(checkpoint), variant)
    onnx_dir = output / "onnx"
    try:
        if precision == "fp8":
            from pidserve.engines.quantize import quantize_fp8_and_export

            graphs = quantize_fp8_and_export(
                net, profile, onnx_dir, calibration=calibration_latents, random_calibration=random_calibration
            )
        else:
            graphs = export_onnx(net.to("cuda"), onnx_dir, profile)
        manifest = build_engines(
            graphs,
            output,
            target,
            precision,
            checkpoint=checkpoint,
            variant=variant,
            timing_cache=timing_cache,
        )
    except EngineConfigError as exc:
        raise _fail(str(exc)) from None
    typer.echo(
        f"wrote {output} ({manifest.precision}, {profile.tag}, batch sizes {list(profile.batch_sizes)})"
    )


bench_app = typer.Typer(help="Benchmarks: ms per image, side by side in one run.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


_OutOpt = Annotated[
    Path | None, typer.Option("--out", "-o", help="Report folder (default bench/out/<command>).")
]
_PlotsOpt = Annotated[bool, typer.Option("--plots/--no-plots", help="Write PNG plots (needs matplotlib).")]


def _int_list(option: str, value: str) -> list[int]:
    try:
        items = [int(v) for v in value.split(",")]
    except ValueError:
        raise _fail(f"{option} must be comma-separated integers, got {value!r}") from None
    if any(v < 1 for v in items):
        raise _fail(f"{option} must be >= 1, got {value!r}")
    return items


def _float_list(option: str, value: str) -> list[float]:
    try:
        return [float(v) for v in value.split(",")]
    except ValueError:
        raise _fail(f"{option} must be comma-separated numbers, got {value!r}") from None


def _bench_model(checkpoint: str | None, preset: str | None, variant: str | None):
    """The model a benchmark times: a checkpoint, or a preset with random weights (seed 0)."""
    import torch

    from pidserve.model import PiDConfig, PiDNet

    if (checkpoint is None) == (preset is None):
        raise _fail("give either --checkpoint or --preset")
    if checkpoint is not None:
        return _load_model(checkpoint, variant)
    if preset not in PRESETS_NAMES():
        raise _fail(f"unknown preset {preset!r}; see `pidserve info --list`")
    torch.manual_seed(0)
    return PiDNet(PiDConfig.preset(preset)).eval()


def _write_bench_report(write, *args, **kwargs) -> list[Path]:
    """Call a bench/ report writer; a missing matplotlib becomes a clear CLI error. Says what it wrote."""
    from pidserve.bench.plots import PlotsUnavailable

    try:
        paths = write(*args, **kwargs)
    except PlotsUnavailable as exc:
        raise _fail(str(exc)) from None
    typer.echo("wrote " + ", ".join(str(p) for p in paths), err=True)
    return paths


@bench_app.command("engine")
def bench_engine(
    ctx: typer.Context,
    checkpoint: Annotated[
        str | None, typer.Option(help="Model checkpoint ('default': the embedded pid-tiny), else --preset.")
    ] = None,
    preset: Annotated[str | None, typer.Option(help="Preset with random weights, e.g. 2k_flux.")] = None,
    variant: Annotated[str | None, typer.Option(help="Preset of an official checkpoint.")] = None,
    backends: Annotated[str, typer.Option(help="Comma-separated backends.")] = "torch,onnxruntime",
    size: Annotated[str, typer.Option(help="Output size HEIGHTxWIDTH.")] = "256x256",
    batches: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1",
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    precision: Annotated[str, typer.Option(help="fp32, bf16 or fp8 (torch backends).")] = "fp32",
    compile_mode: Annotated[
        str | None,
        typer.Option(help="torch-compile's torch.compile mode: default or max-autotune-no-cudagraphs."),
    ] = None,
    attention_backends: Annotated[
        str,
        typer.Option(
            help="Comma-separated attention kernels to compare: auto, flash, cudnn, efficient, math."
        ),
    ] = "auto",
    steps: Annotated[int, typer.Option(help="Sampler steps.")] = 4,
    warmup: Annotated[int, typer.Option(help="Untimed decodes first.")] = 2,
    repeat: Annotated[int, typer.Option(help="Timed decodes.")] = 10,
    out: _OutOpt = None,
    plots: _PlotsOpt = True,
) -> None:
    """Time backends on one model, side by side: ms/image, stages, TFLOP/s, peak memory."""
    from pidserve.bench import report
    from pidserve.bench.engine import bench_engines, markdown_table, write_engine_report
    from pidserve.engines import EngineConfigError, EngineInputError

    net = _bench_model(checkpoint, preset, variant)
    try:
        rows = bench_engines(
            net,
            backends.split(","),
            _int_list("--batches", batches),
            _parse_size(size),
            device=device,
            precision=precision,
            steps=steps,
            warmup=warmup,
            repeat=repeat,
            compile_mode=compile_mode,
            attention_backends=[name.strip() for name in attention_backends.split(",")],
        )
    except (EngineConfigError, EngineInputError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(markdown_table(rows))
    _write_bench_report(
        write_engine_report,
        out or Path("bench/out/engine"),
        rows,
        with_plots=plots,
        command=report.command_line(ctx),
    )


@bench_app.command("http")
def bench_http(
    ctx: typer.Context,
    url: Annotated[
        str | None, typer.Option(help="A running server on loopback; default: start one (the flags below).")
    ] = None,
    checkpoint: Annotated[
        str, typer.Option(help="Started server: checkpoint ('default': pid-tiny).")
    ] = "default",
    variant: Annotated[
        str | None, typer.Option(help="Started server: preset of an official checkpoint.")
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            help="Started server: a preset with random weights (e.g. 2k_flux) instead of --checkpoint."
        ),
    ] = None,
    backend: Annotated[
        str, typer.Option(help="Started server: torch, torch-compile, onnxruntime.")
    ] = "torch",
    device: Annotated[str, typer.Option(help="Started server: cpu or cuda.")] = "cpu",
    precision: Annotated[str, typer.Option(help="Started server: fp32, bf16 or fp8.")] = "fp32",
    max_batch: Annotated[int, typer.Option(help="Started server: largest engine batch.")] = 8,
    max_queue_delay_ms: Annotated[
        float | None, typer.Option(help="Started server: batching delay (default: the server's).")
    ] = None,
    size: Annotated[str, typer.Option(help="Output size HEIGHTxWIDTH of every request.")] = "256x256",
    formats: Annotated[str, typer.Option(help="Comma-separated output formats.")] = "raw,png",
    concurrency: Annotated[
        str, typer.Option(help="Comma-separated concurrency levels (closed loop).")
    ] = "1,2,4,8",
    rate: Annotated[
        str | None, typer.Option(help="Comma-separated request rates per second (open loop) instead.")
    ] = None,
    requests: Annotated[int, typer.Option(help="Requests per level (upper bound).")] = 32,
    max_seconds: Annotated[float, typer.Option(help="Seconds per level (upper bound).")] = 60.0,
    warmup: Annotated[int, typer.Option(help="Unrecorded requests before each level.")] = 2,
    engine_baseline: Annotated[
        bool,
        typer.Option(help="Started server: also time the engine alone in this process, before and after."),
    ] = True,
    api_key_file: Annotated[Path | None, typer.Option(help="File holding the server's API key.")] = None,
    out: _OutOpt = None,
    plots: _PlotsOpt = True,
) -> None:
    """Load a decode server over HTTP: latency percentiles, images/s, batching, server-side breakdown."""
    import asyncio
    from contextlib import nullcontext

    from pidserve.bench import report
    from pidserve.bench.engine import bench_engines
    from pidserve.bench.http_load import (
        HttpPlan,
        NotLoopback,
        local_server,
        random_weights_checkpoint,
        run_sweep,
        write_http_report,
    )
    from pidserve.engines import EngineConfigError

    out = out or Path("bench/out/http")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request would bury the table
    image_size = _parse_size(size)
    plan = HttpPlan(
        formats=formats.split(","),
        mode="rate" if rate else "concurrency",
        loads=_float_list("--rate", rate)
        if rate
        else [float(c) for c in _int_list("--concurrency", concurrency)],
        requests=requests,
        max_seconds=max_seconds,
        warmup=warmup,
        image_size=image_size,
    )
    try:
        plan.validate()
    except ValueError as exc:
        raise _fail(str(exc)) from None
    api_key = api_key_file.read_text().strip() if api_key_file else None
    baselines_ms: list[float] = []

    def sweep(target: str):
        try:
            return asyncio.run(run_sweep(target, plan, api_key))
        except (NotLoopback, ValueError, RuntimeError) as exc:
            raise _fail(str(exc)) from None

    def time_engine_alone() -> None:
        """Batch 1, this process; loaded afresh and released so the server has the device to itself."""
        import gc

        import torch

        net = _load_model(checkpoint, variant)
        try:
            timing = bench_engines(net, [backend], [1], image_size, device=device, precision=precision)[0]
        except EngineConfigError as exc:
            raise _fail(str(exc)) from None
        baselines_ms.append(timing.ms_per_image_median)
        del net
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    if preset is not None:
        if url is not None or checkpoint != "default" or variant is not None:
            raise _fail(
                "--preset starts a server on random weights: leave out --url, --checkpoint and --variant"
            )
        if preset not in PRESETS_NAMES():
            raise _fail(f"unknown preset {preset!r}; see `pidserve info --list`")
    random_weights = random_weights_checkpoint(preset, out, precision) if preset else nullcontext(None)
    if url is not None:
        model, levels = sweep(url)
    else:
        with random_weights as random_checkpoint:  # a started server on random weights: its checkpoint
            if random_checkpoint is not None:
                checkpoint = str(random_checkpoint)
            if engine_baseline:
                time_engine_alone()  # before the server starts ...
            serve_args = ["--checkpoint", checkpoint, "--backend", backend, "--device", device]
            serve_args += ["--precision", precision, "--max-batch", str(max_batch), "--image-size", size]
            if variant:
                serve_args += ["--variant", variant]
            if max_queue_delay_ms is not None:
                serve_args += ["--max-queue-delay-ms", str(max_queue_delay_ms)]
            if api_key_file:
                serve_args += ["--api-key-file", str(api_key_file)]
            try:
                with local_server(serve_args, out / "server.log") as started:
                    model, levels = sweep(started)
            except (RuntimeError, TimeoutError) as exc:
                raise _fail(str(exc)) from None
            if engine_baseline:
                time_engine_alone()  # ... and after it stopped: the two bracket the machine's drift
        if preset is not None:
            model = {**model, "weights": f"random ({preset})"}
    paths = _write_bench_report(
        write_http_report,
        out,
        model,
        plan,
        levels,
        baselines_ms,
        with_plots=plots,
        command=report.command_line(ctx),
    )
    typer.echo(paths[1].read_text())


@bench_app.command("cascade")
def bench_cascade_cmd(
    ctx: typer.Context,
    checkpoint: Annotated[
        str | None, typer.Option(help="Model checkpoint ('default': the embedded pid-tiny), else --preset.")
    ] = None,
    preset: Annotated[str | None, typer.Option(help="Preset with random weights (a tiny-ae one).")] = None,
    size: Annotated[str, typer.Option(help="Output size HEIGHTxWIDTH.")] = "256x256",
    batch: Annotated[int, typer.Option(help="Images per call.")] = 1,
    sr_steps: Annotated[
        str, typer.Option(help="Comma-separated step counts of the SR diffusion model.")
    ] = "50",
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    precision: Annotated[str, typer.Option(help="fp32 or bf16.")] = "fp32",
    warmup: Annotated[int, typer.Option(help="Untimed calls per pipeline.")] = 1,
    repeat: Annotated[int, typer.Option(help="Timed calls per pipeline.")] = 5,
    photos: Annotated[
        Path | None, typer.Option(help="Held-out photos: add quality figures (PiD and decode+bicubic).")
    ] = None,
    vae: Annotated[
        Path | None,
        typer.Option(
            help="flux1/sd3/sdxl models: VAE weights (.safetensors) for the decoder (default: random)."
        ),
    ] = None,
    out: _OutOpt = None,
    plots: _PlotsOpt = True,
) -> None:
    """PiD against decode+bicubic and decode+diffusion-SR: same device, same size, one run."""
    from pidserve.bench import report
    from pidserve.bench.cascade import (
        CascadeSetup,
        add_quality,
        bench_cascade,
        markdown_table,
        write_cascade_report,
    )
    from pidserve.engines import EngineConfigError

    if checkpoint is None and preset is None:
        checkpoint = "default"
    net = _bench_model(checkpoint, preset, None)
    if precision not in ("fp32", "bf16"):
        raise _fail(f"--precision must be fp32 or bf16, got {precision!r}")
    setup = CascadeSetup(
        image_size=_parse_size(size),
        batch=batch,
        sr_steps=_int_list("--sr-steps", sr_steps),
        device=device,
        precision=precision,
        warmup=warmup,
        repeat=repeat,
        vae=vae,
    )
    try:
        rows = bench_cascade(net, setup)
        if photos is not None:
            add_quality(rows, net, photos)
    except (ValueError, FileNotFoundError, EngineConfigError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(markdown_table(rows))
    _write_bench_report(
        write_cascade_report,
        out or Path("bench/out/cascade"),
        rows,
        with_plots=plots,
        command=report.command_line(ctx),
    )


@bench_app.command("kernels")
def bench_kernels_cmd(
    ctx: typer.Context,
    preset: Annotated[
        str, typer.Option(help="Model whose shapes to use (weights play no part).")
    ] = "pid-tiny",
    size: Annotated[str, typer.Option(help="Output size HEIGHTxWIDTH.")] = "256x256",
    batch: Annotated[int, typer.Option(help="Images per call.")] = 1,
    operations: Annotated[
        str,
        typer.Option(
            help="Comma-separated: postprocess, pixel-modulation, copy, patch-attention, pixel-attention."
        ),
    ] = "postprocess,pixel-modulation,copy",
    impls: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated torch, torch-compile, triton, flash, cudnn, efficient, math "
            "(default: all that run)."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    precision: Annotated[str, typer.Option(help="fp32 or bf16.")] = "bf16",
    warmup: Annotated[int, typer.Option(help="Untimed calls first.")] = 3,
    repeat: Annotated[int, typer.Option(help="Timed calls.")] = 20,
    out: _OutOpt = None,
) -> None:
    """Hot spots: each implementation's time, GB/s against the bytes it must move, TFLOP/s for attention."""
    import torch

    from pidserve.bench import report
    from pidserve.bench.kernels import KernelSetup, bench_kernels, markdown_table, write_kernels_report
    from pidserve.model import PiDConfig

    if preset not in PRESETS_NAMES():
        raise _fail(f"unknown preset {preset!r}; see `pidserve info --list`")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if precision not in dtypes:
        raise _fail(f"--precision must be fp32 or bf16, got {precision!r}")
    setup = KernelSetup(
        PiDConfig.preset(preset), _parse_size(size), batch, device, dtypes[precision], warmup, repeat
    )
    chosen = None if impls is None else tuple(impls.split(","))
    try:
        rows = bench_kernels(setup, tuple(operations.split(",")), chosen)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    typer.echo(markdown_table(rows))
    _write_bench_report(
        write_kernels_report, out or Path("bench/out/kernels"), rows, command=report.command_line(ctx)
    )


@bench_app.command("codecs")
def bench_codecs(
    ctx: typer.Context,
    image: Annotated[
        Path, typer.Option(help="A photograph (default: a held-out photo from `pidserve data photos`).")
    ] = Path("data/photos/holdout/mate-LadyBird.jpg"),
    sizes: Annotated[str, typer.Option(help="Comma-separated square sizes.")] = "2048,4096",
    repeat: Annotated[int, typer.Option(help="Timed encodes per codec and size.")] = 5,
    workers: Annotated[int, typer.Option(help="Encoder processes for the server-path row.")] = 2,
    out: _OutOpt = None,
) -> None:
    """Time PNG/JPEG/WebP encoders at serving sizes, and whether they hold the GIL; Markdown table."""
    from pidserve.bench import report
    from pidserve.bench.codecs import as_dicts, markdown_table, time_codecs, time_server_pool

    if not image.is_file():
        raise _fail(f"{image} does not exist: run `pidserve data photos` or pass --image PATH")
    side = _int_list("--sizes", sizes)
    rows = time_codecs(image, side, repeat)
    pool = time_server_pool(image, side, repeat, workers)
    lines = [markdown_table(rows), ""]
    for row in pool:
        lines.append(f"{row['path']} at {row['size']}²: {row['ms_median']:.1f} ms per image (round trip)")
    table = "\n".join(lines)
    typer.echo(table)
    results = {"codecs": as_dicts(rows), "server_pool": pool}
    written = report.write_report(
        out or Path("bench/out/codecs"), "codecs", results, table, command=report.command_line(ctx)
    )
    typer.echo(f"wrote {written}, {written.with_suffix('.md')}", err=True)


@bench_app.command("quality")
def bench_quality(
    photos: Annotated[Path, typer.Option(help="Held-out photo folder.")] = Path("data/photos/holdout"),
    student: Annotated[
        str, typer.Option(help="Student checkpoint ('default': the embedded pid-tiny).")
    ] = "default",
    teacher: Annotated[Path | None, typer.Option(help="Teacher checkpoint (many-step Euler).")] = None,
    autoencoder: Annotated[
        Path | None, typer.Option(help="tiny-ae file whose latents the decoders read (default: embedded).")
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for metrics.json, table.md, grid.png.")
    ] = Path("bench/out/quality"),
    crop: Annotated[int, typer.Option(help="Output (ground-truth crop) side in pixels.")] = 256,
    crops_per_photo: Annotated[int, typer.Option(help="Crops per held-out photo.")] = 6,
    short_side: Annotated[int, typer.Option(help="Photos are reduced to this short side first.")] = 640,
    upscale: Annotated[
        bool, typer.Option(help="Also enlarge photos smaller than --short-side (v1's protocol).")
    ] = False,
    teacher_steps: Annotated[int, typer.Option(help="Euler steps of the teacher.")] = 32,
) -> None:
    """PSNR, SSIM, colour, detail, block grid: student vs teacher vs cascade (tiny-ae) vs bicubic."""
    from pidserve.bench.decoder_quality import QualitySetup, evaluate_decoders, markdown_table, write_report
    from pidserve.model import load_checkpoint

    net = _load_model(student, None)
    if net.cfg.latent_space != "tiny-ae":
        raise _fail(
            f"bench quality needs a model of the 'tiny-ae' latent space; {student} decodes "
            f"'{net.cfg.latent_space}'"
        )
    teacher_net = load_checkpoint(teacher) if teacher else None
    setup = QualitySetup(
        photos,
        crop=crop,
        crops_per_photo=crops_per_photo,
        short_side=short_side,
        upscale=upscale,
        teacher_steps=teacher_steps,
    )
    try:
        ae, space = _load_autoencoder(autoencoder)
        result = evaluate_decoders(setup, net, teacher_net, ae, space=space)
    except (FileNotFoundError, ValueError) as exc:
        raise _fail(str(exc)) from None
    grid = write_report(result, out)
    typer.echo(markdown_table(result["metrics"]))
    typer.echo(f"ground-truth blockiness {result['ground_truth_blockiness']:.3f}")
    typer.echo(f"{result['crops']} crops; wrote {out / 'metrics.json'}, {out / 'table.md'}, {grid}")


@bench_app.command("x0-error")
def bench_x0_error(
    checkpoints: Annotated[list[Path], typer.Argument(help="Teacher / regression checkpoints to compare.")],
    photos: Annotated[Path, typer.Option(help="Held-out photo folder.")] = Path("data/photos/holdout"),
    autoencoder: Annotated[
        Path | None, typer.Option(help="tiny-ae file whose latents the networks read (default: embedded).")
    ] = None,
    crop: Annotated[int, typer.Option(help="Output (ground-truth crop) side in pixels.")] = 256,
    crops_per_photo: Annotated[int, typer.Option(help="Crops per held-out photo.")] = 6,
    short_side: Annotated[int, typer.Option(help="Photos are reduced to this short side first.")] = 640,
    times: Annotated[
        str, typer.Option(help="Comma-separated diffusion times.")
    ] = "0.999,0.866,0.634,0.342,0.1",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write x0_error.json here.")] = None,
) -> None:
    """Held-out x0 error by diffusion time (teacher-forced): is a teacher worth distilling?"""
    from pidserve.bench.decoder_quality import QualitySetup, x0_error_by_t, x0_table
    from pidserve.model import load_checkpoint

    try:
        parsed_times = tuple(float(t) for t in times.split(","))
    except ValueError:
        raise _fail(f"--times must be comma-separated numbers in (0, 1], got {times!r}") from None
    if not all(0 < t <= 1 for t in parsed_times):
        raise _fail(f"--times must lie in (0, 1], got {times!r}")
    for path in checkpoints:
        if not path.is_file():
            raise _fail(f"{path} does not exist")
    nets = {path.name: load_checkpoint(path).eval() for path in checkpoints}
    setup = QualitySetup(
        photos, crop=crop, crops_per_photo=crops_per_photo, short_side=short_side, upscale=False
    )
    try:
        ae, space = _load_autoencoder(autoencoder)
        errors = x0_error_by_t(setup, nets, ae, parsed_times, space=space)
    except (FileNotFoundError, ValueError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(x0_table(errors))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "x0_error.json").write_text(json.dumps(errors, indent=2) + "\n")
        typer.echo(f"wrote {out / 'x0_error.json'}")


def _load_autoencoder(path: Path | None):
    """(tiny-ae in eval mode, its latent space): the embedded one when `path` is None, else the
    file's, normalised with its own recorded statistics."""
    from pidserve.model.autoencoder import latent_space_of, load_autoencoder
    from pidserve.model.default import load_default_autoencoder
    from pidserve.model.latents import get_latent_space

    if path is None:
        return load_default_autoencoder(), get_latent_space("tiny-ae")
    if not path.is_file():
        raise _fail(f"{path} does not exist; pass a tiny-ae .safetensors (from `pidserve train autoencoder`)")
    try:
        ae, info = load_autoencoder(path)
        return ae, latent_space_of(info)
    except ValueError as exc:
        raise _fail(str(exc)) from None


def PRESETS_NAMES() -> list[str]:
    from pidserve.model.config import PRESETS

    return list(PRESETS)


def _print_report(report: dict[str, object]) -> None:
    for key in ("preset", "file", "format", "variants", "stored_dtypes"):
        if key in report:
            typer.echo(f"{key:14s} {report[key]}")
    typer.echo("structure")
    for key, value in report["config"].items():  # type: ignore[union-attr]
        typer.echo(f"  {key:22s} {value}")
    typer.echo("parameters")
    for key, value in report["parameters"].items():  # type: ignore[union-attr]
        typer.echo(f"  {key:22s} {value:>15,}")
    decode = report["decode"]
    typer.echo(f"FLOPs of one {decode['steps']}-step decode at {decode['size']} (batch 1)")  # type: ignore[index]
    for key, value in decode["flops"].items():  # type: ignore[index]
        typer.echo(f"  {key:22s} {value / 1e12:12.3f} TFLOP")


# ---- data and training -------------------------------------------------------------------------
data_app = typer.Typer(help="Training data.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("photos")
def data_photos(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder to write train/, holdout/, manifest.json.")
    ] = Path("data/photos"),
    downloads: Annotated[
        Path | None,
        typer.Option(
            help="Folder with the packages already downloaded (<package>_*.deb, scikit_learn-*.whl)."
        ),
    ] = None,
) -> None:
    """Rebuild the embedded default's photo set (Debian wallpaper packages, scikit-image, scikit-learn)."""
    from pidserve.training.photos import build_photo_set

    try:
        records = build_photo_set(out, downloads)
    except (RuntimeError, OSError, ImportError, KeyError) as e:
        raise _fail(str(e)) from None
    held = sum(r.split == "holdout" for r in records)
    typer.echo(f"wrote {len(records)} photos ({held} held out) and manifest.json to {out}")


train_app = typer.Typer(
    help="Train tiny-ae, a PiD teacher, or distill a 4-step student (single process or torchrun).",
    no_args_is_help=True,
)
app.add_typer(train_app, name="train")

_ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML recipe (see recipes/).")]
_SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a recipe key: --set steps=100.")]


def _train(kind: str, config: Path | None, overrides: list[str] | None) -> None:
    from pidserve.training import config as tc

    classes = {
        "autoencoder": tc.AutoencoderTrainConfig,
        "teacher": tc.TeacherTrainConfig,
        "distill": tc.DistillTrainConfig,
    }
    try:
        cfg = tc.load_config(classes[kind], config, overrides)
    except (ValueError, OSError) as e:
        raise _fail(str(e)) from None
    if kind == "autoencoder":
        from pidserve.training.autoencoder import train_autoencoder as run
    elif kind == "teacher":
        from pidserve.training.teacher import train_teacher as run
    else:
        from pidserve.training.distill import train_distill as run
    out = run(cfg)
    typer.echo(f"wrote {out}")


@train_app.command("autoencoder")
def train_autoencoder_cmd(config: _ConfigOpt = None, set_: _SetOpt = None) -> None:
    """Train tiny-ae on the low-res versions of photo crops."""
    _train("autoencoder", config, set_)


@train_app.command("teacher")
def train_teacher_cmd(config: _ConfigOpt = None, set_: _SetOpt = None) -> None:
    """Train a PiD teacher with flow matching (velocity targets)."""
    _train("teacher", config, set_)


@train_app.command("distill")
def train_distill_cmd(config: _ConfigOpt = None, set_: _SetOpt = None) -> None:
    """Distill a teacher into a 4-step student with DMD2."""
    _train("distill", config, set_)


if __name__ == "__main__":
    app()
