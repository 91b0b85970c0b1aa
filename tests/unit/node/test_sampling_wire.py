"""The sampling fields on the worker wire: plain sessions look exactly as before to a worker that
predates penalties and log probabilities; a job that needs them is never served by such a worker
(its open answer names no feature, or it refuses the fields): the driver routes around it. A
failover replay rebuilds the penalties' history on the new last stage."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import Any

import pytest
import torch

from dlis_market.inference.messages import StageInput
from dlis_market.inference.pipeline import LocalPipeline
from dlis_market.inference.sampling import SamplingParams
from dlis_market.inference.shard_export import export_shards
from dlis_market.inference.stage import SampledOutput
from dlis_market.node.driver import NOT_A_FAULT, JobSession, JobSpec, PipelineDriver, replay_inputs
from dlis_market.node.errors import RemoteError
from dlis_market.node.protocol import OpenBody, SamplingUnsupportedError, TokensBody, WireLogprob
from dlis_market.protocol.routes import RouteHop
from dlis_market.settings import NodeSettings
from dlis_market.types import WireModel
from tests.integration.node.node_helpers import make_tiny_llama

OLD_OPEN_FIELDS = {"session_id", "model", "start", "end", "max_length", "job_id", "reply_to", "next_peer", "greedy",
                   "temperature", "top_k", "top_p", "seed", "ticket"}  # fmt: skip


class OldTokensBody(WireModel):  # what a driver that predates logprobs parses
    sessions: list[str]
    step: int
    token_ids: list[int]


class Peer:
    """A worker's answers to ``open``/``close``, scripted (the driver under test is real)."""

    def __init__(self, open_answer: dict[str, Any] | Exception) -> None:
        self.open_answer = open_answer
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def request(self, peer: str, op: str, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        self.calls.append((op, body))
        if op == "open" and isinstance(self.open_answer, Exception):
            raise self.open_answer
        return self.open_answer if op == "open" else {}  # type: ignore[return-value]


class Pool:
    peer_id = "QmDriver"

    def __init__(self, peer: Peer) -> None:
        self.request = peer.request
        self.dead_peer_callbacks: list[Any] = []


def open_last(answer: dict[str, Any] | Exception, sampling: SamplingParams) -> tuple[Peer, Exception | None]:
    peer = Peer(answer)
    driver = PipelineDriver(None, Pool(peer), NodeSettings())  # type: ignore[arg-type]
    hop = RouteHop("QmLast", "0x" + "11" * 20, 4, 6, 1)
    driver._verified[hop.peer_id] = hop.node
    session = JobSession(driver, JobSpec("m", [1, 2], 3, sampling=sampling))
    session.session_id = "s-1"
    try:
        asyncio.run(session._open_on(hop, None))
    except Exception as exc:  # returned for the test to check
        return peer, exc
    return peer, None


def test_plain_sessions_send_only_the_fields_old_workers_know() -> None:
    body = OpenBody.build(
        SamplingParams(greedy=False, temperature=0.7, seed=3), True, session_id="s", model="m", start=0, end=2,
        max_length=9, job_id=b"\x01" * 32, reply_to="r", next_peer=None,
    ).wire()  # fmt: skip
    assert set(body) <= OLD_OPEN_FIELDS
    full = SamplingParams(presence_penalty=0.5, logit_bias=((7, -100.0),), logprobs=2)
    middle = OpenBody.build(full, False, session_id="s", model="m", start=0, end=2, max_length=9,
                            job_id=b"\x01" * 32, reply_to="r", next_peer="next").wire()  # fmt: skip
    assert set(middle) <= OLD_OPEN_FIELDS  # only the last stage samples: only it gets them
    last = OpenBody.build(full, True, session_id="s", model="m", start=0, end=2, max_length=9,
                          job_id=b"\x01" * 32, reply_to="r", next_peer=None)  # fmt: skip
    assert OpenBody.model_validate(last.wire()).sampling() == full
    # a tokens frame for sessions that asked for nothing parses as before
    assert OldTokensBody.model_validate({"sessions": ["s"], "step": 0, "token_ids": [4]})
    lp = WireLogprob(token=4, logprob=-0.5, top_tokens=[4, 9], top_logprobs=[-0.5, -2.0])
    parsed = TokensBody.model_validate({"sessions": ["s"], "step": 0, "token_ids": [4], "logprobs": [lp.model_dump()]})
    assert parsed.logprobs is not None and parsed.logprobs[0] is not None
    assert parsed.logprobs[0].native().top == ((4, -0.5), (9, -2.0))


def test_a_worker_whose_answer_names_no_feature_is_refused_and_its_session_closed() -> None:
    needs = SamplingParams(frequency_penalty=1.0, logprobs=0)
    peer, err = open_last({"session_id": "s-1"}, needs)  # a worker that predates the features
    assert isinstance(err, SamplingUnsupportedError) and err.code in NOT_A_FAULT and err.peer == "QmLast"
    assert "logprobs, penalties" in str(err)
    assert [op for op, _ in peer.calls] == ["open", "close"]
    peer, err = open_last({"session_id": "s-1", "sampling": ["penalties"]}, needs)
    assert isinstance(err, SamplingUnsupportedError) and "does not apply logprobs (it supports ['penalties'])" in str(
        err
    )
    _, err = open_last({"session_id": "s-1", "sampling": ["logit_bias", "logprobs", "penalties"]}, needs)
    assert err is None
    _, err = open_last({"session_id": "s-1"}, SamplingParams(seed=4, greedy=False))  # nothing new asked
    assert err is None


def test_a_worker_that_refuses_the_new_fields_is_routed_around_not_banned() -> None:
    refused = RemoteError("malformed OpenBody: Extra inputs are not permitted", "protocol", "QmLast")
    _, err = open_last(refused, SamplingParams(logit_bias=((3, 5.0),)))
    assert isinstance(err, SamplingUnsupportedError) and err.code in NOT_A_FAULT
    _, err = open_last(refused, SamplingParams())  # a plain job: the refusal is the worker's fault
    assert err is refused


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> LocalPipeline:
    root: Path = tmp_path_factory.mktemp("penalty-replay")
    make_tiny_llama(root / "model", layers=4, seed=3)
    export_shards(root / "model", root / "shards", stages=2, dtype="fp32", name="tiny")
    return LocalPipeline.load(root / "shards")


def run(pipe: LocalPipeline, steps: list[StageInput], sid: str) -> list[int]:
    out = []
    for inp in steps:
        res = pipe.step(StageInput((sid,), inp.positions, inp.step, token_ids=inp.token_ids))
        assert isinstance(res, SampledOutput) and res.token_ids is not None
        out.append(int(res.token_ids[0]))
    return out


def test_failover_replay_rebuilds_the_penalties_history(pipe: LocalPipeline) -> None:
    prompt, new = [4, 8, 15, 16, 23], 14
    params = SamplingParams(greedy=False, temperature=0.8, seed=9, frequency_penalty=1.0, presence_penalty=-0.5)

    def generate(sid: str, resume_at: int | None, params: SamplingParams = params) -> list[int]:
        for stage in pipe.stages:
            stage.open_session(sid, len(prompt) + new, params)
        tokens = run(pipe, [StageInput((sid,), (0,), 0, token_ids=torch.tensor([prompt]))], sid)
        while len(tokens) < new:
            if resume_at is not None and len(tokens) == resume_at:  # the route changed: fresh sessions
                for stage in pipe.stages:
                    stage.close_session(sid)
                    stage.open_session(sid, len(prompt) + new, params)
                run(pipe, replay_inputs(sid, prompt, tokens, 0), sid)  # outputs known, ignored
            pos = len(prompt) + len(tokens) - 1
            tokens += run(pipe, [StageInput((sid,), (pos,), 0, token_ids=torch.tensor([[tokens[-1]]]))], sid)
        for stage in pipe.stages:
            stage.close_session(sid)
        return tokens

    straight = generate(secrets.token_hex(4), None)
    assert generate(secrets.token_hex(4), 6) == straight
    assert generate(secrets.token_hex(4), None, SamplingParams(greedy=False, temperature=0.8, seed=9)) != straight
