"""Options and parsers more than one command shares.

    parse_size     "2048x2048" -> (2048, 2048): every command that takes an output size
    int_list       "1,2,4" -> [1, 2, 4] (each >= 1)
    float_list     "0.5,2" -> [0.5, 2.0]
    load_model     a checkpoint argument ("default", ours, official + --variant) -> PiDNet
    OutOpt, PlotsOpt, ConfigOpt, SetOpt: option annotations used by several commands
    HoldoutOpt, StudentOpt, AutoencoderOpt, CropOpt, CropsPerPhotoOpt, ShortSideOpt: the held-out
        photo protocol of bench quality, x0-error and window-latents (defaults stay per command)

Bad input is reported with `fail` (exit status 2), naming the option and the expected form.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from pidserve.cli import fail

if TYPE_CHECKING:
    from pidserve.model import PiDNet

# bench commands: where the report goes, and whether it gets PNG plots
OutOpt = Annotated[
    Path | None, typer.Option("--out", "-o", help="Report folder (default bench/out/<command>).")
]
PlotsOpt = Annotated[bool, typer.Option("--plots/--no-plots", help="Write PNG plots (needs matplotlib).")]

# bench commands on held-out photos (bench/decoder_quality.py's QualitySetup)
HoldoutOpt = Annotated[Path, typer.Option(help="Held-out photo folder.")]
StudentOpt = Annotated[str, typer.Option(help="Student checkpoint ('default': the embedded pid-tiny).")]
AutoencoderOpt = Annotated[
    Path | None, typer.Option(help="tiny-ae file whose latents are decoded (default: the embedded one).")
]
CropOpt = Annotated[int, typer.Option(help="Output (ground-truth crop) side in pixels.")]
CropsPerPhotoOpt = Annotated[int, typer.Option(help="Crops per held-out photo.")]
ShortSideOpt = Annotated[int, typer.Option(help="Photos are reduced to this short side first.")]

# train commands: a TOML recipe and key=value overrides
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML recipe (see recipes/).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a recipe key: --set steps=100.")]


def parse_size(size: str, option: str = "--size") -> tuple[int, int]:
    """HEIGHTxWIDTH -> (height, width): pidserve.model.parse_image_size, its error reported."""
    from pidserve.model import parse_image_size

    try:
        return parse_image_size(size, option)
    except ValueError as exc:
        raise fail(exc) from None


def int_list(option: str, value: str) -> list[int]:
    """Comma-separated integers, each >= 1."""
    try:
        items = [int(v) for v in value.split(",")]
    except ValueError:
        raise fail(f"{option} must be comma-separated integers, got {value!r}") from None
    if any(v < 1 for v in items):
        raise fail(f"{option} must be >= 1, got {value!r}")
    return items


def float_list(option: str, value: str) -> list[float]:
    """Comma-separated numbers."""
    try:
        return [float(v) for v in value.split(",")]
    except ValueError:
        raise fail(f"{option} must be comma-separated numbers, got {value!r}") from None


def load_model(checkpoint: str, variant: str | None) -> PiDNet:
    """pidserve.model.load_decoder, its errors reported: a missing file, a file that does not fit,
    an unknown --variant."""
    from pidserve.model import CheckpointError, load_decoder

    try:
        return load_decoder(checkpoint, variant)
    except (FileNotFoundError, CheckpointError, KeyError) as exc:
        raise fail(exc) from None
