"""The one Engine interface every backend implements, and what crosses it.

    DecodeBatch (CPU tensors) --Engine.decode()--> DecodeResult (uint8 [B, H, W, 3] on CPU + timings)

A decode is latent pre-processing, the adapter trunk once, `steps` network evaluations with
fresh noise, and the uint8 post-process — all on the engine's device, with one host-to-device
copy of the inputs and one device-to-host copy of the pixels. Noise comes from each sample's
own seed, so a request's noise does not depend on its batch-mates; its pixels are bit-identical
for the same batch size on one backend, and may differ by float rounding (about one uint8
level) across batch sizes, where matmul kernels block the work differently.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from pidserve.model import (
    MAX_STUDENT_STEPS,
    TILING_OFF,
    Progress,
    TilePlan,
    Tiling,
    WindowLatents,
    crop_window_latents,
    window_latents_for,
)

MAX_SEED = 2**63 - 1  # seeds are int64 on every path (DecodeBatch, the wire formats): 0 .. MAX_SEED

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp8")
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class DecodeAbandoned(Exception):
    """The decode stopped between sampler steps because `DecodeBatch.abandoned` said so."""


class EngineInputError(ValueError):
    """A batch this engine cannot decode (shape, batch size, steps); the message says what fits."""


class EngineConfigError(ValueError):
    """An engine that cannot be built or loaded as asked (wrong device, precision, GPU, version)."""


def check_device(device: str) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' as a torch.device, if this machine has it; else EngineConfigError."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise EngineConfigError(f"device {device!r} is not a device: use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise EngineConfigError(f"device {device!r} is not supported: use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EngineConfigError(
                f"device {device!r} was asked for but CUDA is not available on this machine"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise EngineConfigError(f"device {device!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


@dataclass
class DecodeBatch:
    """What an engine decodes. All tensors on the CPU.

    latents: float32 [B, C, h, w] normalised latents; sigmas: float32 [B] in [0, 1];
    seeds: int64 [B]; text: float32 [B, Lt, text_dim] or None (no text tokens); steps: 1-4.
    """

    latents: torch.Tensor
    sigmas: torch.Tensor
    seeds: torch.Tensor
    text: torch.Tensor | None = None
    steps: int = 4
    # Asked between sampler steps by the backends that run step by step (torch eager, torch-compile
    # off CUDA, onnxruntime): True when nobody waits for any of the batch's images any more (deadline
    # passed, client gone), and the decode stops with DecodeAbandoned. A CUDA-graph replay (torch-compile
    # on CUDA, TensorRT) is one launch and cannot stop part-way: it asks once, before it starts.
    abandoned: Callable[[], bool] | None = field(default=None, compare=False, repr=False)
    # This batch's tiling (model/tiling.py); None: the engine's default (EngineCapabilities.tiling).
    tiling: Tiling | None = None
    # Called as progress(done, total) after each chunk of windows of a tiled decode (a progress bar).
    progress: Progress | None = field(default=None, compare=False, repr=False)

    @property
    def size(self) -> int:
        return int(self.latents.shape[0])

    @classmethod
    def single(
        cls,
        latent: torch.Tensor,
        sigma: float = 0.0,
        seed: int = 0,
        text: torch.Tensor | None = None,
        steps: int = 4,
        tiling: Tiling | None = None,
    ) -> DecodeBatch:
        """A batch of one from a latent [C, h, w] or [1, C, h, w]."""
        latent = latent if latent.ndim == 4 else latent[None]
        return cls(
            latents=latent.float(),
            sigmas=torch.tensor([sigma], dtype=torch.float32),
            seeds=torch.tensor([seed], dtype=torch.int64),
            text=text,
            steps=steps,
            tiling=tiling,
        )


def stop_if_abandoned(batch: DecodeBatch) -> None:
    if batch.abandoned is not None and batch.abandoned():
        raise DecodeAbandoned("every image of this batch was abandoned (deadline passed or client gone)")


def stoppable(velocity: Callable, batch: DecodeBatch) -> Callable:
    """`velocity`, asking `batch.abandoned` before every step (the first included)."""
    if batch.abandoned is None:
        return velocity

    def step(*args, **kwargs):
        stop_if_abandoned(batch)
        return velocity(*args, **kwargs)

    return step


@dataclass
class DecodeResult:
    images: torch.Tensor  # uint8 [B, H, W, 3] on the CPU
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, plus "total"
    windows: int = 1  # windows per image (tiled decodes; 1: untiled)


@dataclass(frozen=True)
class EngineCapabilities:
    """What an engine can decode; `check` turns a mismatch into an EngineInputError."""

    backend: str
    device: str
    precision: str
    latent_channels: int
    latent_space: str
    text_dim: int
    output_scale: int  # output pixels per latent cell
    max_batch: int
    batch_sizes: tuple[int, ...] | None = None  # None: any size up to max_batch
    image_sizes: tuple[tuple[int, int], ...] | None = None  # None: any multiple of 16
    steps: tuple[int, ...] = tuple(range(1, MAX_STUDENT_STEPS + 1))
    text_tokens: tuple[int, ...] | None = None  # None: any count (0 = no text)
    tiling: Tiling = TILING_OFF  # the default of batches that name none
    # What `auto` tiling cuts into: the network's trained output size, or the one shape a fixed-shape
    # engine was built for (its tiles are then that shape). None: this engine cannot tile.
    native_size: tuple[int, int] | None = None

    @property
    def served_batch_sizes(self) -> tuple[int, ...]:
        """Every batch size a request mix can produce: the built ones, else 1..max_batch."""
        return self.batch_sizes or tuple(range(1, self.max_batch + 1))

    def image_size(self, latent_hw: Sequence[int]) -> tuple[int, int]:
        return int(latent_hw[0]) * self.output_scale, int(latent_hw[1]) * self.output_scale

    def check(self, batch: DecodeBatch) -> None:
        latents = batch.latents
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise EngineInputError(
                f"this engine decodes '{self.latent_space}' latents [B, {self.latent_channels}, h, w]; "
                f"got {list(latents.shape)}"
            )
        n = batch.size
        if not 1 <= n <= self.max_batch:
            raise EngineInputError(f"batch size {n} is outside 1..{self.max_batch} for this engine")
        if batch.sigmas.shape != (n,) or batch.seeds.shape != (n,):
            raise EngineInputError(
                f"sigmas and seeds must have shape [{n}]; "
                f"got {list(batch.sigmas.shape)} and {list(batch.seeds.shape)}"
            )
        if n and not 0 <= int(batch.seeds.min()) <= int(batch.seeds.max()) <= MAX_SEED:
            raise EngineInputError(f"seeds must be integers in 0..{MAX_SEED}; got {batch.seeds.tolist()}")
        if batch.steps not in self.steps:
            raise EngineInputError(
                f"steps={batch.steps} is not supported; this engine runs {list(self.steps)}"
            )
        plan = self.plan(batch)  # EngineInputError for a tiling that cannot cut this output
        size = self.image_size(latents.shape[-2:])
        shape = size if plan is None else plan.tile  # what one network call sees
        if self.image_sizes is not None and shape not in self.image_sizes:
            fits = ", ".join(f"{h}x{w}" for h, w in self.image_sizes)
            if plan is not None:
                raise EngineInputError(
                    f"output {size[0]}x{size[1]} cuts into {shape[0]}x{shape[1]} windows, but this engine "
                    f"was built for {fits} only: both sides of the output must be at least the window's"
                )
            hint = "" if self.native_size is None else f" (or ask for tile=auto: windows of {fits})"
            raise EngineInputError(
                f"output size {size[0]}x{size[1]} is not built into this engine; built: {fits}{hint}"
            )
        if batch.text is not None and (batch.text.ndim != 3 or batch.text.shape[0] != n):
            raise EngineInputError(f"text must be [{n}, tokens, dim]; got {list(batch.text.shape)}")
        tokens = 0 if batch.text is None else int(batch.text.shape[1])
        if self.text_tokens is not None and tokens not in self.text_tokens:
            raise EngineInputError(
                f"{tokens} text tokens given; this engine was built for {list(self.text_tokens)}"
            )

    def plan(self, batch: DecodeBatch) -> TilePlan | None:
        """The windows this batch decodes in (its own tiling, else the engine's), or None: untiled."""
        tiling = self.tiling if batch.tiling is None else batch.tiling
        if not tiling.enabled:
            return None
        if self.native_size is None:
            raise EngineInputError(f"the {self.backend} engine does not decode in tiles; ask for tile=off")
        size = self.image_size(batch.latents.shape[-2:])
        try:
            return tiling.plan(size, self.native_size, self.output_scale)
        except ValueError as exc:
            raise EngineInputError(f"tile={tiling}: {exc}") from None


@dataclass(frozen=True)
class ShapeProfile:
    """One static output size, with the batch sizes and text length an engine serves at it.

    What an ONNX export (build/export.py) and a TensorRT engine directory are built for.
    """

    image_size: tuple[int, int]  # output (H, W) pixels
    batch_sizes: tuple[int, ...] = (1,)
    text_tokens: int = 0

    @property
    def max_batch(self) -> int:
        return max(self.batch_sizes)

    @property
    def tag(self) -> str:
        return f"{self.image_size[0]}x{self.image_size[1]}_t{self.text_tokens}"

    def latent_size(self, output_scale: int) -> tuple[int, int]:
        return self.image_size[0] // output_scale, self.image_size[1] // output_scale


class Engine(ABC):
    """Decode batches of latents into uint8 images. Backends never fall back to one another."""

    backend: str = "abstract"
    # What tiled decodes condition each window on (model/window_latents.py); backends that tile set it
    # from their `window_latents` option (engine_window_latents).
    window_latents: WindowLatents = staticmethod(crop_window_latents)

    @property
    @abstractmethod
    def capabilities(self) -> EngineCapabilities: ...

    @abstractmethod
    def decode(self, batch: DecodeBatch) -> DecodeResult:
        """Decode a batch; raises EngineInputError for batches outside `capabilities`."""

    def warmup(self, text_tokens: int | None = None) -> None:
        """Run every served batch size once (and capture graphs where the backend does).

        text_tokens: the text length requests will carry (a server with a text encoder sends the
        network's `text_max_length` with every request); None: the engine's built length, else none.
        """
        caps = self.capabilities
        tokens = warmup_text_tokens(caps, text_tokens)
        for size in caps.served_batch_sizes:
            latents = torch.zeros(size, caps.latent_channels, 1, 1)
            if caps.image_sizes:
                h, w = caps.image_sizes[0]
                latents = torch.zeros(
                    size, caps.latent_channels, h // caps.output_scale, w // caps.output_scale
                )
            text = torch.zeros(size, tokens, caps.text_dim) if tokens else None
            seeds = torch.zeros(size, dtype=torch.int64)
            self.decode(DecodeBatch(latents, torch.zeros(size), seeds, text, max(caps.steps)))

    def close(self) -> None:  # noqa: B027 — optional hook; most backends hold nothing to release
        """Release device memory and sessions."""


# ---- shared helpers for backends ----------------------------------------------------------------
def warmup_text_tokens(caps: EngineCapabilities, requested: int | None) -> int:
    """The text length to warm up with; refuses one the engine was not built for (with the fix)."""
    if requested is None:
        return caps.text_tokens[0] if caps.text_tokens else 0
    if caps.text_tokens is not None and requested not in caps.text_tokens:
        raise EngineConfigError(
            f"requests will carry {requested} text tokens but this {caps.backend} engine was built for "
            f"{list(caps.text_tokens)}; rebuild it with --text-tokens {requested} "
            "(or serve without a text encoder)"
        )
    return requested


def engine_window_latents(mode: str, latent_space: str) -> WindowLatents:
    """What an engine's tiled decodes condition each window on (model/window_latents.py): 'auto'
    (corrected for the latent spaces whose autoencoder pidserve has, else the crop), 'crop' or
    'corrected'; EngineConfigError for a mode this latent space cannot have."""
    try:
        return window_latents_for(mode, latent_space)
    except ValueError as exc:
        raise EngineConfigError(str(exc)) from None


def padded_batch_size(n: int, batch_sizes: Sequence[int]) -> int:
    """The served batch size for a batch of n: the smallest one >= n (the rest is padding)."""
    fits = [size for size in batch_sizes if size >= n]
    if n < 1 or not fits:
        raise EngineInputError(f"batch size {n} is outside 1..{max(batch_sizes)} for this engine")
    return min(fits)


def on_device(device: torch.device) -> AbstractContextManager:
    """Make `device` current (CUDA): streams, graph capture and enqueues then all target it."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def seeded_noises(
    seeds: torch.Tensor, shape: tuple[int, ...], steps: int, device: torch.device
) -> list[torch.Tensor]:
    """`steps` noise tensors of `shape` [B, ...]: sample i's draws come, in order, from seeds[i]'s own
    noise stream on `device` — so a sample's pixels do not depend on its batch-mates."""
    draw = seeded_noise_stream(seeds, shape, device)
    return [draw() for _ in range(steps)]


def seeded_noise_stream(
    seeds: torch.Tensor, shape: tuple[int, ...], device: torch.device
) -> Callable[[], torch.Tensor]:
    """The same draws as `seeded_noises`, one [B, ...] tensor per call, made when asked for: a tiled
    decode of a large output holds one whole-image draw at a time instead of all of them."""
    streams = [_noise_stream(int(seed), (1, *shape[1:]), device) for seed in seeds.tolist()]
    return lambda: torch.cat([draw() for draw in streams])


def _noise_stream(seed: int, shape: tuple[int, ...], device: torch.device):
    """A function returning the next standard-normal draw of `seed`'s stream.

    The CPU generator (mt19937) keeps only the low 32 bits of its seed, so 5 and 5 + 2**32 would give
    the same noise. A seed below 2**32 is one generator (the official sampler's noise, byte for byte);
    a larger one adds a second generator seeded with its high 32 bits and mixes the two draws as
    0.8 a + 0.6 b: still standard normal, and unequal weights keep seeds with swapped halves apart, so
    every seed in 0 .. MAX_SEED has its own noise on every device."""
    if not 0 <= seed <= MAX_SEED:
        raise EngineInputError(f"seed {seed} is outside 0..{MAX_SEED}")
    low = torch.Generator(device=device).manual_seed(seed & 0xFFFFFFFF)
    high_bits = seed >> 32
    if not high_bits:
        return lambda: torch.randn(shape, generator=low, device=device, dtype=torch.float32)
    high = torch.Generator(device=device).manual_seed(high_bits)

    def mixed() -> torch.Tensor:
        a = torch.randn(shape, generator=low, device=device, dtype=torch.float32)
        b = torch.randn(shape, generator=high, device=device, dtype=torch.float32)
        return 0.8 * a + 0.6 * b

    return mixed


def copy_to_host(pixels: torch.Tensor) -> torch.Tensor:
    """The decoded uint8 images as a host tensor the caller owns; the copy has landed when this returns.

    Always a copy: `pixels` may be an engine's reused output buffer (a CUDA graph's static output, the
    static decoder's buffers), which the next decode overwrites. From CUDA the destination is pinned
    (page-locked) memory from torch's caching host allocator: a pageable destination goes through a
    driver staging buffer and first-touch page faults, which cost 32.9 ms for a 4 x 2048² batch (50 MB)
    on an H100 (bench/RESULTS.md).
    """
    if pixels.device.type != "cuda":
        return pixels.clone()
    host = torch.empty(pixels.shape, dtype=pixels.dtype, pin_memory=True)
    host.copy_(pixels, non_blocking=True)
    # The source may be a CUDA graph's static output, rewritten by the next replay: wait for the copy.
    torch.cuda.current_stream(pixels.device).synchronize()
    return host


class StageTimer:
    """Wall-clock (CPU) or CUDA-event (GPU) durations of named stages, read once at the end."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._marks: list[tuple[str, object, object]] = []
        self._start = time.perf_counter()

    def _now(self) -> object:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        begin = self._now()
        yield
        self._marks.append((name, begin, self._now()))

    def result(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, float] = {}
        for name, begin, end in self._marks:
            seconds = begin.elapsed_time(end) / 1e3 if self.cuda else end - begin  # type: ignore[attr-defined,operator]
            out[name] = out.get(name, 0.0) + seconds
        out["total"] = time.perf_counter() - self._start
        return out
