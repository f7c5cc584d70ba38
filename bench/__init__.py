"""The benchmark harness behind `pidserve bench` (method: docs/benchmarks.md).

engine.py (engine timing), http_run.py + http_load.py (load against a server on loopback), cascade.py
(PiD against decode+bicubic and decode+diffusion SR), codecs.py (output encoders), decoder_quality.py +
quality.py (image quality); stats.py, report.py and plots.py are shared by all of them.
"""

from .engine import EngineTiming, markdown_table, time_engine

__all__ = ["EngineTiming", "markdown_table", "time_engine"]
