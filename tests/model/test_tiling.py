"""Tiled decoding (model/tiling.py): the window layout, the blend weights, and the sampler's guarantees:
one window equals untiled bit for bit, the window batching does not change the result beyond float
rounding, and a seed reproduces a decode."""

from __future__ import annotations

import itertools

import pytest
import torch

from pidserve.model import sample, to_uint8_hwc
from pidserve.model.default import load_default_decoder
from pidserve.model.tiling import blend_weights, sample_tiled, windows


@pytest.mark.parametrize(
    ("size", "tile", "overlap"), [(256, 256, 64), (512, 256, 64), (640, 256, 64), (736, 256, 32)]
)
def test_windows_cover_the_image_from_the_inside_on_the_latent_grid(size, tile, overlap) -> None:
    origins = windows(size, tile, overlap, grid=32)
    assert origins[0] == 0 and origins[-1] == size - tile  # the last window is shifted inward, not padded
    assert all(o % 32 == 0 and 0 <= o <= size - tile for o in origins)
    assert all(b - a <= tile - overlap for a, b in itertools.pairwise(origins))  # no gaps
    covered = torch.zeros(size, dtype=torch.bool)
    for o in origins:
        covered[o : o + tile] = True
    assert covered.all()


def test_windows_refuse_what_cannot_be_cut() -> None:
    with pytest.raises(ValueError, match="multiples of 32"):
        windows(512, 250, 64, grid=32)
    with pytest.raises(ValueError, match="overlap"):
        windows(512, 256, 256, grid=32)


def test_blend_weights_fade_across_the_overlap_and_are_never_zero() -> None:
    weight = blend_weights((256, 192), 64, torch.device("cpu"))[0, 0]
    assert weight.shape == (256, 192) and weight.min() > 0
    assert weight[128, 96] == 1.0 and weight[64, 0] < weight[64, 63] < weight[64, 64] == 1.0
    assert weight[0, 0] < weight[0, 64]  # the corners fade along both axes


@pytest.fixture(scope="module")
def net():
    return load_default_decoder()


def test_one_window_is_untiled_bit_for_bit(net) -> None:
    z = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        untiled = sample(net, z, 0.2, generator=torch.Generator().manual_seed(3))
        tiled = sample_tiled(net, z, 0.2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(untiled, tiled)


def test_the_window_batch_changes_nothing_but_float_rounding_and_a_seed_reproduces(net) -> None:
    z = torch.randn(1, 16, 16, 12, generator=torch.Generator().manual_seed(1))  # 512x384: 2 x 2 windows
    with torch.no_grad():
        one, four, again = (
            sample_tiled(net, z, 0.0, generator=torch.Generator().manual_seed(5), window_batch=n)
            for n in (1, 4, 1)
        )
    assert one.shape == (1, 3, 512, 384)
    assert torch.equal(one, again)
    diff = (to_uint8_hwc(one).int() - to_uint8_hwc(four).int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


def test_the_torch_engine_and_pidserve_decode_tile_with_the_same_code(net, tmp_path) -> None:
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from pidserve.cli import app
    from pidserve.engines import DecodeBatch, EngineConfigError, open_engine
    from pidserve.engines.base import seeded_noises

    z = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(7))  # 512x512 out, 4 windows
    engine = open_engine("torch", net=load_default_decoder(), tile=(256, 256))
    images = engine.decode(DecodeBatch.single(z, seed=9)).images
    noises = seeded_noises(torch.tensor([9]), (1, 3, 512, 512), 4, torch.device("cpu"))
    with torch.no_grad():
        expected = to_uint8_hwc(sample_tiled(net, z, 0.0, tile=(256, 256), noises=noises))
    assert torch.equal(images, expected)
    with pytest.raises(EngineConfigError, match="torch backend only"):
        open_engine("onnxruntime", net=net, tile=(256, 256))
    path = tmp_path / "z.safetensors"
    save_file({"latent": z}, str(path))
    result = CliRunner().invoke(
        app, ["decode", str(path), "--tile", "256x256", "--seed", "9", "-o", str(tmp_path / "o.png")]
    )
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "o.png")), expected.numpy()[0])
    bad = CliRunner().invoke(app, ["decode", str(path), "--tile", "big", "-o", str(tmp_path / "b.png")])
    assert bad.exit_code == 2 and "--tile" in bad.output


def test_the_server_tiles_by_setting_and_counts_windows_in_its_cost_model() -> None:
    import httpx
    from safetensors.torch import save as save_safetensors

    from pidserve.model import tiled_window_count
    from pidserve.server import ServerSettings, check_settings

    from ..server.conftest import live_server

    assert tiled_window_count((512, 512), (256, 256), 32) == 9  # 3 x 3 with a 64-px overlap
    assert tiled_window_count((256, 256), (256, 256), 32) == 1
    with pytest.raises(ValueError, match="torch backend only"):
        check_settings(ServerSettings(tile="256x256", backend="onnxruntime"))
    # 9 windows x 256² x 4 steps = 2.36 M pixel-steps: over a 2 M limit although 512² x 4 = 1.05 M is not
    with live_server(tile="256x256", max_pixel_steps=2_000_000) as live:
        z = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(7))
        body = save_safetensors({"latent": z})
        headers = {"Content-Type": "application/x-safetensors"}
        refused = httpx.post(f"{live.url}/v1/decode", content=body, headers=headers, timeout=60)
        assert refused.status_code == 413 and "9 windows of 256x256" in refused.json()["error"]["message"]
        ok = httpx.post(
            f"{live.url}/v1/decode", params={"steps": 2}, content=body, headers=headers, timeout=120
        )
        assert ok.status_code == 200, ok.text[:200]
