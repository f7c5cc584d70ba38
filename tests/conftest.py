"""Shared test helpers: paths to the official reference fixtures (copied into tests/fixtures)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL = FIXTURES / "pid_official"
TINY_MODELS = ("tiny_v1", "tiny_v1.5")


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file into ordinary (aligned) tensors: memory-mapped tensors at unaligned
    offsets take other CPU kernel paths and move float32 results by ~1e-6."""
    return {k: v.clone() for k, v in load_file(str(path)).items()}


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
