"""`pidserve bench ...`: each command times or scores one thing and writes a report.

Method: docs/benchmarks.md.

    engine     backends side by side on one model (bench/engine.py)
    http       a decode server under load (bench/http_run.py, bench/http_load.py)
    soak       a server under hostile traffic (bench/soak.py; the command is in soak_cmd.py)
    cascade    PiD against decode+bicubic and decode+diffusion SR (bench/cascade.py)
    kernels    the hot spots, each implementation (bench/kernels.py)
    codecs     PNG/JPEG/WebP encoders at serving sizes (bench/codecs.py)
    quality    PSNR, SSIM, colour, detail, block grid of the decoders (bench/decoder_quality.py)
    x0-error   held-out x0 error by diffusion time (bench/decoder_quality.py)
    tiles      time and peak memory against output size, tiled vs untiled (bench/tiles.py)
    official   the official PiD code against pidserve on the same weights (bench/official.py)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from pidserve.cli import fail
from pidserve.cli.options import (
    AutoencoderOpt,
    CropOpt,
    CropsPerPhotoOpt,
    HoldoutOpt,
    OutOpt,
    PlotsOpt,
    ShortSideOpt,
    StudentOpt,
    float_list,
    int_list,
    load_model,
    parse_size,
)

if TYPE_CHECKING:
    from pidserve.model import PiDNet

bench_app = typer.Typer(help="Benchmarks: ms per image, side by side in one run.", no_args_is_help=True)


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
    out: OutOpt = None,
    plots: PlotsOpt = True,
) -> None:
    """Time backends on one model, side by side: ms/image, stages, TFLOP/s, peak memory."""
    from pidserve.bench import bench_engines, command_line, engine_table, write_engine_report
    from pidserve.engines import EngineConfigError, EngineInputError

    net = _bench_model(checkpoint, preset, variant)
    try:
        rows = bench_engines(
            net,
            backends.split(","),
            int_list("--batches", batches),
            parse_size(size),
            device=device,
            precision=precision,
            steps=steps,
            warmup=warmup,
            repeat=repeat,
            compile_mode=compile_mode,
            attention_backends=[name.strip() for name in attention_backends.split(",")],
        )
    except (EngineConfigError, EngineInputError) as exc:
        raise fail(exc) from None
    typer.echo(engine_table(rows))
    _write_bench_report(
        write_engine_report,
        out or Path("bench/out/engine"),
        rows,
        with_plots=plots,
        command=command_line(ctx),
    )


@bench_app.command("tiles")
def bench_tiles_cmd(
    ctx: typer.Context,
    checkpoint: Annotated[
        str | None, typer.Option(help="Model checkpoint ('default': the embedded pid-tiny), else --preset.")
    ] = None,
    preset: Annotated[str | None, typer.Option(help="Preset with random weights, e.g. 2k_flux.")] = None,
    sizes: Annotated[
        str, typer.Option(help="Comma-separated output sizes HxW (default: 1x, 2x, 4x the trained side).")
    ] = "",
    tile: Annotated[
        str, typer.Option(help="The tiling compared with untiled: auto, HxW or HxW:OVERLAP.")
    ] = "auto",
    backend: Annotated[str, typer.Option(help="torch | torch-compile")] = "torch",
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    precision: Annotated[str, typer.Option(help="fp32 or bf16.")] = "fp32",
    max_batch: Annotated[int, typer.Option(help="Window rows per network call (tiled).")] = 4,
    steps: Annotated[int, typer.Option(help="Sampler steps.")] = 4,
    warmup: Annotated[int, typer.Option(help="Untimed decodes first.")] = 1,
    repeat: Annotated[int, typer.Option(help="Timed decodes.")] = 3,
    untiled_up_to: Annotated[
        int | None,
        typer.Option(help="Largest output side also decoded untiled (default: all); above it tiled only."),
    ] = None,
    window_latents: Annotated[
        str,
        typer.Option(
            help="Comma-separated window-latents modes, one tiled row each: auto, crop, corrected "
            "(crop,corrected: what the correction costs)."
        ),
    ] = "auto",
    out: OutOpt = None,
) -> None:
    """Time and peak memory of one decode against output size: untiled and tiled, side by side."""
    from pidserve.bench import bench_tiles, command_line, tiles_table, write_tiles_report
    from pidserve.engines import EngineConfigError, EngineInputError
    from pidserve.model import Tiling

    net = _bench_model(checkpoint, preset, None)
    try:
        tiling = Tiling.parse(tile)
    except ValueError as exc:
        raise fail(f"--tile: {exc}") from None
    side_h, side_w = net.cfg.native_size
    chosen = (
        [parse_size(text) for text in sizes.split(",")]
        if sizes
        else [(side_h * k, side_w * k) for k in (1, 2, 4)]
    )
    try:
        rows = bench_tiles(
            net, chosen, tiling, device=device, precision=precision, backend=backend, steps=steps,
            warmup=warmup, repeat=repeat, max_batch=max_batch, untiled_up_to=untiled_up_to,
            window_latents=tuple(mode.strip() for mode in window_latents.split(",")),
        )  # fmt: skip
    except (EngineConfigError, EngineInputError, ValueError) as exc:
        raise fail(exc) from None
    typer.echo(tiles_table(rows))
    path = write_tiles_report(out or Path("bench/out/tiles"), rows, command=command_line(ctx))
    _say_written([path])


@bench_app.command("official")
def bench_official_cmd(
    ctx: typer.Context,
    official_repo: Annotated[Path, typer.Option(help="A checkout of nv-tlabs/PiD (its pid/ package).")],
    checkpoint: Annotated[
        str | None, typer.Option(help="Model checkpoint ('default': the embedded pid-tiny), else --preset.")
    ] = None,
    preset: Annotated[str | None, typer.Option(help="Preset with random weights, e.g. 2k_flux.")] = None,
    variant: Annotated[str | None, typer.Option(help="Preset of an official checkpoint.")] = None,
    size: Annotated[str, typer.Option(help="Output size HEIGHTxWIDTH.")] = "256x256",
    batch: Annotated[int, typer.Option(help="Batch size.")] = 1,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    precision: Annotated[str, typer.Option(help="fp32 or bf16.")] = "fp32",
    modes: Annotated[str, typer.Option(help="Comma-separated: eager, compiled.")] = "eager,compiled",
    steps: Annotated[int, typer.Option(help="Sampler steps of the decode rows.")] = 4,
    warmup: Annotated[int, typer.Option(help="Untimed runs first.")] = 1,
    repeat: Annotated[int, typer.Option(help="Timed runs.")] = 3,
    out: OutOpt = None,
) -> None:
    """The official PiD network against pidserve's on the same weights: parity, time, peak memory."""
    import torch

    from pidserve.bench import bench_official, command_line, official_table, write_official_report

    chosen = [m.strip() for m in modes.split(",") if m.strip()]
    if not chosen or set(chosen) - {"eager", "compiled"}:
        raise fail(f"--modes takes eager and/or compiled, got {modes!r}")
    if precision not in ("fp32", "bf16"):
        raise fail(f"--precision must be fp32 or bf16, got {precision!r}")
    net = _bench_model(checkpoint, preset, variant)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    try:
        net = net.to(device=device, dtype=dtype).eval()
        result = bench_official(
            official_repo, net, parse_size(size), batch=batch, steps=steps, warmup=warmup, repeat=repeat,
            modes=tuple(chosen),
        )  # fmt: skip
    except (ValueError, RuntimeError) as exc:
        raise fail(exc) from None
    typer.echo(official_table(result))
    path = write_official_report(out or Path("bench/out/official"), result, command=command_line(ctx))
    _say_written([path])


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
    out: OutOpt = None,
    plots: PlotsOpt = True,
) -> None:
    """Load a decode server over HTTP: latency percentiles, images/s, batching, server-side breakdown."""
    import httpx

    from pidserve.bench import HttpPlan, StartedServer, command_line, run_http_bench

    out = out or Path("bench/out/http")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request would bury the table
    plan = HttpPlan(
        formats=formats.split(","),
        mode="rate" if rate else "concurrency",
        loads=float_list("--rate", rate)
        if rate
        else [float(c) for c in int_list("--concurrency", concurrency)],
        requests=requests,
        max_seconds=max_seconds,
        warmup=warmup,
        image_size=parse_size(size),
    )
    server = StartedServer(
        checkpoint=checkpoint,
        variant=variant,
        preset=preset,
        backend=backend,
        device=device,
        precision=precision,
        max_batch=max_batch,
        max_queue_delay_ms=max_queue_delay_ms,
        engine_baseline=engine_baseline,
    )
    try:
        paths = run_http_bench(
            plan,
            out,
            url=url,
            server=server,
            api_key_file=api_key_file,
            with_plots=plots,
            command=command_line(ctx),
        )
    except (ValueError, KeyError, RuntimeError, OSError) as exc:  # the ones run_http_bench documents
        raise fail(exc) from None
    except httpx.HTTPError as exc:
        raise fail(f"could not reach {url or 'the started server'}: {exc}") from None
    _say_written(paths)
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
    out: OutOpt = None,
    plots: PlotsOpt = True,
) -> None:
    """PiD against decode+bicubic and decode+diffusion-SR: same device, same size, one run."""
    from pidserve.bench import (
        CascadeSetup,
        add_quality,
        bench_cascade,
        cascade_table,
        command_line,
        write_cascade_report,
    )
    from pidserve.engines import EngineConfigError

    if checkpoint is None and preset is None:
        checkpoint = "default"
    net = _bench_model(checkpoint, preset, None)
    if precision not in ("fp32", "bf16"):
        raise fail(f"--precision must be fp32 or bf16, got {precision!r}")
    setup = CascadeSetup(
        image_size=parse_size(size),
        batch=batch,
        sr_steps=int_list("--sr-steps", sr_steps),
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
        raise fail(exc) from None
    typer.echo(cascade_table(rows))
    _write_bench_report(
        write_cascade_report,
        out or Path("bench/out/cascade"),
        rows,
        with_plots=plots,
        command=command_line(ctx),
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
    out: OutOpt = None,
) -> None:
    """Hot spots: each implementation's time, GB/s against the bytes it must move, TFLOP/s for attention."""
    import torch

    from pidserve.bench import KernelSetup, bench_kernels, command_line, kernels_table, write_kernels_report
    from pidserve.model import PiDConfig

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if precision not in dtypes:
        raise fail(f"--precision must be fp32 or bf16, got {precision!r}")
    try:
        cfg = PiDConfig.preset(preset)
    except KeyError as exc:
        raise fail(exc) from None
    setup = KernelSetup(cfg, parse_size(size), batch, device, dtypes[precision], warmup, repeat)
    chosen = None if impls is None else tuple(impls.split(","))
    try:
        rows = bench_kernels(setup, tuple(operations.split(",")), chosen)
    except ValueError as exc:
        raise fail(exc) from None
    typer.echo(kernels_table(rows))
    _write_bench_report(
        write_kernels_report, out or Path("bench/out/kernels"), rows, command=command_line(ctx)
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
    out: OutOpt = None,
) -> None:
    """Time PNG/JPEG/WebP encoders at serving sizes, and whether they hold the GIL; Markdown table."""
    from pidserve.bench import (
        codec_dicts,
        codecs_table,
        command_line,
        time_codecs,
        time_server_pool,
        write_report,
    )

    if not image.is_file():
        raise fail(f"{image} does not exist: run `pidserve data photos` or pass --image PATH")
    side = int_list("--sizes", sizes)
    rows = time_codecs(image, side, repeat)
    pool = time_server_pool(image, side, repeat, workers)
    lines = [codecs_table(rows), ""]
    for row in pool:
        lines.append(f"{row['path']} at {row['size']}²: {row['ms_median']:.1f} ms per image (round trip)")
    table = "\n".join(lines)
    typer.echo(table)
    results = {"codecs": codec_dicts(rows), "server_pool": pool}
    written = write_report(
        out or Path("bench/out/codecs"), "codecs", results, table, command=command_line(ctx)
    )
    typer.echo(f"wrote {written}, {written.with_suffix('.md')}", err=True)


@bench_app.command("quality")
def bench_quality(
    photos: HoldoutOpt = Path("data/photos/holdout"),
    student: StudentOpt = "default",
    teacher: Annotated[Path | None, typer.Option(help="Teacher checkpoint (many-step Euler).")] = None,
    autoencoder: AutoencoderOpt = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for metrics.json, table.md, grid.png.")
    ] = Path("bench/out/quality"),
    crop: CropOpt = 256,
    crops_per_photo: CropsPerPhotoOpt = 6,
    short_side: ShortSideOpt = 640,
    upscale: Annotated[
        bool, typer.Option(help="Also enlarge photos smaller than --short-side (v1's protocol).")
    ] = False,
    teacher_steps: Annotated[int, typer.Option(help="Euler steps of the teacher.")] = 32,
    tile: Annotated[
        str | None,
        typer.Option(help="Also decode the student tiled: auto, HxW or HxW:OVERLAP (a student_tiled row)."),
    ] = None,
    window_latents: Annotated[
        str,
        typer.Option(
            help="What the tiled row's windows are conditioned on: auto or corrected (the crop corrected "
            "for the encoder's context, as served), or crop."
        ),
    ] = "auto",
) -> None:
    """PSNR, SSIM, colour, detail, block grid: student vs teacher vs cascade (tiny-ae) vs bicubic."""
    from pidserve.bench import QualitySetup, evaluate_decoders, quality_table, write_quality_report
    from pidserve.model import Tiling, load_checkpoint, load_tiny_autoencoder

    net = load_model(student, None)
    if net.cfg.latent_space != "tiny-ae":
        raise fail(
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
        window_latents=window_latents,
    )
    try:
        setup.tile = None if tile is None else Tiling.parse(tile)
        ae, space = load_tiny_autoencoder(autoencoder)
        result = evaluate_decoders(setup, net, teacher_net, ae, space=space)
    except (FileNotFoundError, ValueError) as exc:
        raise fail(exc) from None
    grid = write_quality_report(result, out)
    typer.echo(quality_table(result["metrics"]))
    typer.echo(f"ground-truth blockiness {result['ground_truth_blockiness']:.3f}")
    if result["ground_truth_seam"] is not None:
        typer.echo(f"ground-truth seam score at the window borders {result['ground_truth_seam']:.3f}")
        over_grid = result["ground_truth_seam_over_grid"]
        typer.echo(f"ground-truth seams over the other latent-cell lines {over_grid:.3f}")
    typer.echo(f"{result['crops']} crops; wrote {out / 'metrics.json'}, {out / 'table.md'}, {grid}")


