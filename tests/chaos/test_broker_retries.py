"""Clients that time out, retry and hang up, against a real uvicorn broker on 127.0.0.1 (real chain,
BrokerService and settlement; the backend double plays deliberately slow workers that sign real
receipts).

A retried request must not run (and charge) a second job; a client that leaves cancels its job,
the backend stream is closed and nothing is charged."""

from __future__ import annotations

import asyncio
import json
import secrets
import time

import httpx
import openai

from dlis_market.broker.apikeys import create_api_key
from dlis_market.broker.app import create_app
from dlis_market.broker.service import BrokerService
from dlis_market.chain.job_market import JobAuthorization, Receipt, SignedReceipt, sign_authorization, sign_receipt
from dlis_market.protocol.receipts import StageReceipt
from dlis_market.protocol.routes import RouteHop
from dlis_market.types import model_id
from tests.integration.broker import conftest as broker_suite
from tests.integration.conftest import DEV_PUBLISHER

broker_env = broker_suite.broker_env  # the broker suite's fixtures
live_server = broker_suite.live_server
UNIT = 10**18
MODEL = "smollm2-135m"
GRACE_S = 2.5  # a retry within this re-attaches to the job; after it a lone job is cancelled


class SlowBackend(broker_suite.ScriptedBackend):
    """Workers that take ``delay_s`` per token and, like real ones, sign receipts for the tokens
    they actually processed; records the jobs whose token stream was closed."""

    def __init__(self, base: broker_suite.ScriptedBackend, delay_s: float):
        super().__init__(base.nodes, base.domain, base.script)
        self.delay_s = delay_s
        self.closed: list[str] = []

    async def start(self, job):
        self.jobs.append(job)
        backend, served = self, []

        class Stream:
            async def _gen(self):
                try:
                    for t in backend.script[: job.max_new_tokens]:
                        await asyncio.sleep(backend.delay_s)
                        served.append(t)
                        yield t
                finally:
                    backend.closed.append("0x" + job.job_id.hex())

            def tokens(self):
                return self._gen()

            async def finish(self):
                return signed_route(backend, job, len(job.prompt_ids) + len(served))

        return Stream()


def signed_route(backend, job, tokens: int):
    receipts, route = [], []
    for i, ((s, e), node) in enumerate(zip(broker_suite.SPANS, backend.nodes, strict=True)):
        amount = broker_suite.PRICE * tokens
        r = Receipt(
            job.job_id,
            bytes.fromhex(model_id(job.model, DEV_PUBLISHER)[2:]),
            s,
            e,
            tokens,
            secrets.token_bytes(32),
            amount,
        )
        receipts.append(StageReceipt(node.address, SignedReceipt(r, sign_receipt(node.key, backend.domain, r))))
        route.append(RouteHop(f"peer{i}", node.address, s, e, broker_suite.PRICE))
    return route, receipts


def slow_broker(broker_env, live_server, delay_s: float):
    market, service, backend, ops, nodes, client = broker_env
    settings = market.settings.model_copy(
        update={"broker": market.settings.broker.model_copy(update={"cancel_grace_s": GRACE_S})}
    )
    slow = SlowBackend(backend, delay_s)
    svc = BrokerService(
        settings, service.ledger, service.market, service.broker, service.catalog, slow, service.planner
    )
    srv = live_server(create_app(svc, settle_in_background=False))
    return market, svc, slow, client, srv


def job_body(market, client, max_tokens: int = 8, stream: bool = False, nonce: int | None = None) -> dict:
    jm = market.market()
    auth = JobAuthorization(
        client.address, market.broker.address, bytes.fromhex(model_id(MODEL, DEV_PUBLISHER)[2:]), UNIT,
        secrets.randbits(64) if nonce is None else nonce, market.client.timestamp() + 900,
    )  # fmt: skip
    sig = sign_authorization(client.key, jm.domain(), auth).hex()
    return {
        "model": MODEL, "prompt": "The capital of France is", "max_tokens": max_tokens, "stream": stream,
        "authorization": {"client": client.address, "nonce": str(auth.nonce), "max_cost": str(UNIT),
                          "deadline": auth.deadline, "signature": sig},
    }  # fmt: skip


def wait_for(cond, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_openai_client_retries_make_one_job(broker_env, live_server):
    """The official client, timeout 3 s and 2 retries, against a job that takes ~7 s: it sends no
    Idempotency-Key, only x-stainless-retry-count, so the broker matches retries by API key and
    body. One job runs, is charged once, and the last try gets its answer."""
    market, svc, slow, client, srv = slow_broker(broker_env, live_server, delay_s=1.0)
    jm = market.market()
    jm.deposit(client, 10 * UNIT)
    key = create_api_key(
        svc.ledger, jm, client, cap=2 * UNIT, expires_at=market.client.timestamp() + 3600, broker=svc.broker.address
    ).api_key
    oa = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=key, timeout=3.0, max_retries=2)
    t0 = time.monotonic()
    res = oa.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Capital of France?"}], max_tokens=7, temperature=0
    )
    print(f"answered after {time.monotonic() - t0:.1f} s")
    assert res.choices[0].message.content == " Paris is the capital of France."
    assert len(slow.jobs) == 1 and len(svc.ledger.recent_jobs()) == 1
    job = svc.ledger.recent_jobs()[0]
    assert job.status == "completed" and res.model_extra["dlis"]["job_id"] == job.id
    svc.settler.settle_once()
    assert jm.escrow_of(client.address) == 10 * UNIT - job.cost - job.fee  # charged once


