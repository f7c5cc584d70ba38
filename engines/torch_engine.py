"""PyTorch backends: `torch` (eager) and `torch-compile` (torch.compile + one CUDA graph per shape).

Both run the same decode (`decode_on_device`): condition once, `steps` velocity evaluations
with per-sample seeded noise, fused uint8 post-process, then one device-to-host copy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pidserve.kernels import postprocess
from pidserve.model import Conditioning, PiDNet
from pidserve.model.sampler import student_steps, student_timesteps

from .base import (
    TORCH_DTYPES,
    DecodeBatch,
    DecodeResult,
    Engine,
    EngineCapabilities,
    EngineConfigError,
    StageTimer,
    seeded_noises,
)

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
        return postprocess(x0)


def _stage(timer: StageTimer | None, name: str):
    from contextlib import nullcontext

    return timer.stage(name) if timer is not None else nullcontext()


def _check_device_and_precision(backend: str, device: str, precision: str) -> torch.device:
    if precision not in TORCH_DTYPES:
        raise EngineConfigError(
            f"the {backend} backend runs precision fp32 or bf16, not {precision!r} "
            "(FP8 engines are built with `pidserve build --precision fp8` and run on the tensorrt backend)"
        )
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EngineConfigError(f"device {device!r} was asked for but CUDA is not available on this machine")
    return dev


class TorchEngine(Engine):
    """Eager PyTorch on CPU or GPU, fp32 or bf16. Any batch size up to max_batch, any output size."""

    backend = "torch"

    def __init__(self, net: PiDNet, device: str = "cpu", precision: str = "fp32", max_batch: int = 8) -> None:
        self.device = _check_device_and_precision(self.backend, device, precision)
        self.precision = precision
        self.net = net.to(device=self.device, dtype=TORCH_DTYPES[precision]).eval()
        cfg = net.cfg
        self._caps = EngineCapabilities(
            backend=self.backend,
            device=str(self.device),
            precision=precision,
            latent_channels=cfg.latent_channels,
            latent_space=cfg.latent_space,
            text_dim=cfg.text_dim,
            output_scale=cfg.latent_downsample * cfg.sr_scale,
            max_batch=max_batch,
        )
        log.info("engine: backend=%s device=%s precision=%s", self.backend, self.device, precision)

    @property
    def capabilities(self) -> EngineCapabilities:
        return self._caps

    def decode(self, batch: DecodeBatch) -> DecodeResult:
        self._caps.check(batch)
        timer = StageTimer(self.device)
        height, width = self._caps.image_size(batch.latents.shape[-2:])
        with torch.inference_mode():
            with timer.stage("h2d"):
                latents = batch.latents.to(self.device, non_blocking=True)
                sigmas = batch.sigmas.to(self.device, non_blocking=True)
                text = None if batch.text is None else batch.text.to(self.device, non_blocking=True)
            with timer.stage("noise"):
                noises = seeded_noises(batch.seeds, (batch.size, 3, height, width), batch.steps, self.device)
            pixels = self._compute(latents, sigmas, noises, text, timer)
            with timer.stage("d2h"):
                images = pixels.cpu()
        return DecodeResult(images=images, timings=timer.result())

    def _compute(
        self,
        latents: torch.Tensor,
        sigmas: torch.Tensor,
        noises: list[torch.Tensor],
        text: torch.Tensor | None,
        timer: StageTimer,
    ) -> torch.Tensor:
        return decode_on_device(self.net, latents, sigmas, noises, text, timer=timer)


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
    ahead of time by `warmup()` — and replayed afterwards: inputs are copied into its static
    buffers, the graph runs without any host synchronisation, and its uint8 output is copied out.
    On CPU there is no graph: the compiled network runs step by step.
    """

    backend = "torch-compile"

    def __init__(
        self,
        net: PiDNet,
        device: str = "cpu",
        precision: str = "fp32",
        max_batch: int = 8,
        compile_mode: str | None = None,
    ) -> None:
        super().__init__(net, device, precision, max_batch)
        # Inductor's own CUDA graphs would fight our capture of the whole decode: keep them off.
        mode = compile_mode or ("max-autotune-no-cudagraphs" if self.device.type == "cuda" else "default")
        self.velocity = torch.compile(self.net.velocity, mode=mode, dynamic=False)
        self._graphs: dict[tuple, _CapturedDecode] = {}
        log.info("torch.compile mode=%s; CUDA graphs: %s", mode, self.device.type == "cuda")

    def _compute(
        self,
        latents: torch.Tensor,
        sigmas: torch.Tensor,
        noises: list[torch.Tensor],
        text: torch.Tensor | None,
        timer: StageTimer,
    ) -> torch.Tensor:
        if self.device.type != "cuda":
            return decode_on_device(self.net, latents, sigmas, noises, text, self.velocity, timer)
        key = (tuple(latents.shape), len(noises), None if text is None else tuple(text.shape))
        captured = self._graphs.get(key) or self._capture(key, latents, sigmas, noises, text)
        with timer.stage("graph"):
            captured.latents.copy_(latents)
            captured.sigmas.copy_(sigmas)
            for static, fresh in zip(captured.noises, noises, strict=True):
                static.copy_(fresh)
            if captured.text is not None and text is not None:
                captured.text.copy_(text)
            captured.graph.replay()
        return captured.pixels

    def _capture(
        self,
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

        # Warm up on a side stream (compilation, autotuning, allocator pools), then capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            pixels = run()
        captured = _CapturedDecode(graph, static_latents, static_sigmas, static_noises, static_text, pixels)
        self._graphs[key] = captured
        return captured
