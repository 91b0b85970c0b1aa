"""Logs of the long-running commands: JSON lines on request, text otherwise, library chatter held back."""

from __future__ import annotations

import json
import logging

import pytest

from dlis_market.logs import configure_logging
from dlis_market.settings import LogSettings, Settings


@pytest.fixture(autouse=True)
def _restore_root():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def test_json_lines_carry_level_logger_message_extras_and_exceptions(capfd):
    import hivemind  # noqa: F401  (renames WARNING to "WARN" process-wide; JSON keeps the canonical names)

    configure_logging(LogSettings(format="json"))
    log = logging.getLogger("dlis_market.broker.service")
    log.warning("job %s failed: %s", "0xab", "stage timed out", extra={"job_id": "0xab"})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("settlement pass failed")
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines()]
    assert len(lines) == 2  # one line per record, the traceback inside the object
    assert lines[0]["level"] == "WARNING" and lines[0]["logger"] == "dlis_market.broker.service"
    assert lines[0]["message"] == "job 0xab failed: stage timed out" and lines[0]["job_id"] == "0xab"
    assert lines[0]["ts"].endswith("Z")
    assert "RuntimeError: boom" in lines[1]["exc"]


def test_text_by_default_and_library_info_held_back(capfd):
    configure_logging(Settings.load(environ={}).log)
    logging.getLogger("hivemind.dht").info("routing table refreshed")  # per-message chatter
    logging.getLogger("dlis_market.node.server").info("peer went away")
    err = capfd.readouterr().err
    assert "routing table refreshed" not in err
    assert "INFO dlis_market.node.server: peer went away" in err


def test_format_from_the_environment():
    assert Settings.load(environ={"DLIS_LOG__FORMAT": "json"}).log.format == "json"
