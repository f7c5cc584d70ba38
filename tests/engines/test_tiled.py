"""Tiled decoding on every backend (engines/tiled.py): one code path around each backend's network,
the same pixels as the model's tiled sampler, windows of a fixed-shape engine's one built size, and the
abandon checks and progress reports inside a tiled decode."""

from __future__ import annotations

import pytest
import torch

from pidserve.engines import DecodeAbandoned, DecodeBatch, EngineInputError, ShapeProfile, open_engine
from pidserve.engines.base import seeded_noise_stream, seeded_noises
from pidserve.engines.build import export_onnx
from pidserve.model import TILING_OFF, PiDNet, Tiling, sample_tiled, to_uint8_hwc

from .test_backends import _agree, _batch, _net

# tiny_v1.5 is trained at 128x128 (its native size) on a 64-px latent grid: a 256x256 output is
# 3 x 3 windows of 128x128 overlapping by 64 px.
TILE = Tiling.parse("128x128:64")
BIG = (256, 256)


@pytest.fixture(scope="module")
def tiny_v15() -> PiDNet:
    return _net("tiny_v1.5")


@pytest.fixture(scope="module")
def window_export(tiny_v15: PiDNet, tmp_path_factory: pytest.TempPathFactory):
    """The ONNX export of the window shape only: it serves every larger output in windows."""
    profile = ShapeProfile(image_size=(128, 128), batch_sizes=(1, 2, 3), text_tokens=3)
    return export_onnx(tiny_v15, tmp_path_factory.mktemp("onnx-window"), profile)


def _reference(net: PiDNet, batch: DecodeBatch, window_batch: int = 1) -> torch.Tensor:
    height, width = (n * net.cfg.output_scale for n in batch.latents.shape[-2:])
    noises = seeded_noises(batch.seeds, (batch.size, 3, height, width), batch.steps, torch.device("cpu"))
    with torch.no_grad():
        x = sample_tiled(
            net, batch.latents, batch.sigmas, batch.text, batch.steps, (128, 128), 64, noises,
            window_batch=window_batch,
        )  # fmt: skip
    return to_uint8_hwc(x)


def test_the_noise_stream_tiled_decodes_draw_from_is_the_seeded_noise() -> None:
    """Tiled decodes draw one whole-image noise per step (one held at a time, not `steps`): the same
    tensors as the pre-drawn list untiled decodes use, seed by seed, high 32-bit seeds included."""
    seeds = torch.tensor([3, 2**40 + 7])
    shape = (2, 3, 16, 24)
    draw = seeded_noise_stream(seeds, shape, torch.device("cpu"))
    for expected in seeded_noises(seeds, shape, 4, torch.device("cpu")):
        assert torch.equal(draw(), expected)


@pytest.mark.parametrize("backend", ["torch", "torch-compile", "onnxruntime"])
def test_every_backend_tiles_like_the_model_sampler(tiny_v15: PiDNet, window_export, backend) -> None:
    kwargs = {"engine_dir": window_export.directory} if backend == "onnxruntime" else {"net": tiny_v15}
    engine = open_engine(backend, tiling=TILE, max_batch=3, **kwargs)
    batch = _batch(tiny_v15.cfg, size=2, text_tokens=3, image_hw=BIG)
    result = engine.decode(batch)
    assert result.images.shape == (2, 256, 256, 3) and result.windows == 9
    assert "tiled" in result.timings
    _agree(result.images, _reference(tiny_v15, batch))


def test_a_batch_names_its_own_tiling_over_the_engines_default(tiny_v15: PiDNet) -> None:
    engine = open_engine("torch", net=tiny_v15, tiling="off")
    batch = _batch(tiny_v15.cfg, size=1, text_tokens=3, image_hw=BIG)
    untiled = engine.decode(batch)
    batch.tiling = TILE
    tiled = engine.decode(batch)
    assert untiled.windows == 1 and tiled.windows == 9
    assert not torch.equal(untiled.images, tiled.images)
    _agree(tiled.images, _reference(tiny_v15, batch))
    auto = open_engine("torch", net=tiny_v15, tiling="auto")
    batch.tiling = (
        None  # the engine's default: auto, windows of the native 128x128 (no overlap: 32 px < grid)
    )
    assert auto.decode(batch).windows == 4
    batch.tiling = TILING_OFF
    assert torch.equal(auto.decode(batch).images, untiled.images)


def test_a_fixed_shape_engine_tiles_in_its_built_size_only(window_export) -> None:
    engine = open_engine("onnxruntime", engine_dir=window_export.directory)  # tiling off by default
    cfg = _net("tiny_v1.5").cfg
    big = _batch(cfg, size=1, text_tokens=3, image_hw=BIG)
    with pytest.raises(
        EngineInputError, match=r"256x256 is not built.*ask for tile=auto: windows of 128x128"
    ):
        engine.decode(big)
    big.tiling = Tiling.parse("auto")
    assert engine.decode(big).windows == 4
    big.tiling = Tiling.parse("64x64")
    with pytest.raises(
        EngineInputError, match="cuts into 64x64 windows, but this engine was built for 128x128"
    ):
        engine.decode(big)
    narrow = _batch(cfg, size=1, text_tokens=3, image_hw=(256, 64))
    narrow.tiling = Tiling.parse("auto")
    with pytest.raises(EngineInputError, match="both sides of the output must be at least the window's"):
        engine.decode(narrow)
    off_grid = _batch(cfg, size=1, text_tokens=3, image_hw=BIG)
    off_grid.tiling = Tiling.parse("96x96")
    with pytest.raises(EngineInputError, match="tile=96x96: tile 96 and overlap 0 must be multiples of 64"):
        engine.decode(off_grid)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_a_tiled_decode_stops_between_chunks_and_reports_progress(
    tiny_v15: PiDNet, window_export, backend
) -> None:
    kwargs = {"engine_dir": window_export.directory} if backend == "onnxruntime" else {"net": tiny_v15}
    engine = open_engine(backend, tiling=TILE, max_batch=3, **kwargs)
    batch = _batch(tiny_v15.cfg, size=1, text_tokens=3, image_hw=BIG)
    asked: list[int] = []
    batch.abandoned = lambda: asked.append(1) or len(asked) >= 5
    with pytest.raises(DecodeAbandoned):
        engine.decode(batch)
    assert len(asked) == 5  # asked before every chunk: 9 windows / 3 rows = 3 chunks per step

    reports: list[tuple[int, int]] = []
    batch.abandoned = None
    batch.progress = lambda done, total: reports.append((done, total))
    engine.decode(batch)
    assert reports[-1] == (12, 12) and [done for done, _ in reports] == list(range(1, 13))
