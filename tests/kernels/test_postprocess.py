"""The fused uint8 post-process: the reference against hand-computed bytes, the Triton kernel (run by
Triton's interpreter on CPU) against the reference, argument checks, the lazy Triton import, and the
compiled kernel on a GPU when there is one.

Interpreted kernels run in a subprocess: Triton reads TRITON_INTERPRET when a kernel is decorated, so
setting it inside this process would depend on import order and would also turn the GPU test below
into an interpreter test.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from pidserve.kernels import postprocess, postprocess_reference, postprocess_triton, triton_available

# `pidserve.kernels.postprocess` is the function (re-exported by __init__), so fetch the module by name.
postprocess_module = importlib.import_module("pidserve.kernels.postprocess")

needs_triton = pytest.mark.skipif(not triton_available(), reason="Triton is not installed")


# ---------------------------------------------------------------------------------------------- inputs


def _as_images(values: torch.Tensor, width: int = 32) -> torch.Tensor:
    """Flat values -> [1, 3, H, width], zero-padded; the kernel sees them spread over all channels."""
    per_row = 3 * width
    padded = torch.cat([values, values.new_zeros(-len(values) % per_row)])
    return padded.reshape(1, 3, -1, width).contiguous()


def _random_images(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Normal noise * 1.5: mostly in [-1, 1], about a third outside it (exercises the clamp)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 1.5).to(dtype)


def _step_values() -> torch.Tensor:
    """float32 values where the output byte changes, (k / 127.5) - 1 for k = 0..255, each with its two
    float32 neighbours, plus values past both ends: the inputs where truncation vs rounding, a fused
    multiply-add or a different order of operations would show."""
    steps = (torch.arange(256, dtype=torch.float64) / 127.5 - 1).float()
    below = torch.nextafter(steps, torch.tensor(-float("inf")))
    above = torch.nextafter(steps, torch.tensor(float("inf")))
    outside = torch.tensor([-1e30, -3.0, -1.0000001, 1.0000001, 2.0, 1e30])
    return torch.cat([below, steps, above, outside])


def _all_finite_bfloat16() -> torch.Tensor:
    """Every finite bfloat16 value (65,280 of them), from their bit patterns."""
    values = torch.arange(-(2**15), 2**15, dtype=torch.int16).view(torch.bfloat16)
    return values[torch.isfinite(values)]


# ---------------------------------------------------------------------------------------- reference


def test_reference_matches_hand_computed_bytes() -> None:
    # One image of 1 x 3 pixels; channel planes R, G, B.
    x = torch.tensor(
        [
            [[-1.0, -0.999, -0.5]],  # -> 0, trunc(0.1275) = 0, trunc(63.75) = 63 (rounding would give 64)
            [[0.0, 0.5, 0.9999]],  # -> trunc(127.5) = 127 (rounding: 128), trunc(191.25) = 191, 254
            [[1.0, 2.0, -3.0]],  # -> 255, clamped to 255, clamped to 0
        ]
    ).unsqueeze(0)
    expected = torch.tensor([[[[0, 127, 255], [0, 191, 255], [63, 254, 0]]]], dtype=torch.uint8)
    result = postprocess_reference(x)
    assert result.shape == (1, 1, 3, 3) and result.is_contiguous()
    assert torch.equal(result, expected)


def test_reference_matches_numpy_astype_conversion() -> None:
    # The official conversion: float32 math in numpy, then astype(uint8) (truncation), then HWC.
    x = _as_images(_step_values())
    official = ((np.clip(x.numpy(), -1, 1) + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.array_equal(postprocess_reference(x).numpy(), official)


def test_cpu_dispatch_is_the_reference_and_fills_out() -> None:
    x = _random_images((2, 3, 5, 7), torch.bfloat16, seed=1)
    expected = postprocess_reference(x)
    assert torch.equal(postprocess(x), expected)
    out = torch.full((2, 5, 7, 3), 7, dtype=torch.uint8)
    assert postprocess(x, out=out) is out
    assert torch.equal(out, expected)


# ------------------------------------------------------------------------- the kernel, interpreted

_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import sys

    import torch

    from pidserve.kernels import postprocess_triton

    cases = torch.load(sys.argv[1])
    results = {name: postprocess_triton(x) for name, x in cases["inputs"].items()}
    out = cases["out"]
    returned = postprocess_triton(cases["out_input"], out=out)
    results["out"] = out
    results["out_is_returned"] = torch.tensor(returned.data_ptr() == out.data_ptr())
    torch.save(results, sys.argv[2])
    """
)

INTERPRETED_CASES = ("float32_odd", "bfloat16_odd", "float32_steps", "bfloat16_all")


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, torch.Tensor]]:
    """Run the kernel under TRITON_INTERPRET=1 in one subprocess on all cases; returns inputs and outputs."""
    if not triton_available():
        pytest.skip("Triton is not installed")
    folder = tmp_path_factory.mktemp("interpreter")
    cases = {
        "inputs": {
            # B=2, 17x33 = 561 pixels: one partial block per image.
            "float32_odd": _random_images((2, 3, 17, 33), torch.float32, seed=2),
            "bfloat16_odd": _random_images((2, 3, 17, 33), torch.bfloat16, seed=3),
            "float32_steps": _as_images(_step_values()),
            "bfloat16_all": _as_images(_all_finite_bfloat16(), width=128),
        },
        # 33x65 = 2145 pixels: two full blocks and a partial one per image; 7 marks bytes never written.
        "out_input": _random_images((3, 3, 33, 65), torch.float32, seed=4),
        "out": torch.full((3, 33, 65, 3), 7, dtype=torch.uint8),
    }
    torch.save(cases, folder / "cases.pt")
    script = folder / "run_kernel.py"
    script.write_text(_INTERPRETER_SCRIPT)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    subprocess.run(
        [sys.executable, str(script), str(folder / "cases.pt"), str(folder / "results.pt")],
        env=env,
        check=True,
        timeout=120,
    )
    return {"cases": cases, "results": torch.load(folder / "results.pt")}


