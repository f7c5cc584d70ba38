"""`pidserve bench engine`: ms per image of engines, side by side in one run.

Each configuration (backend x attention kernel x batch size) is opened, warmed up (compilation, graph capture,
allocator), then timed over `repeat` decodes:
- wall time per image around the whole decode (median, p90): `decode` returns host pixels, so the
  device work is complete when the clock stops;
- the engine's own stage breakdown (CUDA events on a GPU, wall clock on the CPU) and their sum,
  the device time;
- achieved TFLOP/s against the model's analytic FLOP count, and peak device memory on a GPU.
"""

from __future__ import annotations

import gc
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from pidserve.engines import DecodeBatch, Engine, ShapeProfile, check_attention_backend, open_engine
from pidserve.model import PiDConfig, PiDNet, decode_flops

from . import plots, report
from .stats import Summary

log = logging.getLogger(__name__)


@dataclass
class EngineTiming:
    backend: str
    device: str
    precision: str
    batch: int
    image_size: tuple[int, int]
    steps: int
    repeat: int
    ms_per_image_median: float
    ms_per_image_p90: float
    images_per_s: float = 0.0  # at the median
    device_ms_per_image: float = 0.0  # sum of the engine's stage timings (CUDA events on a GPU)
    stages_ms: dict[str, float] = field(default_factory=dict)  # median per decode (the whole batch)
    flops_per_image: float = 0.0
    tflops_achieved: float = 0.0
    peak_memory_bytes: int | None = None
    attention: str = "auto"  # the engine's attention kernel (engines/attention.py)

    @property
    def config(self) -> str:
        """What the row measures besides the batch size: backend, precision, a pinned attention kernel."""
        attention = "" if self.attention == "auto" else f" attn={self.attention}"
        return f"{self.backend} {self.precision}{attention}"

    @property
    def label(self) -> str:
        return f"{self.config} b{self.batch}"


def random_batch(
    cfg: PiDConfig, batch: int, image_size: tuple[int, int], steps: int, seed: int = 0
) -> DecodeBatch:
    scale = cfg.output_scale
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(
        batch, cfg.latent_channels, image_size[0] // scale, image_size[1] // scale, generator=g
    )
    return DecodeBatch(latents, torch.zeros(batch), torch.arange(batch, dtype=torch.int64), None, steps)


def time_engine(
    engine: Engine,
    cfg: PiDConfig,
    batch: DecodeBatch,
    warmup: int = 2,
    repeat: int = 10,
    progress: tqdm | None = None,
    attention: str = "auto",
) -> EngineTiming:
    """Warm up, then time `repeat` decodes of `batch` (wall clock around the whole decode)."""
    caps = engine.capabilities
    cuda = caps.device.startswith("cuda")
    for _ in range(warmup):
        engine.decode(batch)
        if progress is not None:
            progress.update()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    walls: list[float] = []
    stages: dict[str, list[float]] = {}
    for _ in range(repeat):
        start = time.perf_counter()
        result = engine.decode(batch)  # returns host pixels: the decode is complete
        walls.append(time.perf_counter() - start)
        for name, seconds in result.timings.items():
            stages.setdefault(name, []).append(seconds)
        if progress is not None:
            progress.update()
    n = batch.size
    size = caps.image_size(batch.latents.shape[-2:])
    per_image = Summary.of(walls).scaled(1e3 / n)
    stages_ms = {k: statistics.median(v) * 1e3 for k, v in stages.items()}
    flops = decode_flops(cfg, *size, steps=batch.steps, text_len=0, batch=1).total
    return EngineTiming(
        backend=caps.backend,
        device=caps.device,
        precision=caps.precision,
        batch=n,
        image_size=size,
        steps=batch.steps,
        repeat=repeat,
        ms_per_image_median=per_image.median,
        ms_per_image_p90=per_image.p90,
        images_per_s=1e3 / per_image.median,
        device_ms_per_image=sum(v for k, v in stages_ms.items() if k != "total") / n,
        stages_ms=stages_ms,
        flops_per_image=flops,
        tflops_achieved=flops / (per_image.median / 1e3) / 1e12,
        peak_memory_bytes=torch.cuda.max_memory_allocated() if cuda else None,
        attention=attention,
    )


