"""`pidserve bench official`: the official PiD network against pidserve's, on the same weights, side by
side in one run: parity first, then time and peak memory per forward and per 4-step decode, eager and
compiled.

    --official-repo PATH: a checkout of nv-tlabs/PiD (never copied into this repository); its
    `pid._src.networks.pid_net.PidNet` is imported from there, built with the constructor arguments of
    the same preset (model/config.official_kwargs) and given pidserve's weights by name
    (model/checkpoints.official_to_ours), so both compute the same function.

What each row times (batch B, output H x W, text of the net's full length, sigma 0):
    forward  one network evaluation: the official `PidNet(x_t, t, y, lq_latent=z, degrade_sigma=s)`;
             pidserve's `PiDNet(x_t, t, z, s, text)` (condition + velocity: the same work)
    decode   the 4-step student rollout (model/sampler.student_steps, the official sampler's
             arithmetic): the official network runs whole at every step,
             as the official `_student_sample_loop` calls it; pidserve conditions once (`model.sample`)
eager, and compiled with torch.compile (mode default) where it compiles: a failure is a row with the
error, never a silent skip. Peak memory: bench/memory.py. The official sampler's own loop is not
imported: it is a method of a training-time model object that needs the whole experiment config; the
rollout arithmetic is the same few elementwise lines (the re-implementation reproduces it bit for bit).
"""

from __future__ import annotations

import importlib
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from pidserve.model import PiDNet, official_kwargs, official_to_ours, sample, student_steps, student_timesteps

from . import report
from .memory import PeakMemory

OFFICIAL_NETWORK_MODULE = "pid._src.networks.pid_net"


def import_official_network(repo: Path) -> type[nn.Module]:
    """`PidNet` from a checkout of nv-tlabs/PiD; ValueError saying what is wrong with the checkout."""
    repo = Path(repo)
    if not (repo / "pid").is_dir():
        raise ValueError(f"{repo} is not a checkout of nv-tlabs/PiD: it has no pid/ package")
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    try:
        module = importlib.import_module(OFFICIAL_NETWORK_MODULE)
    except ImportError as exc:
        raise ValueError(
            f"importing {OFFICIAL_NETWORK_MODULE} from {repo} failed ({exc}); install that checkout's "
            "requirements into this environment"
        ) from None
    if not Path(module.__file__ or "").resolve().is_relative_to(repo.resolve()):
        raise ValueError(f"{OFFICIAL_NETWORK_MODULE} was imported from {module.__file__}, not from {repo}")
    return module.PidNet


def official_network(cls: type[nn.Module], ours: PiDNet) -> nn.Module:
    """The official network of `ours`'s config, holding `ours`'s weights (same device and dtype)."""
    official = cls(**official_kwargs(ours.cfg))
    weights = ours.state_dict()
    wanted = official.state_dict()
    missing = [name for name in wanted if official_to_ours(name) not in weights]
    if missing:
        raise ValueError(f"the official network has tensors pidserve's has not: {missing[:8]}")
    official.load_state_dict({name: weights[official_to_ours(name)] for name in wanted})
    return official.to(device=ours.device, dtype=ours.dtype).eval()


@dataclass
class OfficialTiming:
    side: str  # "official" | "pidserve"
    what: str  # "forward" | "decode"
    mode: str  # "eager" | "compiled"
    ms_median: float | None
    peak_memory_bytes: int | None
    error: str | None = None  # why this row did not run (e.g. the compile failed)


@dataclass
class Inputs:
    x_t: torch.Tensor
    t_scaled: torch.Tensor
    latent: torch.Tensor
    sigma: torch.Tensor
    text: torch.Tensor


def random_inputs(net: PiDNet, batch: int, size: tuple[int, int], seed: int = 0) -> Inputs:
    cfg, g = net.cfg, torch.Generator().manual_seed(seed)
    h, w = size[0] // cfg.output_scale, size[1] // cfg.output_scale

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(net.device, net.dtype)

    return Inputs(
        x_t=randn(batch, 3, *size),
        t_scaled=torch.full((batch,), 999.0, device=net.device, dtype=torch.float32),
        latent=randn(batch, cfg.latent_channels, h, w),
        sigma=torch.zeros(batch, device=net.device),
        text=randn(batch, cfg.text_max_length, cfg.text_dim),
    )


