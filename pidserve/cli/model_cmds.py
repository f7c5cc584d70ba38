"""`pidserve convert` (official checkpoint -> ours) and `pidserve info` (what a checkpoint or preset is)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from pidserve.cli import fail
from pidserve.cli.options import parse_size

if TYPE_CHECKING:
    from pidserve.model import PiDConfig


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

    from pidserve.model import (
        CheckpointError,
        PiDConfig,
        load_checkpoint,
        matching_variants,
        read_checkpoint,
        save_checkpoint,
    )

    dtypes = {"bfloat16": torch.bfloat16, "float32": torch.float32}
    if dtype not in dtypes:
        raise fail(f"--dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    try:
        if variant is None:
            raw = read_checkpoint(checkpoint)
            candidates = matching_variants({k: tuple(v.shape) for k, v in raw.tensors.items()})
            if len(candidates) != 1:
                found = ", ".join(candidates) or "none"
                raise fail(f"pass --variant: the file's architecture fits these presets: {found}")
            variant = candidates[0]
        cfg = PiDConfig.preset(variant)
        typer.echo(f"loading {checkpoint} as {variant} ...", err=True)
        net = load_checkpoint(checkpoint, cfg)
    except (CheckpointError, KeyError) as exc:
        raise fail(exc) from None
    save_checkpoint(net, output, dtype=dtypes[dtype], extra_metadata={"variant": variant})
    typer.echo(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB, {dtype}, variant {variant})")


def info(
    checkpoint: Annotated[Path | None, typer.Argument(help="A checkpoint (official or ours).")] = None,
    preset: Annotated[str | None, typer.Option(help="Describe a preset instead of a file.")] = None,
    variant: Annotated[str | None, typer.Option(help="Variant of an official file (else detected).")] = None,
    size: Annotated[str, typer.Option(help="Output size HEIGHTxWIDTH for the FLOP count.")] = "2048x2048",
    steps: Annotated[int, typer.Option(help="Sampler steps for the FLOP count.")] = 4,
    text_tokens: Annotated[int | None, typer.Option(help="Text tokens (default: the net's maximum).")] = None,
    tile: Annotated[
        str | None,
        typer.Option(help="Also count a tiled decode: auto (trained-size windows), HxW or HxW:OVERLAP."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    list_presets: Annotated[bool, typer.Option("--list", help="List the presets and exit.")] = False,
) -> None:
    """Describe a checkpoint or preset: variant, parameters by part, dtype, FLOPs of one decode."""
    import torch

    from pidserve.model import (
        PRESETS,
        RELEASED_CHECKPOINTS,
        CheckpointError,
        PiDConfig,
        PiDNet,
        decode_flops,
        describe_config,
        parameter_counts,
    )

    if list_presets:
        for name in PRESETS:
            tag = f"released: {RELEASED_CHECKPOINTS[name]}" if name in RELEASED_CHECKPOINTS else "test model"
            typer.echo(f"{name:26s} {tag}")
        return
    if (checkpoint is None) == (preset is None):
        raise fail("give either a CHECKPOINT or --preset NAME")
    height, width = parse_size(size)
    try:
        if preset is not None:
            report: dict[str, object] = {"preset": preset}
            cfg = PiDConfig.preset(preset)
        else:
            report, cfg = _describe_file(checkpoint, variant)
    except (CheckpointError, KeyError) as exc:
        raise fail(exc) from None
    report["config"] = describe_config(cfg)
    with torch.device("meta"):
        report["parameters"] = parameter_counts(PiDNet(cfg))
    if height % cfg.patch_size or width % cfg.patch_size:
        raise fail(f"--size must be a multiple of the patch size {cfg.patch_size}")
    flops = decode_flops(cfg, height, width, steps=steps, text_len=text_tokens)
    report["decode"] = {"size": f"{height}x{width}", "steps": steps, "flops": flops.as_dict()}
    if tile is not None:
        report["tiled"] = _tiled_report(cfg, (height, width), tile, steps, text_tokens, flops.total)

    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    _print_report(report)


def _tiled_report(
    cfg, size: tuple[int, int], tile: str, steps: int, text_tokens: int | None, untiled: int
) -> dict[str, object]:
    """The FLOPs of the same decode in windows (model/tiling.py), and their ratio to untiled."""
    from pidserve.model import Tiling, tiled_decode_flops

    try:
        plan = Tiling.parse(tile).plan(size, cfg.native_size, cfg.output_scale)
    except ValueError as exc:
        raise fail(f"--tile: {exc}") from None
    if plan is None:
        return {"windows": 1, "note": f"{size[0]}x{size[1]} fits in one window: decoded untiled"}
    flops = tiled_decode_flops(cfg, plan, steps=steps, text_len=text_tokens)
    return {
        "tile": f"{plan.tile[0]}x{plan.tile[1]}",
        "overlap": plan.overlap,
        "windows": plan.count,
        "flops": flops.as_dict(),
        "ratio_to_untiled": flops.total / untiled,
    }


def _describe_file(checkpoint: Path, variant: str | None) -> tuple[dict[str, object], PiDConfig]:
    """(file, format, stored dtypes and, for official files, the fitting variants; the config)."""
    from collections import Counter

    from pidserve.model import PiDConfig, matching_variants, read_checkpoint

    raw = read_checkpoint(checkpoint)
    report: dict[str, object] = {
        "file": str(checkpoint),
        "format": "official" if raw.official else "pidserve",
        "stored_dtypes": dict(Counter(str(v.dtype).removeprefix("torch.") for v in raw.tensors.values())),
    }
    if raw.config is not None:
        return report, raw.config
    candidates = (
        [variant] if variant else matching_variants({k: tuple(v.shape) for k, v in raw.tensors.items()})
    )
    report["variants"] = candidates
    if not candidates:
        raise fail(
            f"{checkpoint} fits no preset (see `pidserve info --list`): "
            "its tensors differ from every known architecture"
        )
    return report, PiDConfig.preset(candidates[0])


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
    tiled = report.get("tiled")
    if isinstance(tiled, dict):
        if "flops" not in tiled:
            typer.echo(f"tiled: {tiled['note']}")
            return
        typer.echo(
            f"tiled in {tiled['windows']} windows of {tiled['tile']} (overlap {tiled['overlap']} px): "
            f"{tiled['ratio_to_untiled']:.3f}x the untiled FLOPs"
        )
        for key, value in tiled["flops"].items():
            typer.echo(f"  {key:22s} {value / 1e12:12.3f} TFLOP")
