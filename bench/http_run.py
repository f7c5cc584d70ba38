"""`pidserve bench http` start to finish: the server, the sweep, the engine baseline, the report.

    --url given:  run_sweep against it (loopback only)
    otherwise:    (a preset: write a checkpoint of random weights, deleted afterwards)
                  -> time the engine alone in this process      (the baseline, before ...)
                  -> `pidserve serve` on loopback -> run_sweep -> stop it
                  -> time the engine alone again                (... and after: they bracket the drift)
    -> write_http_report: http.json, http.md, latency_vs_load.png

The load itself (the levels, the records, the statistics) is in http_load.py.
Errors, for the caller to report:
    ValueError        a bad plan, --preset with a checkpoint or URL, a URL not on loopback (NotLoopback),
                      EngineConfigError, CheckpointError
    KeyError          an unknown preset
    RuntimeError      a server that exits or fails a warm-up; PlotsUnavailable (no matplotlib)
    OSError           a server never ready (TimeoutError), a missing file (FileNotFoundError)
    httpx.HTTPError   no server at `url`
"""

from __future__ import annotations

import asyncio
import gc
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from .engine import bench_engines
from .http_load import (
    HttpPlan,
    LoadLevel,
    local_server,
    random_weights_checkpoint,
    run_sweep,
    write_http_report,
)


@dataclass
class StartedServer:
    """The server bench http starts when it is given no URL: `pidserve serve` with these settings."""

    checkpoint: str = "default"  # or one of ours, or official with `variant`
    variant: str | None = None
    preset: str | None = None  # random weights of this preset instead of `checkpoint`
    backend: str = "torch"
    device: str = "cpu"
    precision: str = "fp32"
    max_batch: int = 8
    max_queue_delay_ms: float | None = None  # None: the server's default
    engine_baseline: bool = True  # also time the engine alone in this process, before and after

    def serve_args(
        self, checkpoint: str, image_size: tuple[int, int], api_key_file: Path | None
    ) -> list[str]:
        """The `pidserve serve` flags (host and port are local_server's)."""
        height, width = image_size
        args = ["--checkpoint", checkpoint, "--backend", self.backend, "--device", self.device]
        args += ["--precision", self.precision, "--max-batch", str(self.max_batch)]
        args += ["--image-size", f"{height}x{width}"]
        if self.variant:
            args += ["--variant", self.variant]
        if self.max_queue_delay_ms is not None:
            args += ["--max-queue-delay-ms", str(self.max_queue_delay_ms)]
        if api_key_file:
            args += ["--api-key-file", str(api_key_file)]
        return args


def run_http_bench(
    plan: HttpPlan,
    out_dir: Path,
    *,
    url: str | None = None,
    server: StartedServer | None = None,
    api_key_file: Path | None = None,
    with_plots: bool = True,
    command: str | None = None,
) -> list[Path]:
    """Load `url` (or a server started as `server` describes) with `plan`; the report files written.

    The second path is http.md, the report's Markdown table and findings.
    """
    plan.validate()
    server = server or StartedServer()
    if server.preset is not None and (url is not None or server.checkpoint != "default" or server.variant):
        raise ValueError(
            "--preset starts a server on random weights: leave out --url, --checkpoint and --variant"
        )
    api_key = api_key_file.read_text().strip() if api_key_file else None
    if url is not None:
        model, levels = asyncio.run(run_sweep(url, plan, api_key))
        baselines_ms: list[float] = []
    else:
        model, levels, baselines_ms = _sweep_started_server(plan, out_dir, server, api_key_file, api_key)
    return write_http_report(
        out_dir, model, plan, levels, baselines_ms, with_plots=with_plots, command=command
    )


def _sweep_started_server(
    plan: HttpPlan, out_dir: Path, server: StartedServer, api_key_file: Path | None, api_key: str | None
) -> tuple[dict, list[LoadLevel], list[float]]:
    """(the served model's info, the levels, the engine-alone baselines in ms per image)."""
    baselines_ms: list[float] = []
    random_weights = (
        random_weights_checkpoint(server.preset, out_dir, server.precision)
        if server.preset
        else nullcontext()
    )
    with random_weights as random_checkpoint:
        checkpoint = str(random_checkpoint) if random_checkpoint is not None else server.checkpoint
        if server.engine_baseline:  # before the server starts ...
            baselines_ms.append(_time_engine_alone(checkpoint, server, plan.image_size))
        serve_args = server.serve_args(checkpoint, plan.image_size, api_key_file)
        with local_server(serve_args, out_dir / "server.log") as started:
            model, levels = asyncio.run(run_sweep(started, plan, api_key))
        if server.engine_baseline:  # ... and after it stopped: the two bracket the machine's drift
            baselines_ms.append(_time_engine_alone(checkpoint, server, plan.image_size))
    if server.preset is not None:
        model = {**model, "weights": f"random ({server.preset})"}
    return model, levels, baselines_ms


def _time_engine_alone(checkpoint: str, server: StartedServer, image_size: tuple[int, int]) -> float:
    """ms per image at batch 1 in this process; the model is loaded afresh and released afterwards,
    so the server has the device to itself."""
    import torch

    from pidserve.model import load_decoder

    net = load_decoder(checkpoint, server.variant)
    timing = bench_engines(
        net, [server.backend], [1], image_size, device=server.device, precision=server.precision
    )[0]
    del net
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return timing.ms_per_image_median
