"""Every implemented parameter of the OpenAI-compatible API, through the official `openai` client
over real HTTP (real chain, BrokerService, ledger and settlement; the backend doubles play
workers that sign real receipts). One test per row of the README's "OpenAI compatibility" table,
or a few rows that share a request."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

import httpx
import openai
import pytest

from dlis_market.broker.apikeys import create_api_key
from dlis_market.broker.app import create_app
from dlis_market.broker.detokenize import StopMatcher
from dlis_market.broker.service import BrokerService
from dlis_market.inference.manifest import MANIFEST_NAME
from dlis_market.inference.sampling import TokenLogprob
from tests.chaos.test_broker_retries import signed_route
from tests.integration.broker import conftest as broker_suite

UNIT = 10**18
MODEL = "smollm2-135m"
GRACE_S = 2.5


class PacedBackend(broker_suite.ScriptedBackend):
    """Workers that take ``delay_s`` per token of a long script and sign receipts for the tokens
    they served, like real ones: a job ended early is billed for what it produced only."""

    def __init__(self, base: broker_suite.ScriptedBackend, script: list[int], delay_s: float):
        super().__init__(base.nodes, base.domain, script)
        self.delay_s = delay_s
        self.served: dict[bytes, int] = {}

    async def start(self, job):
        self.jobs.append(job)
        backend = self
        backend.served[job.job_id] = 0

        class Stream:
            async def _gen(self):
                for t in backend.script[: job.max_new_tokens]:
                    await asyncio.sleep(backend.delay_s)
                    backend.served[job.job_id] += 1
                    yield t

            def tokens(self):
                return self._gen()

            async def finish(self):
                return signed_route(backend, job, len(job.prompt_ids) + backend.served[job.job_id])

        return Stream()


@dataclass
class Served:
    market: object
    service: BrokerService
    backend: broker_suite.ScriptedBackend
    client: openai.OpenAI
    url: str
    tok: object


def serve(broker_env, live_server, make_backend=None) -> Served:
    """A broker over ``make_backend(scripted)`` (default: the suite's scripted workers) behind
    uvicorn, and the official client with an API key of a funded client."""
    market, service, backend, _ops, _nodes, client = broker_env
    settings = market.settings.model_copy(
        update={"broker": market.settings.broker.model_copy(update={"cancel_grace_s": GRACE_S})}
    )
    be = make_backend(backend) if make_backend else backend
    svc = BrokerService(settings, service.ledger, service.market, service.broker, service.catalog, be, service.planner)
    srv = live_server(create_app(svc, settle_in_background=False))
    jm = market.market()
    jm.deposit(client, 10 * UNIT)
    grant = create_api_key(
        svc.ledger, jm, client, cap=5 * UNIT, expires_at=market.client.timestamp() + 3600, broker=svc.broker.address
    )
    oa = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=grant.api_key, max_retries=0)
    return Served(market, svc, be, oa, srv.url, service.catalog.get(MODEL).tokenizer)


@pytest.fixture()
def api(broker_env, live_server) -> Served:
    return serve(broker_env, live_server)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_models_list_and_retrieve_with_created(api):
    manifest_time = int((api.service.catalog.get(MODEL).shard_dir / MANIFEST_NAME).stat().st_mtime)
    listed = api.client.models.list().data
    assert [(m.id, m.created, m.owned_by) for m in listed] == [(MODEL, manifest_time, "dlis-market")]
    one = api.client.models.retrieve(MODEL)
    assert one.id == MODEL and one.object == "model" and one.created == manifest_time > 1_600_000_000
    with pytest.raises(openai.NotFoundError) as err:
        api.client.models.retrieve("gpt-4o")
    assert err.value.code == "unknown_model" and MODEL in err.value.message


def test_created_fingerprint_and_default_temperature(api):
    before = int(time.time())
    res = api.client.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=3)
    assert before <= res.created <= int(time.time())
    assert res.system_fingerprint.startswith("fp_") and len(res.system_fingerprint) == 15
    job = api.backend.jobs[-1]
    # temperature left out: OpenAI's default 1.0 sampling, with a random seed (not greedy, not seed 0)
    assert (job.greedy, job.temperature) == (False, 1.0)
    again = api.client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert again.system_fingerprint == res.system_fingerprint and api.backend.jobs[-1].seed != job.seed
    api.client.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=0)
    assert api.backend.jobs[-1].greedy is True
    api.client.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=0.5, top_p=0.9, seed=7)
    job = api.backend.jobs[-1]
    assert (job.greedy, job.temperature, job.top_p, job.seed) == (False, 0.5, 0.9, 7)


def test_stop_string_and_list_cut_the_text(api):
    res = api.client.completions.create(model=MODEL, prompt="x", max_tokens=7, temperature=0, stop=" capital")
    assert res.choices[0].text == " Paris is the" and res.choices[0].finish_reason == "stop"
    res = api.client.chat.completions.create(
        model=MODEL, messages=user("x"), max_tokens=7, temperature=0, stop=["France", " is the"]
    )
    assert res.choices[0].message.content == " Paris" and res.choices[0].finish_reason == "stop"
    # a stop string that never comes: the whole answer, finish by length
    res = api.client.completions.create(model=MODEL, prompt="x", max_tokens=4, temperature=0, stop=["zebra"])
    assert res.choices[0].text == " Paris is the capital" and res.choices[0].finish_reason == "length"


def test_stop_ends_the_job_early_and_charges_only_what_was_served(broker_env, live_server):
    tok = broker_env[1].catalog.get(MODEL).tokenizer
    script = tok(" Paris is the capital of France." * 8)["input_ids"]  # 56 tokens, 0.1 s each
    api = serve(broker_env, live_server, lambda base: PacedBackend(base, script, 0.1))
    t0 = time.monotonic()
    stream = api.client.chat.completions.create(
        model=MODEL, messages=user("x"), max_tokens=56, temperature=0, stop="capital", stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    took = time.monotonic() - t0
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == " Paris is the " and "capital" not in text  # no part of the stop string is streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    job = api.service.ledger.recent_jobs(1)[0]
    assert job.status == "completed" and 4 <= job.completion_tokens <= 6, job.completion_tokens
    assert chunks[-1].usage.completion_tokens == job.completion_tokens  # usage: exactly what is charged
    assert took < 3.0, took  # not the 5.6 s of the whole script
    assert sum(api.backend.served.values()) == job.completion_tokens  # the stages stopped there too
    receipts = api.service.ledger.get_job(job.id).receipts
    assert len(receipts) == 3 and all(r.tokens == job.prompt_tokens + job.completion_tokens for r in receipts)
    assert job.cost == sum(r.amount for r in receipts)
    assert job.error is not None and job.error.startswith(
        "cancelled: a stop string was generated"
    )  # the ledger says why


def test_stream_include_usage(api):
    chunks = list(
        api.client.completions.create(
            model=MODEL, prompt="x", max_tokens=3, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    job = api.service.ledger.recent_jobs(1)[0]
    assert chunks[-1].usage.completion_tokens == 3 == job.completion_tokens
    assert chunks[-1].usage.prompt_tokens == job.prompt_tokens
    assert "".join(c.choices[0].text for c in chunks if c.choices) == " Paris is the"
    plain = list(api.client.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=0, stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason == "length"


def test_n_runs_one_paid_job_per_choice(api):
    res = api.client.chat.completions.create(
        model=MODEL, messages=user("x"), max_tokens=3, n=3, seed=41, temperature=0.8
    )
    assert [c.index for c in res.choices] == [0, 1, 2]
    assert all(c.message.content == " Paris is the" for c in res.choices)
    assert [j.seed for j in api.backend.jobs] == [41, 42, 43]
    jobs = api.service.ledger.recent_jobs(10)
    assert len(jobs) == 3 and all(j.status == "completed" for j in jobs)
    assert res.usage.completion_tokens == 9 == sum(j.completion_tokens for j in jobs)
    assert res.usage.prompt_tokens == sum(j.prompt_tokens for j in jobs)
    assert int(res.model_extra["dlis"]["cost"]) == sum(j.cost for j in jobs)
    chunks = list(api.client.chat.completions.create(model=MODEL, messages=user("x"), max_tokens=2, n=2, stream=True))
    for i in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert "".join(c.delta.content or "" for c in mine) == " Paris is" and mine[-1].finish_reason == "length"


def test_roles_content_parts_and_name(api):
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "text", "text": "a list"}],
         "name": "alice"},
        {"role": "assistant", "content": "Calling.", "refusal": None, "tool_calls": None},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
    ]  # fmt: skip
    res = api.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0)
    assert res.choices[0].message.content == " Paris is"
    prompt = api.tok.decode(api.backend.jobs[-1].prompt_ids)
    assert "<|im_start|>system\nBe brief.<|im_end|>" in prompt  # developer is the system role
    assert "<|im_start|>user\nalice: Look:\na list<|im_end|>" in prompt  # parts joined, name prefixed
    assert "<|im_start|>tool\n42<|im_end|>" in prompt


def test_prompt_list_echo_and_max_completion_tokens(api):
    res = api.client.completions.create(model=MODEL, prompt=["One", "Two"], max_tokens=2, temperature=0, echo=True)
    assert [(c.index, c.text) for c in res.choices] == [(0, "One Paris is"), (1, "Two Paris is")]
    assert [api.tok.decode(j.prompt_ids) for j in api.backend.jobs] == ["One", "Two"]
    chunks = list(api.client.completions.create(model=MODEL, prompt="Hey", max_tokens=2, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "Hey Paris is"
    api.client.chat.completions.create(model=MODEL, messages=user("x"), max_completion_tokens=5, max_tokens=2)
    assert api.backend.jobs[-1].max_new_tokens == 5
    res = api.client.completions.create(model=MODEL, prompt=["a", "b"], n=2, max_tokens=1, seed=3)
    assert [c.index for c in res.choices] == [0, 1, 2, 3] and [j.seed for j in api.backend.jobs[-4:]] == [3, 4, 5, 6]


def test_accepted_neutral_values(api):
    """Parameters at their neutral value change nothing and are taken (clients send them)."""
    res = api.client.chat.completions.create(
        model=MODEL, messages=user("x"), max_tokens=2, temperature=0, presence_penalty=0, frequency_penalty=0.0,
        logit_bias={}, logprobs=False, response_format={"type": "text"}, user="u-1", store=False,
        modalities=["text"],
    )  # fmt: skip
    assert res.choices[0].message.content == " Paris is"
    res = api.client.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=0, best_of=1)
    assert res.choices[0].text == " Paris is"


def test_streamed_chat_sends_the_role_first(api):
    with httpx.stream(
        "POST", f"{api.url}/v1/chat/completions", headers={"Authorization": f"Bearer {api.client.api_key}"},
        json={"model": MODEL, "messages": user("x"), "max_tokens": 2, "stream": True}, timeout=30,
    ) as res:  # fmt: skip
        lines = [ln for ln in res.iter_lines() if ln.startswith("data: ")]
    first = json.loads(lines[0][6:])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["object"] == "chat.completion.chunk" and first["system_fingerprint"].startswith("fp_")
    assert lines[-1] == "data: [DONE]"


@pytest.mark.parametrize(
    ("stops", "pieces", "emitted", "stopped"),
    [
        (["</s>"], ["Hi <", "/", "s> more"], ["Hi ", "", ""], True),  # held back, then dropped
        (["</s>"], ["a <", "b"], ["a ", "<b"], False),  # held back, then released
        (["ab", "b"], ["xa", "b"], ["x", ""], True),  # the earliest stop wins
        (["\n\n"], ["one\n", "two"], ["one", "\ntwo"], False),
        ([], ["plain"], ["plain"], False),
    ],
)
def test_stop_matcher_never_emits_part_of_a_stop_string(stops, pieces, emitted, stopped):
    """The cut itself, without a broker: the pieces emitted while text streams in."""
    m = StopMatcher(stops)
    assert [m.push(p) for p in pieces] == emitted and m.stopped is stopped
    whole = "".join(pieces)
    assert "".join(emitted) + m.flush() == StopMatcher(stops).cut(whole)[0]


class LogprobBackend(broker_suite.ScriptedBackend):
    """Workers that send each scripted token with log probabilities, as a last stage asked for
    ``logprobs`` does: the token at ``-(i + 1) / 10`` and its top ``k`` alternatives below it."""

    def __init__(self, base: broker_suite.ScriptedBackend):
        super().__init__(base.nodes, base.domain, base.script)

    async def start(self, job):
        self.jobs.append(job)
        backend, k = self, job.logprobs or 0

        class Stream:
            async def _gen(self):
                for i, t in enumerate(backend.script[: job.max_new_tokens]):
                    lp = -(i + 1) / 10
                    yield TokenLogprob(t, lp, tuple((t + j, lp - j) for j in range(k)))

            def tokens(self):
                return self._gen()

            async def finish(self):
                return signed_route(backend, job, len(job.prompt_ids) + min(len(backend.script), job.max_new_tokens))

        return Stream()


def test_penalties_and_logit_bias_reach_the_last_stage(api):
    api.client.chat.completions.create(
        model=MODEL, messages=user("x"), max_tokens=2, temperature=0, presence_penalty=0.5, frequency_penalty=-1.25,
        logit_bias={"42": -100, "7": 2.5},
    )  # fmt: skip
    job = api.backend.jobs[-1]
    assert (job.presence_penalty, job.frequency_penalty, job.logit_bias) == (0.5, -1.25, ((7, 2.5), (42, -100.0)))
    assert job.greedy and job.logprobs is None and job.sampling.features == {"penalties", "logit_bias"}
    api.client.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=0.7, seed=3, frequency_penalty=1)
    job = api.backend.jobs[-1]
    assert (job.greedy, job.seed, job.frequency_penalty, job.presence_penalty, job.logit_bias) == (False, 3, 1.0, 0, ())


def test_logprobs_from_workers_that_send_none_fail_the_request(api, caplog):
    """Workers that send bare token ids for a job that asked for log probabilities (workers that
    predate them): the request fails with the reason, never answers without them. The broker's log
    says so in one line per failed job, with the reason and no traceback."""
    caplog.set_level(logging.INFO, logger="dlis_market.broker.service")
    with pytest.raises(openai.APIStatusError) as err:
        api.client.chat.completions.create(model=MODEL, messages=user("x"), max_tokens=2, logprobs=True)
    assert err.value.status_code == 502 and "log probabilit" in err.value.message, err.value.body
    assert api.backend.jobs[-1].logprobs == 0
    with pytest.raises(openai.APIError) as err:  # streamed: the error event, no chunk without log probabilities
        list(api.client.completions.create(model=MODEL, prompt="x", max_tokens=2, logprobs=2, stream=True))
    assert "log probabilit" in err.value.message
    assert api.backend.jobs[-1].logprobs == 2 and api.service.ledger.recent_jobs(1)[0].status == "failed"
    failed = [r for r in caplog.records if " failed: " in r.getMessage()]
    assert len(failed) == 2 and all(r.levelname in ("WARNING", "WARN") and r.exc_info is None for r in failed)
    assert "log probabilit" in failed[-1].getMessage() and failed[-1].job_id in failed[-1].getMessage()


def test_chat_logprobs_shape_stream_and_not(broker_env, live_server):
    api = serve(broker_env, live_server, LogprobBackend)
    script = api.backend.script[:4]
    res = api.client.chat.completions.create(
        model=MODEL, messages=user("x"), max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    assert api.backend.jobs[-1].logprobs == 3
    content = res.choices[0].logprobs.content
    assert [c.token for c in content] == [api.tok.decode([t]) for t in script]
    assert "".join(c.token for c in content) == res.choices[0].message.content == " Paris is the capital"
    assert [c.logprob for c in content] == pytest.approx([-0.1, -0.2, -0.3, -0.4])
    for c, t in zip(content, script, strict=True):
        assert bytes(c.bytes).decode() == c.token
        assert [a.token for a in c.top_logprobs] == [api.tok.decode([t + j]) for j in range(3)]
        tops = [a.logprob for a in c.top_logprobs]
        assert tops == sorted(tops, reverse=True) and tops[0] == c.logprob  # greedy: the best one
    chunks = list(api.client.chat.completions.create(
        model=MODEL, messages=user("x"), max_tokens=4, temperature=0, logprobs=True, top_logprobs=3, stream=True
    ))  # fmt: skip
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    # stop string: the tokens up to the one that completed it; their text is cut at the stop
    res = api.client.chat.completions.create(model=MODEL, messages=user("x"), max_tokens=4, logprobs=True, stop=" the")
    assert res.choices[0].message.content == " Paris is" and res.choices[0].finish_reason == "stop"
    assert [c.token for c in res.choices[0].logprobs.content] == [api.tok.decode([t]) for t in script[:3]]
    assert all(c.top_logprobs == [] for c in res.choices[0].logprobs.content)
    plain = api.client.chat.completions.create(model=MODEL, messages=user("x"), max_tokens=2)
    assert plain.choices[0].logprobs is None and api.backend.jobs[-1].logprobs is None


def test_completion_logprobs_shape_stream_and_not(broker_env, live_server):
    api = serve(broker_env, live_server, LogprobBackend)
    script = api.backend.script[:4]
    res = api.client.completions.create(model=MODEL, prompt="x", max_tokens=4, temperature=0, logprobs=2)
    lp = res.choices[0].logprobs
    texts = [api.tok.decode([t]) for t in script]
    assert lp.tokens == texts and "".join(lp.tokens) == res.choices[0].text
    assert lp.token_logprobs == pytest.approx([-0.1, -0.2, -0.3, -0.4])
    assert lp.text_offset == [sum(len(t) for t in texts[:i]) for i in range(4)]
    assert lp.top_logprobs[1] == {api.tok.decode([script[1]]): pytest.approx(-0.2),
                                  api.tok.decode([script[1] + 1]): pytest.approx(-1.2)}  # fmt: skip
    chunks = list(api.client.completions.create(model=MODEL, prompt="x", max_tokens=4, logprobs=2, stream=True))
    parts = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == texts
    assert [o for p in parts for o in p.text_offset] == lp.text_offset
    zero = api.client.completions.create(model=MODEL, prompt="x", max_tokens=2, logprobs=0)
    assert zero.choices[0].logprobs.top_logprobs == [{texts[0]: pytest.approx(-0.1)}, {texts[1]: pytest.approx(-0.2)}]


def test_privacy_high_reaches_the_policy_and_is_refused_by_name_without_attested_workers(api):
    """``privacy`` (a dlis extension the openai client sends in ``extra_body``) is the native
    policy's: these scripted workers registered no attestation, so a privacy=high request is
    refused naming why (503 no-route), before any job is admitted; privacy=low runs as before."""
    before = len(api.backend.jobs)
    with pytest.raises(openai.APIStatusError) as refused:
        api.client.chat.completions.create(
            model=MODEL, messages=user("x"), max_tokens=2, temperature=0, extra_body={"privacy": "high"}
        )
    assert refused.value.status_code == 503, refused.value
    assert "no verified attestation (privacy=high)" in str(refused.value), refused.value
    assert len(api.backend.jobs) == before
    res = api.client.chat.completions.create(
        model=MODEL, messages=user("x"), max_tokens=2, temperature=0, extra_body={"privacy": "low"}
    )
    assert res.choices[0].message.content == " Paris is" and len(api.backend.jobs) == before + 1