@bench_app.command("x0-error")
def bench_x0_error(
    checkpoints: Annotated[list[Path], typer.Argument(help="Teacher / regression checkpoints to compare.")],
    photos: HoldoutOpt = Path("data/photos/holdout"),
    autoencoder: AutoencoderOpt = None,
    crop: CropOpt = 256,
    crops_per_photo: CropsPerPhotoOpt = 6,
    short_side: ShortSideOpt = 640,
    times: Annotated[
        str, typer.Option(help="Comma-separated diffusion times.")
    ] = "0.999,0.866,0.634,0.342,0.1",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write x0_error.json here.")] = None,
) -> None:
    """Held-out x0 error by diffusion time (teacher-forced): is a teacher worth distilling?"""
    from pidserve.bench import QualitySetup, x0_error_by_t, x0_table
    from pidserve.model import load_checkpoint, load_tiny_autoencoder

    try:
        parsed_times = tuple(float(t) for t in times.split(","))
    except ValueError:
        raise fail(f"--times must be comma-separated numbers in (0, 1], got {times!r}") from None
    if not all(0 < t <= 1 for t in parsed_times):
        raise fail(f"--times must lie in (0, 1], got {times!r}")
    for path in checkpoints:
        if not path.is_file():
            raise fail(f"{path} does not exist")
    # Rows are named by file name, or by the path where two files share a name (teacher_ema.safetensors).
    names = [path.name for path in checkpoints]
    keys = names if len(set(names)) == len(names) else [str(path) for path in checkpoints]
    if len(set(keys)) != len(keys):
        raise fail("the same checkpoint is given twice")
    nets = {key: load_checkpoint(path).eval() for key, path in zip(keys, checkpoints, strict=True)}
    setup = QualitySetup(
        photos, crop=crop, crops_per_photo=crops_per_photo, short_side=short_side, upscale=False
    )
    try:
        ae, space = load_tiny_autoencoder(autoencoder)
        errors = x0_error_by_t(setup, nets, ae, parsed_times, space=space)
    except (FileNotFoundError, ValueError) as exc:
        raise fail(exc) from None
    typer.echo(x0_table(errors))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "x0_error.json").write_text(json.dumps(errors, indent=2) + "\n")
        typer.echo(f"wrote {out / 'x0_error.json'}")


