"""Tiled decoding (model/tiling.py): the window layout, the blend weights, and the sampler's guarantees:
one window equals untiled bit for bit, the window batching does not change the result beyond float
rounding, and a seed reproduces a decode."""

from __future__ import annotations

import itertools

import pytest
import torch

from pidserve.model import sample, to_uint8_hwc
from pidserve.model.default import load_default_decoder
from pidserve.model.tiling import Tiling, blend_weights, sample_tiled, windows


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


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("off", Tiling(enabled=False)),
        ("auto", Tiling()),
        ("256x192", Tiling(True, (256, 192))),
        (" 256 x 256 : 32 ", Tiling(True, (256, 256), 32)),
    ],
)
def test_tiling_parses_its_text_forms_and_prints_them_back(text: str, expected: Tiling) -> None:
    assert Tiling.parse(text) == expected
    assert Tiling.parse(str(expected)) == expected


@pytest.mark.parametrize("text", ["", "256", "256x", "0x256", "axb", "256x256:", "256x256:-1", "on"])
def test_tiling_refuses_other_text(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not 'off', 'auto', 'HxW' or 'HxW:OVERLAP'|at least 1x1"):
        Tiling.parse(text)


def test_a_plan_tiles_only_outputs_larger_than_one_window() -> None:
    assert Tiling().plan((256, 256), (256, 256), 32) is None  # auto at the native size: untiled
    assert Tiling(enabled=False).plan((1024, 1024), (256, 256), 32) is None
    plan = Tiling().plan((512, 384), (256, 256), 32)
    assert plan is not None and plan.overlap == 64 and plan.count == 3 * 2
    assert plan.origins[-1] == (256, 128)  # the last windows end at the borders
    narrow = Tiling().plan((512, 128), (256, 256), 32)
    assert narrow is not None and narrow.tile == (256, 128)  # a side smaller than the window: one window
    ramp, normaliser = (
        blend_weights(plan.tile, plan.overlap, torch.device("cpu")),
        plan.normaliser(torch.device("cpu")),
    )
    total = torch.zeros(1, 1, 512, 384, dtype=torch.float64)
    for window in range(plan.count):
        plan.crop(total, window).add_(plan.window_weight(window, ramp, normaliser))
    assert torch.allclose(total, torch.ones_like(total))  # normalised: x0 blends are convex


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


def test_window_chunks_share_one_pixel_position_table_that_dies_with_the_decode(net) -> None:
    z = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    sigma = torch.zeros(4)
    with torch.no_grad():
        first, second = net.condition(z[:2], sigma[:2]), net.condition(z[2:], sigma[2:])
        other_origin = net.condition(z[:2], sigma[:2], pixel_origin=(8, 0))
    assert first.pixel_positions is second.pixel_positions  # one table for windows of one size
    assert other_origin.pixel_positions is not first.pixel_positions
    assert not torch.equal(other_origin.pixel_positions, first.pixel_positions)
    fresh = net.pixel_position_features(256, 256, z.device)
    assert torch.equal(fresh, first.pixel_positions)
    del first, second, fresh, other_origin  # nothing holds the tables now: they are freed, not cached
    assert len(net._position_tables) == 0


def test_the_torch_engine_and_pidserve_decode_tile_with_the_same_code(net, tmp_path) -> None:
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from pidserve.cli import app
    from pidserve.engines import DecodeBatch, EngineConfigError, open_engine
    from pidserve.engines.base import seeded_noises
    from pidserve.model import CorrectedWindowLatents

    z = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(7))  # 512x512 out, 9 windows
    engine = open_engine("torch", net=load_default_decoder(), tiling="256x256")
    images = engine.decode(DecodeBatch.single(z, seed=9)).images
    noises = seeded_noises(torch.tensor([9]), (1, 3, 512, 512), 4, torch.device("cpu"))
    with torch.no_grad():
        # the engine runs max_batch (8) window rows per network call: the same chunks as window_batch 8;
        # tiny-ae latents: the windows are corrected for the encoder's context by default (auto)
        expected, cropped = (
            to_uint8_hwc(
                sample_tiled(
                    net, z, 0.0, tile=(256, 256), noises=noises, window_batch=8, window_latents=windows
                )
            )
            for windows in (CorrectedWindowLatents(), None)
        )
    assert torch.equal(images, expected)
    crop_engine = open_engine("torch", net=load_default_decoder(), tiling="256x256", window_latents="crop")
    assert torch.equal(crop_engine.decode(DecodeBatch.single(z, seed=9)).images, cropped)
    assert not torch.equal(cropped, expected)
    with pytest.raises(EngineConfigError, match="tile 'big' is not 'off', 'auto', 'HxW' or 'HxW:OVERLAP'"):
        open_engine("torch", net=net, tiling="big")
    path = tmp_path / "z.safetensors"
    save_file({"latent": z}, str(path))
    result = CliRunner().invoke(
        app, ["decode", str(path), "--tile", "256x256", "--seed", "9", "-o", str(tmp_path / "o.png")]
    )
    assert result.exit_code == 0, result.output
    assert "9 windows of 256x256, corrected window latents" in result.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "o.png")), expected.numpy()[0])
    bad = CliRunner().invoke(app, ["decode", str(path), "--tile", "big", "-o", str(tmp_path / "b.png")])
    assert bad.exit_code == 2 and "--tile" in bad.output
    crop = CliRunner().invoke(
        app,
        [
            "decode",
            str(path),
            "--tile",
            "256x256",
            "--seed",
            "9",
            "--window-latents",
            "crop",
            "-o",
            str(tmp_path / "c.png"),
        ],
    )
    assert crop.exit_code == 0, crop.output
    assert "9 windows of 256x256, crop window latents" in crop.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "c.png")), cropped.numpy()[0])
    wrong = CliRunner().invoke(
        app, ["decode", str(path), "--window-latents", "exact", "-o", str(tmp_path / "w.png")]
    )
    assert wrong.exit_code == 2 and "not one of auto, crop, corrected" in wrong.output


