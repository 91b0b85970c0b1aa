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
