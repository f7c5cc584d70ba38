"""What every benchmark writes: <name>.json (machine-readable) and <name>.md (a table to paste).

The JSON carries everything needed to trust or reproduce a figure: the command, the UTC date, the
git commit, the machine (CPU model, cores, memory, GPU) and the versions of the libraries that set
the speed. Plots (bench/plots.py) go into the same folder.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# Libraries whose version changes the numbers; missing ones are reported as "not installed".
VERSIONED_PACKAGES = ("pidserve", "torch", "numpy", "onnxruntime", "triton", "fpng", "httpx", "uvicorn")


def git_commit() -> str:
    """Short SHA of HEAD, with "+dirty" when the work tree has changes; "unknown" outside a checkout."""
    repo = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    try:
        sha = git("rev-parse", "--short", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except OSError:
        return "unknown"
    return (sha + ("+dirty" if dirty else "")) if sha else "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    if "torch" in found:
        import torch

        # The module's version carries the build tag (+cpu, +cu130) that some wheels' metadata lacks.
        found["torch"] = torch.__version__
    return found


def machine_description() -> dict[str, Any]:
    """The hardware a figure was measured on. Imports torch only to ask about GPUs."""
    import torch

    gpu = "none"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        gpu = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor})"
    return {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round((_memory_bytes() or 0) / 2**30, 1),
        "gpu": gpu,
        "cuda": torch.version.cuda or "none",
        "os": platform.platform(),
    }


def command_line(ctx: Any = None) -> str:
    """The command that is running (`pidserve bench ...`), for the report and RESULTS.md.

    Given the CLI's context (typer.Context), it is rebuilt from the parsed options that differ from their
    defaults, so it reads the same whether typed in a shell or invoked from Python; else the process's
    own arguments.
    """
    if ctx is None:
        return "pidserve " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    parts = ["pidserve", *ctx.command_path.split()[1:]]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if not param.opts[0].startswith("-") or value == param.default:
            continue
        if getattr(param, "is_flag", False):
            parts += (param.opts if value else param.secondary_opts)[:1]
        elif value is not None:
            parts += [param.opts[0], shlex.quote(str(value))]
    return " ".join(parts)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(out_dir: Path, name: str, results: Any, table: str, *, command: str | None = None) -> Path:
    """Write <out_dir>/<name>.json and <name>.md; returns the JSON's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": command or command_line(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git": git_commit(),
        "machine": machine_description(),
        "versions": versions(),
    }
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    machine = meta["machine"]
    header = (
        f"`{meta['command']}`\n\n{meta['date']}, git {meta['git']}; {machine['cpu']} "
        f"({machine['logical_cores']} cores, {machine['memory_gib']} GiB), GPU {machine['gpu']}; "
        f"torch {meta['versions']['torch']}.\n\n"
    )
    (out_dir / f"{name}.md").write_text(header + table + "\n")
    return json_path
