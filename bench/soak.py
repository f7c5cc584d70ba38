"""`pidserve bench soak`: the service under mixed traffic for minutes, then the ledger.

    local_server_process (`pidserve serve` in a subprocess; its RSS is sampled from /proc)
      good clients          decode a small latent in a loop; 429/503 are retried after Retry-After
      bad clients           malformed bodies in a loop (BAD_BODIES); each must get its 4xx
      slow clients          a good request trickled in small chunks; must still get 200
      disconnecting clients send half a body, then close; the server must count a 499
    -> SoakReport: what every client saw, the server's own counts (pidserve_requests_total before and
       after), and the verdict: no good request lost, no 5xx, the counts agreeing, memory flat.

Nothing here asserts a speed: the report records how many requests of each kind ran.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

from pidserve.client import AsyncClient, ServerError

from .report import markdown_table

DECODE = "/v1/decode"
ST = "application/x-safetensors"


def _safetensors(latent: np.ndarray) -> bytes:
    from safetensors.numpy import save

    return save({"latent": latent})


def _npy_header_only(shape: tuple[int, ...]) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return out.getvalue()


# Malformed requests the bad clients cycle through: (path, content type, body, extra headers).
BAD_BODIES: list[tuple[str, str, bytes, dict[str, str]]] = [
    (DECODE, ST, b"", {}),
    (DECODE, "text/plain", b"hello", {}),
    (DECODE, "application/json", b"{nope", {}),
    (DECODE, "application/json", b'{"latent": ' + b"[" * 1000 + b"]" * 1000 + b"}", {}),
    (DECODE, "application/json", b'{"latent": [[[0.0]]], "seed": ' + b"9" * 5000 + b"}", {}),
    (DECODE, "application/x-npy", _npy_header_only((1, 16, 2**16, 2**16)) + b"\0" * 64, {}),
    (DECODE, ST, _safetensors(np.zeros((1, 4, 2, 2), np.float32)), {}),
    (DECODE, ST, _safetensors(np.full((1, 16, 2, 2), np.nan, np.float32)), {}),
    ("/v2/models/pid-tiny/infer", "application/json", b'{"inputs": 5}', {}),
    (
        "/v2/models/pid-tiny/infer",
        "application/json",
        b'{"inputs": []}',
        {"Inference-Header-Content-Length": "x"},
    ),
]


@dataclass
class SoakPlan:
    duration_s: float = 180.0
    good_clients: int = 4
    bad_clients: int = 2
    slow_clients: int = 1
    disconnecting_clients: int = 1
    latent_size: int = 4  # tiny-ae latent side: 4 -> 128x128 images
    memory_sample_s: float = 2.0


@dataclass
class SoakReport:
    plan: dict
    seen: dict[str, dict[str, int]]  # client kind -> status -> count ("transport": no response)
    server: dict[str, dict[str, int]]  # route -> status -> count, from pidserve_requests_total
    retried: int  # good requests retried after 429/503
    lost_good: int  # good requests that never got their image
    rss_mb: list[float] = field(default_factory=list)  # the server's resident memory over the run
    problems: list[str] = field(default_factory=list)  # empty: the verdict is a pass

    @property
    def passed(self) -> bool:
        return not self.problems


async def run_soak(url: str, pid: int, plan: SoakPlan) -> SoakReport:
    """Drive the server at `url` (process `pid`) with the plan's clients; returns the ledger."""
    seen: dict[str, Counter] = {kind: Counter() for kind in ("good", "bad", "slow", "disconnecting")}
    routes_seen: Counter = Counter()  # (route, status) as the clients saw them
    rss: list[float] = []
    retried = lost = 0
    before = await _server_counts(url)
    stop_at = time.monotonic() + plan.duration_s
    latent = (
        np.random.default_rng(0)
        .standard_normal((1, 16, plan.latent_size, plan.latent_size))
        .astype(np.float32)
    )
    host, port = url.removeprefix("http://").split(":")

    async def good(index: int) -> None:
        nonlocal retried, lost
        async with AsyncClient(url, timeout=120) as client:
            seed = index * 1_000_000
            while time.monotonic() < stop_at:
                seed += 1
                for _attempt in range(20):
                    try:
                        result = await client.decode(latent, seed=seed, format="raw")
                    except ServerError as exc:
                        seen["good"][str(exc.status)] += 1
                        routes_seen[(DECODE, str(exc.status))] += 1
                        if exc.status in (429, 503):
                            retried += 1
                            await asyncio.sleep(exc.retry_after or 1)
                            continue
                        lost += 1
                        break
                    except httpx.HTTPError:
                        seen["good"]["transport"] += 1
                        lost += 1
                        break
                    size = plan.latent_size * 32
                    ok = result.images().shape == (1, size, size, 3)
                    seen["good"]["200" if ok else "wrong image"] += 1
                    routes_seen[(DECODE, "200")] += 1
                    lost += not ok
                    break
                else:
                    lost += 1

    async def bad(index: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            turn = index
            while time.monotonic() < stop_at:
                path, content_type, body, headers = BAD_BODIES[turn % len(BAD_BODIES)]
                turn += 1
                response = await http.post(
                    path, content=body, headers={"Content-Type": content_type, **headers}
                )
                seen["bad"][str(response.status_code)] += 1
                route = DECODE if path == DECODE else "/v2/models/{name}/infer"
                routes_seen[(route, str(response.status_code))] += 1

    async def slow(_: int) -> None:
        body = _safetensors(latent)
        while time.monotonic() < stop_at:
            status = await _trickle(host, int(port), body, chunks=16, pause_s=0.1)
            seen["slow"][status] += 1
            routes_seen[(DECODE, status)] += 1

    async def disconnecting(_: int) -> None:
        body = _safetensors(latent)
        while time.monotonic() < stop_at:
            await _send_half_and_close(host, int(port), body)
            seen["disconnecting"]["closed mid-body"] += 1
            routes_seen[(DECODE, "499")] += 1
            await asyncio.sleep(0.2)

    async def memory() -> None:
        while time.monotonic() < stop_at:
            rss.append(_rss_mb(pid))
            await asyncio.sleep(plan.memory_sample_s)
        rss.append(_rss_mb(pid))

    tasks = [good(i) for i in range(plan.good_clients)]
    tasks += [bad(i) for i in range(plan.bad_clients)]
    tasks += [slow(i) for i in range(plan.slow_clients)]
    tasks += [disconnecting(i) for i in range(plan.disconnecting_clients)]
    await asyncio.gather(memory(), *tasks)
    await asyncio.sleep(1.0)  # let the server log the last disconnects
    after = await _server_counts(url)
    server = {
        route: {
            status: after[route][status] - before.get(route, {}).get(status, 0) for status in after[route]
        }
        for route in after
    }
    server = {route: {s: n for s, n in counts.items() if n} for route, counts in server.items()}
    report = SoakReport(
        plan=asdict(plan),
        seen={kind: dict(counts) for kind, counts in seen.items()},
        server=server,
        retried=retried,
        lost_good=lost,
        rss_mb=rss,
    )
    report.problems = _verdict(report, routes_seen)
    return report


def _verdict(report: SoakReport, routes_seen: Counter) -> list[str]:
    problems = []
    if report.lost_good:
        problems.append(f"{report.lost_good} good requests never got their image")
    for kind, counts in report.seen.items():
        errors = {
            s: n for s, n in counts.items() if s.startswith("5") and not (kind == "good" and s == "503")
        }
        if errors:
            problems.append(f"{kind} clients saw server errors {errors}")
    bad_ok = {s: n for s, n in report.seen["bad"].items() if not s.startswith("4")}
    if bad_ok:
        problems.append(f"malformed requests were not refused with 4xx: {bad_ok}")
    served = {(route, status): n for route, counts in report.server.items() for status, n in counts.items()}
    served = {key: n for key, n in served.items() if key[0] in (DECODE, "/v2/models/{name}/infer")}
    if served != dict(routes_seen):
        problems.append(f"the server counted {served}, the clients saw {dict(routes_seen)}")
    if len(report.rss_mb) >= 4:
        settled, last = report.rss_mb[len(report.rss_mb) // 4], report.rss_mb[-1]
        if last > settled * 1.2 + 50:
            problems.append(f"server memory grew from {settled:.0f} MB to {last:.0f} MB")
    return problems


async def _server_counts(url: str) -> dict[str, dict[str, int]]:
    """pidserve_requests_total as {route: {status: count}}."""
    from prometheus_client.parser import text_string_to_metric_families

    async with httpx.AsyncClient(timeout=30) as http:
        text = (await http.get(f"{url}/metrics")).text
    counts: dict[str, dict[str, int]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "pidserve_requests_total":
                route, status = sample.labels["route"], sample.labels["status"]
                counts.setdefault(route, {})[status] = int(sample.value)
    return counts


def _request_head(length: int) -> bytes:
    return (
        f"POST {DECODE}?format=raw HTTP/1.1\r\nHost: soak\r\nContent-Type: {ST}\r\n"
        f"Content-Length: {length}\r\nConnection: close\r\n\r\n"
    ).encode()


async def _trickle(host: str, port: int, body: bytes, chunks: int, pause_s: float) -> str:
    """A good request sent in `chunks` pieces `pause_s` apart; the response's status."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(_request_head(len(body)))
        step = -(-len(body) // chunks)
        for start in range(0, len(body), step):
            writer.write(body[start : start + step])
            await writer.drain()
            await asyncio.sleep(pause_s)
        status_line = await asyncio.wait_for(reader.readline(), timeout=120)
        await reader.read()  # the rest, until the server closes (Connection: close)
        parts = status_line.split()
        return parts[1].decode() if len(parts) > 1 else "transport"
    finally:
        writer.close()


async def _send_half_and_close(host: str, port: int, body: bytes) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(_request_head(len(body)) + body[: len(body) // 2])
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.transport.abort()  # a reset, as a client that crashed or lost its network would leave
    del reader


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def soak_table(report: SoakReport) -> str:
    rows = [
        [kind, sum(counts.values()), json.dumps(counts, sort_keys=True)]
        for kind, counts in report.seen.items()
    ]
    rss = report.rss_mb
    memory = f"{rss[len(rss) // 4]:.0f} -> {rss[-1]:.0f} MB" if len(rss) >= 4 else "n/a"
    verdict = "PASS" if report.passed else "FAIL: " + "; ".join(report.problems)
    return (
        markdown_table(["clients", "requests", "statuses seen"], rows)
        + f"\n\ngood requests retried after 429/503: {report.retried}; lost: {report.lost_good}; "
        + f"server RSS (after the first quarter -> end): {memory}\n\n"
        + f"server's pidserve_requests_total deltas: `{json.dumps(report.server, sort_keys=True)}`\n\n"
        + f"verdict: {verdict}"
    )


def run_soak_bench(
    plan: SoakPlan, out_dir: Path, serve_args: list[str], command: str | None = None
) -> SoakReport:
    """`pidserve serve SERVE_ARGS` on loopback, the soak against it, the report in `out_dir`."""
    from .http_load import local_server_process
    from .report import write_report

    with local_server_process(serve_args, out_dir / "soak-server.log") as (url, process):
        report = asyncio.run(run_soak(url, process.pid, plan))
    write_report(
        out_dir, "soak", {**asdict(report), "passed": report.passed}, soak_table(report), command=command
    )
    return report
