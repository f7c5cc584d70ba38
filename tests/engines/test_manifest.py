"""manifest.json: hashing, round trip, clear errors, and the compatibility check with its rebuild command."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest

from pidserve.engines import EngineConfigError, ShapeProfile
from pidserve.engines import manifest as mf
from pidserve.model import PiDConfig

REBUILD = (
    "pidserve build --checkpoint /ckpt/pid-2k-flux.safetensors --gpu-class h100 --precision bf16 "
    "--size 2048x2048 --max-batch 8 -o /engines/h100"
)


def make_manifest(**changes: object) -> mf.EngineManifest:
    fields: dict[str, object] = {
        "model_sha256": "ab" * 32,
        "checkpoint": "/ckpt/pid-2k-flux.safetensors",
        "variant": "2k_flux",
        "config": PiDConfig.preset("tiny_v1").to_dict(),
        "precision": "bf16",
        "profiles": [mf.profile_to_dict(ShapeProfile((2048, 2048), (1, 2, 4, 8)))],
        "tensorrt_version": "10.13.0.35",
        "gpu_class": "h100",
        "gpu_name": "NVIDIA H100 80GB HBM3",
        "compute_capability": "9.0",
        "build_flags": {"workspace_bytes": 1 << 34},
        "engine_dir": "/engines/h100",
    }
    fields.update(changes)
    return mf.EngineManifest(**fields)  # type: ignore[arg-type]


def test_sha256_is_streamed_and_exact(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    data = bytes(range(256)) * 1000
    path.write_bytes(data)
    assert mf.sha256_file(path, chunk_size=1000) == hashlib.sha256(data).hexdigest()
    assert mf.sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_round_trip(tmp_path: Path) -> None:
    manifest = make_manifest()
    path = mf.write_manifest(manifest, tmp_path)
    assert path == tmp_path / "manifest.json"
    loaded = mf.read_manifest(tmp_path)
    assert loaded == manifest
    assert loaded.files == {"condition": "condition.plan", "step": "step.plan"}
    assert loaded.shape_profiles() == [ShapeProfile((2048, 2048), (1, 2, 4, 8), 0)]
    assert loaded.pid_config() == PiDConfig.preset("tiny_v1")
    assert loaded.max_batch == 8
    assert json.loads(path.read_text())["format_version"] == mf.FORMAT_VERSION
    assert not list(tmp_path.glob("*.tmp"))


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(EngineConfigError, match=r"not a TensorRT engine directory: no manifest\.json"):
        mf.read_manifest(tmp_path)


def test_corrupt_manifest(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text('{"format_version": 1, "model_sha')
    with pytest.raises(EngineConfigError, match="not valid JSON"):
        mf.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(EngineConfigError, match="JSON object"):
        mf.read_manifest(tmp_path)


def test_unknown_version(tmp_path: Path) -> None:
    data = make_manifest().to_dict() | {"format_version": 99}
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(EngineConfigError, match="format_version 99; this pidserve reads version 1"):
        mf.read_manifest(tmp_path)


def test_missing_and_malformed_fields(tmp_path: Path) -> None:
    data = make_manifest().to_dict()
    del data["tensorrt_version"], data["gpu_name"]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(EngineConfigError, match="missing fields: gpu_name, tensorrt_version"):
        mf.read_manifest(tmp_path)
    data = make_manifest(compute_capability="sm90").to_dict()
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(EngineConfigError, match="malformed"):
        mf.read_manifest(tmp_path)


def test_compatible_engine_passes() -> None:
    mf.check_compatible(make_manifest(), "NVIDIA H100 80GB HBM3", (9, 0), "10.13.0.35")


def test_other_product_same_capability_only_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        mf.check_compatible(make_manifest(), "NVIDIA H100 PCIe", (9, 0), "10.13.0.35")
    assert "NVIDIA H100 PCIe" in caplog.text


def test_wrong_compute_capability_gives_rebuild_command() -> None:
    with pytest.raises(EngineConfigError) as info:
        mf.check_compatible(make_manifest(), "NVIDIA GeForce RTX 5090", (12, 0), "10.13.0.35")
    message = str(info.value)
    assert "built for compute capability 9.0" in message and "has 12.0" in message
    assert message.endswith(REBUILD.replace("--gpu-class h100", "--gpu-class rtx5090"))


def test_wrong_tensorrt_version_gives_rebuild_command() -> None:
    with pytest.raises(EngineConfigError) as info:
        mf.check_compatible(make_manifest(), "NVIDIA H100 80GB HBM3", (9, 0), "10.14.1.48")
    message = str(info.value)
    assert "TensorRT 10.13.0.35" in message and "10.14.1.48 is installed" in message
    assert message.endswith(REBUILD)


def test_rebuild_command_uses_the_directory_given() -> None:
    with pytest.raises(EngineConfigError, match=r"-o '/srv/my engines'$"):
        mf.check_compatible(make_manifest(), "NVIDIA H100", (9, 0), "9.0.0", engine_dir="/srv/my engines")


def test_fp8_engine_on_gpu_without_fp8_suggests_bf16() -> None:
    manifest = make_manifest(precision="fp8")
    with pytest.raises(EngineConfigError, match="--precision bf16") as info:
        mf.check_compatible(manifest, "NVIDIA A10", (8, 6), "10.13.0.35")
    assert "no FP8 tensor cores" in str(info.value)


def test_rebuild_command_lists_sizes_and_text_tokens() -> None:
    manifest = make_manifest(
        profiles=[
            mf.profile_to_dict(ShapeProfile((2048, 2048), (1, 2, 4), 300)),
            mf.profile_to_dict(ShapeProfile((4096, 4096), (1, 2), 300)),
        ]
    )
    assert mf.rebuild_command(manifest) == (
        "pidserve build --checkpoint /ckpt/pid-2k-flux.safetensors --gpu-class h100 --precision bf16 "
        "--size 2048x2048 --size 4096x4096 --max-batch 4 --text-tokens 300 -o /engines/h100"
    )


def test_profile_from_dict_sorts_and_validates() -> None:
    profile = mf.profile_from_dict({"image_size": [1024, 2048], "batch_sizes": [4, 1, 2], "text_tokens": 7})
    assert profile == ShapeProfile((1024, 2048), (1, 2, 4), 7)
    with pytest.raises(ValueError, match="positive"):
        mf.profile_from_dict({"image_size": [64, 64], "batch_sizes": [0]})


def _stale(directory: Path, **changes: object) -> list[str]:
    request: dict[str, object] = {
        "model_sha256": "ab" * 32,
        "precision": "bf16",
        "gpu_class": "h100",
        "profile": ShapeProfile((2048, 2048), (1, 2, 4, 8)),
        "gpu_name": "NVIDIA H100 80GB HBM3",
        "compute_capability": (9, 0),
        "trt_version": "10.13.0.35",
    }
    request.update(changes)
    return mf.stale_reasons(directory, **request)  # type: ignore[arg-type]


def test_stale_reasons_say_what_differs(tmp_path: Path) -> None:
    assert "no manifest.json" in _stale(tmp_path)[0]
    mf.write_manifest(make_manifest(), tmp_path)
    assert _stale(tmp_path) == []
    assert _stale(tmp_path, model_sha256="cd" * 32) == [
        "built from another checkpoint (model SHA-256 differs)"
    ]
    assert _stale(tmp_path, precision="fp8") == ["built in bf16, fp8 asked"]
    assert _stale(tmp_path, gpu_class="gb200") == ["built for GPU class h100, gb200 asked"]
    assert "no profile 4096x4096" in _stale(tmp_path, profile=ShapeProfile((4096, 4096), (1, 2)))[0]
    (reason,) = _stale(tmp_path, trt_version="10.14.1")
    assert "TensorRT 10.13.0.35" in reason and "Rebuild" not in reason
