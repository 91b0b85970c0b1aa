"""A client tries to pull its escrow from under jobs it was served (real Anvil + JobMarket, real
BrokerService and Settler; the backend double signs real receipts with registered node keys).

The broker must not admit what the client can take back, and one unpayable job must never stop
other clients' jobs from settling."""

from __future__ import annotations

import secrets

from fastapi.testclient import TestClient

from dlis_market.broker.app import create_app
from dlis_market.broker.ledger import Ledger
from dlis_market.broker.service import BrokerService
from dlis_market.chain.job_market import JobAuthorization, sign_authorization
from dlis_market.types import model_id
from tests.integration.broker import conftest as broker_suite
from tests.integration.conftest import DEV_PUBLISHER

broker_env = broker_suite.broker_env  # the broker suite's fixture
UNIT = 10**18
MODEL = "smollm2-135m"
PROMPT = "The capital of France is"


def authorization(market, client, max_cost: int, deadline_in: int = 900) -> dict:
    jm = market.market()
    nonce = secrets.randbits(64)
    auth = JobAuthorization(
        client.address, market.broker.address, bytes.fromhex(model_id(MODEL, DEV_PUBLISHER)[2:]), max_cost, nonce,
        market.client.timestamp() + deadline_in,
    )  # fmt: skip
    sig = sign_authorization(client.key, jm.domain(), auth)
    return {
        "client": client.address,
        "nonce": str(nonce),
        "max_cost": str(max_cost),
        "deadline": auth.deadline,
        "signature": sig.hex(),
    }


def job_body(market, client, max_cost: int, max_tokens: int = 8) -> dict:
    return {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "authorization": authorization(market, client, max_cost),
    }


def honest_jobs(market, http, count: int) -> list[str]:
    """``count`` paid jobs of five other clients, each with plenty of escrow."""
    clients = [market.new_funded_account(10 * UNIT) for _ in range(5)]
    for c in clients:
        market.market().deposit(c, 5 * UNIT)
    ids = []
    for i in range(count):
        res = http.post("/v1/jobs", json=job_body(market, clients[i % len(clients)], UNIT // 10))
        assert res.status_code == 201, res.text
        ids.append(res.json()["id"])
    return ids


def test_withdrawing_after_being_served_cannot_stall_settlement(broker_env):
    """The attack on the old broker: the client requests a withdrawal, waits until it is ready,
    then has a job admitted and answered, and withdraws before the settle tick. The old settler's
    preflight then failed the whole batch, and the unpayable job stayed the oldest, so no job of
    any client settled again."""
    market, service, backend, ops, nodes, client = broker_env
    jm = market.market()
    jm.deposit(client, UNIT)
    jm.request_withdrawal(client, UNIT)
    market.increase_time(3601)  # the old request is ready now

    with TestClient(create_app(service, settle_in_background=False)) as http:
        attack = http.post("/v1/jobs", json=job_body(market, client, UNIT))
        jm.withdraw(client)  # escrow drained before the broker settles
        assert jm.escrow_of(client.address) == 0
        honest = honest_jobs(market, http, 20)

        for _ in range(2):  # a second pass must not trip over anything the first one left
            service.settler.settle_once()
        for jid in honest:
            row = service.ledger.get_job(jid)
            assert row is not None and row.status == "settled", (jid, row and row.status, row and row.error)
        # The broker refused the job the client could not pay for: nothing ran for it.
        assert attack.status_code == 402, attack.text
        assert attack.json()["type"].endswith("insufficient-escrow")
        assert "withdrawal" in attack.json()["detail"]
        assert len(backend.jobs) == 20


def test_unpayable_job_is_isolated_and_the_rest_settle(broker_env, tmp_path):
    """Two broker replicas (separate ledgers, same chain) each admit one job of a client whose
    escrow covers only one of them. Replica B settles first; replica A's job is now unpayable.
    A records it (status and the evidence) and pays the 20 honest jobs queued behind it."""
    market, service, backend, ops, nodes, client = broker_env
    jm = market.market()
    replica_b = BrokerService(
        market.settings, Ledger(f"sqlite:///{tmp_path / 'b.db'}"), jm, market.broker,
        service.catalog, backend, service.planner,
    )  # fmt: skip
    with TestClient(create_app(service, settle_in_background=False)) as http_a:
        quote = http_a.post("/v1/quotes", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 8}).json()
        total = int(quote["max_total"])
        jm.deposit(client, total)  # covers exactly one job
        res_a = http_a.post("/v1/jobs", json=job_body(market, client, total))
        assert res_a.status_code == 201, res_a.text
        with TestClient(create_app(replica_b, settle_in_background=False)) as http_b:
            res_b = http_b.post("/v1/jobs", json=job_body(market, client, total))
            assert res_b.status_code == 201, res_b.text
            assert replica_b.settler.settle_once().settled_batches
        assert jm.escrow_of(client.address) < total

        honest = honest_jobs(market, http_a, 20)
        result = service.settler.settle_once()
        for jid in honest:
            row = service.ledger.get_job(jid)
            assert row is not None and row.status == "settled", (jid, row and row.status, row and row.error)
        bad = service.ledger.get_job(res_a.json()["id"])
        assert bad is not None and bad.status == "unpayable"
        assert bad.id in result.failed_jobs
        # The reason and its evidence stay in the ledger: what the client had and what it owed.
        assert "escrow" in (bad.error or "") and str(jm.escrow_of(client.address)) in (bad.error or "")
        assert len(bad.receipts) == 3  # the signed receipts are kept
        assert service.ledger.committed_escrow(client.address) == 0
        assert service.settler.settle_once().settled_batches == []  # nothing left, nothing stuck


def test_pending_withdrawal_is_not_free_escrow(broker_env):
    market, service, backend, ops, nodes, client = broker_env
    jm = market.market()
    jm.deposit(client, 2 * UNIT)
    jm.request_withdrawal(client, 3 * UNIT // 2)  # not ready yet, but the client can take it
    with TestClient(create_app(service, settle_in_background=False)) as http:
        res = http.post("/v1/jobs", json=job_body(market, client, UNIT))
        assert res.status_code == 402, res.text
        problem = res.json()
        assert problem["type"].endswith("insufficient-escrow") and int(problem["available"]) == UNIT // 2
        assert "withdrawal" in problem["detail"]
        assert service.ledger.recent_jobs() == [] and backend.jobs == []
        ok = http.post("/v1/jobs", json=job_body(market, client, 2 * UNIT // 5))
        assert ok.status_code == 201, ok.text


def test_authorization_beyond_the_settlement_lifetime_is_refused(broker_env):
    market, service, backend, ops, nodes, client = broker_env
    jm = market.market()
    jm.deposit(client, 2 * UNIT)
    lifetime = service.max_authorization_lifetime()
    body = job_body(market, client, UNIT)
    body["authorization"] = authorization(market, client, UNIT, deadline_in=lifetime + 120)
    with TestClient(create_app(service, settle_in_background=False)) as http:
        res = http.post("/v1/jobs", json=body)
        assert res.status_code == 401, res.text
        assert str(lifetime) in res.json()["detail"]
        assert backend.jobs == []
