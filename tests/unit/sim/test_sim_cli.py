"""`dlis sim` from the command line: JSON out, what-if with intervals, and errors that teach."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from dlis_market.cli.main import app

runner = CliRunner()


def test_run_prints_figures_over_seeds_as_json(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    res = runner.invoke(
        app,
        [
            "sim",
            "run",
            "--scenario",
            "demo",
            "--seeds",
            "2",
            "--hours",
            "0.05",
            "--json",
            "--out",
            str(out),
            "--plots",
            str(tmp_path / "png"),
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["peers"] == 4
    assert len(data["runs"]) == 2
    mean, half = data["mean_ci95"]["completion"]
    assert 0 <= mean <= 100 and half >= 0
    assert set(data["runs"][0]["classes"]) == {"phone", "laptop", "server"}
    pngs = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert pngs == ["cheater_gain.png", "completion.png", "earnings.png", "gas.png", "latency.png", "utilisation.png"]


def test_compare_prints_paired_differences(tmp_path: Path) -> None:
    out = tmp_path / "cmp.json"
    res = runner.invoke(
        app,
        [
            "sim",
            "compare",
            "--scenario",
            "demo",
            "--change",
            "check-fraction=1",
            "--seeds",
            "2",
            "--hours",
            "0.05",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "what if check-fraction=1" in res.output
    base, diff, _ = json.loads(out.read_text())["difference"]["checks_drawn"]
    assert diff > 0


def test_an_unknown_change_and_a_missing_file_are_explained(tmp_path: Path) -> None:
    res = runner.invoke(app, ["sim", "compare", "--scenario", "demo", "--change", "more=1"])
    assert res.exit_code == 1
    assert "unknown change 'more=1'" in res.output and "add-peers=N" in res.output
    res = runner.invoke(app, ["sim", "run", "--scenario", str(tmp_path / "nope.yaml")])
    assert res.exit_code == 1
    assert "cannot read scenario" in res.output and "demo" in res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("peers: [{device: toaster, layers: '0:30'}]\nclients: [{rate_per_s: 1}]\n")
    res = runner.invoke(app, ["sim", "run", "--scenario", str(bad)])
    assert res.exit_code == 1
    assert "toaster" in res.output and "laptop" in res.output
