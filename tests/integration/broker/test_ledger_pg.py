"""The ledger's hot writes on PostgreSQL, where several broker processes share one ledger: the
rows come back through RETURNING as a read finds them (uint256 columns as ints), and when two
processes complete the same job, the one that waits on the other's row lock writes nothing."""

from __future__ import annotations

import threading
import time

from dlis_market.broker.ledger import Ledger
from dlis_market.broker.ledger_schema import LedgerError, ReceiptRow
from tests.integration.broker.pg import pg_cluster, pg_url
from tests.unit.broker.test_ledger_writes import MAX_COST, columns, complete, new_job, receipts

__all__ = ["pg_cluster", "pg_url"]  # fixtures


def test_rows_round_trip_through_returning(pg_url: str) -> None:
    ledger = Ledger(pg_url)
    assert ledger.engine.dialect.update_returning
    job = new_job(2**200)  # a nonce past 64 bits
    admitted = ledger.create_job(job)
    assert columns(admitted) == columns(ledger.get_job(job.id))
    done = complete(ledger, job.id, receipts(job.id, amount=2**100))
    read = ledger.get_job(job.id)
    assert columns(done) == columns(read)
    assert read.nonce == 2**200 and read.max_cost == MAX_COST and read.cost == 3 * 2**100
    assert [r.amount for r in read.receipts] == [2**100] * 3


def test_two_processes_completing_one_job_write_it_once(pg_url: str) -> None:
    first, second = Ledger(pg_url), Ledger(pg_url)  # two brokers' engines on one database
    job = new_job(1)
    first.create_job(job)
    outcome: dict[str, str] = {}

    def complete_from_second() -> None:
        try:
            complete(second, job.id, receipts(job.id, amount=7))
            outcome["second"] = "completed"
        except LedgerError as exc:
            outcome["second"] = str(exc)

    rs = receipts(job.id)
    with first.session() as s:  # the first completes it and holds the row until it commits
        Ledger.complete_in(s, job.id, answer="Paris", token_ids=[42], prompt_tokens=5, receipts=rs,
                           cost=3 * 10**12, fee=0, ttft_ms=1.0, latency_ms=2.0)  # fmt: skip
        racer = threading.Thread(target=complete_from_second)
        racer.start()
        time.sleep(1.0)
        assert racer.is_alive(), outcome  # waiting on the first's row lock
    racer.join(30)
    assert outcome == {"second": f"job {job.id} is completed already; its answer and receipts were recorded before"}
    read = first.get_job(job.id)
    assert read.cost == 3 * 10**12 and [r.amount for r in read.receipts] == [10**12] * 3
    with first.session() as s:
        assert s.query(ReceiptRow).count() == 3
