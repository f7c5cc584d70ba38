"""The `pidserve` command line: one Typer app, one subcommand per job.

    __init__      the app, the --verbose switch, `fail` (the one way a command reports an error)
    options       shared option types and parsers (HxW sizes, comma lists, --config/--set, --out)
    model_cmds    convert, info
    decode_cmd    decode (locally, or on a server with --url)
    serve_cmd     serve
    engine_cmds   export, build
    bench_cmds    bench engine | http | cascade | kernels | codecs | quality | x0-error
    soak_cmd      bench soak
    train_cmds    data photos, train autoencoder | teacher | distill

Each command parses its options, makes one call into a library folder and prints the result.
Library errors are caught by the command and reported with `fail`: "error: ..." on stderr, exit
status 2, no traceback. Commands import their libraries inside the function, so `pidserve --help`
stays fast.
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

app = typer.Typer(
    name="pidserve",
    help="Serve PiD, a pixel diffusion decoder: latents in, high-resolution pixels out.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug details.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )


def keep_freed_memory() -> None:
    """For the commands that decode or train on the CPU: keep freed memory in the process
    (engines/cpu_allocator.py; 1.25x faster decodes here). Not for `bench tiles`, which measures memory."""
    from pidserve.engines import keep_freed_memory as apply

    logging.getLogger("pidserve.engines.cpu_allocator").debug("CPU allocator tuning: %s", apply())


def fail(error: str | BaseException) -> typer.Exit:
    """Print "error: ..." in red on stderr; return the exit (status 2) for the caller to raise.

    Takes a message or a library exception (a KeyError's message is printed without its quotes):
        except CheckpointError as exc:
            raise fail(exc) from None
    """
    message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


# The command modules use `fail`, so they are imported once it exists.
from . import bench_cmds, decode_cmd, engine_cmds, model_cmds, serve_cmd, soak_cmd, train_cmds  # noqa: E402

app.command()(model_cmds.convert)
app.command()(model_cmds.info)
app.command()(decode_cmd.decode)
app.command()(serve_cmd.serve)
app.command()(engine_cmds.export)
app.command()(engine_cmds.build)
bench_cmds.bench_app.command("soak")(soak_cmd.bench_soak)
app.add_typer(bench_cmds.bench_app, name="bench")
app.add_typer(train_cmds.data_app, name="data")
app.add_typer(train_cmds.train_app, name="train")

__all__ = ["app", "fail", "keep_freed_memory"]
