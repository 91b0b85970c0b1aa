"""The broker's service layer: domain errors mapped to problems in one place, streamed text built
incrementally (and equal to the whole answer decoded once), finished jobs' event buffers released."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient

from dlis_market.broker.app import create_app
from dlis_market.broker.detokenize import StreamDecoder
from dlis_market.broker.errors import NotFound, PaymentRefused, Refusal
from dlis_market.broker.schemas import JobCreate
from dlis_market.errors import BrokerError
from tests.integration.broker.test_broker_api import MODEL, UNIT, authorization

# Multi-byte UTF-8 in 2, 3 and 4 bytes, split across byte-level BPE tokens.
MULTIBYTE = " naïve café — 日本語のテキスト 🎉🦀 Ω≈ç√ end"


def test_streamed_text_equals_the_whole_answer_decoded_once(broker_env):
    market, service, backend, ops, nodes, client = broker_env
    tok = service.catalog.get(MODEL).tokenizer
    backend.script = tok(MULTIBYTE)["input_ids"]
    assert len(backend.script) > 20
    market.market().deposit(client, 10 * UNIT)
    served = service.catalog.get(MODEL)
    decoded: list[int] = []  # token ids per decode call: bounded windows, not the whole answer
    plain = served.decode
    served.decode = lambda ids: decoded.append(len(ids)) or plain(ids)  # type: ignore[method-assign]
    try:
        with TestClient(create_app(service, settle_in_background=False)) as http:
            body = {"model": MODEL, "prompt": "Say it", "max_tokens": len(backend.script), "stream": True,
                    "authorization": authorization(market, client)}  # fmt: skip
            with http.stream("POST", "/v1/jobs", json=body) as res:
                assert res.status_code == 201
                events = [json.loads(line[6:]) for line in res.iter_lines() if line.startswith("data: ")]
    finally:
        del served.decode
    streamed = "".join(e["text"] for e in events if e["type"] == "token")
    assert streamed == tok.decode(backend.script, skip_special_tokens=True) == MULTIBYTE
    assert "\ufffd" not in streamed
    job = service.ledger.get_job(events[-1]["job_id"])
    assert job is not None and job.answer == streamed
    assert max(decoded) <= 8, f"a decode call took {max(decoded)} tokens: the whole answer is re-decoded"


def test_stream_decoder_is_linear_and_exact_on_a_long_answer(broker_env):
    service = broker_env[1]
    served = service.catalog.get(MODEL)
    ids = served.tokenizer(MULTIBYTE * 40)["input_ids"]
    calls: list[int] = []
    decoder = StreamDecoder(lambda window: calls.append(len(window)) or served.decode(window))
    text = "".join(decoder.push(t) for t in ids) + decoder.flush()
    assert text == served.decode(ids)
    assert sum(calls) < 20 * len(ids)  # the old re-decode costs len(ids)**2 / 2 token decodes


def test_finished_jobs_release_their_live_state(broker_env):
    """Many jobs through the service: once they end (and the retention passes), nothing about them
    stays in memory: event buffers, tasks, watchers, job slots, worker reservations."""
    market, service, backend, ops, nodes, client = broker_env
    market.market().deposit(client, 50 * UNIT)
    broker = market.settings.broker.model_copy(update={"live_events_retention_s": 0.0})
    service.settings = market.settings.model_copy(update={"broker": broker})
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4}
    reqs = [JobCreate.model_validate({**body, "authorization": authorization(market, client)}) for _ in range(30)]

    async def run() -> list[int]:
        sizes = []
        for batch in range(3):
            rows = await asyncio.gather(*(service.submit(r) for r in reqs[batch * 10 : (batch + 1) * 10]))
            await asyncio.gather(*(service.wait(r.id) for r in rows))
            for _ in range(100):  # the runs end, their done callbacks and zero-delay release timers fire
                if not service._live and not service._tasks:
                    break
                await asyncio.sleep(0)
            sizes.append(len(service._live))
        return sizes

    sizes = asyncio.run(run())
    assert sizes == [0, 0, 0], sizes
    assert not service._runs and not service._tasks and not service._watchers and not service._orphaned
    assert service.admission.running == 0 and service.admission.waiting == 0 and not service._reserved
    assert len([j for j in service.ledger.recent_jobs(100) if j.status == "completed"]) == 30


def test_domain_code_raises_domain_errors_without_http(broker_env):
    service = broker_env[1]
    with pytest.raises(NotFound) as err:
        service.catalog.get("no-such-model")
    assert isinstance(err.value, BrokerError) and not hasattr(err.value, "status")
    assert err.value.slug == "unknown-model"


def test_framework_errors_are_problems_too(broker_env):
    service = broker_env[1]
    with TestClient(create_app(service, settle_in_background=False)) as http:
        missing = http.get("/v1/nothing-here")
        assert missing.status_code == 404
        assert missing.headers["content-type"] == "application/problem+json"
        assert missing.json()["type"].endswith("not-found") and missing.json()["status"] == 404
        wrong = http.delete("/healthz")
        assert wrong.status_code == 405 and wrong.headers["content-type"] == "application/problem+json"
        assert wrong.json()["type"].endswith("method-not-allowed") and "allow" in wrong.headers
        invalid = http.post("/v1/jobs", json={"model": MODEL})
        assert invalid.status_code == 422 and invalid.json()["type"].endswith("invalid-request")
        unknown = http.get("/v1/jobs/0x" + "00" * 32)
        assert unknown.status_code == 404 and unknown.json()["type"].endswith("unknown-job")
    assert issubclass(NotFound, Refusal)


def test_concurrent_jobs_of_one_client_cannot_share_free_escrow(broker_env):
    """The ledger work runs in worker threads now; the open-jobs read and the job write of one
    admission still happen as one step, so escrow for one job admits one of two concurrent ones."""
    market, service, backend, ops, nodes, client = broker_env
    market.market().deposit(client, UNIT + UNIT // 2)
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4}
    reqs = [JobCreate.model_validate({**body, "authorization": authorization(market, client)}) for _ in range(2)]

    async def both() -> list[object]:
        # the workers start only once both admissions are decided: a first job that already finished
        # would count its (smaller) real cost instead of its max cost, and rightly admit the second
        gate = asyncio.Event()
        start = backend.start

        async def gated_start(job):  # type: ignore[no-untyped-def]
            await gate.wait()
            return await start(job)

        backend.start = gated_start
        out = await asyncio.gather(*(service.submit(r) for r in reqs), return_exceptions=True)
        gate.set()
        for r in out:
            if not isinstance(r, BaseException):
                await service.wait(r.id)
        return out

    results = asyncio.run(both())
    refused = [r for r in results if isinstance(r, PaymentRefused)]
    assert len(refused) == 1 and refused[0].slug == "insufficient-escrow", results
    assert len(service.ledger.recent_jobs()) == 1
