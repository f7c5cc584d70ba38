"""Fused post-process of a decode: float images [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3].

In eager torch this is several passes over the image (upcast, clamp, add, multiply, cast, permute + copy),
each reading and writing the whole tensor. The Triton kernel does it in one pass: every input element is read
once and every output byte written once, which matters because a decode's last step is memory bound.

The value of every byte is trunc((clamp(x, -1, 1) + 1) * 127.5) computed in float32: truncation toward
zero, not rounding, exactly like numpy's `astype(np.uint8)` after the same float math. That is how the
official PiD code converts images, so our bytes match it exactly.

Inputs must be finite. clamp(NaN) is NaN and casting NaN to uint8 is undefined (torch, numpy and the GPU
each give some byte), so the reference and the kernel may disagree on NaN pixels; nothing checks for
them, because a NaN in a decoded image is a model bug that a byte value would not fix anyway.

Three entry points:
    postprocess_reference(x)          plain torch, the definition of the result
    postprocess_triton(x, out=None)   the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1)
    postprocess(x, out=None, impl=)   what callers use: Triton on CUDA, the reference on CPU
"""

from __future__ import annotations

from typing import Literal

import torch

from .triton_support import INSTALL_HINT, interpreter_enabled, triton_available

INPUT_DTYPES = (torch.float32, torch.bfloat16)

# CUDA limits the second grid dimension (one program row per image) to 65535.
_MAX_TRITON_BATCH = 65535

Impl = Literal["auto", "triton", "torch"]


def postprocess_reference(x: torch.Tensor) -> torch.Tensor:
    """Plain-torch definition of the post-process; the kernel must match it byte for byte.

    Args:
        x: float [B, 3, H, W], any float dtype, any device. Values roughly in [-1, 1]; values outside are
            clamped. Must be finite (see the module docstring).

    Returns:
        uint8 [B, H, W, 3], contiguous, on x's device; values in [0, 255].
    """
    return ((x.float().clamp(-1, 1) + 1) * 127.5).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def postprocess_triton(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The fused Triton kernel: one read of x, one write of the result.

    Args:
        x: float32 or bfloat16 [B, 3, H, W], contiguous (NCHW), on a CUDA device; or on the CPU when the
            environment has TRITON_INTERPRET=1 (Triton's interpreter executes kernels on CPU memory; the
            variable must be set before this function is first called in the process). Finite values.
        out: optional preallocated uint8 [B, H, W, 3], contiguous, on x's device, e.g. a CUDA-graph static
            buffer. To land in pinned host memory, pass a device buffer here and copy it to the pinned
            buffer with `non_blocking=True`.

    Returns:
        uint8 [B, H, W, 3] (`out` itself when given); values in [0, 255].

    Raises:
        ValueError: wrong shape, dtype, layout or device of x or out.
        RuntimeError: Triton is not installed.
    """
    out = _checked_out(x, out)
    on_cuda = x.device.type == "cuda"
    interpreted = x.device.type == "cpu" and interpreter_enabled()
    if not (on_cuda or interpreted):
        raise ValueError(
            f"postprocess_triton needs a CUDA tensor (got one on {x.device}); CPU tensors only work "
            "under Triton's interpreter (TRITON_INTERPRET=1). Use postprocess() to pick automatically."
        )
    if x.shape[0] > _MAX_TRITON_BATCH:
        raise ValueError(
            f"postprocess_triton handles at most {_MAX_TRITON_BATCH} images per call, got {x.shape[0]}"
        )
    if not triton_available():
        raise RuntimeError(INSTALL_HINT)
    if out.numel() == 0:
        return out  # nothing to write, and a grid with a zero dimension is not launchable

    from . import _postprocess_triton  # imports Triton; deferred so `import pidserve.kernels` stays light

    if on_cuda:
        # Triton launches on the current device; make that x's device so multi-GPU callers need no care.
        with torch.cuda.device(x.device):
            _postprocess_triton.launch(x, out)
    else:
        _postprocess_triton.launch(x, out)
    return out


def postprocess(x: torch.Tensor, out: torch.Tensor | None = None, impl: Impl = "auto") -> torch.Tensor:
    """Convert decoded images to uint8 HWC; what the rest of pidserve calls.

    With impl="auto", CUDA tensors go to the Triton kernel and CPU tensors to the plain-torch reference.
    The CPU path is not a fallback for errors: on the CPU the reference simply is the implementation
    (there is nothing to fuse for). A CUDA tensor without Triton installed raises a RuntimeError that
    says how to install it, rather than quietly running the slower torch code. impl="triton" or
    impl="torch" forces one implementation (e.g. for benchmarks or to rule the kernel out).

    Args:
        x: float32 or bfloat16 [B, 3, H, W], contiguous (NCHW), finite, values roughly in [-1, 1].
        out: optional preallocated uint8 [B, H, W, 3], contiguous, on x's device.
        impl: "auto", "triton" or "torch".

    Returns:
        uint8 [B, H, W, 3], contiguous (`out` itself when given); values in [0, 255].

    Raises:
        ValueError: bad x/out (the same checks for every impl, so behaviour does not depend on the
            device), or an unknown impl.
        RuntimeError: the Triton kernel was chosen but Triton is not installed.
    """
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    if impl == "auto":
        impl = "triton" if x.device.type == "cuda" else "torch"
    if impl == "triton":
        return postprocess_triton(x, out)

    out = _checked_out(x, out)
    out.copy_(postprocess_reference(x))
    return out


def _checked_out(x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """Validate x, then validate `out` or allocate it. Returns the uint8 [B, H, W, 3] output buffer."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"x must have shape [B, 3, H, W], got {list(x.shape)}")
    if x.dtype not in INPUT_DTYPES:
        raise ValueError(f"x must be float32 or bfloat16, got {x.dtype}")
    if not x.is_contiguous():
        # channels_last or a sliced view: the kernel indexes plain NCHW memory.
        raise ValueError("x must be contiguous in NCHW order (call x.contiguous() first)")

    batch, _, height, width = x.shape
    expected = (batch, height, width, 3)
    if out is None:
        return torch.empty(expected, dtype=torch.uint8, device=x.device)
    if tuple(out.shape) != expected:
        raise ValueError(f"out must have shape {list(expected)} (= [B, H, W, 3]), got {list(out.shape)}")
    if out.dtype != torch.uint8:
        raise ValueError(f"out must be uint8, got {out.dtype}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    if out.device != x.device:
        raise ValueError(f"out must be on x's device ({x.device}), got {out.device}")
    return out
