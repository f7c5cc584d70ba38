"""`pidserve export` (ONNX graphs for onnxruntime) and `pidserve build` (TensorRT engines for a GPU class).

export: checkpoint -> export_onnx -> condition.onnx + step.onnx (-> verify against PyTorch)
build:  GPU class, precision and TensorRT checked first -> (skip if the manifest is current)
        -> ONNX export (fp8: ModelOpt quantization first) -> TensorRT build -> plans + manifest.json
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from pidserve.cli import fail
from pidserve.cli.options import int_list, load_model, parse_size

if TYPE_CHECKING:
    from pidserve.engines import ShapeProfile


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
    from pidserve.engines.build import export_onnx, verify_export

    net = load_model(checkpoint, variant)
    sizes = tuple(sorted(set(int_list("--batch-sizes", batch_sizes))))
    profile = ShapeProfile(parse_size(size), sizes, text_tokens)
    graphs = export_onnx(net, output, profile)
    typer.echo(f"wrote {graphs.condition} and {graphs.step}")
    if verify:
        error = verify_export(net, graphs)
        typer.echo(f"onnxruntime vs PyTorch: max |velocity difference| = {error:.2e}")


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
    fp8_attention: Annotated[
        bool, typer.Option(help="fp8: quantize both attention BMMs too (TensorRT's FP8 attention).")
    ] = True,
    timing_cache: Annotated[Path | None, typer.Option(help="TensorRT timing cache file.")] = None,
    if_stale: Annotated[
        bool, typer.Option(help="Skip the build when OUTPUT's manifest matches (init containers).")
    ] = False,
) -> None:
    """Build TensorRT engines (condition.plan, step.plan, manifest.json) for one GPU class.

    Runs on the target GPU with TensorRT installed; checks both before exporting anything.
    """
    import torch

    from pidserve.engines import (
        EngineConfigError,
        ShapeProfile,
        batch_ladder,
        check_precision,
        get_gpu_class,
        require_tensorrt,
    )
    from pidserve.engines.build import build_engines, export_onnx, opset_for_tensorrt, quantize_fp8_and_export

    try:
        target = get_gpu_class(gpu_class)
        check_precision(precision, target.compute_capability, f"the {target.name} class")
        trt_version = require_tensorrt()  # fail before a long export, not after
    except EngineConfigError as exc:
        raise fail(exc) from None
    profile = ShapeProfile(parse_size(size), batch_ladder(max_batch or target.default_max_batch), text_tokens)
    if if_stale:
        reasons = _stale_reasons(checkpoint, output, precision, target.name, profile, trt_version)
        if not reasons:
            typer.echo(f"{output} is current ({precision}, {profile.tag}); nothing to build")
            return
        typer.echo(f"building {output}: " + "; ".join(reasons))
    net = load_model(str(checkpoint), variant)
    onnx_dir = output / "onnx"
    try:
        if precision == "fp8":
            graphs = quantize_fp8_and_export(
                net,
                profile,
                onnx_dir,
                calibration=calibration_latents,
                random_calibration=random_calibration,
                attention=fp8_attention,
            )
        else:
            # The precision is in the graph (strongly typed builds): export from the network in bf16.
            dtype = torch.float32 if precision == "fp32" else torch.bfloat16
            opset = opset_for_tensorrt(trt_version)  # the fused Attention op where TensorRT parses it
            graphs = export_onnx(net.to("cuda", dtype), onnx_dir, profile, opset=opset)
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
        raise fail(exc) from None
    typer.echo(
        f"wrote {output} ({manifest.precision}, {profile.tag}, batch sizes {list(profile.batch_sizes)})"
    )


def _stale_reasons(
    checkpoint: Path, output: Path, precision: str, gpu_class: str, profile: ShapeProfile, trt_version: str
) -> list[str]:
    """Why OUTPUT's engines do not match this build on this GPU (empty: they are current)."""
    import torch

    from pidserve.engines import sha256_file, stale_reasons

    if not checkpoint.is_file():
        raise fail(f"{checkpoint} does not exist")
    return stale_reasons(
        output,
        model_sha256=sha256_file(checkpoint),
        precision=precision,
        gpu_class=gpu_class,
        profile=profile,
        gpu_name=torch.cuda.get_device_name(),
        compute_capability=torch.cuda.get_device_capability(),
        trt_version=trt_version,
    )
