"""`pidserve bench tiles`: time and peak memory of one decode against output size, tiled and untiled
side by side in one run (issue 21's cost claim: linear time, memory flat beyond one window batch).

Per output size, each mode (untiled, then the given tiling once per window-latents mode: crop,
corrected; model/window_latents.py) is opened on the same network, warmed up once, then timed over
`repeat` decodes of a random latent (batch 1). Peak memory:
- on CUDA, torch's peak allocated bytes during the timed decodes (reset before them);
- on the CPU (Linux), the process's peak resident set during the timed decodes, by resetting the
  kernel's high-water mark (`/proc/self/clear_refs`, "5") and reading VmHWM; reported above the
  resident set just before, so the weights and the interpreter are not counted.
FLOPs are the analytic counts (model/flops.py): a tiled decode computes every window, overlaps included.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from pidserve.engines import Engine, open_engine
from pidserve.model import (
    TILING_OFF,
    PiDNet,
    Tiling,
    decode_flops,
    tiled_decode_flops,
    window_latents_name,
)

from . import report
from .engine import random_batch
from .memory import PeakMemory


@dataclass
class TileTiming:
    size: tuple[int, int]
    tiling: str  # "off" or the tiling asked for
    windows: int
    window_latents: str  # what tiled windows were conditioned on ("-" untiled)
    ms_median: float
    ms_min: float
    peak_memory_bytes: int | None  # above the baseline (CPU) or allocated (CUDA); None: unmeasurable here
    flops: float
    repeat: int
    device: str


def bench_tiles(
    net: PiDNet,
    sizes: list[tuple[int, int]],
    tiling: Tiling,
    *,
    device: str = "cpu",
    precision: str = "fp32",
    backend: str = "torch",
    steps: int = 4,
    warmup: int = 1,
    repeat: int = 3,
    max_batch: int = 4,
    untiled_up_to: int | None = None,
    window_latents: tuple[str, ...] = ("auto",),
) -> list[TileTiming]:
    """Untiled and tiled decodes at every size, one after another in this process.

    untiled_up_to: the largest output side also decoded untiled (None: every size); above it only
    the tiled rows run (an untiled decode there would take minutes or run out of memory).
    window_latents: one tiled row per mode (auto, crop, corrected), e.g. ("crop", "corrected") for
    what the correction costs."""

    def modes(size: tuple[int, int]) -> list[tuple[Tiling, str]]:
        untiled = untiled_up_to is None or max(size) <= untiled_up_to
        tiled = [(tiling, mode) for mode in window_latents]
        return [(TILING_OFF, "auto"), *tiled] if untiled else tiled

    rows = []
    total = sum(len(modes(size)) for size in sizes) * (warmup + repeat)
    with tqdm(total=total, desc="decodes", unit="decode") as bar:
        for size in sizes:
            batch = random_batch(net.cfg, 1, size, steps)
            for mode, latents_mode in modes(size):
                bar.set_postfix_str(f"{size[0]}x{size[1]} tile={mode} {latents_mode}")
                engine = open_engine(
                    backend, net=net, device=device, precision=precision, max_batch=max_batch,
                    tiling=mode, window_latents=latents_mode,
                )  # fmt: skip
                try:
                    row = _time(engine, net, batch, size, mode, warmup, repeat, bar)
                finally:
                    engine.close()
                    del engine
                    gc.collect()
                rows.append(row)
                bar.write(row_summary(row))
    return rows


def _time(
    engine: Engine,
    net: PiDNet,
    batch,
    size: tuple[int, int],
    mode: Tiling,
    warmup: int,
    repeat: int,
    bar: tqdm,
) -> TileTiming:
    for _ in range(warmup):
        engine.decode(batch)
        bar.update()
    memory = PeakMemory(engine.capabilities.device)
    walls = []
    windows = 1
    memory.start()
    for _ in range(repeat):
        start = time.perf_counter()
        windows = engine.decode(batch).windows
        walls.append(time.perf_counter() - start)
        bar.update()
    peak = memory.stop()
    plan = mode.plan(size, net.cfg.native_size, net.cfg.output_scale)
    latents_mode = "-" if plan is None else window_latents_name(engine.window_latents)
    flops = (
        decode_flops(net.cfg, *size, steps=batch.steps, text_len=0)
        if plan is None
        else tiled_decode_flops(net.cfg, plan, steps=batch.steps, text_len=0)
    )
    return TileTiming(
        size=size,
        tiling=str(mode),
        windows=windows,
        window_latents=latents_mode,
        ms_median=statistics.median(walls) * 1e3,
        ms_min=min(walls) * 1e3,
        peak_memory_bytes=peak,
        flops=float(flops.total),
        repeat=repeat,
        device=engine.capabilities.device,
    )


def row_summary(r: TileTiming) -> str:
    peak = "-" if r.peak_memory_bytes is None else f"{r.peak_memory_bytes / 2**20:.0f} MiB"
    return (
        f"{r.size[0]}x{r.size[1]} tile={r.tiling} ({r.window_latents}): {r.windows} window(s), "
        f"{r.ms_median:.0f} ms, "
        f"peak {peak}, {r.flops / 1e9:.1f} GFLOP"
    )


def markdown_table(rows: list[TileTiming]) -> str:
    columns = [
        "size",
        "tile",
        "window latents",
        "windows",
        "ms (median)",
        "ms per megapixel",
        "peak MiB",
        "GFLOP",
        "device",
    ]
    cells = [
        [
            f"{r.size[0]}x{r.size[1]}",
            r.tiling,
            r.window_latents,
            r.windows,
            f"{r.ms_median:.0f}",
            f"{r.ms_median / (r.size[0] * r.size[1] / 1e6):.0f}",
            "-" if r.peak_memory_bytes is None else f"{r.peak_memory_bytes / 2**20:.0f}",
            f"{r.flops / 1e9:.1f}",
            r.device,
        ]
        for r in rows
    ]
    return report.markdown_table(columns, cells)


def write_tiles_report(out_dir: Path, rows: list[TileTiming], *, command: str | None = None) -> Path:
    """tiles.json and tiles.md (with the machine and the command, like every bench report)."""
    return report.write_report(
        out_dir, "tiles", [asdict(r) for r in rows], markdown_table(rows), command=command
    )
