"""CUDA-graph capture of a whole decode: the one capture helper of the graph-replaying backends.

    torch-compile (torch_engine)    one graph per (batch, latent size, text length, steps) decode
    tensorrt (tensorrt_engine)      one graph per (batch size, steps) decode on its static buffers

A capture warms the decode up on a side stream first (torch.compile compiles and autotunes, Triton
compiles the post-process, TensorRT finishes its lazy per-context set-up, the allocator settles:
none of which may happen inside a capture), then records it on the helper's own stream into the
memory pool every graph of the engine shares. Replays never overlap (one stream), and each graph
reads and writes only buffers that outlive it, so one pool serves them all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


class GraphCapture:
    """Captures decodes on one CUDA device into one shared memory pool, from one capture stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        # An explicit capture stream on our device: torch's default capture stream is created once,
        # on whichever device was current at the first capture in the process.
        self.stream = torch.cuda.Stream(device)

    def capture(self, run: Callable[[], T], warmup_runs: int = 1) -> tuple[torch.cuda.CUDAGraph, T]:
        """Run `run` `warmup_runs` times on a side stream, then capture one more run as a CUDA graph.

        Returns the graph and what the captured run returned: the static outputs each replay rewrites.
        """
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(warmup_runs):
                run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            output = run()
        return graph, output
