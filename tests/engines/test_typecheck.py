"""mypy over the TensorRT code, against the TensorRT 10 type stubs (tensorrt-stubs).

The TensorRT code cannot run without an NVIDIA GPU; type-checking it against the stubs is what
catches a misspelt method or a wrong argument here. Three things make the stubs usable:

- tensorrt-stubs installs `tensorrt/__init__.pyi` without a py.typed marker, so mypy ignores it
  in site-packages; the stubs are copied into a directory on mypy_path instead.
- A few stub signatures are not valid Python (a parameter named `in`, a parameter without a
  default after ones with defaults); those lines are repaired in the copy.
- The package maps folders onto `pidserve.*` (setuptools package-dir), which mypy cannot follow;
  a temporary `pidserve/` tree of symlinks gives mypy the same module names.

The mypy settings are in `mypy_config` below (strict about our code, silent about the stubs'
own errors). A probe file with a deliberate mistake checks that the stubs are really in use.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHECKED = ("build/tensorrt_build.py", "tensorrt_engine.py", "trt_support.py")
PROBE = "import tensorrt as trt\n\ntrt.Builder(trt.Logger()).build_serialized_netwrk\n"


def stub_packages() -> list[Path]:
    """The tensorrt and tensorrt_bindings stub directories installed by tensorrt-stubs."""
    try:
        dist = importlib.metadata.distribution("tensorrt-stubs")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("tensorrt-stubs is not installed (the Makefile installs it with --no-deps)")
    roots = {
        Path(str(dist.locate_file(f))).parent for f in dist.files or [] if str(f).endswith("__init__.pyi")
    }
    return sorted(roots)


def repair_stub(text: str) -> str:
    """Make stub signatures that are not valid Python parse (only the lines that fail to)."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if not line.lstrip().startswith("def "):
            continue
        try:
            ast.parse(line.strip() + " ...")
        except SyntaxError:
            lines[i] = _repair_def(line)
    repaired = "\n".join(lines)
    ast.parse(repaired)  # fails the test loudly if a new kind of stub error appears
    return repaired


def _repair_def(line: str) -> str:
    # Parameters named after keywords (`in`) get a trailing underscore.
    line = re.sub(r"([(,]\s*)(in|from|lambda|def)(\s*:)", r"\1\2_\3", line)
    match = re.match(r"^(\s*def \w+\()(.*)(\)\s*(?:->.*)?:\s*)$", line)
    if match is None:
        return line
    params, depth, current = [], 0, ""
    for char in match.group(2):
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            params.append(current)
            current = ""
        else:
            current += char
    params.append(current)
    # A parameter without a default after ones with defaults gets `= ...`.
    seen_default = False
    for i, param in enumerate(params):
        if "=" in param:
            seen_default = True
        elif seen_default and param.strip() and not param.strip().startswith("*"):
            params[i] = param + " = ..."
    return match.group(1) + ",".join(params) + match.group(3)


def package_tree(root: Path) -> Path:
    """root/pidserve/... as symlinks, following pyproject's package-dir mapping."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    mapping: dict[str, str] = pyproject["tool"]["setuptools"]["package-dir"]
    top = root / "pidserve"
    top.mkdir(parents=True)
    for entry in (REPO / mapping["pidserve"]).iterdir():
        if entry.suffix == ".py":
            (top / entry.name).symlink_to(entry)
    for package, folder in mapping.items():
        if package != "pidserve":
            (root / package.replace(".", "/")).symlink_to(REPO / folder, target_is_directory=True)
    return top


def mypy_config(stubs: Path) -> str:
    return "\n".join(
        [
            "[mypy]",
            f"mypy_path = {stubs}",
            "python_version = 3.11",
            "follow_imports = silent",
            "ignore_missing_imports = True",
            "disallow_untyped_defs = True",
            "check_untyped_defs = True",
            "warn_unused_ignores = True",
            "warn_redundant_casts = True",
            "strict_equality = True",
            "[mypy-tensorrt,tensorrt.*,tensorrt_bindings,tensorrt_bindings.*]",
            "ignore_errors = True",
            "",
        ]
    )


def test_tensorrt_code_typechecks_against_the_stubs(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    stubs = tmp_path / "stubs"
    for package in stub_packages():
        shutil.copytree(package, stubs / package.name)
        for stub in (stubs / package.name).rglob("*.pyi"):
            stub.write_text(repair_stub(stub.read_text()))
    top = package_tree(tmp_path / "src")
    probe = tmp_path / "src" / "stub_probe.py"
    probe.write_text(PROBE)
    config = tmp_path / "mypy.ini"
    config.write_text(mypy_config(stubs))
    cache = request.config.cache.mkdir("mypy") if request.config.cache else tmp_path / "mypy-cache"
    files = [str(top / "engines" / name) for name in CHECKED]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(config),
            "--cache-dir",
            str(cache),
            *files,
            str(probe),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if ": error:" in line]
    ours = [line for line in errors if "stub_probe.py" not in line]
    assert not ours, "mypy errors in the TensorRT code:\n" + output
    # The probe's misspelt method must be caught: otherwise the stubs were not used at all.
    assert any('"Builder" has no attribute "build_serialized_netwrk"' in line for line in errors), output
