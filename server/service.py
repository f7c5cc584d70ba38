"""The request path, in order: validate, embed, submit, await, encode -> bytes and timings.

Both HTTP front ends (/v1/decode and the KServe v2 infer route) call `DecodeService.decode`, so a
latent is validated, batched, decoded and encoded the same way whichever protocol brought it.

    validate  the latents against the served model and the limits; sigmas and seeds per latent; the
              prompt; a one-latent probe through the engine's own capability check, carrying the
              text the request will carry                                      -> 413, 422, 503
    embed     the prompt -> text embedding, off the event loop (none without a text encoder)
    submit    one batcher job per latent                                       -> 429, 503
    await     every job, against the deadline and the client's disconnect      -> 504, 499, 500
    encode    the uint8 images -> PNG/JPEG/WebP (one body per image) or one raw/safetensors body, in
              the encoder pool; or the tensor's bytes as they are (TENSOR: KServe's binary data)

The model behind it (engine, prompt encoder, encoder pool, batcher) is the loader's (loader.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from pidserve.engines import MAX_SEED, DecodeBatch, EngineInputError
from pidserve.model import (
    MAX_STUDENT_STEPS,
    LatentError,
    PiDConfig,
    TilePlan,
    Tiling,
    decode_flops,
    get_latent_space,
    tiled_decode_flops,
    validate_sigma,
)

from .batcher import DeadlineExceeded, EngineFailure, Job, JobResult, QueueFull, ShuttingDown
from .encoder_pool import EncoderUnavailable
from .errors import ApiError, client_closed, too_large, unprocessable
from .loader import ModelInfo, ModelLoader
from .settings import OutputFormat

TENSOR = "tensor"  # output format: the uint8 [B, H, W, 3] bytes, unencoded (KServe's binary data)


@dataclass
class DecodeRequest:
    latents: torch.Tensor  # float32 [B, C, h, w]
    sigmas: torch.Tensor | float | None = None  # [B], [] or a float; None: 0 (clean latent)
    seeds: torch.Tensor | int | None = None  # [B], [] or an int (sample i gets seed + i); None: random
    steps: int = MAX_STUDENT_STEPS
    prompt: str | None = None
    timeout_s: float | None = None
    output_format: OutputFormat | Literal["tensor"] | None = None  # None: the server's default format
    quality: int | None = None  # JPEG/WebP; None: the server's default
    tile: str | None = None  # off | auto | HxW | HxW:OVERLAP (model/tiling.py); None: the server's default


@dataclass
class DecodeOutcome:
    bodies: list[bytes]  # one per image (png, jpeg, webp); one for the batch (raw, safetensors, tensor)
    output_format: str
    shape: tuple[int, ...]  # of the uint8 images: [B, H, W, 3]
    seeds: list[int]
    timings: dict[str, float] = field(default_factory=dict)  # queue, compute (max over the batch), encode
    batch_sizes: list[int] = field(default_factory=list)
    windows: int = 1  # windows per image (tiled decodes)


class DecodeService:
    def __init__(self, loader: ModelLoader) -> None:
        self.loader = loader
        self.settings = loader.settings
        self.metrics = loader.metrics

    def require_ready(self, latent_space: str | None = None) -> ModelInfo:
        """503 unless the model is ready; 422 when the caller names another latent space than it decodes."""
        info = self.loader.require_ready()
        if latent_space is not None and latent_space != info.latent_space:
            raise unprocessable(
                f"this server decodes '{info.latent_space}' latents ({info.name}); "
                f"got latent_space={latent_space!r}"
            )
        return info

    async def decode(
        self, request: DecodeRequest, disconnected: Callable[[], Awaitable[None]] | None = None
    ) -> DecodeOutcome:
        """Validate, embed, queue, wait (deadline, client disconnect), encode; timed by outcome
        (pidserve_inference_duration_seconds, what Triton's statistics report as success and fail)."""
        started = time.monotonic()
        outcome = "fail"
        try:
            result = await self._decode(request, disconnected)
            outcome = "success"
            return result
        finally:
            self.metrics.inference_seconds.labels(outcome).observe(time.monotonic() - started)
            self.metrics.last_inference.set_to_current_time()

    async def _decode(
        self, request: DecodeRequest, disconnected: Callable[[], Awaitable[None]] | None
    ) -> DecodeOutcome:
        sigmas, seeds, tiling = self.validate(request)
        limit = self.settings.request_timeout_s
        timeout = min(request.timeout_s or limit, limit)
        deadline = time.monotonic() + timeout
        text = await self._embed(request.prompt)
        jobs = self._submit(request, sigmas, seeds, text, deadline, tiling)
        results = await self._wait(jobs, deadline, timeout, disconnected)
        images = torch.stack([r.image for r in results]).numpy()
        fmt = request.output_format or self.settings.default_format
        bodies, encode_timing = await self._encode(
            images, fmt, request.quality or self.settings.default_quality
        )
        return DecodeOutcome(
            bodies=bodies,
            output_format=fmt,
            shape=tuple(images.shape),
            seeds=seeds,
            timings={
                "queue": max(r.queue_s for r in results),
                "compute": max(r.compute_s for r in results),
                **encode_timing,
            },
            batch_sizes=[r.batch_size for r in results],
            windows=max(r.windows for r in results),
        )

    # ---- 1. validate ----
    def validate(self, request: DecodeRequest) -> tuple[torch.Tensor, list[int], Tiling | None]:
        """Check a request against the model and limits; returns (sigmas [B], seeds, its tiling or None
        for the server's). Raises ApiError."""
        info = self.require_ready()
        settings = self.settings
        latents = request.latents
        try:
            get_latent_space(info.latent_space).validate(latents)
        except LatentError as exc:
            raise unprocessable(str(exc)) from None
        count = int(latents.shape[0])
        if count > settings.max_request_latents:
            raise too_large(
                f"{count} latents in one request; the limit is {settings.max_request_latents} "
                "(split the batch over several requests)"
            )
        if request.steps not in info.steps:
            raise unprocessable(f"steps={request.steps} is not served; choose one of {list(info.steps)}")
        try:
            tiling = None if request.tile is None else Tiling.parse(request.tile)
        except ValueError as exc:
            raise unprocessable(str(exc)) from None
        self._check_cost(count, latents, request.steps, info, tiling)
        try:
            sigma = 0.0 if request.sigmas is None else request.sigmas
            if isinstance(sigma, torch.Tensor) and sigma.ndim == 0:
                sigma = float(sigma)
            sigmas = validate_sigma(sigma, count)
        except LatentError as exc:
            raise unprocessable(str(exc)) from None
        seeds = _seeds(request.seeds, count)
        self.loader.prompts.check(request.prompt)
        self._probe(latents[:1], sigmas[:1], seeds[:1], request.steps, tiling)
        return sigmas, seeds, tiling

    def _check_cost(
        self, count: int, latents: torch.Tensor, steps: int, info: ModelInfo, tiling: Tiling | None
    ) -> None:
        """The request-cost model: output pixels (memory) and pixel-steps (compute), per request.

        Pixel-steps are counted at the network's native size (see `charged_pixel_steps`): a tiled
        decode pays for every window, overlaps included; an untiled one above the native size pays
        for its global attention growing faster than its pixels."""
        limits = self.settings.request_limits()
        height, width = (int(n) * info.output_scale for n in latents.shape[-2:])
        pixels = count * height * width
        what = f"{count} x {height}x{width}" if count > 1 else f"{height}x{width}"
        where = f"on {info.device} ({info.precision})"
        if pixels > limits.output_pixels:
            raise too_large(
                f"the request would produce {what} = {pixels:,} pixels; this server allows "
                f"{limits.output_pixels:,} per request {where} (--max-output-pixels / "
                "PIDSERVE_MAX_OUTPUT_PIXELS); send fewer or smaller latents"
            )
        plan = self._plan(latents[:1], tiling)
        network = self.loader.network
        assert network is not None  # set when the model became ready
        cost = count * charged_pixel_steps(network, (height, width), plan, steps, self.loader.text_tokens)
        if plan is not None:
            what = f"{what} in {plan.count} windows of {plan.tile[0]}x{plan.tile[1]}"
        elif height * width > network.native_size[0] * network.native_size[1]:
            what = f"{what} untiled (above the native {network.native_size[0]}x{network.native_size[1]})"
        if cost > limits.pixel_steps:
            hint = "" if plan is not None else ", or decode it in tiles (tile=auto)"
            raise too_large(
                f"the request ({what}, {steps} steps) costs {cost:,} pixel-steps; this server allows "
                f"{limits.pixel_steps:,} per request {where} (--max-pixel-steps / "
                f"PIDSERVE_MAX_PIXEL_STEPS); send fewer or smaller latents or fewer steps{hint}"
            )

    def _plan(self, latent: torch.Tensor, tiling: Tiling | None) -> TilePlan | None:
        """The windows the engine will cut this latent's output into (None: untiled); 422 when it cannot."""
        engine = self.loader.engine
        assert engine is not None
        try:
            return engine.capabilities.plan(DecodeBatch.single(latent[0], tiling=tiling))
        except EngineInputError as exc:
            raise unprocessable(str(exc)) from None

    def _probe(
        self, latent: torch.Tensor, sigma: torch.Tensor, seed: list[int], steps: int, tiling: Tiling | None
    ) -> None:
        """The engine's own check on one latent with the text every request carries (an engine built
        for a fixed text length refuses a batch without it), so a misfit is a 422 before queueing."""
        engine = self.loader.engine
        assert engine is not None
        tokens = self.loader.text_tokens
        # Only the shape is checked: a broadcast view of one zero, [1, tokens, text_dim], allocates nothing.
        text = torch.zeros(1, 1, 1).expand(1, tokens, engine.capabilities.text_dim) if tokens else None
        try:
            engine.capabilities.check(
                DecodeBatch(latent, sigma, torch.tensor(seed), text, steps, tiling=tiling)
            )
        except EngineInputError as exc:
            raise unprocessable(str(exc)) from None

    # ---- 2. embed ----
    async def _embed(self, prompt: str | None) -> torch.Tensor | None:
        prompts = self.loader.prompts
        return await asyncio.to_thread(prompts.embed, prompt) if prompts.enabled else None

    # ---- 3. submit ----
    def _submit(
        self,
        request: DecodeRequest,
        sigmas: torch.Tensor,
        seeds: list[int],
        text: torch.Tensor | None,
        deadline: float,
        tiling: Tiling | None,
    ) -> list[Job]:
        jobs = [
            Job(latent, float(sigma), seed, text, request.steps, deadline, tiling=tiling)
            for latent, sigma, seed in zip(request.latents, sigmas.tolist(), seeds, strict=True)
        ]
        batcher = self.loader.batcher
        assert batcher is not None
        try:
            batcher.submit(jobs)
        except QueueFull as exc:
            raise ApiError(
                429, str(exc), code="queue_full", headers={"Retry-After": str(exc.retry_after)}
            ) from None
        except ShuttingDown as exc:
            raise _shutting_down(exc) from None
        self.metrics.queue_depth.set(batcher.depth)
        return jobs

    # ---- 4. await ----
    async def _wait(
        self,
        jobs: list[Job],
        deadline: float,
        timeout: float,
        disconnected: Callable[[], Awaitable[None]] | None,
    ) -> list[JobResult]:
        limit = self.settings.request_timeout_s
        waiting = asyncio.gather(*(asyncio.wrap_future(job.future) for job in jobs))
        # Once abandoned, `waiting` may still end with a job's exception: retrieve it, so asyncio does not
        # log "_GatheringFuture exception was never retrieved" for every 504 and 499.
        waiting.add_done_callback(lambda future: future.cancelled() or future.exception())
        watcher = asyncio.ensure_future(disconnected()) if disconnected else None
        try:
            done, _ = await asyncio.wait(
                [waiting] + ([watcher] if watcher else []),
                timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if waiting not in done:
                gone = watcher is not None and watcher in done
                for job in jobs:
                    job.drop_reason = "client_closed" if gone else "deadline"
                    job.abandoned = True  # computing: the engine stops between steps where it can
                assert self.loader.batcher is not None
                self.loader.batcher.withdraw(jobs)  # queued: out of the queue now, freeing its slots
                waiting.cancel()
                if gone:
                    raise client_closed()
                raise ApiError(504, _deadline_message(timeout, limit), code="deadline_exceeded")
            results = waiting.result()
        except DeadlineExceeded as exc:
            raise ApiError(504, str(exc), code="deadline_exceeded") from None
        except EngineFailure as exc:
            raise ApiError(500, str(exc), code="engine_failure") from None
        except ShuttingDown as exc:
            raise _shutting_down(exc) from None
        finally:
            if watcher is not None:
                watcher.cancel()
        for result in results:
            self.metrics.queue_seconds.observe(result.queue_s)
        return results

    # ---- 5. encode ----
    async def _encode(
        self, images: np.ndarray, fmt: str, quality: int
    ) -> tuple[list[bytes], dict[str, float]]:
        """(bodies, {"encode": seconds}); the tensor format is the bytes as they are, and not timed."""
        if fmt == TENSOR:
            return [np.ascontiguousarray(images).tobytes()], {}
        start = time.monotonic()
        try:
            bodies = await self.loader.encoders.encode(images, fmt, quality)
        except EncoderUnavailable as exc:
            raise ApiError(503, str(exc), code="encoder_unavailable") from None
        seconds = time.monotonic() - start
        self.metrics.encode_seconds.labels(fmt).observe(seconds)
        return bodies, {"encode": seconds}


def charged_pixel_steps(
    network: PiDConfig, output: tuple[int, int], plan: TilePlan | None, steps: int, text_tokens: int
) -> int:
    """What one image's decode is charged against the pixel-steps limit: its FLOPs, in pixel-steps
    at the network's native size (output pixels x steps there).

    At the native size this is exactly pixels x steps, and a tiled decode in native windows pays
    windows x window pixels x steps. An untiled decode above the native size pays more per pixel
    than its pixels alone say: its patch attention is global, so its cost grows with the square of
    its tokens (pid-tiny at 1024x1024 untiled: ~5x the pixels' share, and ~5x the time measured).
    """
    native_h, native_w = network.native_size
    native = decode_flops(network, native_h, native_w, steps=steps, text_len=text_tokens).total
    if plan is None:
        work = decode_flops(network, *output, steps=steps, text_len=text_tokens).total
    else:
        work = tiled_decode_flops(network, plan, steps=steps, text_len=text_tokens).total
    return round(work / native * native_h * native_w * steps)


def _shutting_down(exc: ShuttingDown) -> ApiError:
    """503: this replica stops; the work was not lost to a fault, so another replica can take it."""
    return ApiError(503, str(exc), code="shutting_down", headers={"Retry-After": "1"})


def _deadline_message(timeout: float, limit: float) -> str:
    if timeout < limit:
        return f"the decode did not finish within the request's deadline of {timeout:g} s"
    return (
        f"the decode did not finish within {timeout:g} s, this server's limit (--request-timeout-s / "
        "PIDSERVE_REQUEST_TIMEOUT_S); send fewer or smaller latents, or raise the limit"
    )


def _seeds(seeds: torch.Tensor | int | None, count: int) -> list[int]:
    """One seed per latent: given, seed + i from one, or random + i; every one in 0..MAX_SEED."""
    if seeds is None:
        base = int(torch.randint(0, 2**31 - 1, ()).item())
        return [base + i for i in range(count)]
    one_seed = not isinstance(seeds, torch.Tensor) or seeds.ndim == 0
    if one_seed:
        given = [int(seeds) + i for i in range(count)]
    elif seeds.shape == (count,):
        given = [int(s) for s in seeds.tolist()]
    else:
        raise unprocessable(f"seed must be one integer or {count} of them; got shape {list(seeds.shape)}")
    bad = [seed for seed in given if not 0 <= seed <= MAX_SEED]
    if bad:
        why = f"; latent i uses seed + i, so one seed for {count} latents is at most {MAX_SEED - count + 1}"
        raise unprocessable(
            f"seeds are integers in 0..{MAX_SEED}; got {bad[0]}" + (why if one_seed and count > 1 else "")
        )
    return given
