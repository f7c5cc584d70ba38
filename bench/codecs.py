"""`pidserve bench codecs`: output encoders at serving sizes, and which of them hold the GIL.

For each candidate and size: median ms per image on one thread, output size, whether the decoded file
equals the input (lossless), and the throughput of two threads over one. A codec that releases the GIL
scales with threads (~2x on two cores); one that holds it does not (~1x) and must run in processes.
The server's own path (EncoderPool: fpng in worker processes via shared memory) is timed too.

The test image is a real photograph, centre-cropped and resized to each size with Lanczos (upsampling a
photograph is smoother than a real 4K decode, so compression ratios at 4096² are optimistic).
"""

from __future__ import annotations

import asyncio
import io
import logging
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pidserve.server import encode_fpng, encode_jpeg, encode_pillow_png, encode_webp

log = logging.getLogger(__name__)


def _pillow_png(level: int) -> Callable[[np.ndarray], bytes]:
    return lambda pixels: encode_pillow_png(pixels, level)


def _opencv_png(pixels: np.ndarray) -> bytes:
    import cv2

    ok, data = cv2.imencode(".png", np.ascontiguousarray(pixels[..., ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    assert ok
    return data.tobytes()


def _imagecodecs_png(pixels: np.ndarray) -> bytes:
    import imagecodecs

    return imagecodecs.png_encode(pixels, level=1)


def _pillow_jpeg(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def _opencv_webp(pixels: np.ndarray) -> bytes:
    import cv2

    ok, data = cv2.imencode(".webp", np.ascontiguousarray(pixels[..., ::-1]), [cv2.IMWRITE_WEBP_QUALITY, 90])
    assert ok
    return data.tobytes()


# name -> (format, encoder, module it needs). Optional ones are skipped, and said so, when not installed.
CANDIDATES: dict[str, tuple[str, Callable[[np.ndarray], bytes], str | None]] = {
    "fpng (served)": ("png", encode_fpng, "fpng"),
    "pillow png level 0": ("png", _pillow_png(0), None),
    "pillow png level 1": ("png", _pillow_png(1), None),
    "pillow png level 6 (default)": ("png", _pillow_png(6), None),
    "opencv png level 1": ("png", _opencv_png, "cv2"),
    "imagecodecs png level 1": ("png", _imagecodecs_png, "imagecodecs"),
    "simplejpeg q90 (served)": ("jpeg", lambda p: encode_jpeg(p, 90), "simplejpeg"),
    "pillow jpeg q90": ("jpeg", _pillow_jpeg, None),
    "pillow webp q90 method 0 (served)": ("webp", lambda p: encode_webp(p, 90), None),
    "opencv webp q90": ("webp", _opencv_webp, "cv2"),
}


@dataclass
class CodecTiming:
    codec: str
    format: str
    size: int
    ms_median: float
    megabytes: float
    lossless: bool
    two_thread_speedup: float  # ~2 on two cores: releases the GIL; ~1: holds it


def load_photo(path: Path, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: the photo's centre square, resized with Lanczos."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        square = im.crop((left, top, left + side, top + side))
        return np.asarray(square.resize((size, size), Image.Resampling.LANCZOS)).copy()


def _median_ms(encode: Callable[[np.ndarray], bytes], pixels: np.ndarray, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        encode(pixels)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _two_thread_speedup(encode: Callable[[np.ndarray], bytes], pixels: np.ndarray, repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(2 * repeat):
        encode(pixels)
    serial = time.perf_counter() - start
    threads = [threading.Thread(target=lambda: [encode(pixels) for _ in range(repeat)]) for _ in range(2)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return serial / (time.perf_counter() - start)


def _lossless(data: bytes, pixels: np.ndarray) -> bool:
    with Image.open(io.BytesIO(data)) as im:
        return bool(np.array_equal(np.asarray(im.convert("RGB")), pixels))


def time_codecs(
    photo: Path, sizes: list[int], repeat: int, only: list[str] | None = None
) -> list[CodecTiming]:
    import importlib.util

    rows = []
    for size in sizes:
        pixels = load_photo(photo, size)
        for name, (fmt, encode, module) in CANDIDATES.items():
            if only and name not in only:
                continue
            if module is not None and importlib.util.find_spec(module) is None:
                log.warning("skipping %s: %s is not installed", name, module)
                continue
            data = encode(pixels)  # warm up (imports, tables)
            rows.append(
                CodecTiming(
                    codec=name,
                    format=fmt,
                    size=size,
                    ms_median=_median_ms(encode, pixels, repeat),
                    megabytes=len(data) / 1e6,
                    lossless=_lossless(data, pixels),
                    two_thread_speedup=_two_thread_speedup(encode, pixels, repeat),
                )
            )
            log.info("%s at %d²: %.1f ms", name, size, rows[-1].ms_median)
    return rows


def time_server_pool(photo: Path, sizes: list[int], repeat: int, workers: int) -> list[dict]:
    """The server's PNG path end to end: shared-memory hand-off to an fpng worker process and back."""
    from pidserve.server import EncoderPool

    pool = EncoderPool(workers, png_encoder="fpng")
    try:
        pool.warmup()
        rows = []
        for size in sizes:
            batch = load_photo(photo, size)[None]

            async def once(images: np.ndarray = batch) -> None:
                await pool.encode(images, "png", 90)

            asyncio.run(once())
            times = []
            for _ in range(repeat):
                start = time.perf_counter()
                asyncio.run(once())
                times.append(time.perf_counter() - start)
            rows.append({"path": "EncoderPool png (fpng, process)", "size": size,
                         "ms_median": statistics.median(times) * 1e3})  # fmt: skip
        return rows
    finally:
        pool.close()


def markdown_table(rows: list[CodecTiming]) -> str:
    lines = [
        "| codec | size | ms/image | MB | lossless | 2-thread speedup |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.codec} | {r.size}² | {r.ms_median:.1f} | {r.megabytes:.2f} "
            f"| {'yes' if r.lossless else 'no'} | {r.two_thread_speedup:.2f} |"
        )
    return "\n".join(lines)


def as_dicts(rows: list[CodecTiming]) -> list[dict]:
    return [asdict(r) for r in rows]
