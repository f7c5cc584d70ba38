"""The benchmark harness. Public API: time_engine, EngineTiming, markdown_table."""

from .engine import EngineTiming, markdown_table, time_engine

__all__ = ["EngineTiming", "markdown_table", "time_engine"]
