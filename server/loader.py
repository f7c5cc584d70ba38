"""The served model's lifecycle, and what /v1/models and /v2/models/{name} say about it.

    start()  a background thread: network (model.load_decoder) -> engine (engines.open_engine)
             -> the text length every request will carry -> prompt encoder -> warm-up (engine,
             encoder pool) -> batcher started -> ready
    stop()   stop accepting, drain the queue, close the encoder pool and the engine

States: starting -> loading -> ready | failed; ready -> stopping. The server answers /v2/health/live
at once and /v2/health/ready with 503 until every served batch size has run once; a failed load
keeps it unready (and not live), with the reason in `failure`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pidserve.engines import (
    BACKENDS,
    PRECISIONS,
    Engine,
    EngineCapabilities,
    EngineConfigError,
    ShapeProfile,
    check_device,
    open_engine,
)
from pidserve.model import DEFAULT_CHECKPOINT, DEFAULT_MODEL_NAME, PRESETS, PiDConfig, PiDNet, load_decoder

from .batcher import Batcher, BatchStats
from .encoder_pool import EncoderPool
from .errors import ApiError
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
    output_scale: int  # output pixels per latent cell
    latent_downsample: int  # image pixels per latent cell of the latent's own VAE (packed latents' sizes)
    backend: str
    device: str
    precision: str
    max_batch: int
    steps: tuple[int, ...]
    prompts: bool


def model_name(settings: ServerSettings) -> str:
    """The served model's name: the one asked for, else the embedded default's, the variant, the stem."""
    if settings.model_name:
        return settings.model_name
    if settings.checkpoint == DEFAULT_CHECKPOINT:
        return DEFAULT_MODEL_NAME
    return settings.variant or Path(settings.checkpoint).stem


def load_network(settings: ServerSettings) -> PiDNet:
    log.info(
        "loading checkpoint %s%s", settings.checkpoint, f" ({settings.variant})" if settings.variant else ""
    )
    return load_decoder(settings.checkpoint, settings.variant)


def _attention_of(engine: Engine, asked: str) -> str:
    """The attention kernel the engine pinned (a torch engine's `auto` may resolve to a measured kernel);
    engines without the attribute (TensorRT, onnxruntime, wrappers) report what was asked."""
    return getattr(engine, "attention_backend", None) or asked


def check_settings(settings: ServerSettings) -> None:
    """What can be checked before the port is bound and anything loads: the checkpoint file, variant,
    backend, device, precision and engine directory. A ValueError says what to fix (`pidserve serve`
    exits with it at once instead of serving a model that can never load)."""
    if settings.backend not in BACKENDS:
        raise ValueError(f"--backend {settings.backend!r} is not one of {', '.join(BACKENDS)}")
    if settings.precision not in PRECISIONS:
        raise ValueError(f"--precision {settings.precision!r} is not one of {', '.join(PRECISIONS)}")
    check_device(settings.device)
    if settings.backend == "tensorrt":
        if settings.engine_dir is None:
            raise ValueError(
                "the tensorrt backend serves a built engine: pass --engine-dir (see pidserve build)"
            )
    elif settings.checkpoint != DEFAULT_CHECKPOINT and not Path(settings.checkpoint).is_file():
        raise ValueError(f"--checkpoint {settings.checkpoint} does not exist (or use 'default')")
    if settings.variant is not None and settings.variant not in PRESETS:
        raise ValueError(
            f"--variant {settings.variant!r} is unknown; `pidserve info --list` shows the presets"
        )
    settings.parsed_tiling()  # ValueError with the accepted forms
    if settings.engine_dir is not None and not settings.engine_dir.is_dir():
        raise ValueError(f"--engine-dir {settings.engine_dir} is not a directory")


def open_configured_engine(settings: ServerSettings, net: PiDNet | None) -> Engine:
    """The engine `settings` ask for; nothing falls back to another backend."""
    image_sizes = settings.parsed_image_sizes()
    batch_sizes = tuple(settings.batch_sizes) if settings.batch_sizes else None
    profile = None
    if settings.backend == "onnxruntime" and settings.engine_dir is None:
        if not image_sizes or len(image_sizes) != 1:
            raise EngineConfigError("the onnxruntime backend serves one output size: pass one --image-size")
        # Exported here for the requests this server will send: with a text encoder every request
        # carries the network's text length (see request_text_tokens).
        text_tokens = net.cfg.text_max_length if net is not None and settings.text_encoder else 0
        profile = ShapeProfile(
            image_sizes[0], batch_sizes or tuple(range(1, settings.max_batch + 1)), text_tokens=text_tokens
        )
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
        tiling=settings.parsed_tiling(),
        window_latents=settings.window_latents,
    )


def network_config(net: PiDNet | None, engine: Engine) -> PiDConfig:
    """The served network's PiDConfig: from the model, or from a TensorRT engine's manifest."""
    if net is not None:
        return net.cfg
    manifest = getattr(engine, "manifest", None)
    if manifest is None:
        raise EngineConfigError(f"the {engine.backend} engine does not say which network it runs")
    return manifest.pid_config()


def request_text_tokens(caps: EngineCapabilities, text_length: int, prompts: bool) -> int:
    """The text positions every request will carry: with a text encoder, the network's text length
    (the empty prompt too); without one, none.

    An engine built for a fixed text length (ONNX, TensorRT: `--text-tokens`) must be built for
    exactly that, or it would refuse every request: the load fails here instead, naming the fix.
    """
    tokens = text_length if prompts else 0
    if caps.text_tokens is not None and tokens not in caps.text_tokens:
        if prompts:
            fix = f"rebuild it with --text-tokens {tokens} (or serve without a text encoder)"
        else:
            fix = (
                "serve it with --text-encoder (requests then carry text), or rebuild it with --text-tokens 0"
            )
        raise EngineConfigError(
            f"requests will carry {tokens} text tokens but this {caps.backend} engine was built for "
            f"{list(caps.text_tokens)}; {fix}"
        )
    return tokens


class ModelLoader:
    """The engine, its prompt encoder, the encoder pool and the batcher, from start to stop."""

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
        self.network: PiDConfig | None = None  # the served network's config (from the model or manifest)
        self.text_tokens = 0  # text positions every request carries (0: none)
        self.prompts = PromptEncoder(None, model_name=self.name)
        self.encoders = EncoderPool(settings.encode_workers, settings.png_encoder, settings.png_level)
        self.batcher: Batcher | None = None
        self._thread: threading.Thread | None = None
        self._drain: threading.Thread | None = None  # runs the batcher's shutdown (begin_shutdown)
        self.on_failure: Callable[[], None] | None = None  # called once loading failed (runner: exit)

    @property
    def ready(self) -> bool:
        """Serving, with an encoder pool that has not failed to recover (a dead encoder process is
        replaced on the next encode; only a failed replacement makes the service unready)."""
        return self.state == "ready" and self.encoders.failure is None

    def start(self) -> None:
        self.state = "loading"
        self._thread = threading.Thread(target=self._load, name="model-loader", daemon=True)
        self._thread.start()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.ready

    def require_ready(self) -> ModelInfo:
        """The model's info, or a 503 that says why it cannot serve yet."""
        if self.state == "ready" and self.info is not None:
            if self.encoders.failure is not None:
                raise ApiError(503, self.encoders.failure, code="encoder_unavailable")
            return self.info
        message = {
            "starting": "the model is loading; retry shortly",
            "loading": "the model is loading and warming up; retry shortly",
            "stopping": "the service is shutting down",
            "failed": f"the model failed to load ({self.failure}); see the server log",
        }[self.state]
        raise ApiError(503, message, code="not_ready", headers={"Retry-After": "5"})

    def begin_shutdown(self, grace_s: float) -> None:
        """Shutdown has begun (SIGTERM; runner.py calls this before the HTTP server drains): readiness
        turns false, new requests get 503, and the queue runs until the cut-off, `grace_s` minus a
        margin for the last responses to go out; then every unfinished latent gets a 503. One deadline
        for the HTTP server and the batcher, so the process exits inside its grace period."""
        if self._drain is not None:
            return
        self.state = "stopping"
        self.metrics.ready.set(0)
        cut_off = time.monotonic() + max(0.0, grace_s - min(2.0, grace_s / 4))
        self._drain = threading.Thread(target=self._stop_batcher, args=(cut_off,), name="drain", daemon=True)
        self._drain.start()

    def _stop_batcher(self, cut_off: float) -> None:
        if self.batcher is not None:
            finished = self.batcher.stop(cut_off)
            log.info("decode queue %s", "drained" if finished else "cut off at the shutdown deadline")

    def stop(self) -> None:
        """The last step of shutdown (the app's lifespan end): the queue was drained or cut off by
        begin_shutdown (called here if nothing did); then the engine and the encoders close."""
        self.begin_shutdown(self.settings.graceful_shutdown_s)
        grace = self.settings.graceful_shutdown_s
        if self._thread is not None:
            self._thread.join(timeout=grace)  # still loading (a compile): do not wait past the grace
        assert self._drain is not None
        self._drain.join(timeout=grace + 1)
        self.encoders.close()
        if self.engine is not None and not self._thread_alive():
            self.engine.close()

    def _thread_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- the loading thread ----
    def _load(self) -> None:
        started = time.monotonic()
        try:
            engine = self._open()
            self._warm_up(engine)
            self._serve(engine)
        except Exception as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            self.state = "failed"
            log.exception("could not load the model: the service stays unready")
            if self.on_failure is not None:
                self.on_failure()
            return
        caps = engine.capabilities
        log.info(
            "ready: %s on the %s backend (%s, %s) after %.1f s",
            self.name,
            engine.backend,
            caps.device,
            caps.precision,
            time.monotonic() - started,
        )

    def _open(self) -> Engine:
        """Network, engine, the requests' text length, prompt encoder."""
        settings = self.settings
        # A TensorRT engine directory carries the network (and its config in the manifest): the
        # checkpoint is not loaded, which would cost host memory for nothing (5 GB for 2k_flux).
        net = None if settings.backend == "tensorrt" else load_network(settings)
        engine = self.engine = self.engine_factory(settings, net)
        self.network = network_config(net, engine)
        text_length = self.network.text_max_length
        # Checked before the text encoder loads (a Gemma-2 takes a while): a mismatch fails at once.
        self.text_tokens = request_text_tokens(
            engine.capabilities, text_length, prompts=settings.text_encoder is not None
        )
        self.prompts = PromptEncoder.load(
            settings.text_encoder,
            device=settings.device,
            cache_size=settings.prompt_cache_size,
            max_tokens=text_length,
            model_name=self.name,
            # A pinned attention kernel is process-wide (engines/attention.py): keep the text
            # encoder off scaled_dot_product_attention, or a prompt could hit the pin mid-decode.
            attn_implementation=None
            if _attention_of(engine, settings.attention_backend) == "auto"
            else "eager",
        )
        return engine

    def _warm_up(self, engine: Engine) -> None:
        caps = engine.capabilities
        log.info(
            "warming up %s on %s (%s, batch sizes %s)",
            caps.backend,
            caps.device,
            caps.precision,
            caps.batch_sizes or f"1..{caps.max_batch}",
        )
        # Exactly the text shape every request will carry (compile, capture), or the first request
        # would pay for it.
        engine.warmup(text_tokens=self.text_tokens)
        self.encoders.warmup()

    def _serve(self, engine: Engine) -> None:
        caps = engine.capabilities
        self.info = ModelInfo(
            name=self.name,
            latent_space=caps.latent_space,
            latent_channels=caps.latent_channels,
            output_scale=caps.output_scale,
            latent_downsample=self.network.latent_downsample,
            backend=engine.backend,
            device=caps.device,
            precision=caps.precision,
            max_batch=caps.max_batch,
            steps=tuple(caps.steps),
            prompts=self.prompts.enabled,
        )
        if self.state == "stopping":  # shutdown began while loading: do not start serving
            return
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
                "attention": _attention_of(engine, self.settings.attention_backend),
            }
        )
        self.state = "ready"
        self.metrics.ready.set(1)

    def _on_batch(self, stats: BatchStats) -> None:
        if stats.failed:
            self.metrics.batch_failures.inc()
            return
        self.metrics.batch_size.observe(stats.size)
        self.metrics.compute_seconds.observe(stats.compute_s)
        self.metrics.images.inc(stats.size)
        self.metrics.queue_depth.set(self.batcher.depth if self.batcher else 0)
