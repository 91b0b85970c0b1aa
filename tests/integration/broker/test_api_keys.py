"""API keys issued by the broker over HTTP (``POST /v1/api-keys``), on a real chain.

The client proves its account with an EIP-712 ``ApiKeyRequest`` signature; the broker makes the
spender key and keeps it encrypted under the API key; the client authorizes that spender on chain
(``JobMarket.setSpender``). Forged, replayed, stale or out-of-range requests are refused and
leave no key behind.
"""

from __future__ import annotations

import json
import secrets
import shutil

import pytest
from eth_account import Account
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from web3 import Web3

from dlis_market.broker.apikeys import ApiKeyRequest, sign_api_key_request
from dlis_market.broker.app import create_app
from dlis_market.broker.ledger import ApiKeyRow

UNIT = 10**18
MODEL = "smollm2-135m"


def key_count(service) -> int:
    with service.ledger.session() as s:
        return int(s.scalar(select(func.count()).select_from(ApiKeyRow)) or 0)


def request_body(market, service, signer, *, client=None, cap=UNIT, expires_in=3600, deadline_in=300, broker=None):
    now = market.client.timestamp()
    req = ApiKeyRequest(
        client=(client or signer).address,
        broker=broker or service.broker.address,
        cap=cap,
        expires_at=now + expires_in,
        nonce=secrets.randbits(64),
        deadline=now + deadline_in,
    )
    sig = sign_api_key_request(signer.key, service.market.domain(), req)
    return {
        "client": req.client,
        "broker": req.broker,
        "cap": str(req.cap),
        "expires_at": req.expires_at,
        "nonce": str(req.nonce),
        "deadline": req.deadline,
        "signature": "0x" + sig.hex(),
    }


@pytest.fixture()
def api(broker_env):
    market, service, backend, ops, nodes, client = broker_env
    market.market().deposit(client, 10 * UNIT)
    with TestClient(create_app(service, settle_in_background=False)) as http:
        yield market, service, client, http


def chat(http, key):
    return http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "Capital of France?"}], "max_tokens": 4},
        headers={"Authorization": f"Bearer {key}"},
    )


def test_key_issued_over_http_works_once_authorized_on_chain(api):
    market, service, client, http = api
    res = http.post("/v1/api-keys", json=request_body(market, service, client))
    assert res.status_code == 201, res.text
    grant = res.json()
    assert grant["api_key"].startswith("sk-dlis-") and grant["client"] == client.address
    assert grant["cap"] == str(UNIT) and Web3.is_checksum_address(grant["spender"])
    # the database holds a hash of the key and the spender key encrypted under it: never either secret
    with service.ledger.session() as s:
        row = s.scalars(select(ApiKeyRow)).one()
    assert grant["api_key"] not in row.signer_key and grant["api_key"] not in row.key_hash

    before = chat(http, grant["api_key"])  # the spender is not authorized on chain yet
    assert before.status_code == 401, before.text
    assert "not authorized on chain" in before.json()["error"]["message"]
    assert "setSpender" in before.json()["error"]["message"]

    market.market().set_spender(client, grant["spender"], UNIT, grant["expires_at"])
    after = chat(http, grant["api_key"])
    assert after.status_code == 200, after.text
    assert after.json()["choices"][0]["message"]["content"]


def test_forged_signature_is_refused_and_stores_nothing(api):
    market, service, client, http = api
    mallory = Account.create()
    # Mallory signs a request claiming to be the client
    res = http.post("/v1/api-keys", json=request_body(market, service, mallory, client=client))
    assert res.status_code == 401, res.text
    assert res.json()["type"].endswith("bad-api-key-request")
    assert mallory.address in res.json()["detail"] and client.address in res.json()["detail"]
    # a signature that does not decode at all
    body = request_body(market, service, client)
    body["signature"] = "0x" + "00" * 65
    assert http.post("/v1/api-keys", json=body).status_code == 401
    assert key_count(service) == 0


