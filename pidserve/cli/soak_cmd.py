"""`pidserve bench soak`: a server under mixed good, bad, slow and disconnecting clients (bench/soak.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from pidserve.cli import fail
from pidserve.cli.options import OutOpt


def bench_soak(
    duration_s: Annotated[float, typer.Option(help="Seconds of traffic.")] = 180.0,
    good: Annotated[int, typer.Option(help="Well-behaved clients (decode in a loop).")] = 4,
    bad: Annotated[int, typer.Option(help="Clients sending malformed requests.")] = 2,
    slow: Annotated[int, typer.Option(help="Clients trickling their body in small chunks.")] = 1,
    disconnecting: Annotated[int, typer.Option(help="Clients closing mid-body.")] = 1,
    latent_size: Annotated[int, typer.Option(help="Latent side of the good requests (4: 128x128).")] = 4,
    serve_arg: Annotated[
        list[str] | None,
        typer.Option(
            "--serve-arg",
            help="A flag for the started `pidserve serve` (repeat), e.g. --serve-arg=--max-batch=4.",
        ),
    ] = None,
    out: OutOpt = None,
) -> None:
    """Soak a started server (the embedded default) with hostile traffic; the verdict and the ledger."""
    from pidserve.bench import SoakPlan, command_line, run_soak_bench

    logging.getLogger("httpx").setLevel(logging.WARNING)
    out = out or Path("bench/out/soak")
    plan = SoakPlan(
        duration_s=duration_s,
        good_clients=good,
        bad_clients=bad,
        slow_clients=slow,
        disconnecting_clients=disconnecting,
        latent_size=latent_size,
    )
    try:
        report = run_soak_bench(plan, out, serve_arg or [], command=command_line())
    except (RuntimeError, OSError) as exc:
        raise fail(exc) from None
    typer.echo((out / "soak.md").read_text())
    if not report.passed:
        raise fail("the soak failed: " + "; ".join(report.problems))
