"""The broker's HTTP API on a real chain: admission checks, paid jobs, streaming, settlement."""

from __future__ import annotations

import json
import secrets
import time

import pytest
from eth_account import Account
from fastapi.testclient import TestClient

from dlis_market.broker.app import create_app
from dlis_market.broker.auth import sign_job_read
from dlis_market.broker.planning import chain_standing, make_planner
from dlis_market.chain.job_market import JobAuthorization, sign_authorization
from dlis_market.types import model_id
from tests.integration.conftest import DEV_PUBLISHER

UNIT = 10**18
MODEL = "smollm2-135m"


def authorization(market, client, max_cost=UNIT, nonce=None, deadline_in=1200, signer=None, model=MODEL):
    jm = market.market()
    nonce = secrets.randbits(64) if nonce is None else nonce
    auth = JobAuthorization(
        client.address, market.broker.address, bytes.fromhex(model_id(model, DEV_PUBLISHER)[2:]), max_cost, nonce,
        market.client.timestamp() + deadline_in,
    )  # fmt: skip
    sig = sign_authorization((signer or client).key, jm.domain(), auth)
    return {
        "client": client.address,
        "nonce": str(nonce),
        "max_cost": str(max_cost),
        "deadline": auth.deadline,
        "signature": sig.hex(),
    }


@pytest.fixture()
def api(broker_env):
    market, service, backend, ops, nodes, client = broker_env
    with TestClient(create_app(service, settle_in_background=False)) as http:
        yield market, service, backend, ops, client, http


