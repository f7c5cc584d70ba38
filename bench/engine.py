"""`pidserve bench engine`: ms per image of engines, side by side in one run.

Each configuration is warmed up first (compilation, graph capture, allocator), then timed over
`repeat` decodes: median and p90 wall time per image, the engine's own stage breakdown, and
achieved TFLOP/s against the model's analytic FLOP count.
"""

from __future__ import annotations

import logging
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pidserve.engines import DecodeBatch, Engine
from pidserve.model import PiDConfig
from pidserve.model.flops import decode_flops

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
    stages_ms: dict[str, float] = field(default_factory=dict)  # median per decode
    tflops_achieved: float = 0.0
    peak_memory_bytes: int | None = None


def percentile(values: list[float], q: float) -> float:
    """q-th percentile (0..100) with linear interpolation between order statistics."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def random_batch(
    cfg: PiDConfig, batch: int, image_size: tuple[int, int], steps: int, seed: int = 0
) -> DecodeBatch:
    scale = cfg.latent_downsample * cfg.sr_scale
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(
        batch, cfg.latent_channels, image_size[0] // scale, image_size[1] // scale, generator=g
    )
    return DecodeBatch(latents, torch.zeros(batch), torch.arange(batch, dtype=torch.int64), None, steps)


def time_engine(
    engine: Engine, cfg: PiDConfig, batch: DecodeBatch, warmup: int = 2, repeat: int = 10
) -> EngineTiming:
    """Warm up, then time `repeat` decodes of `batch` (wall clock around the whole decode)."""
    caps = engine.capabilities
    cuda = caps.device.startswith("cuda")
    for _ in range(warmup):
        engine.decode(batch)
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
    n = batch.size
    size = caps.image_size(batch.latents.shape[-2:])
    median = statistics.median(walls)
    flops = decode_flops(cfg, *size, steps=batch.steps, text_len=0, batch=n).total
    return EngineTiming(
        backend=caps.backend,
        device=caps.device,
        precision=caps.precision,
        batch=n,
        image_size=size,
        steps=batch.steps,
        repeat=repeat,
        ms_per_image_median=median * 1e3 / n,
        ms_per_image_p90=percentile(walls, 90) * 1e3 / n,
        stages_ms={k: statistics.median(v) * 1e3 for k, v in stages.items()},
        tflops_achieved=flops / median / 1e12,
        peak_memory_bytes=torch.cuda.max_memory_allocated() if cuda else None,
    )


def machine_description() -> dict[str, str]:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": str(torch.get_num_threads()),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
    }
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        )
        info["git_sha"] = sha.stdout.strip() or "unknown"
    except OSError:
        info["git_sha"] = "unknown"
    return info


def markdown_table(rows: list[EngineTiming]) -> str:
    columns = [
        "backend",
        "device",
        "precision",
        "batch",
        "size",
        "ms/image (median)",
        "p90",
        "TFLOP/s",
        "stages (ms)",
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r.stages_ms.items() if k != "total")
        lines.append(
            f"| {r.backend} | {r.device} | {r.precision} | {r.batch} | {r.image_size[0]}x{r.image_size[1]} | "
            f"{r.ms_per_image_median:.1f} | {r.ms_per_image_p90:.1f} | {r.tflops_achieved:.3f} | {stages} |"
        )
    return "\n".join(lines)


def as_dicts(rows: list[EngineTiming]) -> list[dict]:
    return [asdict(r) for r in rows]


def write_json(path: Path, rows: list[EngineTiming], command: str) -> None:
    import json
    from datetime import UTC, datetime

    report = {
        "command": command,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_description(),
        "results": as_dicts(rows),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
