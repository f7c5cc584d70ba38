"""PyTorch backends: `torch` (eager) and `torch-compile` (torch.compile + one CUDA graph per shape).

Both run the same decode (`decode_on_device`): condition once, `steps` velocity evaluations
with per-sample seeded noise, fused uint8 post-process, then one device-to-host copy.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pidserve import kernels
from pidserve.model import (
    TILING_OFF,
    Conditioning,
    PiDNet,
    TilePlan,
    Tiling,
    student_steps,
    student_timesteps,
)

from .attention import attention_context, check_attention_backend, resolve_attention_backend
from .base import (
    TORCH_DTYPES,
    DecodeBatch,
    DecodeResult,
    Engine,
    EngineCapabilities,
    EngineConfigError,
    StageTimer,
    check_device,
    copy_to_host,
    engine_window_latents,
    on_device,
    padded_batch_size,
    seeded_noise_stream,
    seeded_noises,
    stop_if_abandoned,
    stoppable,
    warmup_text_tokens,
)
from .cuda_graphs import GraphCapture
from .fp8_linear import check_fp8_matmul, convert_to_fp8, has_fp8_layers
from .tiled import decode_tiled

log = logging.getLogger(__name__)

Velocity = Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]


def decode_on_device(
    net: PiDNet,
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    noises: list[torch.Tensor],
    text: torch.Tensor | None,
    velocity: Velocity | None = None,
    timer: StageTimer | None = None,
) -> torch.Tensor:
    """The decode after the inputs are on the device: uint8 [B, H, W, 3] on the device.

    noises: `steps` tensors [B, 3, H, W] (initial noise, then one per re-noising).
    velocity: the network step to use (default: the eager `net.velocity`).
    """
    velocity = velocity or net.velocity
    with _stage(timer, "condition"):
        cond = net.condition(latents, sigmas, text)
    with _stage(timer, "steps"):
        draws = iter(noises)
        x0 = student_steps(lambda x, t: velocity(x, t, cond), draws.__next__, student_timesteps(len(noises)))
    with _stage(timer, "postprocess"):
        return kernels.postprocess(x0)


def _stage(timer: StageTimer | None, name: str):
    from contextlib import nullcontext

    return timer.stage(name) if timer is not None else nullcontext()


# What the network's weights and activations are stored in, per precision. fp8: BF16, except the big
# matmuls, which fp8_linear.convert_to_fp8 switches to FP8 after the cast.
COMPUTE_DTYPES = {**TORCH_DTYPES, "fp8": torch.bfloat16}


def _check_device_and_precision(backend: str, device: str, precision: str) -> torch.device:
    if precision not in COMPUTE_DTYPES:
        raise EngineConfigError(
            f"the {backend} backend runs precision {', '.join(COMPUTE_DTYPES)}, not {precision!r}"
        )
    return check_device(device)


class TorchEngine(Engine):
    """Eager PyTorch on CPU or GPU, fp32, bf16 or fp8 (BF16 with FP8 matmuls: fp8_linear.py).
    Any batch size up to max_batch, any output size."""

    backend = "torch"

    def __init__(
        self,
        net: PiDNet,
        device: str = "cpu",
        precision: str = "fp32",
        max_batch: int = 8,
        batch_sizes: Sequence[int] | None = None,
        image_sizes: Sequence[tuple[int, int]] | None = None,
        attention_backend: str = "auto",
        tiling: Tiling = TILING_OFF,
        window_latents: str = "auto",
    ) -> None:
        """batch_sizes: serve only these (a batch of n runs padded to the next one); None: any size
        up to max_batch. image_sizes: serve only these output sizes; None: any multiple of 16.
        attention_backend: the scaled-dot-product-attention kernel to use (attention.py; auto: torch's).
        tiling: how batches that name none are cut into windows (model/tiling.py; `auto`: windows of
        the network's native size `cfg.native_size`); a tiled decode runs max_batch window rows at a
        time. window_latents: what each window is conditioned on (auto, crop, corrected:
        model/window_latents.py)."""
        self.device = _check_device_and_precision(self.backend, device, precision)
        check_attention_backend(attention_backend, self.device)
        # auto: the kernel measured fastest on this GPU where one was measured (attention.py)
        attention_backend = resolve_attention_backend(attention_backend, self.device)
        self.precision = precision
        self.attention_backend = attention_backend
        if self.device.type == "cuda" and precision == "fp32":
            # torch runs fp32 convolutions (and optionally matmuls) in TF32 by default on CUDA;
            # "fp32" here means IEEE fp32, as on the CPU and in the other backends.
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            log.info("fp32 on CUDA: TF32 disabled for matmuls and convolutions (process-wide)")
        # The engine takes the network over: it is moved and cast in place (and for fp8 converted).
        if has_fp8_layers(net):  # converted by an earlier fp8 engine: a cast would ruin its FP8 weights
            if precision != "fp8":
                raise EngineConfigError(
                    "this network's matmuls were converted to FP8 by another engine; "
                    f"load it again for {precision}"
                )
            self.net = net.to(device=self.device).eval()
        else:
            self.net = net.to(device=self.device, dtype=COMPUTE_DTYPES[precision]).eval()
        if precision == "fp8":
            check_fp8_matmul(self.device)
            log.info("fp8: %s", convert_to_fp8(self.net).summary())
        cfg = net.cfg
        if batch_sizes is not None:
            batch_sizes = tuple(sorted(set(batch_sizes)))
            max_batch = batch_sizes[-1]
        self._caps = EngineCapabilities(
            backend=self.backend,
            device=str(self.device),
            precision=precision,
            latent_channels=cfg.latent_channels,
            latent_space=cfg.latent_space,
            text_dim=cfg.text_dim,
            output_scale=cfg.output_scale,
            max_batch=max_batch,
            batch_sizes=batch_sizes,
            image_sizes=None if image_sizes is None else tuple(tuple(size) for size in image_sizes),
            tiling=tiling,
            native_size=cfg.native_size,
        )
        self.window_latents = engine_window_latents(window_latents, cfg.latent_space)
        log.info(
            "engine: backend=%s device=%s precision=%s attention=%s",
            self.backend,
            self.device,
            precision,
            attention_backend,
        )

    @property
    def capabilities(self) -> EngineCapabilities:
        return self._caps

    def decode(self, batch: DecodeBatch) -> DecodeResult:
        self._caps.check(batch)
        n = batch.size
        if self._caps.batch_sizes is not None:
            batch = _pad(batch, padded_batch_size(n, self._caps.batch_sizes))
        timer = StageTimer(self.device)
        height, width = self._caps.image_size(batch.latents.shape[-2:])
        plan = self._caps.plan(batch)
        with torch.inference_mode():
            with timer.stage("h2d"):
                latents = batch.latents.to(self.device, non_blocking=True)
                sigmas = batch.sigmas.to(self.device, non_blocking=True)
                text = None if batch.text is None else batch.text.to(self.device, non_blocking=True)
            shape = (batch.size, 3, height, width)
            # Compilation and graph capture happen inside _compute, so they see the attention choice too.
            with on_device(self.device), attention_context(self.attention_backend):
                if plan is None:
                    with timer.stage("noise"):
                        noises = seeded_noises(batch.seeds, shape, batch.steps, self.device)
                    pixels = self._compute(latents, sigmas, noises, text, timer, batch)
                else:  # the noise is drawn step by step inside
                    with timer.stage("tiled"):
                        draw = seeded_noise_stream(batch.seeds, shape, self.device)
                        x0 = self._compute_tiled(plan, latents, sigmas, draw, text, batch)
                    with timer.stage("postprocess"):
                        pixels = kernels.postprocess(x0)
            with timer.stage("d2h"):
                images = copy_to_host(pixels[:n])
        return DecodeResult(images=images, timings=timer.result(), windows=1 if plan is None else plan.count)

    def _compute_tiled(
        self,
        plan: TilePlan,
        latents: torch.Tensor,
        sigmas: torch.Tensor,
        draw: Callable[[], torch.Tensor],
        text: torch.Tensor | None,
        batch: DecodeBatch,
    ) -> torch.Tensor:
        """x0 of a tiled decode: the eager network on max_batch window rows at a time."""

        def condition(latent_rows, sigma_rows, text_rows) -> Conditioning:
            return self.net.condition(latent_rows, sigma_rows, text_rows, image_size=plan.tile)

        network, row_counts = self._window_network()

        def velocity(cond: Conditioning, x_rows: torch.Tensor, t_rows: torch.Tensor) -> torch.Tensor:
            return network(x_rows, t_rows, cond)

        row_batch = self._caps.max_batch
        return decode_tiled(
            plan, batch, latents, sigmas, text, draw, row_batch, condition, velocity, row_counts,
            self.window_latents,
        )  # fmt: skip

    def _window_network(self) -> tuple[Velocity, tuple[int, ...] | None]:
        """The network step tiled decodes run on window rows, and the row counts it takes (None: any)."""
        return self.net.velocity, None

    def _compute(
        self,
        latents: torch.Tensor,
        sigmas: torch.Tensor,
        noises: list[torch.Tensor],
        text: torch.Tensor | None,
        timer: StageTimer,
        batch: DecodeBatch,
    ) -> torch.Tensor:
        """The decode on the device; eager, so it stops between steps when `batch.abandoned` says so."""
        return decode_on_device(
            self.net, latents, sigmas, noises, text, stoppable(self.net.velocity, batch), timer
        )


def _pad(batch: DecodeBatch, size: int) -> DecodeBatch:
    """The batch padded to `size` rows by repeating its first sample (their pixels are dropped)."""
    extra = size - batch.size
    if extra == 0:
        return batch

    def grow(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t[:1].expand(extra, *t.shape[1:])])

    text = None if batch.text is None else grow(batch.text)
    return dataclasses.replace(
        batch, latents=grow(batch.latents), sigmas=grow(batch.sigmas), seeds=grow(batch.seeds), text=text
    )


@dataclass
class _CapturedDecode:
    """One CUDA graph of the whole decode for one shape, with the static buffers it reads and writes."""

    graph: torch.cuda.CUDAGraph
    latents: torch.Tensor
    sigmas: torch.Tensor
    noises: list[torch.Tensor]
    text: torch.Tensor | None
    pixels: torch.Tensor  # uint8 [B, H, W, 3] written by the graph


class TorchCompileEngine(TorchEngine):
    """torch.compile'd network; on CUDA the whole decode replays as one CUDA graph per shape.

    A graph is captured on first use of a (batch, latent size, text length, steps) shape — or
    ahead of time by `warmup()` for the served `batch_sizes` x `image_sizes` — and replayed
    afterwards: inputs are copied into its static buffers, the graph runs without any host
    synchronisation, and its uint8 output is copied out. All graphs share one memory pool.
    On CPU there is no graph: the compiled network runs step by step.

    Name the served shapes in production: every new shape is a new compilation, and past
    torch._dynamo's recompile limit (8 by default; raised here to cover the served shapes)
    Dynamo runs new shapes eagerly, with a warning in the log.
    """

    backend = "torch-compile"

    def __init__(
        self,
        net: PiDNet,
        device: str = "cpu",
        precision: str = "fp32",
        max_batch: int = 8,
        compile_mode: str | None = None,
        batch_sizes: Sequence[int] | None = None,
        image_sizes: Sequence[tuple[int, int]] | None = None,
        attention_backend: str = "auto",
        tiling: Tiling = TILING_OFF,
        window_latents: str = "auto",
    ) -> None:
        # Mode "default" (None) on every device: on an H100, 2k flux at 2048² compiles in well under a
        # minute per shape and runs 1.55x faster than eager (bench/RESULTS.md); "max-autotune-no-cudagraphs"
        # autotunes for minutes (139 s on a tiny test net) with a speed gain nobody has measured yet.
        # Never "reduce-overhead" or "max-autotune": inductor's own CUDA graphs would fight our capture
        # of the whole decode.
        if compile_mode in ("reduce-overhead", "max-autotune"):
            raise EngineConfigError(
                f"torch.compile mode {compile_mode!r} captures its own CUDA graphs, which conflicts with the "
                "engine's capture of the whole decode; use 'default' or 'max-autotune-no-cudagraphs'"
            )
        super().__init__(
            net, device, precision, max_batch, batch_sizes, image_sizes, attention_backend, tiling,
            window_latents,
        )  # fmt: skip
        # dynamic=False compiles once per (batch size, image size); past dynamo's recompile limit it
        # would quietly run eager, so the limit covers every served shape.
        served = len(self._caps.served_batch_sizes) * max(1, len(image_sizes or ()))
        if served > torch._dynamo.config.recompile_limit:
            torch._dynamo.config.recompile_limit = served
        mode = compile_mode or "default"
        self.velocity = torch.compile(self.net.velocity, mode=mode, dynamic=False)
        self._graphs: dict[tuple, _CapturedDecode] = {}
        self._capture = GraphCapture(self.device) if self.device.type == "cuda" else None
        log.info("torch.compile mode=%s; CUDA graphs: %s", mode, self.device.type == "cuda")

    def _window_network(self) -> tuple[Velocity, tuple[int, ...] | None]:
        """Tiled decodes run the compiled step on chunks padded to max_batch window rows: one compiled
        shape (the window's) serves every output size. Step by step, also on CUDA (no graph yet)."""
        return self.velocity, (self._caps.max_batch,)

    def _compute(
        self,
        latents: torch.Tensor,
        sigmas: torch.Tensor,
        noises: list[torch.Tensor],
        text: torch.Tensor | None,
        timer: StageTimer,
        batch: DecodeBatch,
    ) -> torch.Tensor:
        if self._capture is None:  # not on CUDA: no graphs, the compiled network runs step by step
            velocity = stoppable(self.velocity, batch)
            return decode_on_device(self.net, latents, sigmas, noises, text, velocity, timer)
        stop_if_abandoned(batch)  # one graph replay: it can only be skipped before it starts
        key = (tuple(latents.shape), len(noises), None if text is None else tuple(text.shape))
        captured = self._graphs.get(key) or self._capture_decode(
            self._capture, key, latents, sigmas, noises, text
        )
        with timer.stage("graph"):
            captured.latents.copy_(latents)
            captured.sigmas.copy_(sigmas)
            for static, fresh in zip(captured.noises, noises, strict=True):
                static.copy_(fresh)
            if captured.text is not None and text is not None:
                captured.text.copy_(text)
            captured.graph.replay()
        return captured.pixels

    def _capture_decode(
        self,
        capture: GraphCapture,
        key: tuple,
        latents: torch.Tensor,
        sigmas: torch.Tensor,
        noises: list[torch.Tensor],
        text: torch.Tensor | None,
    ) -> _CapturedDecode:
        log.info("capturing a CUDA graph for decode shape %s", key)
        static_latents, static_sigmas = latents.clone(), sigmas.clone()
        static_noises = [n.clone() for n in noises]
        static_text = None if text is None else text.clone()

        def run() -> torch.Tensor:
            return decode_on_device(
                self.net, static_latents, static_sigmas, static_noises, static_text, self.velocity
            )

        # Two warm-up runs on a side stream (compilation, autotuning, allocator pools), then the capture.
        graph, pixels = capture.capture(run, warmup_runs=2)
        captured = _CapturedDecode(graph, static_latents, static_sigmas, static_noises, static_text, pixels)
        self._graphs[key] = captured
        return captured

    def close(self) -> None:
        """Drop the captured graphs and return their memory pool's blocks to the device (a 2048² batch
        of 4 holds tens of GB: the next engine in the process, e.g. in `bench engine`, needs them)."""
        self._graphs.clear()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def warmup(self, text_tokens: int | None = None) -> None:
        """Compile (and on CUDA capture) every served batch size x output size, 4 steps, with
        `text_tokens` text positions (None or 0: no text) — the shapes requests will bring."""
        caps = self._caps
        tokens = warmup_text_tokens(caps, text_tokens)
        if caps.image_sizes is None:
            log.warning("torch-compile warmup: no served image sizes given; shapes compile on first use")
            return
        for height, width in caps.image_sizes:
            for size in caps.served_batch_sizes:  # each batch size compiles (and captures) once
                latents = torch.zeros(
                    size, caps.latent_channels, height // caps.output_scale, width // caps.output_scale
                )
                text = torch.zeros(size, tokens, caps.text_dim) if tokens else None
                seeds = torch.zeros(size, dtype=torch.int64)
                self.decode(DecodeBatch(latents, torch.zeros(size), seeds, text))