def test_native_retry_with_idempotency_key_returns_the_same_job(broker_env, live_server):
    market, svc, slow, client, srv = slow_broker(broker_env, live_server, delay_s=0.05)
    market.market().deposit(client, 10 * UNIT)
    body = job_body(market, client)
    key = {"Idempotency-Key": secrets.token_hex(16)}
    with httpx.Client(base_url=srv.url, timeout=30) as http:
        first = http.post("/v1/jobs", json=body, headers=key)
        again = http.post("/v1/jobs", json=body, headers=key)
        assert first.status_code == again.status_code == 201, (first.text, again.text)
        assert first.json()["id"] == again.json()["id"] and len(slow.jobs) == 1
        other = http.post("/v1/jobs", json={**body, "max_tokens": 4}, headers=key)
        assert other.status_code == 422 and other.json()["type"].endswith("idempotency-key-reused")
        assert http.post("/v1/jobs", json=body).status_code == 409  # no key: the nonce is used
    assert len(slow.jobs) == 1


def test_client_hanging_up_cancels_its_job(broker_env, live_server):
    """Non-streaming (the client times out and does not retry) and streaming (the client closes
    the stream after the first token): the backend stream is closed at once, and the job is settled
    for the tokens the stages served by then, not for the whole answer it asked for."""
    market, svc, slow, client, srv = slow_broker(broker_env, live_server, delay_s=1.0)
    jm = market.market()
    jm.deposit(client, 10 * UNIT)
    key = create_api_key(
        svc.ledger, jm, client, cap=2 * UNIT, expires_at=market.client.timestamp() + 3600, broker=svc.broker.address
    ).api_key
    oa = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=key, timeout=1.5, max_retries=0)
    try:
        oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=7)
        raise AssertionError("the slow job answered within the client's timeout")
    except openai.APITimeoutError:
        pass
    plain = svc.ledger.recent_jobs()[0].id
    wait_for(lambda: svc.ledger.get_job(plain).status != "running")

    body = job_body(market, client, max_tokens=7, stream=True)
    with httpx.Client(base_url=srv.url, timeout=30) as http, http.stream("POST", "/v1/jobs", json=body) as res:
        assert res.status_code == 201
        for line in res.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["type"] == "token":
                break  # hang up after the first token
    streamed = svc.ledger.recent_jobs()[0].id
    wait_for(lambda: svc.ledger.get_job(streamed).status != "running")

    owed = 0
    for jid in (plain, streamed):
        row = svc.ledger.get_job(jid)
        assert jid in slow.closed and row.status == "completed" and "cancelled" in row.error, (row.status, row.error)
        assert 1 <= row.completion_tokens < 7  # stopped early, by the grace period after the hang-up
        assert row.cost == 3 * broker_suite.PRICE * (row.prompt_tokens + row.completion_tokens)
        owed += row.cost + row.fee
    assert len(svc.settler.settle_once().settled_batches) == 1
    assert jm.escrow_of(client.address) == 10 * UNIT - owed  # charged for the served tokens only
    assert svc.ledger.committed_escrow(client.address) == 0


def test_restart_fails_jobs_left_running_and_releases_their_escrow(broker_env):
    """The broker process died while a job ran: the ledger shows it running, its max cost committed.
    A new broker on the same database fails it with a reason at start, so the client's escrow is
    free again, and settles the completed job the old process had not settled yet."""
    from fastapi.testclient import TestClient

    from dlis_market.broker.ledger import Ledger, NewJob

    market, service, backend, ops, nodes, client = broker_env
    jm = market.market()
    jm.deposit(client, 10 * UNIT)
    with TestClient(create_app(service, settle_in_background=False)) as http:  # the first process
        done = http.post("/v1/jobs", json=job_body(market, client)).json()
        # ... and one that was running when it died (written as the service writes it, then left).
        a = job_body(market, client, nonce=7)["authorization"]
        stuck_id = "0x" + JobAuthorization(client.address, market.broker.address, b"", UNIT, 7, 0).job_id.hex()
        service.ledger.create_job(
            NewJob(
                stuck_id,
                client.address,
                7,
                MODEL,
                model_id(MODEL, DEV_PUBLISHER),
                {"prompt": "x"},
                UNIT,
                a["deadline"],
                a["signature"],
            )
        )
        service.ledger.mark_running(stuck_id, [], False)
    assert service.ledger.committed_escrow(client.address) == UNIT + int(done["cost"]) + int(done["fee"])

    restarted = BrokerService(
        market.settings, Ledger(service.ledger.url), jm, market.broker, service.catalog, backend, service.planner
    )
    with TestClient(create_app(restarted, settle_in_background=False)) as http:
        row = restarted.ledger.get_job(stuck_id)
        assert row.status == "failed" and "interrupted" in row.error
        assert restarted.ledger.committed_escrow(client.address) == int(done["cost"]) + int(done["fee"])
        restarted.settler.settle_once()
        assert restarted.ledger.get_job(done["id"]).status == "settled"
        assert restarted.ledger.committed_escrow(client.address) == 0
        assert http.get(f"/v1/jobs/{stuck_id}").json()["error"].startswith("interrupted")
