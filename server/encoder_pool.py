"""The output-encoding pool: PNG/JPEG/WebP off the event loop, on every core.

Measured on the 2-core development machine (bench/RESULTS.md, `pidserve bench codecs`): at 2048² fpng
writes a PNG in ~18 ms where Pillow/zlib level 1 takes ~270 ms and Pillow's default level ~1.5 s. fpng
holds the GIL (two threads run no faster than one), so it runs in worker processes, fed through shared
memory (one copy in, the PNG bytes back). JPEG (simplejpeg), WebP (Pillow, method 0) and Pillow's zlib
PNG release the GIL (two threads ~1.5-2x one) and run in threads.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
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


class EncoderPool:
    """`await pool.encode(images, fmt, quality)` -> bytes per image (one for raw/safetensors)."""

    def __init__(self, workers: int, png_encoder: str = "fpng", png_level: int = 1) -> None:
        self.png_encoder = png_encoder
        self.png_level = png_level
        self.threads: Executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="encode")
        # spawn, not fork: the server process holds threads (torch, the event loop) that fork would copy.
        self.processes = ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn")
        )
        self.workers = workers

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
            return await loop.run_in_executor(self.processes, job)
        finally:
            block.close()
            block.unlink()

    def close(self) -> None:
        self.threads.shutdown(wait=True)
        self.processes.shutdown(wait=True, cancel_futures=True)