def parity(official: nn.Module, ours: PiDNet, inputs: Inputs) -> dict[str, float]:
    """Max and relative (to the output's largest magnitude) difference of one forward."""
    with torch.no_grad():
        a = official(
            inputs.x_t, inputs.t_scaled, inputs.text, lq_latent=inputs.latent, degrade_sigma=inputs.sigma
        )
        b = ours(inputs.x_t, inputs.t_scaled, inputs.latent, inputs.sigma, inputs.text)
    diff = (a.float() - b.float()).abs().max().item()
    return {"max_abs_diff": diff, "relative": diff / max(b.float().abs().max().item(), 1e-12)}


def _runners(official: nn.Module, ours: PiDNet, inputs: Inputs, steps: int, compiled: bool) -> dict:
    """(side, what) -> a no-argument callable doing that work once."""
    forward_official: Callable = torch.compile(official) if compiled else official
    velocity_ours: Callable = torch.compile(ours.velocity) if compiled else ours.velocity
    noise = torch.Generator(device=inputs.x_t.device)

    def official_forward(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return forward_official(x, t, inputs.text, lq_latent=inputs.latent, degrade_sigma=inputs.sigma)

    def ours_forward() -> torch.Tensor:
        cond = ours.condition(
            inputs.latent, inputs.sigma, inputs.text, image_size=tuple(inputs.x_t.shape[-2:])
        )
        return velocity_ours(inputs.x_t, inputs.t_scaled, cond)

    def draw() -> torch.Tensor:
        return torch.randn(inputs.x_t.shape, generator=noise, device=inputs.x_t.device).to(inputs.x_t.dtype)

    def official_decode() -> torch.Tensor:
        noise.manual_seed(0)
        return student_steps(official_forward, draw, student_timesteps(steps))

    def ours_decode() -> torch.Tensor:
        noise.manual_seed(0)
        if not compiled:
            return sample(
                ours,
                inputs.latent,
                inputs.sigma,
                inputs.text,
                steps=steps,
                noises=[draw() for _ in range(steps)],
            )
        cond = ours.condition(
            inputs.latent, inputs.sigma, inputs.text, image_size=tuple(inputs.x_t.shape[-2:])
        )
        return student_steps(lambda x, t: velocity_ours(x, t, cond), draw, student_timesteps(steps))

    return {
        ("official", "forward"): lambda: official_forward(inputs.x_t, inputs.t_scaled),
        ("pidserve", "forward"): ours_forward,
        ("official", "decode"): official_decode,
        ("pidserve", "decode"): ours_decode,
    }


def _time(run: Callable[[], torch.Tensor], device: str, warmup: int, repeat: int) -> tuple[float, int | None]:
    cuda = device.startswith("cuda")
    for _ in range(warmup):
        run()
    memory = PeakMemory(device)
    memory.start()
    walls = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - start)
    return statistics.median(walls) * 1e3, memory.stop()


def bench_official(
    repo: Path,
    ours: PiDNet,
    size: tuple[int, int],
    *,
    batch: int = 1,
    steps: int = 4,
    warmup: int = 1,
    repeat: int = 3,
    modes: tuple[str, ...] = ("eager", "compiled"),
) -> dict:
    """Parity, then every (mode, what, side) row, the two sides of a row pair timed back to back.

    The compiled rows run in a child process (spawned, given the network's config and weights): a
    compiler that crashes the process (the official network's torch.compile on the CPU ends in a
    corrupted heap, measured 2026-12-02) becomes an error row instead of ending the benchmark."""
    official = official_network(import_official_network(repo), ours)
    inputs = random_inputs(ours, batch, size)
    result: dict = {
        "size": list(size),
        "batch": batch,
        "steps": steps,
        "parity": parity(official, ours, inputs),
    }
    rows: list[OfficialTiming] = []
    job = _Job(
        str(repo), ours.cfg.to_dict(), size, batch, steps, warmup, repeat, str(ours.device), str(ours.dtype)
    )
    for mode in modes:
        if mode == "eager":
            rows += _mode_rows(official, ours, job, compiled=False)
        else:
            state = {k: v.detach().cpu() for k, v in ours.state_dict().items()}
            rows += _in_child(job, state)
    result["rows"] = [asdict(r) for r in rows]
    result["speedups"] = speedups(rows)
    return result


