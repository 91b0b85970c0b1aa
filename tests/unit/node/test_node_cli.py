"""`dlis node start` argument handling (no worker is started: every case is refused before that)."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from dlis_market.cli import worker


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Root."""

    worker.register(app)
    return app


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shards", "."], "exactly one of --layers START:END or --auto"),
        (["--shards", ".", "--layers", "0:2", "--auto"], "exactly one of --layers START:END or --auto"),
        (["--layers", "0:2"], "exactly one of --shards DIR or --manifest-cid CID"),
        (["--shards", ".", "--layers", "2:1"], "START:END"),
    ],
)
def test_start_refuses_inconsistent_flags(args: list[str], message: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(_app(), ["start", *args], env={"DLIS_HOME": str(tmp_path)})
    assert result.exit_code == 1
    assert message in result.output


def test_start_is_mounted_with_its_options() -> None:
    result = CliRunner().invoke(_app(), ["start", "--help"])
    assert result.exit_code == 0
    for flag in ("--layers", "--auto", "--manifest-cid", "--initial-peer", "--price", "--market", "--registry"):
        assert flag in result.output
