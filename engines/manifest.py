"""manifest.json: what an engine directory holds and what it was built from, for, and with.

    engine_dir/
        condition.plan   TensorRT plan of condition.onnx (adapter trunk, text projection)
        step.plan        TensorRT plan of step.onnx (one network evaluation)
        manifest.json    this file

A plan only loads with the TensorRT version that built it, on a GPU of the compute capability
it was built on. The manifest records both, so a mismatch is reported before TensorRT is asked
to deserialize anything, with the exact `pidserve build` command that rebuilds the directory.
It also records the model (sha256 of the checkpoint file, and its PiDConfig), the precision,
the shape profiles (output size, batch sizes, text tokens) and the build flags.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shlex
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pidserve.model import PiDConfig

from .base import EngineConfigError, ShapeProfile
from .gpu_classes import (
    ComputeCapability,
    format_compute_capability,
    fp8_supported,
    match_gpu_class,
    parse_compute_capability,
)

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
ENGINE_FILES = {"condition": "condition.plan", "step": "step.plan"}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class EngineManifest:
    """The contents of manifest.json (format version 1). JSON-ready values only."""

    model_sha256: str  # of the checkpoint file the engines were built from
    checkpoint: str  # its path at build time (goes into the rebuild command)
    variant: str | None  # preset name ("2k_flux", ...) when known
    config: dict[str, Any]  # PiDConfig.to_dict()
    precision: str  # "fp32" | "bf16" | "fp8"
    profiles: list[dict[str, Any]]  # ShapeProfile fields: image_size, batch_sizes, text_tokens
    tensorrt_version: str  # tensorrt.__version__ of the builder, e.g. "10.13.0.35"
    gpu_class: str  # "rtx5090" | "gb200" | "h100"
    gpu_name: str  # product name of the build GPU, e.g. "NVIDIA H100 80GB HBM3"
    compute_capability: str  # of the build GPU, e.g. "9.0"
    build_flags: dict[str, Any]  # workspace, optimization level, typing and builder flags per graph
    engine_dir: str  # where the build wrote the directory (the rebuild command's -o)
    files: dict[str, str] = field(default_factory=lambda: dict(ENGINE_FILES))
    created: str = field(default_factory=_now)  # ISO 8601, UTC
    format_version: int = FORMAT_VERSION

    def pid_config(self) -> PiDConfig:
        return PiDConfig.from_dict(self.config)

    def shape_profiles(self) -> list[ShapeProfile]:
        return [profile_from_dict(p) for p in self.profiles]

    @property
    def max_batch(self) -> int:
        return max(profile.max_batch for profile in self.shape_profiles())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "manifest") -> EngineManifest:
        """Validate and load a parsed manifest.json; EngineConfigError says what is wrong."""
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise EngineConfigError(
                f"{source} has format_version {version!r}; this pidserve reads version {FORMAT_VERSION}. "
                "Rebuild the engine directory with this pidserve (`pidserve build ...`)."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in data
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        )
        if missing:
            raise EngineConfigError(f"{source} is missing fields: {', '.join(missing)}")
        unknown = sorted(set(data) - names)
        if unknown:
            log.warning("%s has fields this pidserve does not know (ignored): %s", source, ", ".join(unknown))
        manifest = cls(**{k: v for k, v in data.items() if k in names})
        try:
            parse_compute_capability(manifest.compute_capability)
            manifest.shape_profiles()
        except (TypeError, ValueError, KeyError) as exc:
            raise EngineConfigError(f"{source} is malformed: {exc}") from exc
        if set(manifest.files) != set(ENGINE_FILES):
            raise EngineConfigError(
                f"{source} lists files {manifest.files}; expected keys {sorted(ENGINE_FILES)}"
            )
        return manifest


def profile_to_dict(profile: ShapeProfile) -> dict[str, Any]:
    return {
        "image_size": list(profile.image_size),
        "batch_sizes": list(profile.batch_sizes),
        "text_tokens": profile.text_tokens,
    }


def profile_from_dict(data: dict[str, Any]) -> ShapeProfile:
    """A ShapeProfile from its JSON form (lists become tuples)."""
    height, width = (int(v) for v in data["image_size"])
    batch_sizes = tuple(int(b) for b in data["batch_sizes"])
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch_sizes must be positive integers, got {list(batch_sizes)}")
    return ShapeProfile((height, width), tuple(sorted(batch_sizes)), int(data.get("text_tokens", 0)))


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (checkpoints are several GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(manifest: EngineManifest, directory: str | Path) -> Path:
    """Write directory/manifest.json atomically (a reader never sees half a file)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(directory: str | Path) -> EngineManifest:
    """Read directory/manifest.json; EngineConfigError if it is missing, corrupt or of another version."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise EngineConfigError(
            f"{directory} is not a TensorRT engine directory: no {MANIFEST_NAME} "
            "(build one with `pidserve build --checkpoint CKPT --gpu-class CLASS ... -o DIR`)"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EngineConfigError(f"{path} is not valid JSON ({exc}); rebuild the engine directory") from exc
    if not isinstance(data, dict):
        raise EngineConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return EngineManifest.from_dict(data, source=str(path))


def rebuild_command(
    manifest: EngineManifest,
    engine_dir: str | Path | None = None,
    gpu_class: str | None = None,
    precision: str | None = None,
) -> str:
    """The `pidserve build` command that rebuilds this engine directory (for another GPU or version).

    pidserve build --checkpoint CKPT --gpu-class CLASS --precision P --size HxW --max-batch N -o DIR
    (one --size per profile; --text-tokens N only when the engines take text tokens).
    """
    sizes = []
    for profile in manifest.shape_profiles():
        size = f"{profile.image_size[0]}x{profile.image_size[1]}"
        if size not in sizes:
            sizes.append(size)
    parts = [
        "pidserve build",
        f"--checkpoint {shlex.quote(manifest.checkpoint)}",
        f"--gpu-class {gpu_class or manifest.gpu_class}",
        f"--precision {precision or manifest.precision}",
        *(f"--size {size}" for size in sizes),
        f"--max-batch {manifest.max_batch}",
    ]
    text_tokens = max(profile.text_tokens for profile in manifest.shape_profiles())
    if text_tokens:
        parts.append(f"--text-tokens {text_tokens}")
    parts.append(f"-o {shlex.quote(str(engine_dir or manifest.engine_dir))}")
    return " ".join(parts)


def check_compatible(
    manifest: EngineManifest,
    gpu_name: str,
    compute_capability: ComputeCapability,
    trt_version: str,
    engine_dir: str | Path | None = None,
) -> None:
    """Raise EngineConfigError if the plans cannot run on this GPU with this TensorRT.

    Plans need the compute capability and the exact TensorRT version they were built with. A
    different product name with the same compute capability (H100 PCIe vs SXM) loads, possibly
    with less tuned kernels, so it is only logged. The message ends with the rebuild command,
    for this machine's GPU class when it has one.
    """
    built_cc = parse_compute_capability(manifest.compute_capability)
    here_cc = tuple(compute_capability)
    problems = []
    if here_cc != built_cc:
        problems.append(
            f"it was built for compute capability {manifest.compute_capability} ({manifest.gpu_name}) "
            f"but this GPU, {gpu_name}, has {format_compute_capability(compute_capability)}"
        )
    if trt_version != manifest.tensorrt_version:
        problems.append(
            f"it was built with TensorRT {manifest.tensorrt_version} but TensorRT {trt_version} is installed "
            "(plans load only in the TensorRT version that built them)"
        )
    if not problems:
        if gpu_name != manifest.gpu_name:
            log.warning(
                "engine built on %s runs on %s (same compute capability %s); rebuild here for best speed",
                manifest.gpu_name,
                gpu_name,
                manifest.compute_capability,
            )
        return
    here_class = match_gpu_class(gpu_name, compute_capability)
    precision = manifest.precision
    note = ""
    if precision == "fp8" and not fp8_supported(compute_capability):
        precision = "bf16"
        note = f" (this GPU has no FP8 tensor cores, so the command asks for {precision})"
    command = rebuild_command(manifest, engine_dir, here_class.name if here_class else None, precision)
    where = engine_dir or manifest.engine_dir
    raise EngineConfigError(
        f"engine directory {where} cannot run here: "
        + "; ".join(problems)
        + f". Rebuild it{note}:\n  {command}"
    )


def stale_reasons(
    directory: str | Path,
    *,
    model_sha256: str,
    precision: str,
    gpu_class: str,
    profile: ShapeProfile,
    gpu_name: str,
    compute_capability: ComputeCapability,
    trt_version: str,
) -> list[str]:
    """Why the engines in `directory` do not match this build request (empty: they are current).

    What `pidserve build --if-stale` asks before a long build, e.g. in a Kubernetes init container
    on a shared engine cache: same checkpoint bytes, precision, GPU class and shape profile, and
    plans this GPU and TensorRT can run.
    """
    try:
        manifest = read_manifest(directory)
    except EngineConfigError as exc:
        return [str(exc)]
    reasons = []
    if manifest.model_sha256 != model_sha256:
        reasons.append("built from another checkpoint (model SHA-256 differs)")
    if manifest.precision != precision:
        reasons.append(f"built in {manifest.precision}, {precision} asked")
    if manifest.gpu_class != gpu_class:
        reasons.append(f"built for GPU class {manifest.gpu_class}, {gpu_class} asked")
    if profile_to_dict(profile) not in manifest.profiles:
        reasons.append(f"no profile {profile.tag} with batch sizes {list(profile.batch_sizes)}")
    try:
        check_compatible(manifest, gpu_name, compute_capability, trt_version, directory)
    except EngineConfigError as exc:
        reasons.append(str(exc).split(". Rebuild it")[0])
    return reasons
