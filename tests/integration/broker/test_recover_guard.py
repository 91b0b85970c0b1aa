"""Recovery after a crash takes every interrupted job through to an end, even when one of them
fails to reclaim: none is left running (its max cost committed against the client's escrow)."""

from __future__ import annotations

import asyncio

from dlis_market.broker.ledger import JobStatus, LedgerError, NewJob

MODEL = "smollm2-135m"


def test_one_failing_reclaim_does_not_strand_the_others(broker_env, monkeypatch):
    market, service, backend, ops, nodes, client = broker_env
    route = [
        {"node": n.address, "peer_id": f"peer{i}", "start": 10 * i, "end": 10 * (i + 1)} for i, n in enumerate(nodes)
    ]
    ids = ["0x" + f"{i:02x}" * 32 for i in (1, 2, 3)]
    for i, job_id in enumerate(ids):
        service.ledger.create_job(
            NewJob(
                job_id,
                client.address,
                i,
                MODEL,
                "0x" + "44" * 32,
                {"prompt": "x", "max_tokens": 2},
                10**15,
                2**40,
                "0x",
                route=route,
            )
        )
    reclaimed = []

    async def reclaim(job_id: str) -> bool:
        if job_id == ids[0]:  # e.g. a peer that was not dead after all recorded it meanwhile
            raise LedgerError(f"job {job_id} already ended")
        reclaimed.append(job_id)
        return True

    monkeypatch.setattr(service, "_reclaim", reclaim)
    done, failed = asyncio.run(service.adopt_orphans(restarted=True))
    assert reclaimed == ids[1:] and done == ids[1:] and failed == ids[:1]
    first = service.ledger.get_job(ids[0])
    assert first.status == JobStatus.FAILED and "reclaim failed" in first.error
