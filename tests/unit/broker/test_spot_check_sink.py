"""The spot-check sink's outbox while the oracle is down: fingerprint passes (credit, frequent)
are bounded, so they never crowd out the failure reports and slash evidence the outbox must keep."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dlis_market.broker import spot_check_sink
from dlis_market.broker.spot_check_sink import FAILURE_KIND, FINGERPRINT_PASS_KIND, OracleSink
from dlis_market.chain.anvil import free_port
from dlis_market.protocol.outbox import Outbox, sqlite_url
from dlis_market.protocol.spot_checks import FingerprintCheckPass, SpotCheckFailure

NODE, CHECKER = "0x" + "aa" * 20, "0x" + "bb" * 20


def test_passes_kept_while_the_oracle_is_down_are_bounded_and_leave_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spot_check_sink, "FINGERPRINT_PASSES_KEPT", 3)
    box = Outbox(sqlite_url(tmp_path / "outbox.db"), max_rows=5, retry_base_s=60.0)
    sink = OracleSink(f"http://127.0.0.1:{free_port()}", box, timeout_s=1.0)  # nothing listens: down

    async def run() -> tuple[list[str], list[str], dict[str, object]]:
        for i in range(10):  # twice the outbox's room
            passed = FingerprintCheckPass(node=NODE, checker=CHECKER, job_id="0x" + f"{i:064x}", start=0, end=10,
                                          fingerprint_hash="0x" + "ab" * 32)  # fmt: skip
            assert (await sink.report_fingerprint_pass(passed))["outcome"] == "queued"
        failure = SpotCheckFailure(node=NODE, job_id="0x" + "07" * 32, start=0, end=10)
        answer = await sink.report_failure(failure)  # still fits: the passes took 3 rows of 5
        passes = [m.key for m in await box.pending(FINGERPRINT_PASS_KIND)]
        failures = [m.key for m in await box.pending(FAILURE_KIND)]
        await sink.close()
        return passes, failures, answer

    passes, failures, answer = asyncio.run(run())
    assert passes == [f"{NODE}:0x{i:064x}:0" for i in (7, 8, 9)]  # the newest three wait
    assert failures == [f"{NODE}:0x{'07' * 32}:0"] and answer["outcome"] == "queued"
