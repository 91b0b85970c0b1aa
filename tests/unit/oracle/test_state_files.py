"""The oracle's state files survive a crash at any point of a write."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dlis_market.oracle import state_files
from dlis_market.oracle.errors import SpotCheckSecretError
from dlis_market.oracle.state_files import append_line, complete_lines, remove_leftovers, write_atomic
from dlis_market.oracle.verification import load_or_create_secret


class Crash(BaseException):
    """The process dies here (not an Exception: nothing may catch and carry on)."""


def _crash(*_args: object, **_kw: object) -> None:
    raise Crash


@pytest.mark.parametrize("at", ["fsync", "replace"])
def test_a_crash_while_replacing_a_file_leaves_the_previous_one(tmp_path: Path, monkeypatch, at: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "privacy.json"
    write_atomic(path, '{"v": 1}')
    monkeypatch.setattr(state_files.os, at, _crash)
    with pytest.raises(Crash):
        write_atomic(path, '{"v": 2, "much": "' + "x" * 100_000 + '"}')
    monkeypatch.undo()
    assert path.read_text() == '{"v": 1}'
    remove_leftovers(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["privacy.json"]
    write_atomic(path, '{"v": 2}')
    assert path.read_text() == '{"v": 2}'


def test_leftover_temporary_files_are_removed(tmp_path: Path) -> None:
    (tmp_path / ".tmp-privacy.json.abc").write_text('{"v": ')  # what a crash before the rename leaves
    (tmp_path / "privacy.json").write_text("{}")
    assert remove_leftovers(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["privacy.json"]


def test_a_line_cut_short_by_a_crash_is_dropped(tmp_path: Path) -> None:
    log = tmp_path / "checks" / "7.log"
    append_line(log, "0xA pass")
    append_line(log, "0xB fail")
    with log.open("a") as fh:
        fh.write("0xC pa")  # the process died mid-append
    assert complete_lines(log) == ["0xA pass", "0xB fail"]
    append_line(log, "0xD pass")  # the restarted process appends: the torn part is cut off first
    assert log.read_text() == "0xA pass\n0xB fail\n0xD pass\n"
    assert complete_lines(tmp_path / "missing.log") == []
    with pytest.raises(ValueError):
        append_line(log, "two\nlines")


def test_sampler_secret_is_created_whole_or_not_at_all(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "broker" / "spot_check_secret"
    monkeypatch.setattr(os, "fsync", _crash)
    with pytest.raises(Crash):
        load_or_create_secret(path)
    monkeypatch.undo()
    assert not path.exists() and list(path.parent.iterdir()) == []
    secret = load_or_create_secret(path)
    assert len(secret) == 32 and load_or_create_secret(path) == secret
    assert path.stat().st_mode & 0o777 == 0o600
    path.write_bytes(secret[:5])  # cut short by an older version's crash
    with pytest.raises(SpotCheckSecretError, match="5 bytes"):
        load_or_create_secret(path)
