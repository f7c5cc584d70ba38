"""`pidserve bench official` (bench/official.py) against a stand-in registered under the official import
path (tests/fixtures/official_standin): the checkout is imported from its path, the official network
built from the preset's official arguments and given pidserve's weights by name, parity checked, and
every row timed (a compile that fails is a row with its error)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pidserve.bench import bench_official, import_official_network, official_network, official_table
from pidserve.cli import app
from pidserve.model import PiDConfig, PiDNet
from pidserve.model.checkpoints import ours_to_official
from tests.conftest import FIXTURES

STANDIN = FIXTURES / "official_standin"


@pytest.fixture
def standin():
    yield import_official_network(STANDIN)
    for name in [m for m in sys.modules if m == "pid" or m.startswith("pid.")]:
        del sys.modules[name]
    sys.path.remove(str(STANDIN))


def test_the_official_network_gets_pidserves_weights_and_agrees(standin) -> None:
    ours = PiDNet(PiDConfig.preset("tiny_v1")).eval()
    official = official_network(standin, ours)
    assert official.state_dict().keys() == {ours_to_official(k) for k in ours.state_dict()}
    result = bench_official(STANDIN, ours, (64, 64), repeat=1, warmup=0, modes=("eager",))
    assert result["parity"]["max_abs_diff"] < 1e-5
    rows = {(r["mode"], r["what"], r["side"]): r for r in result["rows"]}
    assert set(rows) == {("eager", w, s) for w in ("forward", "decode") for s in ("official", "pidserve")}
    assert all(r["ms_median"] > 0 and r["error"] is None for r in rows.values())
    assert set(result["speedups"]) == {"eager forward", "eager decode"}
    assert "parity: max |official - pidserve|" in official_table(result)


def test_compiled_rows_run_in_a_child_process_that_may_die(standin, monkeypatch) -> None:
    """The official network's torch.compile on the CPU ended in a corrupted heap (2026-12-02): the
    compiled rows run in a spawned child, whose death is an error row, never the benchmark's end."""
    from pidserve.bench import official as bo

    ours = PiDNet(PiDConfig.preset("tiny_v1")).eval()
    job = bo._Job(str(STANDIN), ours.cfg.to_dict(), (64, 64), 1, 2, 0, 1, "cpu", "torch.float32")
    state = ours.state_dict()
    rows = bo._in_child(job, state)  # really compiled, in a spawned process
    assert {(r.side, r.what) for r in rows} == {
        (s, w) for s in ("official", "pidserve") for w in ("forward", "decode")
    }
    assert all(r.mode == "compiled" and (r.ms_median or r.error) for r in rows)
    dying = bo._Job("/nonexistent/checkout", ours.cfg.to_dict(), (64, 64), 1, 2, 0, 1, "cpu", "torch.float32")
    died = bo._in_child(dying, state)
    assert len(died) == 4 and all("process died" in r.error for r in died)


def test_a_checkout_without_the_official_package_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a checkout of nv-tlabs/PiD: it has no pid/ package"):
        import_official_network(tmp_path)
    (tmp_path / "pid").mkdir()
    with pytest.raises(ValueError, match=r"importing pid._src.networks.pid_net from .* failed"):
        import_official_network(tmp_path)
    sys.path.remove(str(tmp_path))
    sys.modules.pop("pid", None)


def test_the_bench_official_command_writes_its_report(tmp_path: Path, standin) -> None:
    result = CliRunner().invoke(
        app,
        ["bench", "official", "--official-repo", str(STANDIN), "--preset", "tiny_v1.5", "--size", "128x128",
         "--modes", "eager", "--repeat", "1", "--warmup", "0", "--out", str(tmp_path)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "official.json").read_text())["results"]
    assert report["parity"]["max_abs_diff"] < 1e-5 and len(report["rows"]) == 4
    bad = CliRunner().invoke(
        app, ["bench", "official", "--official-repo", str(tmp_path), "--preset", "tiny_v1"]
    )
    assert bad.exit_code != 0 and "no pid/ package" in bad.output


def test_our_names_map_back_onto_every_official_name() -> None:
    from safetensors import safe_open

    from pidserve.model.checkpoints import official_to_ours
    from tests.conftest import OFFICIAL

    for model in ("tiny_v1", "tiny_v1.5"):
        with safe_open(str(OFFICIAL / model / "weights.safetensors"), "pt") as f:
            names = list(f.keys())
        assert [ours_to_official(official_to_ours(name)) for name in names] == names
