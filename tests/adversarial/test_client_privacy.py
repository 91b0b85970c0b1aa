"""A stranger tries to read other clients' prompts and answers from the broker (real Anvil, real
BrokerService and app; the backend double answers with a fixed script and real receipts).

Only the job's client reads its content: with an EIP-712 JobRead signature, or the API key the
job ran under. Everyone else still sees the route, cost, receipts and settlement."""

from __future__ import annotations

import secrets
import time

import httpx
from eth_account import Account
from fastapi.testclient import TestClient

from dlis_market.broker.apikeys import create_api_key
from dlis_market.broker.app import create_app
from dlis_market.broker.auth import sign_job_read
from dlis_market.chain.job_market import JobAuthorization, sign_authorization
from dlis_market.types import model_id
from tests.integration.broker import conftest as broker_suite
from tests.integration.conftest import DEV_PUBLISHER

broker_env = broker_suite.broker_env  # the broker suite's fixture
live_server = broker_suite.live_server
UNIT = 10**18
MODEL = "smollm2-135m"
SECRET = "my secret launch code is 7431"
ANSWER = "Paris is the capital"  # what the scripted workers answer


def run_job(market, client, http) -> str:
    jm = market.market()
    auth = JobAuthorization(
        client.address, market.broker.address, bytes.fromhex(model_id(MODEL, DEV_PUBLISHER)[2:]), UNIT,
        secrets.randbits(64),
        market.client.timestamp() + 900,
    )  # fmt: skip
    body = {
        "model": MODEL,
        "prompt": SECRET,
        "max_tokens": 8,
        "authorization": {
            "client": client.address, "nonce": str(auth.nonce), "max_cost": str(UNIT), "deadline": auth.deadline,
            "signature": sign_authorization(client.key, jm.domain(), auth).hex(),
        },
    }  # fmt: skip
    res = http.post("/v1/jobs", json=body)
    assert res.status_code == 201, res.text
    assert ANSWER in res.json()["answer"]  # the submitter gets its own answer
    return str(res.json()["id"])


def outsider_views(http, job_id: str, headers: dict[str, str] | None = None) -> dict[str, str]:
    return {
        path: http.get(path, headers=headers or {}).text
        for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/events", "/v1/jobs", "/jobs", f"/jobs/{job_id}")
    }


def test_outsider_reads_no_prompt_or_answer(broker_env):
    market, service, backend, ops, nodes, client = broker_env
    market.market().deposit(client, 2 * UNIT)
    with TestClient(create_app(service, settle_in_background=False)) as http:
        job_id = run_job(market, client, http)
        service.settler.settle_once()
        for path, body in outsider_views(http, job_id).items():
            assert SECRET not in body and "launch code" not in body, path
            assert ANSWER not in body, path
        public = http.get(f"/v1/jobs/{job_id}").json()
        assert public["content_withheld"] and public["answer"] is None and public["request"] is None
        # What stays public: route, cost, receipts, settlement.
        assert [h["start"] for h in public["route"]] == [0, 10, 20] and int(public["cost"]) > 0
        assert len(public["receipts"]) == 3 and public["settlement"]["tx_hash"].startswith("0x")

        # A read permission signed by anyone but the client is refused.
        stranger = Account.create()
        forged = sign_job_read(stranger.key, market.market().domain(), job_id, int(time.time()) + 300)
        res = http.get(f"/v1/jobs/{job_id}", headers={"X-DLIS-Job-Read": forged})
        assert res.status_code == 403 and ANSWER not in res.text
        res = http.get(f"/jobs/{job_id}", params={"read": forged})
        assert res.status_code == 403 and ANSWER not in res.text and SECRET not in res.text
        # Expired, or a permission for another job, are refused too.
        old = sign_job_read(client.key, market.market().domain(), job_id, int(time.time()) - 1)
        assert http.get(f"/v1/jobs/{job_id}", headers={"X-DLIS-Job-Read": old}).status_code == 401
        other = sign_job_read(client.key, market.market().domain(), "0x" + "11" * 32, int(time.time()) + 300)
        assert http.get(f"/v1/jobs/{job_id}", headers={"X-DLIS-Job-Read": other}).status_code == 403
        # A signature that recovers no key at all (r = s = 0) is a 401, not a broker error.
        null = f"{int(time.time()) + 300}:0x" + "00" * 65
        res = http.get(f"/v1/jobs/{job_id}", headers={"X-DLIS-Job-Read": null})
        assert res.status_code == 401 and ANSWER not in res.text, res.text

        # The client reads its job with its signature: JSON, events and the dashboard page.
        mine = sign_job_read(client.key, market.market().domain(), job_id, int(time.time()) + 300)
        job = http.get(f"/v1/jobs/{job_id}", headers={"X-DLIS-Job-Read": mine}).json()
        assert ANSWER in job["answer"] and job["request"]["prompt"] == SECRET and not job["content_withheld"]
        page = http.get(f"/jobs/{job_id}", params={"read": mine}).text
        assert ANSWER in page and SECRET in page


def test_api_key_reads_only_its_own_jobs(broker_env):
    market, service, backend, ops, nodes, client = broker_env
    jm = market.market()
    jm.deposit(client, 2 * UNIT)
    other_client = market.new_funded_account(10 * UNIT)
    jm.deposit(other_client, 2 * UNIT)
    expires = market.client.timestamp() + 3600
    key = create_api_key(
        service.ledger, jm, client, cap=UNIT, expires_at=expires, broker=service.broker.address
    ).api_key
    other_key = create_api_key(
        service.ledger, jm, other_client, cap=UNIT, expires_at=expires, broker=service.broker.address
    ).api_key
    with TestClient(create_app(service, settle_in_background=False)) as http:
        res = http.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": SECRET}], "max_tokens": 8},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert res.status_code == 200, res.text
        job_id = res.json()["dlis"]["job_id"]
        for path, body in outsider_views(http, job_id).items():
            assert SECRET not in body and ANSWER not in body, path
        for path, body in outsider_views(http, job_id, {"Authorization": f"Bearer {other_key}"}).items():
            assert SECRET not in body and ANSWER not in body, path
        assert http.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {other_key}"}).status_code == 403
        job = http.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}).json()
        assert ANSWER in job["answer"] and job["request"]["messages"][0]["content"] == SECRET
        events = http.get(f"/v1/jobs/{job_id}/events", headers={"Authorization": f"Bearer {key}"}).text
        assert "event: token" in events


def test_cli_status_shows_the_answer_to_its_client_only(broker_env, live_server):
    import json

    from typer.testing import CliRunner

    from dlis_market.cli.main import app

    market, service, backend, ops, nodes, _ = broker_env
    client = market.accounts[5]  # a dev account, so the CLI can unlock it as dev:5
    market.fund(client.address, 10 * UNIT)
    market.market().deposit(client, 2 * UNIT)
    srv = live_server(create_app(service, settle_in_background=False))
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        job_id = run_job(market, client, http)
    env = {"DLIS_HOME": str(market.settings.home), "DLIS_CHAIN__RPC_URL": market.settings.chain.rpc_url}
    base = ["job", "status", job_id, "--broker-url", srv.url, "--json"]
    outsider = CliRunner().invoke(app, base, env=env)
    assert outsider.exit_code == 0, outsider.output
    assert json.loads(outsider.stdout)["answer"] is None and ANSWER not in outsider.stdout
    mine = CliRunner().invoke(app, [*base, "--account", "dev:5"], env=env)
    assert mine.exit_code == 0, mine.output
    assert ANSWER in json.loads(mine.stdout)["answer"]