def bench_engines(
    net: PiDNet,
    backends: list[str],
    batches: list[int],
    image_size: tuple[int, int],
    *,
    device: str = "cpu",
    precision: str = "fp32",
    steps: int = 4,
    warmup: int = 2,
    repeat: int = 10,
    compile_mode: str | None = None,
    attention_backends: list[str] | None = None,
) -> list[EngineTiming]:
    """Every backend x attention kernel at every batch size, one after another in this process; a
    progress bar per decode.

    onnxruntime always runs on the CPU in fp32 (its export is the fp32 graph). compile_mode goes to
    torch-compile (None: the engine's default). attention_backends (default ["auto"]) apply to the torch
    backends; the other backends run once, with their own kernels.
    """
    attention_backends = attention_backends or ["auto"]
    for attention in attention_backends:  # refuse a bad name before any configuration runs
        check_attention_backend(attention, torch.device(device))
    configs = [
        (backend, attention)
        for backend in backends
        for attention in (attention_backends if backend in ("torch", "torch-compile") else ["auto"])
    ]
    rows = []
    with tqdm(total=len(configs) * len(batches) * (warmup + repeat), desc="decodes", unit="decode") as bar:
        for batch_size in batches:
            batch = random_batch(net.cfg, batch_size, image_size, steps)
            for backend, attention in configs:
                bar.set_postfix_str(f"{backend} attention {attention} batch {batch_size}")
                ort = backend == "onnxruntime"
                engine = open_engine(
                    backend,
                    net=net,
                    device="cpu" if ort else device,
                    precision="fp32" if ort else precision,
                    max_batch=batch_size,
                    profile=ShapeProfile(image_size, (batch_size,)),
                    compile_mode=compile_mode if backend == "torch-compile" else None,
                    attention_backend=attention,
                )
                try:
                    row = time_engine(
                        engine,
                        net.cfg,
                        batch,
                        warmup=warmup,
                        repeat=repeat,
                        progress=bar,
                        attention=attention,
                    )
                    rows.append(row)
                    # Each row reaches the log as it is measured: a run stopped at a time limit (the GPU
                    # suite's stages) still leaves the rows it finished.
                    bar.write(row_summary(row))
                finally:
                    engine.close()
                    # Free this engine's device memory before the next one opens: two 2048² engines with
                    # their graphs need not fit on one GPU together, and peak memory is per engine.
                    del engine
                    # Every configuration compiles the same net.velocity: without a reset its compiled
                    # variants pile up towards Dynamo's recompile limit, past which later configurations
                    # would quietly run eager (and Dynamo does not guard on the attention kernel pin).
                    torch._dynamo.reset()
                    gc.collect()
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
    return rows


def row_summary(r: EngineTiming) -> str:
    """One line per measured configuration, for the log."""
    peak = "" if r.peak_memory_bytes is None else f", peak {r.peak_memory_bytes / 2**30:.2f} GiB"
    return (
        f"{r.label} {r.image_size[0]}x{r.image_size[1]} on {r.device}: {r.ms_per_image_median:.1f} ms/image "
        f"(p90 {r.ms_per_image_p90:.1f}), {r.tflops_achieved:.1f} TFLOP/s{peak}"
    )


def markdown_table(rows: list[EngineTiming]) -> str:
    columns = [
        "backend",
        "attention",
        "device",
        "precision",
        "batch",
        "size",
        "ms/image (median)",
        "p90",
        "images/s",
        "TFLOP/s",
        "peak GiB",
        "stages per decode (ms)",
    ]
    cells = []
    for r in rows:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r.stages_ms.items() if k != "total")
        peak = "-" if r.peak_memory_bytes is None else f"{r.peak_memory_bytes / 2**30:.2f}"
        cells.append(
            [
                r.backend,
                r.attention,
                r.device,
                r.precision,
                r.batch,
                f"{r.image_size[0]}x{r.image_size[1]}",
                f"{r.ms_per_image_median:.1f}",
                f"{r.ms_per_image_p90:.1f}",
                f"{r.images_per_s:.2f}",
                f"{r.tflops_achieved:.3f}",
                peak,
                stages,
            ]
        )
    return report.markdown_table(columns, cells)


def write_engine_report(
    out_dir: Path, rows: list[EngineTiming], *, with_plots: bool = True, command: str | None = None
) -> list[Path]:
    """engine.json, engine.md and (with plots) throughput_vs_batch.png, stages.png; returns the paths."""
    written = [
        report.write_report(
            out_dir, "engine", [asdict(r) for r in rows], markdown_table(rows), command=command
        )
    ]
    written.append(out_dir / "engine.md")
    if with_plots:
        series: dict[str, list[tuple[int, float]]] = {}
        for r in rows:
            name = f"{r.config} {r.device} {r.image_size[0]}x{r.image_size[1]}"
            series.setdefault(name, []).append((r.batch, r.images_per_s))
        written.append(
            plots.throughput_vs_batch(series, out_dir / "throughput_vs_batch.png", title="engine throughput")
        )
        bars = {r.label: {k: v / r.batch for k, v in r.stages_ms.items() if k != "total"} for r in rows}
        written.append(
            plots.stage_breakdown(
                bars, out_dir / "stages.png", title="where one image's time goes", unit="ms per image"
            )
        )
    return written
