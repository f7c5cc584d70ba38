"""The decode service: loads the model and engine, validates requests, feeds the batcher, encodes outputs.

Both HTTP front ends (/v1/decode and the KServe v2 infer route) call `DecodeService.decode`, so a latent is
validated, batched and decoded the same way whichever protocol brought it.

Lifecycle: `start()` loads and warms up in a background thread (the server answers /v2/health/live at once
and /v2/health/ready with 503 until every served batch size has run once); `stop()` stops accepting and
drains the queue.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pidserve.engines import (
    DecodeBatch,
    Engine,
    EngineConfigError,
    EngineInputError,
    ShapeProfile,
    open_engine,
)
from pidserve.model import LatentError, PiDNet, get_latent_space
from pidserve.model.latents import validate_sigma

from .batcher import Batcher, BatchStats, DeadlineExceeded, EngineFailure, Job, QueueFull
from .encoders import EncoderPool
from .errors import ApiError, too_large, unprocessable
from .metrics import Metrics
from .prompts import PromptEncoder
from .settings import ServerSettings

log = logging.getLogger(__name__)

EngineFactory = Callable[[ServerSettings, "PiDNet | None"], Engine]


@dataclass(frozen=True)
class ModelInfo:
    """What /v1/models and /v2/models/{name} say about the loaded model."""

    name: str
    latent_space: str
    latent_channels: int
    output_scale: int
    backend: str
    device: str
    precision: str
    max_batch: int
    steps: tuple[int, ...]
    prompts: bool


@dataclass
class DecodeRequest:
    latents: torch.Tensor  # float32 [B, C, h, w]
    sigmas: torch.Tensor | float | None = None  # [B], [] or a float; None: 0 (clean latent)
    seeds: torch.Tensor | int | None = None  # [B], [] or an int (sample i gets seed + i); None: random
    steps: int = 4
    prompt: str | None = None
    timeout_s: float | None = None


@dataclass
class DecodeOutcome:
    images: np.ndarray  # uint8 [B, H, W, 3]
    seeds: list[int]
    timings: dict[str, float] = field(default_factory=dict)  # queue, compute (seconds; max over the batch)
    batch_sizes: list[int] = field(default_factory=list)


def model_name(settings: ServerSettings) -> str:
    if settings.model_name:
        return settings.model_name
    if settings.checkpoint == "default":
        from pidserve.model.default import DEFAULT_MODEL_NAME

        return DEFAULT_MODEL_NAME
    return settings.variant or Path(settings.checkpoint).stem


def load_model(settings: ServerSettings) -> PiDNet:
    from pidserve.model import PiDConfig, load_checkpoint

    log.info(
        "loading checkpoint %s%s", settings.checkpoint, f" ({settings.variant})" if settings.variant else ""
    )
    if settings.checkpoint == "default":
        from pidserve.model.default import load_default_decoder

        return load_default_decoder()
    return load_checkpoint(
        settings.checkpoint, PiDConfig.preset(settings.variant) if settings.variant else None
    )


def open_configured_engine(settings: ServerSettings, net: PiDNet | None) -> Engine:
    """The engine `settings` ask for; nothing falls back to another backend."""
    image_sizes = settings.parsed_image_sizes()
    batch_sizes = tuple(settings.batch_sizes) if settings.batch_sizes else None
    profile = None
    if settings.backend == "onnxruntime" and settings.engine_dir is None:
        if not image_sizes or len(image_sizes) != 1:
            raise EngineConfigError("the onnxruntime backend serves one output size: pass one --image-size")
        profile = ShapeProfile(image_sizes[0], batch_sizes or tuple(range(1, settings.max_batch + 1)))
    return open_engine(
        settings.backend,
        net=net,
        device=settings.device,
        precision=settings.precision,
        max_batch=settings.max_batch,
        batch_sizes=batch_sizes,
        image_sizes=image_sizes,
        engine_dir=settings.engine_dir,
        profile=profile,
        attention_backend=settings.attention_backend,
    )


def _network_config(net: PiDNet | None, engine: Engine):
    """The served network's PiDConfig: from the model, or from a TensorRT engine's manifest."""
    if net is not None:
        return net.cfg
    manifest = getattr(engine, "manifest", None)
    if manifest is None:
        raise EngineConfigError(f"the {engine.backend} engine does not say which network it runs")
    return manifest.pid_config()


class DecodeService:
    def __init__(
        self, settings: ServerSettings, metrics: Metrics, engine_factory: EngineFactory | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.engine_factory = engine_factory or open_configured_engine
        self.name = model_name(settings)
        self.state = "starting"  # starting -> loading -> ready | failed; ready -> stopping
        self.failure: str | None = None
        self.info: ModelInfo | None = None
        self.engine: Engine | None = None
        self.batcher: Batcher | None = None
        self.prompts = PromptEncoder(None, model_name=self.name)
        self.encoders = EncoderPool(settings.encode_workers, settings.png_encoder, settings.png_level)
        self._loader: threading.Thread | None = None

    # ---- lifecycle ----
    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def start(self) -> None:
        self.state = "loading"
        self._loader = threading.Thread(target=self._load, name="model-loader", daemon=True)
        self._loader.start()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        if self._loader is not None:
            self._loader.join(timeout)
        return self.ready

    def _load(self) -> None:
        started = time.monotonic()
        try:
            # A TensorRT engine directory carries the network (and its config in the manifest): the
            # checkpoint is not loaded, which would cost host memory for nothing (5 GB for 2k_flux).
            net = None if self.settings.backend == "tensorrt" else load_model(self.settings)
            engine = self.engine_factory(self.settings, net)
            text_length = _network_config(net, engine).text_max_length
            caps = engine.capabilities
            self.prompts = PromptEncoder.load(
                self.settings.text_encoder,
                device=self.settings.device,
                cache_size=self.settings.prompt_cache_size,
                max_tokens=text_length,
                model_name=self.name,
                # A pinned attention kernel is process-wide (engines/attention.py): keep the text
                # encoder off scaled_dot_product_attention, or a prompt could hit the pin mid-decode.
                attn_implementation=None if self.settings.attention_backend == "auto" else "eager",
            )
            log.info(
                "warming up %s on %s (%s, batch sizes %s)",
                caps.backend,
                caps.device,
                caps.precision,
                caps.batch_sizes or f"1..{caps.max_batch}",
            )
            # With a text encoder every request carries text_length tokens (the empty prompt too):
            # warm (compile, capture) exactly that shape, or the first request would pay for it.
            engine.warmup(text_tokens=text_length if self.prompts.enabled else None)
            self.encoders.warmup()
            self.engine = engine
            self.info = ModelInfo(
                name=self.name,
                latent_space=caps.latent_space,
                latent_channels=caps.latent_channels,
                output_scale=caps.output_scale,
                backend=engine.backend,
                device=caps.device,
                precision=caps.precision,
                max_batch=caps.max_batch,
                steps=tuple(caps.steps),
                prompts=self.prompts.enabled,
            )
            self.batcher = Batcher(
                [engine],
                max_batch=self.settings.max_batch,
                max_delay_s=self.settings.max_queue_delay_ms / 1e3,
                max_queue=self.settings.max_queue_size,
                on_batch=self._on_batch,
                on_drop=lambda reason: self.metrics.dropped.labels(reason).inc(),
            )
            self.batcher.start()
            self.metrics.model.info(
                {
                    "name": self.name,
                    "backend": engine.backend,
                    "device": caps.device,
                    "precision": caps.precision,
                    "latent_space": caps.latent_space,
                    "attention": self.settings.attention_backend,
                }
            )
            self.state = "ready"
            self.metrics.ready.set(1)
            log.info(
                "ready: %s on the %s backend (%s, %s) after %.1f s",
                self.name,
                engine.backend,
                caps.device,
                caps.precision,
                time.monotonic() - started,
            )
        except Exception as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            self.state = "failed"
            log.exception("could not load the model: the service stays unready")

    def _on_batch(self, stats: BatchStats) -> None:
        if stats.failed:
            self.metrics.batch_failures.inc()
            return
        self.metrics.batch_size.observe(stats.size)
        self.metrics.compute_seconds.observe(stats.compute_s)
        self.metrics.images.inc(stats.size)
        self.metrics.queue_depth.set(self.batcher.depth if self.batcher else 0)

    def stop(self) -> None:
        was = self.state
        self.state = "stopping"
        self.metrics.ready.set(0)
        if self._loader is not None:
            self._loader.join()
        if self.batcher is not None and was == "ready":
            drained = self.batcher.stop(timeout=self.settings.graceful_shutdown_s)
            log.info("decode queue %s", "drained" if drained else "not drained in time")
        self.encoders.close()
        if self.engine is not None:
            self.engine.close()

    def require_ready(self) -> ModelInfo:
        if self.state == "ready" and self.info is not None:
            return self.info
        message = {
            "starting": "the model is loading; retry shortly",
            "loading": "the model is loading and warming up; retry shortly",
            "stopping": "the service is shutting down",
            "failed": f"the model failed to load ({self.failure}); see the server log",
        }[self.state]
        raise ApiError(503, message, code="not_ready", headers={"Retry-After": "5"})

    # ---- decoding ----
    def validate(self, request: DecodeRequest) -> tuple[torch.Tensor, list[int]]:
        """Check a request against the model and limits; returns (sigmas [B], seeds). Raises ApiError."""
        info = self.require_ready()
        latents = request.latents
        try:
            get_latent_space(info.latent_space).validate(latents)
        except LatentError as exc:
            raise unprocessable(str(exc)) from None
        count = int(latents.shape[0])
        if count > self.settings.max_request_latents:
            raise too_large(
                f"{count} latents in one request; the limit is {self.settings.max_request_latents} "
                "(split the batch over several requests)"
            )
        height, width = (int(n) * info.output_scale for n in latents.shape[-2:])
        if count * height * width > self.settings.max_output_pixels:
            raise too_large(
                f"the request would produce {count} x {height}x{width} = {count * height * width} pixels; "
                f"the limit is {self.settings.max_output_pixels} per request"
            )
        if request.steps not in info.steps:
            raise unprocessable(f"steps={request.steps} is not served; choose one of {list(info.steps)}")
        try:
            sigma = 0.0 if request.sigmas is None else request.sigmas
            if isinstance(sigma, torch.Tensor) and sigma.ndim == 0:
                sigma = float(sigma)
            sigmas = validate_sigma(sigma, count)
        except LatentError as exc:
            raise unprocessable(str(exc)) from None
        seeds = self._seeds(request.seeds, count)
        self.prompts.check(request.prompt)
        assert self.engine is not None
        probe = DecodeBatch(latents[:1], sigmas[:1], torch.tensor(seeds[:1]), None, request.steps)
        try:
            self.engine.capabilities.check(probe)
        except EngineInputError as exc:
            raise unprocessable(str(exc)) from None
        return sigmas, seeds

    @staticmethod
    def _seeds(seeds: torch.Tensor | int | None, count: int) -> list[int]:
        if seeds is None:
            base = int(torch.randint(0, 2**31 - 1, ()).item())
            return [base + i for i in range(count)]
        if isinstance(seeds, int):
            return [seeds + i for i in range(count)]
        if seeds.ndim == 0:
            return [int(seeds) + i for i in range(count)]
        if seeds.shape != (count,):
            raise unprocessable(f"seed must be one integer or {count} of them; got shape {list(seeds.shape)}")
        return [int(s) for s in seeds.tolist()]

    async def decode(
        self, request: DecodeRequest, disconnected: Callable[[], Awaitable[None]] | None = None
    ) -> DecodeOutcome:
        """Validate, queue, wait (deadline, client disconnect), and return the uint8 images."""
        sigmas, seeds = self.validate(request)
        timeout = min(request.timeout_s or self.settings.request_timeout_s, self.settings.request_timeout_s)
        deadline = time.monotonic() + timeout
        text = await asyncio.to_thread(self.prompts.embed, request.prompt) if self.prompts.enabled else None
        jobs = [
            Job(latent, float(sigma), seed, text, request.steps, deadline)
            for latent, sigma, seed in zip(request.latents, sigmas.tolist(), seeds, strict=True)
        ]
        assert self.batcher is not None
        try:
            self.batcher.submit(jobs)
        except QueueFull as exc:
            raise ApiError(
                429, str(exc), code="queue_full", headers={"Retry-After": str(exc.retry_after)}
            ) from None
        except RuntimeError as exc:
            raise ApiError(503, str(exc), code="not_ready") from None
        self.metrics.queue_depth.set(self.batcher.depth)
        waiting = asyncio.gather(*(asyncio.wrap_future(job.future) for job in jobs))
        watcher = asyncio.ensure_future(disconnected()) if disconnected else None
        try:
            done, _ = await asyncio.wait(
                [waiting] + ([watcher] if watcher else []),
                timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if waiting not in done:
                for job in jobs:
                    job.future.cancel()  # not yet running: the worker drops it before compute
                waiting.cancel()
                if watcher is not None and watcher in done:
                    raise ApiError(499, "the client closed the connection", code="client_closed")
                raise ApiError(
                    504, f"the decode did not finish within {timeout:g} s", code="deadline_exceeded"
                )
            results = waiting.result()
        except DeadlineExceeded as exc:
            raise ApiError(504, str(exc), code="deadline_exceeded") from None
        except EngineFailure as exc:
            raise ApiError(500, str(exc), code="engine_failure") from None
        finally:
            if watcher is not None:
                watcher.cancel()
        for result in results:
            self.metrics.queue_seconds.observe(result.queue_s)
        images = torch.stack([r.image for r in results]).numpy()
        return DecodeOutcome(
            images=images,
            seeds=seeds,
            timings={
                "queue": max(r.queue_s for r in results),
                "compute": max(r.compute_s for r in results),
            },
            batch_sizes=[r.batch_size for r in results],
        )
