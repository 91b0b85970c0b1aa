"""The broker's signed job observations: built from a route, signed with the runner key, checked by
the oracle's one runner check (``tampered`` / ``unauthorized_runner``)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from eth_account import Account

from dlis_market.broker.observations import JobObserver, observe_job
from dlis_market.oracle.errors import EvidenceRefusedError
from dlis_market.oracle.verification import check_runner
from dlis_market.protocol.observations import MAX_OBSERVATIONS, ObservationBatch
from dlis_market.protocol.routes import RouteHop

from .evidence_helpers import RUNNER

NODES = [Account.from_key(bytes([0x21 + i]) * 32).address for i in range(3)]
ROUTE = [RouteHop(f"peer{i}", NODES[i], 10 * i, 10 * (i + 1), 1) for i in range(2)]


def test_observe_job_credits_the_route_and_blames_the_failed_stage(domain) -> None:  # type: ignore[no-untyped-def]
    failed = RouteHop("peer9", NODES[2], 0, 10, 1)
    obs = observe_job(b"\x07" * 32, ROUTE, 32, 3.2104, failed=[failed], routed_tps={"peer0": 40.0})
    assert [(o.node, o.ok, o.tokens, o.latency_ms, o.routed_tps) for o in obs] == [
        (NODES[0], True, 32, 3210, 40.0),
        (NODES[1], True, 32, 3210, 0.0),
        (NODES[2], False, 0, 0, 0.0),
    ]
    assert obs[0].ms_per_token == pytest.approx(3210 / 32) and obs[2].ms_per_token is None
    with pytest.raises(ValueError):
        observe_job(b"\x07" * 32, ROUTE, -1, 1.0)


def test_signature_covers_every_figure(domain) -> None:  # type: ignore[no-untyped-def]
    (ob,) = observe_job(b"\x07" * 32, ROUTE[:1], 32, 3.2)
    signed = ob.signed_by_runner(RUNNER.key, domain)
    assert check_runner(signed.signer(domain), signed.runner, [RUNNER.address], "observation") == RUNNER.address
    for change in ({"tokens": 320}, {"latency_ms": 1}, {"ok": False}, {"node": NODES[2]}, {"routed_tps": 1.0},
                   {"job_id": "0x" + "08" * 32}, {"start": 1}, {"end": 11}):  # fmt: skip
        edited = signed.model_copy(update=change)
        with pytest.raises(EvidenceRefusedError) as err:
            check_runner(edited.signer(domain), edited.runner, [RUNNER.address], "observation")
        assert err.value.reason == "tampered", change
    node_signed = ob.signed_by_runner(Account.from_key(b"\x21" * 32).key, domain)
    with pytest.raises(EvidenceRefusedError) as err:
        check_runner(node_signed.signer(domain), node_signed.runner, [RUNNER.address], "observation")
    assert err.value.reason == "unauthorized_runner"


class _Sink:
    def __init__(self, answer: dict[str, Any]) -> None:
        self.batches: list[ObservationBatch] = []
        self.answer = answer

    async def observe(self, batch: ObservationBatch) -> dict[str, Any]:
        self.batches.append(batch)
        return self.answer(batch) if callable(self.answer) else self.answer


def test_observer_signs_and_posts_in_batches(domain) -> None:  # type: ignore[no-untyped-def]
    route = [RouteHop(f"peer{i}", NODES[i % 3], i, i + 1, 1) for i in range(MAX_OBSERVATIONS + 6)]
    sink = _Sink(lambda b: {"recorded": len(b.observations) - 1, "of": len(b.observations)})
    observer = JobObserver(RUNNER.key, domain, sink)
    asyncio.run(observer.report(observe_job(b"\x07" * 32, route, 8, 1.0)))
    assert [len(b.observations) for b in sink.batches] == [MAX_OBSERVATIONS, 6]
    assert all(o.signer(domain) == RUNNER.address for b in sink.batches for o in b.observations)
    assert observer.counts == {"recorded": MAX_OBSERVATIONS + 4, "duplicate": 2}
    refused = JobObserver(RUNNER.key, domain, _Sink({"refused": "unauthorized_runner", "detail": "x"}))
    asyncio.run(refused.report(observe_job(b"\x07" * 32, ROUTE, 8, 1.0)))
    assert refused.counts == {"refused:unauthorized_runner": 2}