def test_paid_job_runs_and_settles_exact_amounts(api):
    market, service, backend, ops, client, http = api
    jm = market.market()
    jm.deposit(client, 10 * UNIT)
    quote = http.post("/v1/quotes", json={"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8})
    assert quote.status_code == 200, quote.text
    q = quote.json()
    assert [h["start"] for h in q["route"]] == [0, 10, 20]
    assert int(q["cost"]) == 3 * 10**12 * (q["prompt_tokens"] + 8)

    body = {
        "model": MODEL,
        "prompt": "The capital of France is",
        "max_tokens": 8,
        "authorization": authorization(market, client),
    }
    res = http.post("/v1/jobs", json=body)
    assert res.status_code == 201, res.text
    job = res.json()
    assert job["status"] == "completed" and job["answer"].startswith(" Paris is the capital")
    assert [r["start"] for r in job["receipts"]] == [0, 10, 20]
    cost, fee = int(job["cost"]), int(job["fee"])
    assert cost == sum(int(r["amount"]) for r in job["receipts"]) and fee == cost * jm.fee_bps() // 10_000
    assert backend.jobs[0].job_id.hex() == job["id"][2:]

    escrow = jm.escrow_of(client.address)
    assert escrow == 10 * UNIT  # nothing moves before settlement
    result = service.settler.settle_once()
    assert len(result.settled_batches) == 1
    assert jm.escrow_of(client.address) == escrow - cost - fee
    for op, r in zip(ops, job["receipts"], strict=True):
        assert jm.claimable_of(op.address) == int(r["amount"])
    settled = http.get(f"/v1/jobs/{job['id']}").json()
    assert settled["status"] == "settled" and settled["settlement"]["tx_hash"].startswith("0x")


def test_streaming_job_sends_tokens_then_done(api):
    market, service, backend, ops, client, http = api
    market.market().deposit(client, 10 * UNIT)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 5,
        "stream": True,
        "authorization": authorization(market, client),
    }
    with http.stream("POST", "/v1/jobs", json=body) as res:
        assert res.status_code == 201
        events = [json.loads(line[6:]) for line in res.iter_lines() if line.startswith("data: ")]
    tokens = [e for e in events if e["type"] == "token"]
    assert len(tokens) == 5 and events[-1]["type"] == "done"
    job_id = events[-1]["job_id"]
    read = sign_job_read(client.key, market.market().domain(), job_id, int(time.time()) + 60)
    job = http.get(f"/v1/jobs/{job_id}", headers={"X-DLIS-Job-Read": read}).json()
    assert job["answer"] == "".join(t["text"] for t in tokens)
    # the chat template of the model's tokenizer framed the prompt
    assert (
        backend.jobs[0].prompt_ids[:3]
        == service.catalog.get(MODEL).encode_prompt(
            None, [{"role": "user", "content": "What is the capital of France?"}]
        )[:3]
    )


def test_refusals_are_problem_json_and_change_nothing(api):
    market, service, backend, ops, client, http = api
    jm = market.market()

    def post(body):
        res = http.post("/v1/jobs", json=body)
        assert res.headers["content-type"].startswith("application/problem+json"), res.text
        return res.status_code, res.json()

    base = {"model": MODEL, "prompt": "hello", "max_tokens": 4}
    # no escrow yet: 402 and nothing runs
    status, prob = post({**base, "authorization": authorization(market, client)})
    assert status == 402 and "deposit more" in prob["detail"] and not backend.jobs
    jm.deposit(client, 1 * UNIT)

    status, prob = post({**base, "model": "nope", "authorization": authorization(market, client, model="nope")})
    assert status == 404 and "smollm2-135m" in prob["detail"]
    status, prob = post(
        {**base, "max_tokens": 4096, "prompt": "x " * 5000, "authorization": authorization(market, client)}
    )
    assert status == 413 and prob["limit"] == 8192
    status, prob = post({**base, "authorization": authorization(market, client, signer=Account.create())})
    assert status == 401 and "not " + client.address in prob["detail"]
    status, prob = post({**base, "authorization": authorization(market, client, deadline_in=-5)})
    assert status == 401 and "deadline" in prob["detail"]
    status, prob = post({**base, "authorization": authorization(market, client, max_cost=10)})
    assert status == 402 and "authorization allows 10" in prob["detail"]
    status, prob = post({**base, "authorization": {"client": "0x12"}})
    assert status == 422 and prob["errors"]
    two = {"prompt": "a", "messages": [{"role": "user", "content": "a"}]}
    status, prob = post({"model": MODEL, **two, "authorization": authorization(market, client)})
    assert status == 422 and "exactly one" in prob["detail"]
    # a proof of SmolLM2's head (576 x 49152, bf16) is not on offer: refused before anything runs
    status, prob = post({**base, "proof": "zk", "authorization": authorization(market, client)})
    assert status == 422 and prob["type"].endswith("proof-unsupported"), prob
    assert "zk.max_head_params" in prob["detail"] or "fp32" in prob["detail"]
    assert not backend.jobs and service.ledger.recent_jobs() == []

    auth = authorization(market, client, nonce=77)
    assert http.post("/v1/jobs", json={**base, "authorization": auth}).status_code == 201
    status, prob = post({**base, "authorization": auth})
    assert status == 409 and "nonce 77" in prob["detail"]

    backend.has_offers = False
    status, prob = post({**base, "authorization": authorization(market, client)})
    assert status == 503 and "no worker announces" in prob["detail"]


def test_unknown_job_is_404(api):
    *_, http = api
    res = http.get("/v1/jobs/0x" + "00" * 32)
    assert res.status_code == 404 and res.json()["type"].endswith("unknown-job")


def test_policy_and_stake_filter_routes(api):
    market, service, backend, ops, client, http = api
    q = {"model": MODEL, "prompt": "hello", "max_tokens": 4}
    res = http.post("/v1/quotes", json={**q, "policy": {"privacy": "high"}})
    assert res.status_code == 503 and "attest" in res.json()["detail"]
    res = http.post("/v1/quotes", json={**q, "policy": {"max_cost": "1"}})
    assert res.status_code == 503 and "max_cost" in res.json()["detail"]
    # the operator of layers [10, 20) unstakes below the minimum: its node is no longer routable
    staking = market.staking()
    staking.request_unstake(ops[1], staking.info(ops[1].address).active)
    service.planner = make_planner(market.settings.broker, chain_standing(market.registry(), market.reputation()))
    res = http.post("/v1/quotes", json=q)
    assert res.status_code == 503 and "[10, 20)" in res.json()["detail"]


def test_cli_status_waits_for_the_chain_to_settle(broker_env, live_server):
    """`dlis job status --wait S` returns once the job is settled on chain, and exits 1 with the
    job's status when it is not within S seconds."""
    import threading

    import httpx
    from typer.testing import CliRunner

    from dlis_market.cli.main import app

    market, service, backend, ops, nodes, client = broker_env
    market.market().deposit(client, 10 * UNIT)
    srv = live_server(create_app(service, settle_in_background=False))
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4}
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        res = http.post("/v1/jobs", json={**body, "authorization": authorization(market, client)})
        assert res.status_code == 201, res.text
    job_id = res.json()["id"]
    env = {"DLIS_HOME": str(market.settings.home), "DLIS_CHAIN__RPC_URL": market.settings.chain.rpc_url}
    status = ["job", "status", job_id, "--broker-url", srv.url, "--json"]

    t0 = time.monotonic()
    late = CliRunner().invoke(app, [*status, "--wait", "1"], env=env)
    assert time.monotonic() - t0 >= 1.0
    assert late.exit_code == 1
    error = json.loads(late.stdout)["error"]
    assert f"job {job_id} is not settled on chain after 1 s (status completed)" in error["message"]

    settle = threading.Timer(1.0, service.settler.settle_once)
    settle.start()
    try:
        done = CliRunner().invoke(app, [*status, "--wait", "60"], env=env)
    finally:
        settle.join()
    assert done.exit_code == 0, done.output
    job = json.loads(done.stdout)
    assert job["settled_on_chain"] is True and job["settlement"]["tx_hash"].startswith("0x")