@dataclass(frozen=True)
class _Job:
    """What the compiled rows' child process needs to rebuild both networks and time them."""

    repo: str
    config: dict
    size: tuple[int, int]
    batch: int
    steps: int
    warmup: int
    repeat: int
    device: str
    dtype: str


def _mode_rows(official: nn.Module, ours: PiDNet, job: _Job, compiled: bool) -> list[OfficialTiming]:
    mode = "compiled" if compiled else "eager"
    inputs = random_inputs(ours, job.batch, job.size)
    runners = _runners(official, ours, inputs, job.steps, compiled)
    rows = []
    with torch.no_grad(), tqdm(total=4, desc=f"official vs pidserve, {mode}", unit="row") as bar:
        for what in ("forward", "decode"):
            for side in ("official", "pidserve"):
                bar.set_postfix_str(f"{what} {side}")
                try:
                    ms, peak = _time(runners[(side, what)], job.device, job.warmup, job.repeat)
                    rows.append(OfficialTiming(side, what, mode, ms, peak))
                except Exception as exc:  # a compile that fails is a measured fact, reported
                    rows.append(
                        OfficialTiming(side, what, mode, None, None, f"{type(exc).__name__}: {exc}"[:300])
                    )
                bar.update()
    return rows


def _child(job: _Job, state: dict, queue) -> None:
    from pidserve.model import PiDConfig

    ours = PiDNet(PiDConfig.from_dict(job.config))
    ours.load_state_dict(state)
    ours = ours.to(device=job.device, dtype=getattr(torch, job.dtype.removeprefix("torch."))).eval()
    official = official_network(import_official_network(Path(job.repo)), ours)
    queue.put([asdict(r) for r in _mode_rows(official, ours, job, compiled=True)])


def _in_child(job: _Job, state: dict) -> list[OfficialTiming]:
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_child, args=(job, state, queue))
    child.start()
    child.join()
    if child.exitcode == 0 and not queue.empty():
        return [OfficialTiming(**row) for row in queue.get()]
    why = f"the compiled run's process died (exit code {child.exitcode}) before it reported"
    return [
        OfficialTiming(side, what, "compiled", None, None, why)
        for what in ("forward", "decode")
        for side in ("official", "pidserve")
    ]


def speedups(rows: list[OfficialTiming]) -> dict[str, float]:
    """official ms / pidserve ms per (mode, what), where both ran."""
    times = {(r.mode, r.what, r.side): r.ms_median for r in rows}
    out = {}
    for mode, what in {(r.mode, r.what) for r in rows}:
        a, b = times.get((mode, what, "official")), times.get((mode, what, "pidserve"))
        if a and b:
            out[f"{mode} {what}"] = a / b
    return dict(sorted(out.items()))


def markdown_table(result: dict) -> str:
    columns = ["mode", "what", "side", "ms (median)", "peak MiB", "note"]
    cells = []
    for r in result["rows"]:
        ms = "-" if r["ms_median"] is None else f"{r['ms_median']:.1f}"
        peak = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:.0f}"
        cells.append([r["mode"], r["what"], r["side"], ms, peak, r["error"] or ""])
    parity_line = (
        f"parity: max |official - pidserve| = {result['parity']['max_abs_diff']:.2e} "
        f"({result['parity']['relative']:.1e} of the output's largest value)"
    )
    ratios = ", ".join(f"{k} {v:.2f}x" for k, v in result["speedups"].items()) or "none measured"
    return (
        f"{parity_line}\n\nspeedup of pidserve (official ms / pidserve ms): {ratios}\n\n"
        + report.markdown_table(columns, cells)
    )


def write_official_report(out_dir: Path, result: dict, *, command: str | None = None) -> Path:
    return report.write_report(out_dir, "official", result, markdown_table(result), command=command)
