"""`pidserve bench http`: load a decode server over HTTP and report what a client sees.

    start a server on loopback (or take --url, loopback only)
    -> for each output format, for each load level (a concurrency, or an offered request rate):
         a few unrecorded warm-up requests, then up to `requests` requests within `max_seconds`
         through pidserve.client.AsyncClient: end-to-end latency, status, Server-Timing, X-Batch-Size
       and the server's pidserve_batch_size histogram scraped from /metrics before and after
    -> per level: p50/p90/p99 latency, images/s, mean engine batch, server-side breakdown

Closed loop ("concurrency"): that many clients, each sending its next request when the last returns.
Open loop ("rate"): requests arrive as a Poisson process at the offered rate whatever the server does,
so queueing shows up in the latency. Both stop at `requests` or `max_seconds`, whichever comes first;
each request also carries a server deadline of `max_seconds`, so a level never outlives ~2x its bound.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from pidserve.client import AsyncClient, ServerError

from . import plots, report
from .stats import Summary, rate, ratio

log = logging.getLogger(__name__)

STATUS_TRANSPORT_ERROR = 0  # connection refused/reset, HTTP timeout: no status line came back


class NotLoopback(ValueError):
    """The harness only loads servers on this machine."""


def require_loopback(url: str) -> None:
    """Refuse any URL whose host resolves to an address that is not loopback."""
    host = urlsplit(url).hostname
    if not host:
        raise NotLoopback(f"{url!r} has no host; give e.g. http://127.0.0.1:8000")
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise NotLoopback(f"cannot resolve {host!r}: {exc}") from None
    remote = sorted(a for a in addresses if not ipaddress.ip_address(a.split("%")[0]).is_loopback)
    if remote:
        raise NotLoopback(
            f"bench http only loads servers on loopback; {host} resolves to {', '.join(remote)}. "
            "Run the harness on the serving machine against http://127.0.0.1:PORT."
        )


# ---- a server started by the harness -----------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def local_server(serve_args: list[str], log_path: Path, ready_timeout_s: float = 600.0) -> Iterator[str]:
    """`pidserve serve` on 127.0.0.1 in a subprocess; yields its URL once /v2/health/ready answers 200."""
    with local_server_process(serve_args, log_path, ready_timeout_s) as (url, _):
        yield url


@contextmanager
def local_server_process(
    serve_args: list[str], log_path: Path, ready_timeout_s: float = 600.0
) -> Iterator[tuple[str, subprocess.Popen]]:
    """local_server, yielding the process too (bench soak samples its memory).

    Its log goes to `log_path`. On exit it gets SIGTERM (a graceful drain), then SIGKILL after 30 s.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "pidserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log_file:
        process = subprocess.Popen([*command, *serve_args], stdout=log_file, stderr=subprocess.STDOUT)
        try:
            _wait_ready(url, process, log_path, ready_timeout_s)
            yield url, process
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextmanager
def random_weights_checkpoint(preset: str, directory: Path, precision: str) -> Iterator[Path]:
    """A checkpoint of `preset` with random weights (seed 0) for a started server, deleted afterwards.

    Serving speed does not depend on the weights, so a 2k model can be load-tested at its real sizes
    without its released checkpoint. Stored in BF16 unless the server runs fp32 (a 2k model is 2.8 GB
    in BF16). The server itself never invents weights: it loads this file like any other.
    """
    import torch

    from pidserve.model import PiDConfig, PiDNet, save_checkpoint

    torch.manual_seed(0)
    net = PiDNet(PiDConfig.preset(preset)).eval()
    path = directory / f"random-{preset}.safetensors"
    save_checkpoint(net, path, dtype=torch.float32 if precision == "fp32" else torch.bfloat16)
    del net
    log.info("wrote random weights of %s to %s (deleted after the run)", preset, path)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _wait_ready(url: str, process: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with tqdm(desc="starting server", unit="s", bar_format="{desc}: {elapsed}") as bar:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the server exited with status {process.returncode}; its log:\n{tail}")
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
            bar.update()
    raise TimeoutError(f"the server at {url} was not ready after {timeout_s:.0f} s; see {log_path}")


# ---- one load level ----------------------------------------------------------------------------------
@dataclass
class RequestRecord:
    start: float  # perf_counter seconds
    end: float
    status: int  # HTTP status; 0: transport error (no response)
    images: int = 0
    response_bytes: int = 0
    server_ms: dict[str, float] = field(default_factory=dict)  # Server-Timing
    batch_size: int = 0  # the engine batch the latent ran in (X-Batch-Size)

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass
class LoadLevel:
    """What a client saw at one load level."""

    format: str
    mode: str  # "concurrency" | "rate"
    load: float  # clients, or offered requests per second
    sent: int
    ok: int
    errors: dict[str, int]  # HTTP status (or "transport") -> count
    duration_s: float
    images_per_s: float
    latency_ms: Summary | None  # successful requests only
    server_ms: dict[str, float]  # median per Server-Timing entry (queue, compute, encode, total)
    mean_batch_per_request: float  # mean of X-Batch-Size: the batch a request's latent shared
    mean_engine_batch: float | None  # from /metrics: latents per engine call during this level
    mean_response_bytes: float

    @classmethod
    def from_records(
        cls, fmt: str, mode: str, load: float, records: list[RequestRecord], engine_batch: float | None
    ) -> LoadLevel:
        good = [r for r in records if r.ok]
        errors = Counter(
            "transport" if r.status == STATUS_TRANSPORT_ERROR else str(r.status) for r in records if not r.ok
        )
        names = sorted({name for r in good for name in r.server_ms})
        start = min((r.start for r in records), default=0.0)
        end = max((r.end for r in records), default=0.0)
        return cls(
            format=fmt,
            mode=mode,
            load=load,
            sent=len(records),
            ok=len(good),
            errors=dict(errors),
            duration_s=end - start,
            images_per_s=rate(sum(r.images for r in good), start, end),
            latency_ms=Summary.of([(r.end - r.start) * 1e3 for r in good]) if good else None,
            server_ms={n: statistics.median(r.server_ms[n] for r in good if n in r.server_ms) for n in names},
            mean_batch_per_request=statistics.fmean(r.batch_size for r in good) if good else 0.0,
            mean_engine_batch=engine_batch,
            mean_response_bytes=statistics.fmean(r.response_bytes for r in good) if good else 0.0,
        )


async def _one_request(
    client: AsyncClient, latent: np.ndarray, fmt: str, seed: int, deadline_s: float
) -> RequestRecord:
    start = time.perf_counter()
    try:
        result = await client.decode(latent, seed=seed, format=fmt, timeout=deadline_s)
    except ServerError as exc:
        return RequestRecord(start, time.perf_counter(), exc.status)
    except httpx.HTTPError:
        return RequestRecord(start, time.perf_counter(), STATUS_TRANSPORT_ERROR)
    return RequestRecord(
        start,
        time.perf_counter(),
        200,
        images=1,
        response_bytes=len(result.content),
        server_ms=result.timings_ms,
        batch_size=result.batch_sizes[0] if result.batch_sizes else 0,
    )


async def closed_loop(
    client: AsyncClient,
    latent: np.ndarray,
    fmt: str,
    concurrency: int,
    requests: int,
    max_seconds: float,
    progress: tqdm | None = None,
) -> list[RequestRecord]:
    """`concurrency` clients in a loop until `requests` have been sent or `max_seconds` have passed."""
    records: list[RequestRecord] = []
    stop_at = time.perf_counter() + max_seconds
    issued = 0

    async def client_loop() -> None:
        nonlocal issued
        while issued < requests and time.perf_counter() < stop_at:
            seed = issued
            issued += 1
            records.append(await _one_request(client, latent, fmt, seed, max_seconds))
            if progress is not None:
                progress.update()

    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return records


def poisson_arrivals(rate_per_s: float, count: int, seed: int = 0) -> list[float]:
    """Arrival offsets (seconds from the start) of a Poisson process at `rate_per_s`."""
    if rate_per_s <= 0:
        raise ValueError(f"request rate must be > 0, got {rate_per_s}")
    draw = random.Random(seed)
    times, now = [], 0.0
    for _ in range(count):
        now += draw.expovariate(rate_per_s)
        times.append(now)
    return times


async def open_loop(
    client: AsyncClient,
    latent: np.ndarray,
    fmt: str,
    rate_per_s: float,
    requests: int,
    max_seconds: float,
    progress: tqdm | None = None,
) -> list[RequestRecord]:
    """Requests at Poisson arrival times until `requests` or `max_seconds`; then waits for the answers."""
    start = time.perf_counter()
    tasks = []

    async def tracked(seed: int) -> RequestRecord:
        record = await _one_request(client, latent, fmt, seed, max_seconds)
        if progress is not None:
            progress.update()
        return record

    for seed, offset in enumerate(poisson_arrivals(rate_per_s, requests)):
        if offset > max_seconds:
            break
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        tasks.append(asyncio.create_task(tracked(seed)))
    return list(await asyncio.gather(*tasks))


# ---- the sweep -------------------------------------------------------------------------------------
async def _engine_batch_totals(http: httpx.AsyncClient) -> tuple[float, float] | None:
    """(sum, count) of the server's pidserve_batch_size histogram; None if /metrics is unavailable."""
    try:
        response = await http.get("/metrics")
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    totals = {}
    for family in text_string_to_metric_families(response.text):
        if family.name == "pidserve_batch_size":
            for sample in family.samples:
                totals[sample.name] = sample.value
    if "pidserve_batch_size_sum" not in totals or "pidserve_batch_size_count" not in totals:
        return None
    return totals["pidserve_batch_size_sum"], totals["pidserve_batch_size_count"]


@dataclass
class HttpPlan:
    formats: list[str]
    mode: str  # "concurrency" | "rate"
    loads: list[float]  # concurrencies, or requests per second
    requests: int = 32  # per level
    max_seconds: float = 60.0  # per level
    warmup: int = 2  # unrecorded requests before each level
    image_size: tuple[int, int] = (256, 256)

    def validate(self) -> None:
        if self.mode not in ("concurrency", "rate"):
            raise ValueError(f"mode must be 'concurrency' or 'rate', got {self.mode!r}")
        if not self.formats or not self.loads:
            raise ValueError("give at least one format and one load level")
        if self.mode == "concurrency" and any(c < 1 or c != int(c) for c in self.loads):
            raise ValueError(f"concurrency levels must be whole numbers >= 1, got {self.loads}")
        if any(load <= 0 for load in self.loads):
            raise ValueError(f"load levels must be > 0, got {self.loads}")
        if self.requests < 1 or self.max_seconds <= 0:
            raise ValueError("requests must be >= 1 and max_seconds > 0")


async def run_sweep(url: str, plan: HttpPlan, api_key: str | None = None) -> tuple[dict, list[LoadLevel]]:
    """Every format at every load level against `url`; returns (the served model's info, levels)."""
    require_loopback(url)
    plan.validate()
    levels: list[LoadLevel] = []
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with (
        AsyncClient(url, api_key=api_key, timeout=plan.max_seconds + 30) as client,
        httpx.AsyncClient(base_url=url, headers=headers, timeout=10) as http,
    ):
        models = await client.models()
        model = models["models"][0]
        if model.get("state") != "ready":
            raise RuntimeError(f"the server's model is not ready (state {model.get('state')!r})")
        scale = model["output_scale"]
        height, width = plan.image_size
        if height % scale or width % scale:
            raise ValueError(f"output size {height}x{width} is not a multiple of the model's scale {scale}")
        latent = np.random.default_rng(0).standard_normal(
            (model["latent_channels"], height // scale, width // scale), dtype=np.float32
        )
        total = len(plan.formats) * len(plan.loads) * plan.requests
        with tqdm(total=total, desc="requests", unit="req") as bar:
            for fmt in plan.formats:
                for load in plan.loads:
                    bar.set_postfix_str(f"{fmt} {plan.mode} {load:g}")
                    for seed in range(plan.warmup):
                        record = await _one_request(client, latent, fmt, seed, plan.max_seconds)
                        if not record.ok:
                            raise RuntimeError(
                                f"warm-up request for {fmt} failed with status {record.status}"
                            )
                    before = await _engine_batch_totals(http)
                    if plan.mode == "concurrency":
                        records = await closed_loop(
                            client, latent, fmt, int(load), plan.requests, plan.max_seconds, bar
                        )
                    else:
                        records = await open_loop(
                            client, latent, fmt, load, plan.requests, plan.max_seconds, bar
                        )
                    after = await _engine_batch_totals(http)
                    engine_batch = None
                    if before and after and after[1] > before[1]:
                        engine_batch = (after[0] - before[0]) / (after[1] - before[1])
                    levels.append(LoadLevel.from_records(fmt, plan.mode, load, records, engine_batch))
    return model, levels


# ---- the report -------------------------------------------------------------------------------------
def findings(levels: list[LoadLevel], engine_baseline_ms: float | None) -> dict[str, float]:
    """The figures the issue asks for, computed from one run (absent when the run lacks the levels)."""
    out: dict[str, float] = {}
    by_key = {(lv.format, lv.load): lv for lv in levels if lv.latency_ms is not None}
    for fmt in sorted({lv.format for lv in levels}):
        loads = sorted(load for f, load in by_key if f == fmt)
        if not loads:
            continue
        lowest, highest = by_key[(fmt, loads[0])], by_key[(fmt, loads[-1])]
        if lowest.latency_ms and "compute" in lowest.server_ms:
            out[f"{fmt}_latency_over_server_compute_at_{lowest.load:g}"] = ratio(
                lowest.latency_ms.median, lowest.server_ms["compute"]
            )
        if engine_baseline_ms and lowest.latency_ms:
            out[f"{fmt}_latency_over_engine_at_{lowest.load:g}"] = ratio(
                lowest.latency_ms.median, engine_baseline_ms
            )
        if highest is not lowest:
            out[f"{fmt}_images_per_s_gain_{highest.load:g}_over_{lowest.load:g}"] = ratio(
                highest.images_per_s, lowest.images_per_s
            )
    return out


def markdown_table(levels: list[LoadLevel]) -> str:
    columns = [
        "format",
        levels[0].mode if levels else "load",
        "ok/sent",
        "errors",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "images/s",
        "engine batch",
        "server queue / compute / encode (median ms)",
        "KB/response",
    ]
    rows = []
    for lv in levels:
        lat = lv.latency_ms
        s = lv.server_ms
        rows.append(
            [
                lv.format,
                f"{lv.load:g}",
                f"{lv.ok}/{lv.sent}",
                ", ".join(f"{k}: {v}" for k, v in lv.errors.items()) or "-",
                f"{lat.median:.1f}" if lat else "-",
                f"{lat.p90:.1f}" if lat else "-",
                f"{lat.p99:.1f}" if lat else "-",
                f"{lv.images_per_s:.2f}",
                "-" if lv.mean_engine_batch is None else f"{lv.mean_engine_batch:.2f}",
                " / ".join(f"{s[k]:.1f}" if k in s else "-" for k in ("queue", "compute", "encode")),
                f"{lv.mean_response_bytes / 1e3:.1f}",
            ]
        )
    return report.markdown_table(columns, rows)


def write_http_report(
    out_dir: Path,
    model: dict,
    plan: HttpPlan,
    levels: list[LoadLevel],
    engine_baselines_ms: list[float],
    *,
    with_plots: bool = True,
    command: str | None = None,
) -> list[Path]:
    """engine_baselines_ms: the engine alone, timed before and after the sweep (empty: not timed)."""
    engine_baseline_ms = statistics.fmean(engine_baselines_ms) if engine_baselines_ms else None
    found = findings(levels, engine_baseline_ms)
    results = {
        "model": model,
        "plan": asdict(plan),
        "engine_baseline_ms_per_image": engine_baseline_ms,
        "engine_baseline_runs_ms": engine_baselines_ms,
        "findings": found,
        "levels": [asdict(lv) for lv in levels],
    }
    lines = [markdown_table(levels), ""]
    if engine_baselines_ms:
        runs = " and ".join(f"{ms:.1f}" for ms in engine_baselines_ms)
        lines.append(
            f"Engine alone (harness process, batch 1, before and after the sweep): {runs} ms per image; "
            f"mean {engine_baseline_ms:.1f}."
        )
    lines += [f"- {name}: {value:.2f}" for name, value in found.items()]
    written = [
        report.write_report(out_dir, "http", results, "\n".join(lines), command=command),
        out_dir / "http.md",
    ]
    if with_plots:
        series = {
            fmt: [
                {
                    "x": lv.load,
                    "p50": lv.latency_ms.median,
                    "p90": lv.latency_ms.p90,
                    "p99": lv.latency_ms.p99,
                    "images_per_s": lv.images_per_s,
                }
                for lv in levels
                if lv.format == fmt and lv.latency_ms is not None
            ]
            for fmt in plan.formats
        }
        x_label = "concurrent clients" if plan.mode == "concurrency" else "offered requests / s"
        height, width = plan.image_size
        title = f"{model.get('name')} on {model.get('backend')} ({model.get('device')}), {height}x{width}"
        written.append(
            plots.latency_vs_load(series, out_dir / "latency_vs_load.png", x_label=x_label, title=title)
        )
    return written
