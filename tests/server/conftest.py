"""A real uvicorn server on loopback around the embedded default, with a fault-injecting engine wrapper.

The wrapper is the only stand-in: it delegates to the real torch engine and, for chosen seeds, raises (to
test that a failed batch fails alone) or waits on a gate (to fill the queue or pass a deadline on purpose).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
import uvicorn

from pidserve.engines import (
    DecodeAbandoned,
    DecodeBatch,
    DecodeResult,
    Engine,
    EngineCapabilities,
    open_engine,
)
from pidserve.model.default import load_default_decoder
from pidserve.server import ServerSettings, create_app
from pidserve.server.loader import open_configured_engine
from pidserve.server.runner import Server

POISON_SEED = 666  # a batch holding this seed raises inside the engine
GATED_SEED = 777  # a batch holding this seed waits until the test opens the gate
MODEL = "pid-tiny"


class FaultyEngine(Engine):
    """The real engine, plus injected failures and a gate keyed on seeds."""

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.backend = inner.backend
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set when a gated batch starts waiting
        self.seen_seeds: list[int] = []  # seeds of every batch that reached the real engine
        self.seen_text: list[torch.Tensor | None] = []  # and its text embeddings
        self.abandoned = 0  # decodes the real engine stopped part-way (DecodeBatch.abandoned)

    @property
    def capabilities(self) -> EngineCapabilities:
        return self.inner.capabilities

    def decode(self, batch: DecodeBatch) -> DecodeResult:
        seeds = batch.seeds.tolist()
        if GATED_SEED in seeds:
            self.entered.set()
            self.gate.wait(timeout=30)
        if POISON_SEED in seeds:
            raise RuntimeError("injected engine failure")
        self.seen_seeds.extend(seeds)
        self.seen_text.append(batch.text)
        try:
            return self.inner.decode(batch)
        except DecodeAbandoned:
            self.abandoned += 1
            raise


@dataclass
class LiveServer:
    url: str
    host_port: str
    app: object
    engine: FaultyEngine | None
    server: Server
    thread: threading.Thread  # runs the server; over when the server has shut down

    def server_done(self) -> bool:
        return not self.thread.is_alive()

    @property
    def loader(self):
        """The served model's lifecycle (state, failure, batcher, prompt encoder): server/loader.py."""
        return self.app.state.loader


@contextmanager
def live_server(wait_ready: bool = True, engine_factory=None, **settings) -> Iterator[LiveServer]:
    defaults = {"encode_workers": 2, "max_queue_delay_ms": 20.0}
    config = ServerSettings(**{**defaults, **settings})
    holder: dict = {}

    def factory(settings: ServerSettings, net) -> Engine:
        holder["engine"] = FaultyEngine(open_configured_engine(settings, net))
        return holder["engine"]

    app = create_app(config, engine_factory or factory)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    grace = int(config.graceful_shutdown_s)
    server = Server(
        uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=grace or None),
        app.state.loader,
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    if wait_ready:
        assert app.state.loader.wait_loaded(timeout=120), app.state.loader.failure
    try:
        yield LiveServer(
            f"http://127.0.0.1:{port}", f"127.0.0.1:{port}", app, holder.get("engine"), server, thread
        )
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()


@pytest.fixture(scope="package")
def server() -> Iterator[LiveServer]:
    """The shared server: small limits so the 413 cases are cheap to reach."""
    with live_server(max_body_bytes=1 << 20, max_output_pixels=4 * 128 * 128, max_request_latents=4) as live:
        yield live


@pytest.fixture(scope="package")
def reference_engine() -> Engine:
    """The same backend as the server, outside it: what 'the engine's own output' means."""
    return open_engine("torch", net=load_default_decoder(), max_batch=4)


def reference(engine: Engine, latents: torch.Tensor, seeds: list[int], sigma: float = 0.0) -> torch.Tensor:
    """uint8 [B, H, W, 3], decoding one latent at a time (batch size 1, as a lone request runs)."""
    images = [
        engine.decode(DecodeBatch.single(latent, sigma=sigma, seed=seed)).images[0]
        for latent, seed in zip(latents, seeds, strict=True)
    ]
    return torch.stack(images)


def latent(batch: int = 1, size: int = 2, seed: int = 0) -> torch.Tensor:
    """A tiny-ae latent [B, 16, size, size] (-> 32*size pixels square)."""
    return torch.randn(batch, 16, size, size, generator=torch.Generator().manual_seed(seed))
