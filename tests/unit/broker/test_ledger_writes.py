"""The ledger's hot writes (a job's admission and its completion), which run as Core statements
outside the session's unit of work, on a real SQLite file: what they return is what a later read
finds, a job is recorded once, and the open-jobs read sees its own session's unwritten changes."""

from __future__ import annotations

import secrets

import pytest

from dlis_market.broker.ledger import Ledger
from dlis_market.broker.ledger_schema import JobRow, JobStatus, LedgerError, NewJob, ReceiptRow
from dlis_market.chain.market_messages import Receipt, SignedReceipt
from dlis_market.chain.typed_data import CompactSignature
from dlis_market.protocol.receipts import StageReceipt

CLIENT = "0x" + "c1" * 20
MAX_COST = 10**16
SPANS = ((0, 10), (10, 20), (20, 30))


@pytest.fixture(params=["returning", "no-returning"])
def ledger(tmp_path, request) -> Ledger:
    """Also as on a SQLite before 3.35, which has no UPDATE ... RETURNING."""
    led = Ledger(f"sqlite:///{tmp_path / 'broker.db'}")
    led.engine.dialect.update_returning = request.param == "returning"
    return led


def new_job(nonce: int, route: bool = True) -> NewJob:
    return NewJob(
        id="0x" + secrets.token_hex(32),
        client=CLIENT,
        nonce=nonce,
        model="smollm2-135m",
        model_id="0x" + "00" * 32,
        request={"prompt": "hi", "max_tokens": 1},
        max_cost=MAX_COST,
        deadline=2**40,  # past 2038
        auth_signature="0x" + "11" * 65,
        route=[{"peer": "p", "start": 0, "end": 30}] if route else None,
        owner="me",
    )


def receipts(job_id: str, amount: int = 10**12) -> list[StageReceipt]:
    sig = CompactSignature.from_bytes(bytes(range(1, 65)) + b"\x1b")
    out = []
    for start, end in SPANS:
        r = Receipt(bytes.fromhex(job_id[2:]), b"\x02" * 32, start, end, 1, secrets.token_bytes(32), amount)
        out.append(StageReceipt(node="0x" + f"{start:02x}" * 20, signed=SignedReceipt(r, sig)))
    return out


def complete(ledger: Ledger, job_id: str, rs: list[StageReceipt]) -> JobRow:
    cost = sum(r.amount for r in rs)
    return ledger.complete_job(
        job_id, answer="Paris", token_ids=[42], prompt_tokens=5, receipts=rs, cost=cost, fee=cost // 100,
        ttft_ms=1.5, latency_ms=2.5, route=[{"peer": "q"}],
    )  # fmt: skip


def columns(row: JobRow) -> dict:
    return {c.key: getattr(row, c.key) for c in JobRow.__table__.columns}


def test_admitted_and_completed_rows_are_what_a_read_finds(ledger):
    job = new_job(1)
    admitted = ledger.create_job(job)
    assert admitted.status == JobStatus.RUNNING and admitted.receipts == []
    assert columns(admitted) == columns(ledger.get_job(job.id))
    assert ledger.get_job(job.id).deadline == 2**40 and ledger.get_job(job.id).max_cost == MAX_COST

    rs = receipts(job.id)
    done = complete(ledger, job.id, rs)
    read = ledger.get_job(job.id)
    assert columns(done) == columns(read)
    assert done.status == JobStatus.COMPLETED and done.answer == "Paris" and done.cost == 3 * 10**12
    assert done.route_json == '[{"peer": "q"}]' and done.updated_at >= admitted.updated_at
    keep = ("stage", "node", "start", "end", "tokens", "output_hash", "amount", "signature")
    as_returned = [{k: getattr(r, k) for k in keep} for r in done.receipts]
    assert as_returned == [{k: getattr(r, k) for k in keep} for r in read.receipts]
    assert [r.signed(bytes.fromhex(job.id[2:]), b"\x02" * 32) for r in read.receipts] == [r.signed for r in rs]


def test_a_job_id_is_admitted_once(ledger):
    job = new_job(1)
    ledger.create_job(job)
    with pytest.raises(LedgerError, match="already exists; use a new nonce"):
        ledger.create_job(job)
    with ledger.session() as s:
        assert Ledger.has_job(s, job.id) and not Ledger.has_job(s, "0x" + "ff" * 32)


def test_a_job_is_completed_once_and_its_receipts_written_once(ledger):
    job = new_job(1)
    ledger.create_job(job)
    complete(ledger, job.id, receipts(job.id))
    with pytest.raises(LedgerError, match="is completed already"):
        complete(ledger, job.id, receipts(job.id, amount=7))
    read = ledger.get_job(job.id)
    assert [r.amount for r in read.receipts] == [10**12] * 3 and read.cost == 3 * 10**12
    with ledger.session() as s:
        assert s.query(ReceiptRow).count() == 3
    with pytest.raises(LedgerError, match="unknown job"):
        complete(ledger, "0x" + "ee" * 32, [])


def test_a_failed_job_is_not_completed(ledger):
    job = new_job(1)
    ledger.create_job(job)
    assert ledger.fail_job(job.id, "worker gone")
    with pytest.raises(LedgerError, match="is failed already"):
        complete(ledger, job.id, receipts(job.id))
    assert ledger.get_job(job.id).receipts == []


def test_open_jobs_read_counts_its_own_sessions_unwritten_changes(ledger):
    """Admission reads the client's open jobs in the writer's session, where an earlier write of
    the same transaction may still be held by the session (not yet sent to the database)."""
    a, b = new_job(1), new_job(2, route=False)
    ledger.create_job(a)
    ledger.create_job(b)
    assert ledger.committed_escrow(CLIENT) == 2 * MAX_COST
    with ledger.session() as s:
        s.get(JobRow, a.id).status = JobStatus.FAILED  # held by the session, not flushed
        assert Ledger.committed_in(s, CLIENT) == MAX_COST
        s.rollback()
    complete(ledger, a.id, receipts(a.id))
    assert ledger.committed_escrow(CLIENT) == MAX_COST + 3 * 10**12 + 3 * 10**12 // 100