def test_replayed_request_is_refused(api):
    market, service, client, http = api
    body = request_body(market, service, client)
    assert http.post("/v1/api-keys", json=body).status_code == 201
    again = http.post("/v1/api-keys", json=body)
    assert again.status_code == 409, again.text
    assert "already" in again.json()["detail"]
    assert key_count(service) == 1


@pytest.mark.parametrize(
    ("change", "status", "words"),
    [
        ({"deadline_in": -10}, 401, "expired"),
        ({"deadline_in": 7200}, 422, "600 s"),
        ({"expires_in": -5}, 422, "already past"),
        ({"cap": 0}, 422, "cap"),
        ({"cap": 2**128}, 422, "uint128"),
        ({"broker": "0x" + "11" * 20}, 401, "another broker"),
    ],
)
def test_out_of_range_requests_are_refused(api, change, status, words):
    market, service, client, http = api
    res = http.post("/v1/api-keys", json=request_body(market, service, client, **change))
    assert res.status_code == status, res.text
    assert words in res.json()["detail"], res.json()
    assert key_count(service) == 0


def test_malformed_request_is_a_400_problem(api):
    market, service, client, http = api
    body = request_body(market, service, client)
    body["client"] = "0x1234"
    del body["nonce"]
    res = http.post("/v1/api-keys", json=body)
    assert res.status_code == 422, res.text
    assert key_count(service) == 0


def test_no_escrow_no_key_and_a_bounded_number_per_client(api, monkeypatch):
    """Keys cost the broker storage and addresses cost nothing: a key needs escrow held for this
    broker, and a client holds at most MAX_LIVE_KEYS unexpired keys."""
    market, service, client, http = api
    stranger = market.new_funded_account(UNIT)  # funded, but nothing deposited for this broker
    res = http.post("/v1/api-keys", json=request_body(market, service, stranger))
    assert res.status_code == 402, res.text
    assert "deposit first" in res.json()["detail"]
    assert key_count(service) == 0
    monkeypatch.setattr("dlis_market.broker.apikeys.MAX_LIVE_KEYS", 2)
    assert [http.post("/v1/api-keys", json=request_body(market, service, client)).status_code for _ in range(3)] == [
        201,
        201,
        429,
    ]
    assert key_count(service) == 2


def test_cli_gets_its_key_from_the_broker(broker_env, live_server, tmp_path):
    """`dlis broker api-key` on a machine with no access to the broker's database: the key comes
    over HTTP and the CLI authorizes its spender on chain."""
    from typer.testing import CliRunner

    from dlis_market.cli.main import app

    market, service, backend, ops, nodes, _ = broker_env
    client = market.accounts[6]  # a dev account, so the CLI can unlock it as dev:6
    market.fund(client.address, 10 * UNIT)
    market.market().deposit(client, 2 * UNIT)
    srv = live_server(create_app(service, settle_in_background=False))
    elsewhere = tmp_path / "client-home"  # another machine: the chain's deployment file, no broker ledger
    shutil.copytree(market.settings.deployments_dir, elsewhere / "deployments")
    env = {"DLIS_HOME": str(elsewhere), "DLIS_CHAIN__RPC_URL": market.settings.chain.rpc_url}
    out = CliRunner().invoke(
        app,
        ["broker", "api-key", "-a", "dev:6", "--cap", "1.5", "--days", "2", "--broker-url", srv.url, "--json"],
        env=env,
    )
    assert out.exit_code == 0, out.output
    grant = json.loads(out.stdout)
    assert grant["cap"] == str(3 * UNIT // 2) and grant["client"] == client.address
    remaining, expiry = market.market().spender_of(client.address, grant["spender"])
    assert remaining == 3 * UNIT // 2 and expiry == grant["expires_at"]
    assert not (elsewhere / "broker.db").exists()
    with TestClient(create_app(service, settle_in_background=False)) as http:
        res = chat(http, grant["api_key"])
    assert res.status_code == 200, res.text

    bad = CliRunner().invoke(
        app, ["broker", "api-key", "-a", "dev:6", "--cap", "0", "--broker-url", srv.url, "--json"], env=env
    )
    assert bad.exit_code != 0
    assert "cap 0 must be > 0" in json.loads(bad.stdout)["error"]["message"]
