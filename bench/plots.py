"""PNG plots for the benchmark reports: readable at a glance, one question per figure.

    latency_vs_load     p50/p90/p99 latency and images/s against concurrency (or offered rate)
    throughput_vs_batch images/s against batch size, one line per configuration
    stage_breakdown     where the time of one image goes, one stacked bar per configuration

matplotlib is the `bench` extra (`pip install 'pidserve[bench]'`); without it, asking for plots fails
with that instruction rather than skipping them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


class PlotsUnavailable(RuntimeError):
    """matplotlib is not installed."""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise PlotsUnavailable(
            "plots need matplotlib: pip install 'pidserve[bench]' (or pass --no-plots)"
        ) from None
    matplotlib.use("Agg")  # files only; never opens a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def latency_vs_load(
    series: Mapping[str, Sequence[Mapping[str, float]]], path: Path, *, x_label: str, title: str
) -> Path:
    """series: name -> points with keys x, p50, p90, p99 (ms) and images_per_s."""
    plt = _pyplot()
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(11, 4.2))
    for index, (name, points) in enumerate(series.items()):
        color = f"C{index}"
        xs = [p["x"] for p in points]
        for key, style in (("p50", "-o"), ("p90", "--s"), ("p99", ":^")):
            lat.plot(xs, [p[key] for p in points], style, color=color, label=f"{name} {key}")
        thr.plot(xs, [p["images_per_s"] for p in points], "-o", color=color, label=name)
    lat.set(xlabel=x_label, ylabel="end-to-end latency (ms)", title="latency")
    thr.set(xlabel=x_label, ylabel="images / s", title="throughput")
    levels = sorted({p["x"] for points in series.values() for p in points})
    for axis in (lat, thr):
        axis.set_xscale("log", base=2)  # load levels usually double: 1, 2, 4, 8
        axis.set_xticks(levels, [f"{x:g}" for x in levels])
        axis.minorticks_off()
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
        axis.set_ylim(bottom=0)
    fig.suptitle(title)
    return _save(fig, path)


def throughput_vs_batch(series: Mapping[str, Sequence[tuple[int, float]]], path: Path, *, title: str) -> Path:
    """series: name -> [(batch size, images/s)]."""
    plt = _pyplot()
    fig, axis = plt.subplots(figsize=(6.5, 4.2))
    for name, points in series.items():
        ordered = sorted(points)
        axis.plot([b for b, _ in ordered], [r for _, r in ordered], "-o", label=name)
    axis.set(xlabel="batch size", ylabel="images / s", title=title)
    axis.set_xticks(sorted({b for points in series.values() for b, _ in points}))
    axis.set_ylim(bottom=0)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return _save(fig, path)


def stage_breakdown(bars: Mapping[str, Mapping[str, float]], path: Path, *, title: str, unit: str) -> Path:
    """bars: configuration -> {stage: duration}; one horizontal stacked bar per configuration."""
    plt = _pyplot()
    stages: list[str] = []
    for parts in bars.values():
        stages += [s for s in parts if s not in stages]
    fig, axis = plt.subplots(figsize=(9, 0.5 * len(bars) + 2.0))
    names = list(bars)
    left = [0.0] * len(names)
    for index, stage in enumerate(stages):
        widths = [bars[name].get(stage, 0.0) for name in names]
        axis.barh(names, widths, left=left, color=f"C{index % 10}", label=stage)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    axis.invert_yaxis()  # first configuration on top, like the table
    axis.set(xlabel=unit, title=title)
    axis.grid(axis="x", alpha=0.3)
    axis.legend(fontsize=7, ncols=min(len(stages), 6), loc="upper center", bbox_to_anchor=(0.5, -0.3))
    return _save(fig, path)
