"""diffusers' remote VAE decode protocol (`diffusers.utils.remote_utils.remote_decode`) on POST
/v1/remote-decode: a pipeline hands its latents to pidserve unchanged, as it would to a hosted VAE.

    request   body: the latent tensor's raw bytes (Content-Type tensor/binary); query: shape, dtype,
              scaling_factor, shift_factor, height, width (packed latents), output_type, image_format,
              partial_postprocess; Accept image/jpeg | image/png | tensor/binary
    latent    raw = tensor / scaling_factor + shift_factor (what diffusers' own decoders compute before
              vae.decode; without scaling_factor the tensor is taken as raw), a packed [B, L, 4C] latent
              unpacked from height/width; then the served latent space's own normalisation
              (model/latents): the network reads normalised latents
    response  output_type "pil": one JPEG or PNG image; "pt": the images as a tensor with `shape` and
              `dtype` headers: uint8 [B, H, W, 3] with partial_postprocess, else float16 [B, 3, H, W]
              in [-1, 1] (what a VAE decoder returns, for the pipeline's image processor)

Errors are the /v1 JSON body (diffusers raises RuntimeError(response.json())).
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from pidserve.model import LatentError, get_latent_space, unpack_sequence

from .errors import ApiError, bad_request, unprocessable

# dtype names diffusers sends (str(tensor.dtype) without "torch.") -> torch dtype
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
OUTPUT_TYPES = ("pil", "pt")
IMAGE_FORMATS = {"jpg": "jpeg", "png": "png"}


def parse_shape(values: list[str]) -> list[int]:
    """`shape` as requests sends a list: repeated `shape=1&shape=16&...` (or one "[1, 16, ...]")."""
    text = ",".join(values).strip().strip("[]")
    try:
        shape = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise bad_request(
            f"shape must be integers, e.g. shape=1&shape=16&shape=64&shape=64; got {values}"
        ) from None
    if not 3 <= len(shape) <= 4 or min(shape) < 1:
        raise unprocessable(f"shape {shape} is not a latent [B, C, h, w] or a packed latent [B, L, 4C]")
    return shape


def read_latent(
    body: bytes,
    shape: list[int],
    dtype: str,
    scaling_factor: float | None,
    shift_factor: float | None,
    height: int | None,
    width: int | None,
    latent_space: str,
    latent_downsample: int,
) -> torch.Tensor:
    """The request's tensor as the normalised [B, C, h, w] latent the served network reads."""
    torch_dtype = DTYPES.get(dtype)
    if torch_dtype is None:
        raise unprocessable(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    expected = math.prod(shape) * torch_dtype.itemsize
    if len(body) != expected:
        raise unprocessable(f"shape {shape} in {dtype} is {expected} bytes; the body has {len(body)}")
    tensor = torch.frombuffer(bytearray(body), dtype=torch_dtype).reshape(shape).float()
    if tensor.ndim == 3:  # packed (FLUX-style 2x2 patches as a sequence): needs the image size
        if height is None or width is None:
            raise unprocessable("a packed [B, L, 4C] latent needs height and width (of the image)")
        try:
            tensor = unpack_sequence(tensor, height // latent_downsample, width // latent_downsample)
        except LatentError as exc:
            raise unprocessable(str(exc)) from None
    if scaling_factor is not None:
        if not math.isfinite(scaling_factor) or scaling_factor == 0:
            raise unprocessable("scaling_factor must be a finite number other than 0")
        tensor = tensor / scaling_factor + (shift_factor or 0.0)
    elif shift_factor is not None:
        raise unprocessable(
            "shift_factor needs scaling_factor (raw = tensor / scaling_factor + shift_factor)"
        )
    try:
        return get_latent_space(latent_space).normalize(tensor)
    except LatentError as exc:
        raise unprocessable(str(exc)) from None


def tensor_reply(images: np.ndarray, partial_postprocess: bool) -> tuple[bytes, dict[str, str]]:
    """uint8 [B, H, W, 3] -> (bytes, the `shape` and `dtype` headers remote_decode reads)."""
    if partial_postprocess:
        array = np.ascontiguousarray(images)
        dtype = "uint8"
    else:  # what a VAE decoder returns: float [B, 3, H, W] in [-1, 1]
        array = np.ascontiguousarray((images.transpose(0, 3, 1, 2) / 127.5 - 1.0).astype(np.float16))
        dtype = "float16"
    return array.tobytes(), {"shape": json.dumps(list(array.shape)), "dtype": dtype}


def check_output(output_type: str, image_format: str, batch: int) -> None:
    if output_type not in OUTPUT_TYPES:
        raise unprocessable(
            f"output_type {output_type!r} is not served; use one of {', '.join(OUTPUT_TYPES)}"
        )
    if image_format not in IMAGE_FORMATS:
        raise unprocessable(f"image_format {image_format!r} is not one of {', '.join(IMAGE_FORMATS)}")
    if output_type == "pil" and batch != 1:
        raise ApiError(
            422,
            f"output_type pil returns one image; this latent holds {batch}: send output_type=pt",
            code="invalid_input",
        )
