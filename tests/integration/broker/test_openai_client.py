"""The official `openai` Python client, unchanged, against the broker over real HTTP."""

from __future__ import annotations

import threading
import time

import openai
import pytest
import uvicorn

from dlis_market.broker.apikeys import create_api_key
from dlis_market.broker.app import create_app
from dlis_market.chain.anvil import free_port

UNIT = 10**18
MODEL = "smollm2-135m"


@pytest.fixture()
def served(broker_env):
    market, service, backend, ops, nodes, client = broker_env
    market.market().deposit(client, 10 * UNIT)
    grant = create_api_key(
        service.ledger,
        market.market(),
        client,
        cap=2 * UNIT,
        expires_at=market.client.timestamp() + 3600,
        broker=service.broker.address,
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(service, settle_in_background=False), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "broker did not start"
        time.sleep(0.05)
    try:
        yield (
            market,
            service,
            grant,
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=grant.api_key, max_retries=0),
        )
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_chat_completion_and_settlement(served):
    market, service, grant, client = served
    assert [m.id for m in client.models.list().data] == [MODEL]
    res = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Capital of France?"}], max_tokens=6, temperature=0
    )
    assert res.choices[0].message.role == "assistant"
    assert res.choices[0].message.content == " Paris is the capital of France"
    assert res.choices[0].finish_reason == "length"
    assert res.usage.completion_tokens == 6 and res.usage.prompt_tokens > 5
    service.settler.settle_once()
    remaining, _ = market.market().spender_of(grant.client, grant.spender)
    job = service.ledger.recent_jobs(1)[0]
    assert job.status == "settled" and remaining == 2 * UNIT - job.cost - job.fee  # the chain enforced the cap


def test_completion_and_streaming(served):
    _, _, _, client = served
    res = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert res.choices[0].text == " Paris is the capital"
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == " Paris is the" and chunks[-1].choices[0].finish_reason == "length"
    stream = list(client.completions.create(model=MODEL, prompt="x", max_tokens=2, stream=True))
    assert "".join(c.choices[0].text for c in stream) == " Paris is"


def test_bad_api_key_is_refused(served):
    *_, client = served
    bad = openai.OpenAI(base_url=str(client.base_url), api_key="sk-dlis-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert "not known" in str(err.value)
