"""diffusers' own `remote_decode` (the installed diffusers.utils.remote_utils) against a live server:
a pipeline's latents in, the served model's images out, with no change to the client."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pidserve.model.latents import TINY_AE_SHIFT, TINY_AE_STD, pack_sequence

from .conftest import latent, reference

remote_utils = pytest.importorskip("diffusers.utils.remote_utils")
remote_decode = remote_utils.remote_decode

# What a diffusers pipeline built on tiny-ae would hold: latents = (raw - shift) * scaling, which the
# server undoes (raw = latents / scaling_factor + shift_factor) before its own normalisation.
SCALING, SHIFT = 1.0 / TINY_AE_STD, TINY_AE_SHIFT


def _endpoint(server) -> str:
    return f"{server.url}/v1/remote-decode"


def test_pt_output_is_the_engines_pixels(server, reference_engine) -> None:
    z = latent(seed=51)
    images = remote_decode(
        endpoint=_endpoint(server), tensor=z, scaling_factor=SCALING, shift_factor=SHIFT,
        output_type="pt", partial_postprocess=True, return_type="pt",
    )  # fmt: skip
    assert images.dtype == torch.uint8 and images.shape == (1, 64, 64, 3)
    # the normalisation round trip (float32) may move a value by an ulp: within one level
    expected = reference(reference_engine, z, [0], 0.0)
    assert (images.int() - expected.int()).abs().max() <= 1


def test_the_seed_is_0_unless_the_endpoint_names_one(server) -> None:
    args = {"tensor": latent(seed=56), "do_scaling": False, "output_type": "pt", "partial_postprocess": True,
            "return_type": "pt"}  # fmt: skip
    first, again = (remote_decode(endpoint=_endpoint(server), **args) for _ in range(2))
    other = remote_decode(endpoint=_endpoint(server) + "?seed=7", **args)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_pil_jpeg_and_png(server) -> None:
    for image_format, magic in (("jpg", "jpeg"), ("png", "png")):
        image = remote_decode(
            endpoint=_endpoint(server), tensor=latent(seed=52), scaling_factor=SCALING, shift_factor=SHIFT,
            output_type="pil", image_format=image_format,
        )  # fmt: skip
        assert image.size == (64, 64) and image.format == magic


def test_float_pt_output_for_the_pipelines_image_processor(server) -> None:
    decoded = remote_decode(
        endpoint=_endpoint(server), tensor=latent(batch=2, seed=53), scaling_factor=SCALING,
        shift_factor=SHIFT, output_type="pt", partial_postprocess=False, return_type="pt",
    )  # fmt: skip
    assert decoded.shape == (2, 3, 64, 64) and decoded.dtype == torch.float16
    assert float(decoded.min()) >= -1.0 and float(decoded.max()) <= 1.0


def test_packed_latents_are_unpacked_from_height_and_width(server, reference_engine) -> None:
    z = latent(seed=54)  # [1, 16, 2, 2] -> packed [1, 1, 64] (FLUX's 2x2 sequence packing)
    packed = pack_sequence(z)
    images = remote_decode(
        endpoint=_endpoint(server), tensor=packed, scaling_factor=SCALING, shift_factor=SHIFT,
        height=16, width=16, output_type="pt", partial_postprocess=True, return_type="pt",
    )  # fmt: skip
    expected = reference(reference_engine, z, [0], 0.0)
    assert (images.int() - expected.int()).abs().max() <= 1


def test_bf16_tensors_and_raw_latents(server) -> None:
    raw = latent(seed=55) * TINY_AE_STD + TINY_AE_SHIFT  # no scaling_factor: the tensor is the raw latent
    images = remote_decode(
        endpoint=_endpoint(server), tensor=raw.to(torch.bfloat16), do_scaling=False,
        output_type="pt", partial_postprocess=True, return_type="pt",
    )  # fmt: skip
    assert images.shape == (1, 64, 64, 3)


def test_errors_reach_the_caller_as_diffusers_raises_them(server) -> None:
    with pytest.raises(RuntimeError, match="16 channels"):
        remote_decode(
            endpoint=_endpoint(server), tensor=torch.zeros(1, 4, 2, 2), do_scaling=False, output_type="pt",
            partial_postprocess=True, return_type="pt",
        )  # fmt: skip
    with pytest.raises(RuntimeError, match="output_type=pt"):
        remote_decode(endpoint=_endpoint(server), tensor=latent(batch=2), do_scaling=False, output_type="pil")
    assert np.asarray(
        remote_decode(endpoint=_endpoint(server), tensor=latent(), do_scaling=False, output_type="pil")
    ).shape == (64, 64, 3)
