"""A bounded soak (bench/soak.py) against a live server: mixed good, bad, slow and disconnecting clients,
then zero lost good requests, no 5xx, and the server's request counts equal to what the clients saw.
(`pidserve bench soak` runs the same for minutes against a started server: bench/RESULTS.md.)"""

from __future__ import annotations

import asyncio
import os

from pidserve.bench import SoakPlan
from pidserve.bench.soak import run_soak

from .conftest import live_server


def test_a_short_soak_loses_nothing_and_the_counts_add_up() -> None:
    # A small queue, so that the good clients also meet 429s and retry.
    with live_server(max_queue_size=3, max_queue_delay_ms=5.0) as live:
        plan = SoakPlan(duration_s=12, good_clients=4, bad_clients=2, slow_clients=1, disconnecting_clients=1)
        report = asyncio.run(run_soak(live.url, os.getpid(), plan))
    assert report.passed, report.problems
    assert report.lost_good == 0
    assert report.seen["good"]["200"] > 0 and report.seen["slow"].get("200", 0) > 0
    assert sum(report.seen["bad"].values()) > 0 and report.server["/v1/decode"]["499"] > 0
