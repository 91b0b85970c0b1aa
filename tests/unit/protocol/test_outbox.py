"""The persisted outbox: rows are on disk before the first try and survive a reopen, retries back
off exponentially up to a cap, definitive refusals become dead letters (never retried), the size
is bounded, a kind keeps its order, and against a real oracle app (Anvil) a message delivered twice
(a crash between delivery and delete) counts once: the oracle's duplicate answers end the row."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dlis_market.broker.observations import JobObserver, OracleObservationSink, observe_job
from dlis_market.broker.spot_checks import OracleSink
from dlis_market.chain.anvil import free_port
from dlis_market.node.telemetry import TelemetryRecorder, WorkerTelemetry
from dlis_market.oracle.service import OracleService
from dlis_market.protocol.outbox import (
    Answer,
    Outbox,
    OutboxError,
    OutboxFullError,
    State,
    Verdict,
    classify_http,
    sqlite_url,
)
from dlis_market.protocol.routes import RouteHop
from dlis_market.protocol.spot_checks import SpotCheckFailure
from dlis_market.settings import OutboxSettings, Settings
from dlis_market.types import LayerRange
from tests.integration.oracle.test_worker_telemetry import ThreadedOracle
from tests.unit.oracle.evidence_helpers import make_evidence, reference_output

UNIT = 10**18


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Receiver:
    """Answers each delivery with the next scripted verdict (the last one repeats); records bodies."""

    def __init__(self, *verdicts: Verdict) -> None:
        self.verdicts = list(verdicts) or [Verdict.DELIVERED]
        self.bodies: list[bytes] = []

    async def __call__(self, body: bytes) -> Answer:
        self.bodies.append(body)
        verdict = self.verdicts.pop(0) if len(self.verdicts) > 1 else self.verdicts[0]
        return Answer(verdict, f"{verdict} #{len(self.bodies)}", {"reason": "nope"} if verdict == "refused" else {})


def _box(path: Path, clock: Clock | None = None, **kw: float) -> Outbox:
    return Outbox(sqlite_url(path / "outbox.db"), clock=clock or Clock(), **kw)  # type: ignore[arg-type]


def test_a_message_is_on_disk_before_the_first_try_and_survives_a_reopen(tmp_path: Path) -> None:
    async def main() -> None:
        box = _box(tmp_path)
        box.register("k", Receiver(Verdict.RETRY))
        delivery = await box.send("k", "m1", b"body one")
        assert delivery.status == "queued" and not delivery.done
        assert (await box.send("k", "m1", b"body one")).status == "queued"  # one row per key
        assert len(await box.pending()) == 1
        await box.close()
        again = _box(tmp_path)  # a restarted sender: a new object on the same file
        again.register("k", Receiver())
        [row] = await again.pending()
        assert (row.key, row.body, row.attempts, row.state) == ("m1", b"body one", 1, State.PENDING)
        assert "retry #1" in row.last_error
        await again.close()

    asyncio.run(main())


def test_the_row_is_committed_before_the_receiver_sees_the_body(tmp_path: Path) -> None:
    seen: list[list[tuple[str, int]]] = []

    async def deliver(body: bytes) -> Answer:  # another connection (another process) sees the row
        with contextlib.closing(sqlite3.connect(tmp_path / "outbox.db")) as other:
            seen.append(other.execute("SELECT key, attempts FROM outbox_messages").fetchall())
        return Answer(Verdict.DELIVERED)

    async def main() -> None:
        box = _box(tmp_path)
        box.register("k", deliver)
        assert (await box.send("k", "m1", b"x")).status == "delivered"
        assert await box.pending() == []  # deleted once delivered
        await box.close()

    asyncio.run(main())
    assert seen == [[("m1", 0)]]


def test_retries_back_off_exponentially_up_to_the_cap(tmp_path: Path) -> None:
    clock = Clock()
    receiver = Receiver(Verdict.RETRY)

    async def main() -> list[float]:
        box = _box(tmp_path, clock, retry_base_s=1.0, retry_max_s=8.0)
        box.register("k", receiver)
        await box.put("k", "m", b"x")
        waits = []
        for _ in range(6):
            before = len(receiver.bodies)
            await box.flush()
            assert len(receiver.bodies) == before + 1
            [row] = await box.pending()
            waits.append(row.next_attempt_at - clock.now)
            clock.now += waits[-1] - 0.01
            await box.flush()  # not due yet: no try
            assert len(receiver.bodies) == before + 1
            clock.now += 0.01
        await box.close()
        return waits

    assert asyncio.run(main()) == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_a_definitive_refusal_is_a_dead_letter_never_retried(tmp_path: Path) -> None:
    receiver = Receiver(Verdict.REFUSED, Verdict.DELIVERED)

    async def main() -> None:
        box = _box(tmp_path)
        box.register("k", receiver)
        await box.put("k", "bad", b"refused body")
        await box.put("k", "good", b"next body")
        assert await box.flush() == 1  # the refusal does not block the row behind it
        [dead] = await box.dead_letters()
        assert (dead.key, dead.state, dead.attempts) == ("bad", State.DEAD, 1) and "refused #1" in dead.last_error
        assert await box.pending() == []
        for _ in range(3):
            await box.flush()
        assert receiver.bodies == [b"refused body", b"next body"]  # tried once, never again
        again = await box.send("k", "bad", b"refused body")  # the same message again: still dead, not sent
        assert again.status == "dead" and again.answer is not None and "refused #1" in again.answer.detail
        assert len(receiver.bodies) == 2
        assert await box.purge_dead() == 1 and await box.dead_letters() == []
        await box.close()

    asyncio.run(main())


def test_full_outbox_refuses_with_the_numbers(tmp_path: Path) -> None:
    async def main() -> None:
        box = _box(tmp_path, max_rows=2, max_bytes=2048)
        box.register("k", Receiver(Verdict.RETRY))
        await box.put("k", "a", b"1")
        await box.put("k", "b", b"2")
        with pytest.raises(OutboxFullError, match=r"full: 2 messages of 2 bytes \(0 dead letters\).*limits 2 messages"):
            await box.put("k", "c", b"3")
        big = _box(tmp_path / "big", max_bytes=2048)
        big.register("k", Receiver(Verdict.RETRY))
        await big.put("k", "a", b"x" * 2000)
        with pytest.raises(OutboxFullError, match="2048 bytes; this k message of 100 bytes"):
            await big.put("k", "b", b"y" * 100)
        with pytest.raises(OutboxError, match="no receiver registered for outbox kind 'other'"):
            await box.put("other", "a", b"1")
        with pytest.raises(OutboxError, match="1 to 200 characters, got 201"):
            await box.put("k", "x" * 201, b"1")
        await box.close()
        await big.close()

    asyncio.run(main())


def test_keep_latest_keeps_only_the_newest_rows(tmp_path: Path) -> None:
    async def main() -> None:
        box = _box(tmp_path, max_rows=2)
        box.register("tel", Receiver(Verdict.RETRY), keep_latest=2)
        for seq in range(5):  # more than max_rows: superseded rows make room
            await box.put("tel", str(seq), f"report {seq}".encode())
        assert [m.key for m in await box.pending()] == ["3", "4"]
        await box.close()

    asyncio.run(main())


def test_a_kind_goes_out_in_order_and_waits_on_its_head(tmp_path: Path) -> None:
    clock = Clock()
    receiver = Receiver(Verdict.RETRY, Verdict.DELIVERED)

    async def main() -> None:
        box = _box(tmp_path, clock)
        box.register("k", receiver)
        for i in range(3):
            await box.put("k", str(i), f"b{i}".encode())
        assert await box.flush() == 0 and receiver.bodies == [b"b0"]  # the head failed: the rest wait
        assert (await box.send("k", "3", b"b3")).status == "queued"  # behind a head in backoff
        assert receiver.bodies == [b"b0"]
        clock.now += 1.0
        assert await box.flush() == 4
        assert receiver.bodies == [b"b0", b"b0", b"b1", b"b2", b"b3"]
        await box.close()

    asyncio.run(main())


def test_run_loop_delivers_once_the_receiver_is_back(tmp_path: Path) -> None:
    receiver = Receiver(Verdict.RETRY, Verdict.RETRY, Verdict.DELIVERED)

    async def main() -> float:
        box = Outbox(sqlite_url(tmp_path / "o.db"), retry_base_s=0.05, retry_max_s=0.2)
        box.register("k", receiver)
        box.start()
        began = time.monotonic()
        await box.put("k", "m", b"x")
        while await box.pending():
            assert time.monotonic() - began < 10, "the loop did not deliver"
            await asyncio.sleep(0.02)
        took = time.monotonic() - began
        await box.close()
        return took

    assert asyncio.run(main()) < 5 and len(receiver.bodies) == 3


@pytest.mark.parametrize(
    ("status", "reason", "verdict"),
    [
        (200, None, Verdict.DELIVERED),
        (202, None, Verdict.DELIVERED),
        (409, "duplicate", Verdict.DUPLICATE),
        (409, "superseded", Verdict.DUPLICATE),
        (422, "already_slashed", Verdict.DUPLICATE),
        (422, "stale", Verdict.REFUSED),
        (413, "oversized", Verdict.REFUSED),
        (404, None, Verdict.REFUSED),
        (408, None, Verdict.RETRY),
        (429, None, Verdict.RETRY),
        (500, None, Verdict.RETRY),
        (503, "chain-unavailable", Verdict.RETRY),
        (302, None, Verdict.RETRY),
    ],
)
def test_http_answers_map_to_verdicts(status: int, reason: str | None, verdict: Verdict) -> None:
    assert classify_http(status, reason, {"duplicate", "superseded", "already_slashed"}) is verdict


def test_bad_limits_are_refused(tmp_path: Path) -> None:
    with pytest.raises(OutboxError, match="retry_max_s >= retry_base_s"):
        Outbox(sqlite_url(tmp_path / "o.db"), retry_base_s=10.0, retry_max_s=1.0)
    box = Outbox.from_settings(sqlite_url(tmp_path / "o.db"), OutboxSettings(retry_base_s=0.5, retry_max_s=4.0))
    assert (box.backoff_s(1), box.backoff_s(4), box.backoff_s(100)) == (0.5, 4.0, 4.0)


# ---------------------------------------------------------------------- against a real oracle


def _oracle(market, tmp_path: Path) -> OracleService:  # type: ignore[no-untyped-def]
    data = market.settings.model_dump()
    data["oracle"]["state_dir"] = tmp_path / "oracle"
    return OracleService(Settings.model_validate(data), market.client, market.oracle, seed=0)


def _until(check: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_exactly_once_against_a_real_oracle_answering_duplicates(market, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Each message is delivered, then the process "crashes" before deleting its row (the row is put
    back): the redelivery meets the oracle's dedup answer, the row ends, the effect happened once."""
    service = _oracle(market, tmp_path)
    ops = [market.new_funded_account(300 * UNIT) for _ in range(2)]
    steady, flaky = (market.enroll_node(op, stake=300 * UNIT) for op in ops)
    out = reference_output()
    domain = market.market().domain()
    slash = make_evidence(flaky, steady, domain, out + 1.0, out, runner=market.oracle, oracle_domain=service.domain)
    passed = make_evidence(flaky, steady, domain, out, out, job=b"\x08" * 32, runner=market.oracle,
                           oracle_domain=service.domain)  # fmt: skip
    failure = SpotCheckFailure(node=steady.address, job_id="0x" + "09" * 32, start=0, end=8, detail="withheld")
    failure = failure.signed_by_runner(market.oracle.key, service.domain)
    hop = RouteHop("peer", flaky.address, 0, 8, 1)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    box_url = sqlite_url(tmp_path / "broker" / "outbox.db")

    async def twice() -> dict[str, list[str]]:
        box = Outbox(box_url)
        sink = OracleSink(url, box)
        observer = JobObserver(market.oracle.key, service.domain, OracleObservationSink(url, box))
        tel = WorkerTelemetry(
            TelemetryRecorder(served=LayerRange(start=0, end=8), advertised_tps=5.0, free_kv_slots=lambda: 1),
            node_key=bytes(flaky.key), node_address=flaky.address, chain_id=market.client.chain_id,
            reputation_address=market.reputation().address, dht=None, interval_s=1.0, oracle_url=url,
            outbox=box,
        )  # fmt: skip
        answers: dict[str, list[str]] = {"evidence": [], "failure": [], "observations": [], "telemetry": []}
        for _ in range(2):
            answers["evidence"].append((await sink.submit(slash))["outcome"])
            answers["evidence"].append((await sink.submit(passed))["outcome"])
            answers["failure"].append(str((await sink.report_failure(failure))["recorded"]))
            await observer.report(observe_job(b"\x0a" * 32, [hop], 8, 1.0))
            answers["telemetry"].append((await tel.report_once(None)).hex()[:8])
            # the crash: every row goes back as if its delete was lost (same key, same body)
            for kind, key, body in sent:
                assert await box.put(kind, key, body)
            await box.flush()  # redelivered (by this pass or the sinks' loop): each a duplicate, rows end
            assert await box.pending() == [] and await box.dead_letters() == []
            sent.clear()
        answers["observations"] = [str(observer.counts[k]) for k in ("recorded", "duplicate")]
        await sink.close()
        return answers

    sent: list[tuple[str, str, bytes]] = []
    original = Outbox.send

    async def recording_send(self: Outbox, kind: str, key: str, body: bytes):  # type: ignore[no-untyped-def]
        delivery = await original(self, kind, key, body)
        if delivery.done:
            sent.append((kind, key, body))
        return delivery

    stake_before = market.staking().info(ops[1].address).active
    with ThreadedOracle(service, port), pytest.MonkeyPatch.context() as mp:
        mp.setattr(Outbox, "send", recording_send)
        answers = asyncio.run(twice())
    assert answers["evidence"] == ["slashed", "pass", "duplicate", "pass"]  # a second slash is refused as used
    assert answers["failure"] == ["True", "False"]
    assert answers["observations"] == ["1", "1"]  # recorded once, the second report a duplicate
    assert market.staking().info(ops[1].address).active == stake_before - service.config.slash_amount
    epoch = service.epoch_of(time.time())
    assert dict(service._checks[epoch]) == {flaky.address: [1, 1], steady.address: [2, 1]}
    assert sum(len(v) for v in service._observed.values()) == 1
    assert service.intake.counts["accepted"] == 2 and service.intake.counts["duplicate"] == 2
