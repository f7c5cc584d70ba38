"""The Triton kernel behind `postprocess_triton`. Imports Triton at module level, so only
`postprocess.py` imports this module, and only when a Triton launch is actually requested."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Pixels per program. 1024 pixels = 12 KiB of float32 reads and 3 KiB of byte writes per program: large
# enough to keep loads vectorized and the launch grid small, small enough for many programs per SM even
# on 256x256 images (64 programs per image). Not tuned on a GPU yet; see kernels/README.md.
BLOCK_PIXELS = 1024
NUM_WARPS = 4


@triton.jit
def _to_byte(v):
    """One channel value -> uint8, exactly as `postprocess_reference`: float32 math, truncation.

    `.to(tl.uint8)` from float is fptoui, which truncates toward zero like numpy's astype(uint8); after the
    clamp the value lies in [0, 255], so there is no overflow.
    """
    v = v.to(tl.float32)
    v = tl.minimum(tl.maximum(v, -1.0), 1.0)
    return ((v + 1.0) * 127.5).to(tl.uint8)


@triton.jit
def postprocess_kernel(x_ptr, out_ptr, hw, BLOCK: tl.constexpr):
    """x [B, 3, H, W] float (NCHW, contiguous) -> out [B, H, W, 3] uint8 (HWC, contiguous).

    Grid: (cdiv(H*W, BLOCK), B). Program (p, b) handles pixels p*BLOCK .. p*BLOCK+BLOCK-1 of image b:
    it reads those pixels from each of the three channel planes (three contiguous, coalesced loads) and
    writes them interleaved as R, G, B bytes. Every input element is read once, every byte written once.
    """
    pixel_block = tl.program_id(0)
    # int64 for the image offset: B*3*H*W can exceed 2**31 for large batches of large images, while the
    # offsets inside one image (3*H*W) stay small.
    image = tl.program_id(1).to(tl.int64)
    pixels = pixel_block * BLOCK + tl.arange(0, BLOCK)
    in_image = pixels < hw  # the last block of an image is usually partial

    planes = x_ptr + image * 3 * hw
    red = tl.load(planes + pixels, mask=in_image)
    green = tl.load(planes + hw + pixels, mask=in_image)
    blue = tl.load(planes + 2 * hw + pixels, mask=in_image)

    # Byte 3*i + c of the image holds channel c of pixel i.
    rgb = out_ptr + (image * hw + pixels) * 3
    tl.store(rgb, _to_byte(red), mask=in_image)
    tl.store(rgb + 1, _to_byte(green), mask=in_image)
    tl.store(rgb + 2, _to_byte(blue), mask=in_image)


def launch(x: torch.Tensor, out: torch.Tensor) -> None:
    """Run the kernel: x [B, 3, H, W] float32/bfloat16 -> out [B, H, W, 3] uint8 (already validated)."""
    batch, _, height, width = x.shape
    hw = height * width
    grid = (triton.cdiv(hw, BLOCK_PIXELS), batch)
    postprocess_kernel[grid](x, out, hw, BLOCK=BLOCK_PIXELS, num_warps=NUM_WARPS)
