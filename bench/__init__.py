"""The benchmark harness behind `pidserve bench` (method: docs/benchmarks.md).

engine.py (engine timing), http_run.py + http_load.py (load against a server on loopback), soak.py
(a server under mixed hostile traffic), cascade.py
(PiD against decode+bicubic and decode+diffusion SR), codecs.py (output encoders), decoder_quality.py +
quality.py (image quality); stats.py, report.py and plots.py are shared by all of them.

Public API (other folders use exactly these names), by command; a module's `markdown_table` is
exported under its command's name (engine_table, ...):
    engine     EngineTiming, time_engine, bench_engines, engine_table, write_engine_report
    http       HttpPlan, StartedServer, run_http_bench
    soak       SoakPlan, SoakReport, run_soak_bench (mixed good, bad, slow, disconnecting clients)
    tiles      TileTiming, bench_tiles, tiles_table, write_tiles_report (time, memory vs output size)
    official   OfficialTiming, import_official_network, official_network, bench_official, official_table,
               write_official_report (the official PiD code against pidserve on the same weights)
    cascade    CascadeSetup, bench_cascade, add_quality, cascade_table, write_cascade_report
    kernels    KernelSetup, bench_kernels, kernels_table, write_kernels_report
    codecs     time_codecs, time_server_pool, codecs_table, codec_dicts
    quality    QualitySetup, evaluate_decoders, quality_table, write_quality_report, x0_error_by_t,
               x0_table
    window_latents  window_latent_cast, window_latent_table (is a tiled cast the blend's or the latents'?)
    reports    command_line, write_report, PlotsUnavailable
"""

from .cascade import CascadeSetup, add_quality, bench_cascade, write_cascade_report
from .cascade import markdown_table as cascade_table
from .codecs import as_dicts as codec_dicts
from .codecs import markdown_table as codecs_table
from .codecs import time_codecs, time_server_pool
from .decoder_quality import QualitySetup, evaluate_decoders, x0_error_by_t, x0_table
from .decoder_quality import markdown_table as quality_table
from .decoder_quality import write_report as write_quality_report
from .engine import EngineTiming, bench_engines, time_engine, write_engine_report
from .engine import markdown_table as engine_table
from .http_load import HttpPlan
from .http_run import StartedServer, run_http_bench
from .kernels import KernelSetup, bench_kernels, write_kernels_report
from .kernels import markdown_table as kernels_table
from .official import (
    OfficialTiming,
    bench_official,
    import_official_network,
    official_network,
    write_official_report,
)
from .official import markdown_table as official_table
from .plots import PlotsUnavailable
from .report import command_line, write_report
from .soak import SoakPlan, SoakReport, run_soak_bench
from .tiles import TileTiming, bench_tiles, write_tiles_report
from .tiles import markdown_table as tiles_table
from .window_latents import window_latent_cast, window_latent_table

__all__ = [
    "CascadeSetup",
    "EngineTiming",
    "HttpPlan",
    "KernelSetup",
    "OfficialTiming",
    "PlotsUnavailable",
    "QualitySetup",
    "SoakPlan",
    "SoakReport",
    "StartedServer",
    "TileTiming",
    "add_quality",
    "bench_cascade",
    "bench_engines",
    "bench_kernels",
    "bench_official",
    "bench_tiles",
    "cascade_table",
    "codec_dicts",
    "codecs_table",
    "command_line",
    "engine_table",
    "evaluate_decoders",
    "import_official_network",
    "kernels_table",
    "official_network",
    "official_table",
    "quality_table",
    "run_http_bench",
    "run_soak_bench",
    "tiles_table",
    "time_codecs",
    "time_engine",
    "time_server_pool",
    "window_latent_cast",
    "window_latent_table",
    "write_cascade_report",
    "write_engine_report",
    "write_kernels_report",
    "write_official_report",
    "write_quality_report",
    "write_report",
    "write_tiles_report",
    "x0_error_by_t",
    "x0_table",
]
