"""GPU classes: the facts per class, product-name matching, default profiles, precision checks."""

from __future__ import annotations

import pytest
import torch

from pidserve.engines import EngineConfigError, ShapeProfile
from pidserve.engines import gpu_classes as gc


def test_class_facts() -> None:
    rtx, gb, h100 = gc.GPU_CLASSES["rtx5090"], gc.GPU_CLASSES["gb200"], gc.GPU_CLASSES["h100"]
    assert (rtx.compute_capability, rtx.memory_gib) == ((12, 0), 32.0)
    assert gb.compute_capability == (10, 0) and 180 <= gb.memory_gib <= 192
    assert (h100.compute_capability, h100.memory_gib) == ((9, 0), 80.0)
    for gpu_class in gc.GPU_CLASSES.values():
        assert gpu_class.default_precision == "bf16"
        assert gpu_class.workspace_bytes >= gc.GIB
        assert gpu_class.output_sizes[0].image_size == (2048, 2048)


@pytest.mark.parametrize(
    ("product", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H100 PCIe", "h100"),
        ("NVIDIA H100 NVL", "h100"),
        ("NVIDIA GeForce RTX 5090", "rtx5090"),
        ("NVIDIA GeForce RTX 5090 D", "rtx5090"),
        ("NVIDIA GB200", "gb200"),
        ("NVIDIA GeForce RTX 5090 Laptop GPU", None),
        ("NVIDIA GeForce RTX 5080", None),
        ("NVIDIA A100-SXM4-80GB", None),
        ("NVIDIA H200", None),
    ],
)
def test_match_by_product_name(product: str, expected: str | None) -> None:
    capability = gc.GPU_CLASSES[expected].compute_capability if expected else (9, 0)
    found = gc.match_gpu_class(product, capability)
    assert (found.name if found else None) == expected


def test_name_with_wrong_compute_capability_is_not_classified(caplog: pytest.LogCaptureFixture) -> None:
    assert gc.match_gpu_class("NVIDIA H100 80GB HBM3", (8, 0)) is None
    assert "compute capability 8.0" in caplog.text


def test_default_profiles_per_variant() -> None:
    h100 = gc.get_gpu_class("h100")
    assert h100.default_profiles("2k_flux") == [ShapeProfile((2048, 2048), (1, 2, 4, 8))]
    assert h100.default_profiles("2kto4k_sd3", text_tokens=300) == [
        ShapeProfile((2048, 2048), (1, 2, 4, 8), 300),
        ShapeProfile((4096, 4096), (1, 2), 300),
    ]
    gb200 = gc.get_gpu_class("gb200")
    assert [p.image_size for p in gb200.default_profiles("2kto4k_v1pt5_flux")] == [(2048, 2048), (4096, 4096)]
    assert gb200.default_max_batch == 16
    rtx = gc.get_gpu_class("rtx5090")
    assert [p.image_size for p in rtx.default_profiles("2kto4k_sd3")] == [(2048, 2048)]
    assert rtx.default_profiles(None) == [ShapeProfile((2048, 2048), (1, 2, 4))]


@pytest.mark.parametrize(
    ("max_batch", "ladder"),
    [(1, (1,)), (2, (1, 2)), (6, (1, 2, 4, 6)), (8, (1, 2, 4, 8)), (16, (1, 2, 4, 8, 16))],
)
def test_batch_ladder(max_batch: int, ladder: tuple[int, ...]) -> None:
    assert gc.batch_ladder(max_batch) == ladder


def test_batch_ladder_rejects_zero() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        gc.batch_ladder(0)


def test_unknown_class_lists_known() -> None:
    with pytest.raises(EngineConfigError, match="rtx5090, gb200, h100"):
        gc.get_gpu_class("a100")


@pytest.mark.parametrize(
    ("capability", "ok"), [((8, 6), False), ((8, 9), True), ((9, 0), True), ((12, 0), True)]
)
def test_fp8_supported(capability: tuple[int, int], ok: bool) -> None:
    assert gc.fp8_supported(capability) is ok


def test_fp8_below_8_9_is_refused_with_a_clear_message() -> None:
    with pytest.raises(EngineConfigError, match=r"FP8 needs compute capability >= 8\.9.*NVIDIA A10 has 8\.6"):
        gc.check_precision("fp8", (8, 6), "NVIDIA A10")
    gc.check_precision("fp8", (8, 9))
    gc.check_precision("bf16", (8, 6))


def test_bf16_and_unknown_precisions() -> None:
    with pytest.raises(EngineConfigError, match=r"BF16 needs compute capability >= 8\.0"):
        gc.check_precision("bf16", (7, 5))
    with pytest.raises(EngineConfigError, match="unknown precision 'int8'"):
        gc.check_precision("int8", (9, 0))
    gc.check_precision("fp32", (7, 5))


def test_compute_capability_text() -> None:
    assert gc.format_compute_capability((12, 0)) == "12.0"
    assert gc.parse_compute_capability(" 8.9 ") == (8, 9)
    with pytest.raises(ValueError, match="look like"):
        gc.parse_compute_capability("sm90")


def test_detect_without_gpu_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gc.detect_gpu_class() is None
    with pytest.raises(EngineConfigError, match="no CUDA GPU"):
        gc.current_gpu()


def test_detect_reads_torch_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GB200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    found = gc.detect_gpu_class()
    assert found is not None and found.name == "gb200"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40S")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    assert gc.detect_gpu_class() is None
