"""Attacker: a client who spends one escrow at two brokers.

Each broker counts only the jobs it admitted itself against the client's escrow, so with one
shared escrow a client worth one job is admitted (and served) by every broker it asks; all but one
of those jobs then fail settlement and the stages that served them go unpaid. Escrow is now held
per broker (``JobMarket.escrowOf(client, broker)``), settlement draws only from the settling
broker's part, and a broker admits only against its own part: over-admission across brokers is
impossible by construction, not by coordination.

Real Anvil and JobMarket, two real BrokerServices with their own BROKER_ROLE accounts and ledgers;
the backend double signs real receipts with registered node keys.
"""

from __future__ import annotations

import secrets

from fastapi.testclient import TestClient

from dlis_market.broker.app import create_app
from dlis_market.broker.bootstrap import build_graph
from dlis_market.broker.ledger import Ledger
from dlis_market.chain.job_market import JobAuthorization, sign_authorization
from dlis_market.types import model_id
from tests.integration.broker import conftest as broker_suite
from tests.integration.conftest import DEV_PUBLISHER

broker_env = broker_suite.broker_env  # the broker suite's fixture
MODEL = "smollm2-135m"
PROMPT = "The capital of France is"


def _job(market, client, broker: str, max_cost: int) -> dict:
    jm = market.market()
    auth = JobAuthorization(
        client.address, broker, bytes.fromhex(model_id(MODEL, DEV_PUBLISHER)[2:]), max_cost, secrets.randbits(64),
        market.client.timestamp() + 600,
    )  # fmt: skip
    return {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": 8,
        "authorization": {
            "client": client.address,
            "nonce": str(auth.nonce),
            "max_cost": str(max_cost),
            "deadline": auth.deadline,
            "signature": sign_authorization(client.key, jm.domain(), auth).hex(),
        },
    }


def _second_broker(market, service, backend, tmp_path):
    """Another broker of the same market: its own account (granted BROKER_ROLE by the admin)."""
    account = market.new_funded_account(0)
    jm = market.market()
    role = jm.contract.functions.BROKER_ROLE().call()
    market.client.transact(market.deployer, jm.contract.functions.grantRole(role, account.address))
    ledger = Ledger(f"sqlite:///{tmp_path / 'second-broker.db'}")
    graph = build_graph(market.settings, market.client, account, service.catalog, ledger)
    return account, graph.service(backend)


def test_one_escrow_is_not_admitted_twice_by_two_brokers(broker_env, tmp_path):
    market, service, backend, ops, nodes, client = broker_env
    jm = market.market()
    other, service_b = _second_broker(market, service, backend, tmp_path)
    with TestClient(create_app(service, settle_in_background=False)) as http_a:
        quote = http_a.post("/v1/quotes", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 8}).json()
        total = int(quote["max_total"])
        jm.deposit(client, total)  # enough for one job, held for the deployment's broker (A)
        res_a = http_a.post("/v1/jobs", json=_job(market, client, market.broker.address, total))
        assert res_a.status_code == 201, res_a.text
        with TestClient(create_app(service_b, settle_in_background=False)) as http_b:
            res_b = http_b.post("/v1/jobs", json=_job(market, client, other.address, total))
        # Broker B refuses before anything runs: the client holds no escrow for B.
        assert res_b.status_code == 402, res_b.text
        problem = res_b.json()
        assert problem["type"].endswith("insufficient-escrow") and int(problem["available"]) == 0
        assert other.address in problem["detail"] and "deposit" in problem["detail"]
        assert len(backend.jobs) == 1  # only A's job was served
        assert service.settler.settle_once().settled_batches
        row = service.ledger.get_job(res_a.json()["id"])
        assert row is not None and row.status == "settled", row and row.error
    assert jm.escrow_of(client.address, market.broker.address) < total


def test_escrow_held_for_one_broker_cannot_be_settled_by_another(broker_env, tmp_path):
    """Even a broker that admits anyway (a modified one) cannot charge another broker's part:
    the contract draws only from the settling broker's escrow, so what the client deposited for
    A stays there for the jobs A admitted."""
    market, service, backend, ops, nodes, client = broker_env
    jm = market.market()
    other, service_b = _second_broker(market, service, backend, tmp_path)
    jm.deposit(client, 10**18)  # for A
    jm.deposit(client, 10**18, broker=other.address)  # for B: B admits and settles from this part
    with TestClient(create_app(service_b, settle_in_background=False)) as http_b:
        res = http_b.post("/v1/jobs", json=_job(market, client, other.address, 10**17))
        assert res.status_code == 201, res.text
        assert service_b.settler.settle_once().settled_batches
        row = service_b.ledger.get_job(res.json()["id"])
        assert row is not None and row.status == "settled", row and row.error
        charged = 10**18 - jm.escrow_of(client.address, other.address)
    assert charged == int(row.cost) + int(row.fee) > 0
    assert jm.escrow_of(client.address, market.broker.address) == 10**18  # A's part untouched
