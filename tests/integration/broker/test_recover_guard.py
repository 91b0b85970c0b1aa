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


def test_a_restarted_broker_pays_a_private_jobs_shares_to_its_planned_pair_only(broker_env, monkeypatch):
    """Reclaim after a crash asks every peer of the model for receipts it kept. A private job's
    first-stage receipts are shares, paid side by side, so a registered node outside the planned
    pair that answers with a receipt of its own for that range (signed on the spot) would add to
    the bill: only the pair's are taken."""
    from eth_utils import keccak

    from dlis_market.chain.job_market import Receipt, SignedReceipt, sign_receipt
    from dlis_market.protocol.receipts import StageReceipt

    market, service, backend, ops, nodes, client = broker_env
    more = [market.enroll_node(market.new_funded_account(1000 * 10**18)) for _ in range(2)]
    pair, n2, n3, forger = sorted(nodes[:2], key=lambda n: int(n.address, 16)), nodes[2], more[0], more[1]
    ranges = [(pair[0], 0, 10), (pair[1], 0, 10), (n2, 10, 20), (n3, 20, 30)]
    route = [{"node": n.address, "peer_id": f"peer-{n.address}", "start": a, "end": b} for n, a, b in ranges]
    job_id = "0x" + "5a" * 32
    service.ledger.create_job(
        NewJob(job_id, client.address, 7, MODEL, "0x" + "44" * 32,
               {"prompt": "x", "max_tokens": 2, "policy": {"privacy": "high"}}, 10**15, 2**40, "0x", route=route)
    )  # fmt: skip
    domain = market.market().domain()

    def kept(node, start: int, end: int) -> StageReceipt:
        r = Receipt(bytes.fromhex(job_id[2:]), b"\x44" * 32, start, end, 2, keccak(node.address.encode()), 2 * 10**12)
        return StageReceipt(node.address, SignedReceipt(r, sign_receipt(node.key, domain, r)), f"peer-{node.address}")

    answered = [kept(n, a, b) for n, a, b in ranges] + [kept(forger, 0, 10)]

    async def unclaimed(job: bytes, peers: list[str]) -> list[StageReceipt]:
        return answered

    monkeypatch.setattr(backend, "unclaimed", unclaimed, raising=False)
    assert asyncio.run(service._reclaim(job_id)) is True
    recorded = service.ledger.get_job(job_id)
    assert recorded is not None
    got = [(r.node.lower(), r.start, r.end) for r in sorted(recorded.receipts, key=lambda r: r.stage)]
    assert got == [(n.address.lower(), a, b) for n, a, b in ranges], got  # the forger's share is not paid