@pytest.mark.parametrize("name", INTERPRETED_CASES)
def test_interpreted_kernel_equals_reference(interpreted: dict, name: str) -> None:
    x = interpreted["cases"]["inputs"][name]
    result = interpreted["results"][name]
    expected = postprocess_reference(x)
    assert result.dtype == torch.uint8 and result.is_contiguous()
    assert result.shape == expected.shape
    mismatches = (result != expected).sum().item()
    assert mismatches == 0, f"{mismatches} of {expected.numel()} bytes differ"


def test_interpreted_kernel_writes_every_byte_of_out(interpreted: dict) -> None:
    assert interpreted["results"]["out_is_returned"].item()
    expected = postprocess_reference(interpreted["cases"]["out_input"])
    assert torch.equal(interpreted["results"]["out"], expected)


# ------------------------------------------------------------------------------------ argument checks

GOOD_X = torch.zeros(2, 3, 4, 5)


@pytest.mark.parametrize(
    ("x", "out", "message"),
    [
        (torch.zeros(3, 4, 5), None, r"shape \[B, 3, H, W\]"),
        (torch.zeros(2, 4, 4, 5), None, r"shape \[B, 3, H, W\]"),
        (torch.zeros(2, 3, 4, 5, dtype=torch.float16), None, "float32 or bfloat16"),
        (torch.zeros(2, 3, 4, 5, dtype=torch.uint8), None, "float32 or bfloat16"),
        (GOOD_X.to(memory_format=torch.channels_last), None, "contiguous in NCHW"),
        (GOOD_X, torch.zeros(2, 5, 4, 3, dtype=torch.uint8), r"out must have shape \[2, 4, 5, 3\]"),
        (GOOD_X, torch.zeros(2, 4, 5, 3), "out must be uint8"),
        (GOOD_X, torch.zeros(2, 3, 4, 5, dtype=torch.uint8).permute(0, 2, 3, 1), "out must be contiguous"),
        (GOOD_X, torch.zeros(2, 4, 5, 3, dtype=torch.uint8, device="meta"), "out must be on x's device"),
    ],
)
@pytest.mark.parametrize("entry", [postprocess, postprocess_triton])
def test_bad_arguments_raise_value_error(
    entry, x: torch.Tensor, out: torch.Tensor | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        entry(x, out=out)


def test_unknown_impl_raises() -> None:
    with pytest.raises(ValueError, match="impl must be"):
        postprocess(GOOD_X, impl="cuda")  # type: ignore[arg-type]


def test_triton_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        postprocess_triton(GOOD_X)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        postprocess(GOOD_X, impl="triton")


def test_missing_triton_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # The interpreter flag only gets the CPU tensor past the device check; the kernel is never imported.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(postprocess_module, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="pip install triton"):
        postprocess_triton(GOOD_X)


@needs_triton
def test_empty_batch_launches_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # returns before the kernel module is imported
    assert postprocess_triton(torch.zeros(0, 3, 4, 5)).shape == (0, 4, 5, 3)
    assert postprocess(torch.zeros(0, 3, 4, 5)).shape == (0, 4, 5, 3)


def test_import_does_not_import_triton_and_works_without_it() -> None:
    script = textwrap.dedent(
        """
        import sys

        import torch

        had_triton = "triton" in sys.modules
        import pidserve.kernels as kernels

        assert ("triton" in sys.modules) == had_triton, "importing pidserve.kernels imported triton"

        sys.modules["triton"] = None  # `import triton` now raises ImportError, as on a machine without it
        assert not kernels.triton_available()
        assert kernels.postprocess(torch.zeros(1, 3, 2, 2)).shape == (1, 2, 2, 3)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=60, cwd=Path.cwd())


# ----------------------------------------------------------------------------------- compiled, on GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize(
    "x",
    [
        _random_images((2, 3, 257, 129), torch.float32, seed=5),
        _random_images((2, 3, 257, 129), torch.bfloat16, seed=6),
        _as_images(_step_values()),
        _as_images(_all_finite_bfloat16(), width=128),
    ],
    ids=["float32_odd", "bfloat16_odd", "float32_steps", "bfloat16_all"],
)
def test_compiled_kernel_equals_reference_on_gpu(x: torch.Tensor) -> None:
    expected = postprocess_reference(x)
    on_gpu = x.cuda()
    assert torch.equal(postprocess(on_gpu).cpu(), expected)  # "auto" picks the kernel on CUDA
    out = torch.full(expected.shape, 7, dtype=torch.uint8, device="cuda")
    assert postprocess_triton(on_gpu, out=out) is out
    assert torch.equal(out.cpu(), expected)
