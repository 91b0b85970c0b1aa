"""Property-based fuzzing of every broker route against its own OpenAPI spec: malformed, mistyped
and extreme inputs get a 4xx problem, never a 5xx.

schemathesis would be the tool, but it needs a hypothesis far newer than the exact pin eth-brownie
imposes, so bodies are generated here from the spec's property names with hypothesis 6.27.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlis_market.broker.app import create_app
from tests.integration.conftest import DEV_PUBLISHER

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**300), max_value=2**300),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.sampled_from(["smollm2-135m", "0x" + "ab" * 20, "0x" + "11" * 65, "low", "high", "user", "", "9" * 90]),
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


def _fields(spec: dict, schema: dict) -> list[str]:
    if "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return list(schema.get("properties", {}))


@pytest.fixture()
def http(broker_env):
    market, service, *_ = broker_env
    with TestClient(create_app(service, settle_in_background=False), raise_server_exceptions=False) as client:
        yield client


def test_no_route_answers_5xx_to_fuzzed_input(http):
    spec = http.get("/openapi.json").json()
    posts = []
    for path, ops in spec["paths"].items():
        if "post" in ops and "{" not in path:
            body = ops["post"].get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            posts.append((path, _fields(spec, body)))
    gets = [p for p, ops in spec["paths"].items() if "get" in ops]
    assert {"/v1/jobs", "/v1/quotes", "/v1/chat/completions", "/v1/completions"} <= {p for p, _ in posts}

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        path, fields = data.draw(st.sampled_from(posts))
        keys = st.sampled_from(fields) if fields else st.text(max_size=8)
        body = data.draw(st.one_of(JSON, st.dictionaries(keys, JSON, max_size=len(fields) + 1)))
        res = http.post(
            path, json=body, headers={"Authorization": data.draw(st.sampled_from(["", "Bearer x", "Bearer sk-dlis-0"]))}
        )
        assert res.status_code < 500, (path, body, res.status_code, res.text[:300])
        get = data.draw(st.sampled_from(gets)).replace(
            "{job_id}", data.draw(st.sampled_from(["0x" + "00" * 32, "x", "%00"]))
        )
        res = http.get(get)
        assert res.status_code < 500, (get, res.status_code, res.text[:300])

    fuzz()


def _authorization(market, client) -> dict:
    import secrets

    from dlis_market.chain.job_market import JobAuthorization, sign_authorization
    from dlis_market.types import model_id

    auth = JobAuthorization(
        client.address, market.broker.address, bytes.fromhex(model_id("smollm2-135m", DEV_PUBLISHER)[2:]), 10**18,
        secrets.randbits(64), market.client.timestamp() + 900,
    )  # fmt: skip
    sig = sign_authorization(client.key, market.market().domain(), auth)
    return {"client": client.address, "nonce": str(auth.nonce), "max_cost": str(10**18),
            "deadline": auth.deadline, "signature": sig.hex()}  # fmt: skip


@pytest.mark.parametrize(
    "content",
    [
        {"messages": []},
        {"prompt": ""},
        {"prompt": "", "messages": []},
        {"messages": [{"role": "user", "content": ""}], "max_tokens": 0},
    ],
)
def test_empty_inputs_are_422_problems(broker_env, content):
    """Found by hand: an empty `messages` list was a 500 (text/plain) and an empty prompt a 413."""
    market, service, backend, ops, nodes, client = broker_env
    market.market().deposit(client, 10**18)
    with TestClient(create_app(service, settle_in_background=False), raise_server_exceptions=False) as http:
        for path, body in (
            ("/v1/quotes", {"model": "smollm2-135m", **content}),
            ("/v1/jobs", {"model": "smollm2-135m", **content, "authorization": _authorization(market, client)}),
        ):
            res = http.post(path, json=body)
            assert res.status_code == 422, (path, body, res.status_code, res.text[:300])
            assert res.headers["content-type"] == "application/problem+json"
        assert backend.jobs == []


def test_bad_read_proofs_are_4xx(http):
    job = "0x" + "00" * 32
    for headers in ({"X-DLIS-Job-Read": "x"}, {"X-DLIS-Job-Read": "1:0x" + "1" * 130},
                    {"X-DLIS-Job-Read": "9" * 30 + ":0x"}, {"Authorization": "Bearer sk-dlis-0"}):  # fmt: skip
        for path in (f"/v1/jobs/{job}", f"/v1/jobs/{job}/events", f"/jobs/{job}", "/v1/jobs", "/jobs"):
            res = http.get(path, headers=headers)
            assert res.status_code < 500, (path, headers, res.status_code, res.text[:300])
