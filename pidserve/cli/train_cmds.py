"""`pidserve data photos` (the embedded default's photo set) and `pidserve train autoencoder | teacher |
distill` (a TOML recipe from recipes/ plus --set overrides; single process or under torchrun)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from pidserve.cli import fail, keep_freed_memory
from pidserve.cli.options import ConfigOpt, SetOpt

data_app = typer.Typer(help="Training data.", no_args_is_help=True)
train_app = typer.Typer(
    help="Train tiny-ae, a PiD teacher, or distill a 4-step student (single process or torchrun).",
    no_args_is_help=True,
)


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
    from pidserve.training import build_photo_set

    try:
        records = build_photo_set(out, downloads)
    except (RuntimeError, OSError, ImportError, KeyError) as exc:
        raise fail(exc) from None
    held = sum(r.split == "holdout" for r in records)
    typer.echo(f"wrote {len(records)} photos ({held} held out) and manifest.json to {out}")


@train_app.command("autoencoder")
def train_autoencoder_cmd(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Train tiny-ae on the low-res versions of photo crops."""
    keep_freed_memory()
    from pidserve.training import AutoencoderTrainConfig, train_autoencoder

    _train(train_autoencoder, AutoencoderTrainConfig, config, set_)


@train_app.command("teacher")
def train_teacher_cmd(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Train a PiD teacher with flow matching (velocity targets)."""
    keep_freed_memory()
    from pidserve.training import TeacherTrainConfig, train_teacher

    _train(train_teacher, TeacherTrainConfig, config, set_)


@train_app.command("distill")
def train_distill_cmd(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Distill a teacher into a 4-step student with DMD2."""
    keep_freed_memory()
    from pidserve.training import DistillTrainConfig, train_distill

    _train(train_distill, DistillTrainConfig, config, set_)


def _train(
    trainer: Callable[[Any], Path], config_class: type, config: Path | None, overrides: list[str] | None
):
    """Read the recipe (a bad key or value is reported, not raised), run `trainer`, say what it wrote."""
    from pidserve.training import load_config

    try:
        cfg = load_config(config_class, config, overrides)
    except (ValueError, OSError) as exc:
        raise fail(exc) from None
    typer.echo(f"wrote {trainer(cfg)}")
