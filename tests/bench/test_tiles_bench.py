"""`pidserve bench tiles` (bench/tiles.py): untiled and tiled rows per size, with windows, FLOPs and
peak memory, and its report files."""

from __future__ import annotations

import json
import mmap
from pathlib import Path

from typer.testing import CliRunner

from pidserve.bench import bench_tiles, tiles_table
from pidserve.bench.memory import PeakMemory
from pidserve.cli import app
from pidserve.model import PiDConfig, PiDNet, Tiling, decode_flops


def test_bench_tiles_measures_untiled_and_tiled_side_by_side() -> None:
    net = PiDNet(PiDConfig.preset("tiny_v1.5")).eval()  # trained size 128x128, 64-px latent grid
    rows = bench_tiles(net, [(128, 128), (256, 256)], Tiling.parse("128x128:64"), repeat=1, warmup=0)
    assert [(r.size, r.tiling, r.windows) for r in rows] == [
        ((128, 128), "off", 1),
        ((128, 128), "128x128:64", 1),  # fits in one window: decoded untiled
        ((256, 256), "off", 1),
        ((256, 256), "128x128:64", 9),
    ]
    window = decode_flops(net.cfg, 128, 128, steps=4, text_len=0).total
    assert rows[1].flops == rows[0].flops == window and rows[3].flops == 9 * window
    assert all(r.ms_median > 0 and r.peak_memory_bytes is not None for r in rows)
    assert "| 256x256 | 128x128:64 | crop | 9 |" in tiles_table(rows)  # FLUX.2 latents: no correction


def test_bench_tiles_times_each_window_latents_mode_side_by_side() -> None:
    net = PiDNet(PiDConfig.preset("pid-tiny")).eval()  # tiny-ae latents: correctable
    rows = bench_tiles(
        net,
        [(512, 512)],
        Tiling(),
        repeat=1,
        warmup=0,
        untiled_up_to=256,
        window_latents=("crop", "corrected"),
    )
    assert [(r.tiling, r.window_latents, r.windows) for r in rows] == [
        ("auto", "crop", 9),
        ("auto", "corrected", 9),
    ]
    assert rows[0].flops == rows[1].flops  # the FLOP counts are the network's; the correction is not in them


def test_bench_tiles_decodes_only_tiled_above_untiled_up_to() -> None:
    net = PiDNet(PiDConfig.preset("tiny_v1.5")).eval()
    sizes = [(128, 128), (256, 256)]
    rows = bench_tiles(net, sizes, Tiling.parse("128x128:64"), repeat=1, warmup=0, untiled_up_to=128)
    assert [(r.size, r.tiling) for r in rows] == [
        ((128, 128), "off"),
        ((128, 128), "128x128:64"),
        ((256, 256), "128x128:64"),  # no untiled row above 128 px
    ]


def test_peak_memory_sees_an_allocation_between_start_and_stop() -> None:
    memory = PeakMemory("cpu")
    memory.start()
    # a fresh anonymous mapping: memory the allocator freed earlier in this process (still resident)
    # would be reused without raising the resident set
    block = mmap.mmap(-1, 64 * 2**20)
    for offset in range(0, len(block), 4096):
        block[offset] = 1
    peak = memory.stop()
    del block
    assert peak is not None and peak >= 60 * 2**20


def test_the_bench_tiles_command_writes_its_report(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["bench", "tiles", "--preset", "tiny_v1", "--sizes", "128x128", "--tile", "64x64",
         "--repeat", "1", "--warmup", "0", "--out", str(tmp_path)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "tiles.json").read_text())["results"]
    assert [r["windows"] for r in rows] == [1, 4]
    bad = CliRunner().invoke(app, ["bench", "tiles", "--preset", "tiny_v1", "--tile", "big"])
    assert bad.exit_code != 0 and "--tile" in bad.output
