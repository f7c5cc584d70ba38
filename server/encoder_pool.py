"""The output-encoding pool: PNG/JPEG/WebP off the event loop, on every core.

Measured on the 2-core development machine (bench/RESULTS.md, `pidserve bench codecs`): at 2048² fpng
writes a PNG in ~18 ms where Pillow/zlib level 1 takes ~270 ms and Pillow's default level ~1.5 s. fpng
holds the GIL (two threads run no faster than one), so it runs in worker processes, fed through shared
memory (one copy in, the PNG bytes back). JPEG (simplejpeg), WebP (Pillow, method 0) and Pillow's zlib
PNG release the GIL (two threads ~1.5-2x one) and run in threads.

A worker process can die (OOM-killed, crashed); ProcessPoolExecutor then marks the whole pool broken and
fails every encode on it, for good. The pool notices (BrokenProcessPool), builds a fresh set of processes
once per breakage, and retries the encode once; if that cannot be done, `failure` says why and readiness
turns false (loader.py), so the orchestrator restarts the pod.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from multiprocessing import shared_memory

import numpy as np

from . import image_encoders

log = logging.getLogger(__name__)


def _encode_shared(name: str, shape: tuple[int, ...]) -> bytes:
    """In a worker process: fpng-encode the uint8 image held in shared memory block `name`."""
    block = shared_memory.SharedMemory(name=name)
    try:
        pixels = np.ndarray(shape, dtype=np.uint8, buffer=block.buf)
        try:
            return image_encoders.encode_fpng(pixels)
        finally:
            del pixels  # release the buffer before closing the block
    finally:
        block.close()


def _warm(_: int) -> int:
    """Import the codecs in a fresh worker process (so the first request does not pay for it)."""
    import fpng  # noqa: F401
    import PIL.Image  # noqa: F401

    return 0


class EncoderUnavailable(Exception):
    """The encoder processes died and could not be rebuilt (`EncoderPool.failure` says why)."""


class EncoderPool:
    """`await pool.encode(images, fmt, quality)` -> bytes per image (one for raw/safetensors)."""

    def __init__(self, workers: int, png_encoder: str = "fpng", png_level: int = 1) -> None:
        self.png_encoder = png_encoder
        self.png_level = png_level
        self.workers = workers
        self.threads: Executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="encode")
        self.processes = self._start_processes()
        self.generation = 0  # +1 per rebuild: concurrent encodes that saw one breakage rebuild once
        self.rebuilds = 0
        self.failure: str | None = None  # set when a rebuild failed: the pool cannot recover
        self._rebuild_lock = threading.Lock()

    def _start_processes(self) -> ProcessPoolExecutor:
        # spawn, not fork: the server process holds threads (torch, the event loop) that fork would copy.
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"))

    def warmup(self) -> None:
        """Start the fpng processes now (ProcessPoolExecutor starts them on first use otherwise)."""
        if self.png_encoder == "fpng":
            list(self.processes.map(_warm, range(self.workers)))

    async def encode(self, images: np.ndarray, fmt: str, quality: int) -> list[bytes]:
        """images: uint8 [B, H, W, 3]. raw/safetensors give one bytes for the whole batch."""
        loop = asyncio.get_running_loop()
        if fmt in ("raw", "safetensors"):
            return [await loop.run_in_executor(self.threads, image_encoders.encode_tensor, images, fmt)]
        jobs = [self._encode_one(loop, image, fmt, quality) for image in images]
        return list(await asyncio.gather(*jobs))

    async def _encode_one(self, loop, pixels: np.ndarray, fmt: str, quality: int) -> bytes:
        if fmt == "jpeg":
            return await loop.run_in_executor(self.threads, image_encoders.encode_jpeg, pixels, quality)
        if fmt == "webp":
            return await loop.run_in_executor(self.threads, image_encoders.encode_webp, pixels, quality)
        if self.png_encoder == "pillow":
            return await loop.run_in_executor(
                self.threads, image_encoders.encode_pillow_png, pixels, self.png_level
            )
        return await self._fpng_in_process(loop, pixels)

    async def _fpng_in_process(self, loop, pixels: np.ndarray) -> bytes:
        block = shared_memory.SharedMemory(create=True, size=max(pixels.nbytes, 1))
        try:
            np.ndarray(pixels.shape, dtype=np.uint8, buffer=block.buf)[...] = pixels
            job = partial(_encode_shared, block.name, tuple(pixels.shape))
            generation = self.generation
            try:
                return await self._run_fpng(loop, job)
            except BrokenProcessPool:
                log.warning("an encoder process died; rebuilding the pool and retrying the image once")
                await asyncio.to_thread(self._rebuild, generation)
            try:
                return await self._run_fpng(loop, job)
            except BrokenProcessPool:
                raise EncoderUnavailable("an encoder process died again right after a rebuild") from None
        finally:
            block.close()
            block.unlink()

    async def _run_fpng(self, loop, job) -> bytes:
        """One fpng encode in the current process pool (BrokenProcessPool if a process died)."""
        if self.failure is not None:
            raise EncoderUnavailable(self.failure)
        return await loop.run_in_executor(self.processes, job)

    def _rebuild(self, broken_generation: int) -> None:
        """Replace the broken process pool (once, however many encodes saw it break) and warm it up."""
        with self._rebuild_lock:
            if self.generation != broken_generation:
                return  # another encode already rebuilt it
            self.processes.shutdown(wait=False, cancel_futures=True)
            try:
                self.processes = self._start_processes()
                self.warmup()
            except Exception as exc:
                self.failure = (
                    f"the PNG encoder processes could not be restarted: {type(exc).__name__}: {exc}"
                )
                log.exception("encoder pool rebuild failed: the service reports not ready")
                raise EncoderUnavailable(self.failure) from None
            self.generation += 1
            self.rebuilds += 1

    def close(self) -> None:
        self.threads.shutdown(wait=True)
        self.processes.shutdown(wait=True, cancel_futures=True)