def test_the_server_tiles_by_default_per_request_and_counts_windows_in_its_cost_model() -> None:
    import httpx
    from safetensors.torch import save as save_safetensors

    from pidserve.model import tiled_window_count
    from pidserve.server import ServerSettings, check_settings

    from ..server.conftest import live_server

    assert tiled_window_count((512, 512), (256, 256), 32) == 9  # 3 x 3 with a 64-px overlap
    assert tiled_window_count((256, 256), (256, 256), 32) == 1
    with pytest.raises(ValueError, match="PIDSERVE_TILE: tile '256' is not"):
        check_settings(ServerSettings(tile="256"))
    # tile=auto (the default): 9 windows x 256² x 4 steps = 2.36 M pixel-steps, over a 2 M limit
    # although 512² x 4 = 1.05 M untiled is not
    with live_server(max_pixel_steps=2_000_000) as live:
        z = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(7))
        body = save_safetensors({"latent": z})
        headers = {"Content-Type": "application/x-safetensors"}

        def post(**params):
            return httpx.post(
                f"{live.url}/v1/decode", params=params, content=body, headers=headers, timeout=120
            )

        refused = post()
        assert refused.status_code == 413 and "9 windows of 256x256" in refused.json()["error"]["message"]
        tiled = post(steps=2)
        assert tiled.status_code == 200, tiled.text[:200]
        assert 'windows;desc="9"' in tiled.headers["server-timing"]
        untiled = post(steps=2, tile="off")  # per request: the whole 512² in one network call
        assert untiled.status_code == 200 and "windows" not in untiled.headers["server-timing"]
        assert untiled.content != tiled.content
        coarse = post(steps=2, tile="256x256:0")  # 2 x 2 windows, no overlap
        assert coarse.status_code == 200 and 'windows;desc="4"' in coarse.headers["server-timing"]
        bad = post(tile="256x250")
        assert bad.status_code == 422 and "multiples of 32" in bad.json()["error"]["message"]
        worse = post(tile="big")
        assert worse.status_code == 422 and "'off', 'auto', 'HxW' or 'HxW:OVERLAP'" in worse.text
    # --window-latents crop: the windows read their plain crops of the latent, another image
    with live_server(window_latents="crop") as live:
        cropped = httpx.post(
            f"{live.url}/v1/decode", params={"steps": 2}, content=body, headers=headers, timeout=120
        )
        assert cropped.status_code == 200 and 'windows;desc="9"' in cropped.headers["server-timing"]
        assert cropped.content != tiled.content
    with pytest.raises(ValueError, match="window_latents"):
        ServerSettings(window_latents="exact")