@bench_app.command("window-latents")
def bench_window_latents(
    photos: HoldoutOpt = Path("data/photos/holdout"),
    student: StudentOpt = "default",
    autoencoder: AutoencoderOpt = None,
    crop: Annotated[int, typer.Option(help="Output side in pixels (a multiple of the window).")] = 1024,
    crops_per_photo: CropsPerPhotoOpt = 1,
    short_side: ShortSideOpt = 640,
    tile: Annotated[
        str, typer.Option(help="The tiling of the tiled rows: auto, HxW or HxW:OVERLAP.")
    ] = "auto",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write window_latents.json here.")] = None,
) -> None:
    """Is a tiled decode's colour cast the blending's or the window latents'? Five decodes compared."""
    from pidserve.bench import QualitySetup, window_latent_cast, window_latent_table
    from pidserve.model import Tiling, load_tiny_autoencoder

    net = load_model(student, None)
    if net.cfg.latent_space != "tiny-ae":
        raise fail(
            f"bench window-latents needs a 'tiny-ae' student (it re-encodes windows); "
            f"{student} decodes '{net.cfg.latent_space}'"
        )
    setup = QualitySetup(
        photos, crop=crop, crops_per_photo=crops_per_photo, short_side=short_side, upscale=False
    )
    try:
        ae, space = load_tiny_autoencoder(autoencoder)
        figures = window_latent_cast(setup, net, ae, Tiling.parse(tile), space=space)
    except (FileNotFoundError, ValueError) as exc:
        raise fail(exc) from None
    typer.echo(window_latent_table(figures))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "window_latents.json").write_text(json.dumps(figures, indent=2) + "\n")
        typer.echo(f"wrote {out / 'window_latents.json'}")


def _bench_model(checkpoint: str | None, preset: str | None, variant: str | None) -> PiDNet:
    """The model a benchmark times: a checkpoint, or a preset with random weights (seed 0)."""
    import torch

    from pidserve.model import PiDConfig, PiDNet

    if (checkpoint is None) == (preset is None):
        raise fail("give either --checkpoint or --preset")
    if checkpoint is not None:
        return load_model(checkpoint, variant)
    try:
        cfg = PiDConfig.preset(preset)
    except KeyError as exc:
        raise fail(exc) from None
    torch.manual_seed(0)
    return PiDNet(cfg).eval()


def _write_bench_report(write, *args, **kwargs) -> list[Path]:
    """Call a bench/ report writer; a missing matplotlib becomes a clear CLI error. Says what it wrote."""
    from pidserve.bench import PlotsUnavailable

    try:
        paths = write(*args, **kwargs)
    except PlotsUnavailable as exc:
        raise fail(exc) from None
    _say_written(paths)
    return paths


def _say_written(paths: list[Path]) -> None:
    typer.echo("wrote " + ", ".join(str(p) for p in paths), err=True)
