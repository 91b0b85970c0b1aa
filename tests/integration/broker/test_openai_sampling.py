"""Sampling parameters reach a real sampler: the official client against the broker whose workers
run the real SmolLM2 stages in this process (the stages' own ``sample_next``, seeded per job)."""

from __future__ import annotations

import asyncio

import pytest

from dlis_market.inference.pipeline import LocalPipeline
from dlis_market.inference.sampling import SamplingParams
from tests.chaos.test_broker_retries import signed_route
from tests.integration.broker import conftest as broker_suite
from tests.integration.broker.test_openai_params import MODEL, serve, user


class ModelBackend(broker_suite.ScriptedBackend):
    """Workers that run the real model (all stages in this process) with the job's sampling."""

    def __init__(self, base: broker_suite.ScriptedBackend, pipeline: LocalPipeline):
        super().__init__(base.nodes, base.domain, [])
        self.pipeline = pipeline
        self.lock = asyncio.Lock()  # one generation at a time: the stages' session stores are not shared

    async def start(self, job):
        self.jobs.append(job)
        params = SamplingParams(greedy=job.greedy, temperature=job.temperature, top_k=job.top_k, top_p=job.top_p,
                                seed=job.seed)  # fmt: skip
        async with self.lock:
            gen = await asyncio.to_thread(
                self.pipeline.generate_ids, [job.prompt_ids], job.max_new_tokens, params, job.stop_token_ids
            )
        tokens, backend = gen[0].token_ids, self

        class Stream:
            async def _gen(self):
                for t in tokens:
                    yield t

            def tokens(self):
                return self._gen()

            async def finish(self):
                return signed_route(backend, job, len(job.prompt_ids) + len(tokens))

        return Stream()


@pytest.fixture(scope="module")
def pipeline(smollm2_shards) -> LocalPipeline:
    return LocalPipeline.load(smollm2_shards)


@pytest.fixture()
def api(broker_env, live_server, pipeline):
    return serve(broker_env, live_server, lambda base: ModelBackend(base, pipeline))


def test_seed_reproduces_and_n_is_seed_plus_i(api):
    ask = {"model": MODEL, "messages": user("Name a colour."), "max_tokens": 5, "temperature": 1.0}
    first = api.client.chat.completions.create(**ask, seed=1234).choices[0].message.content
    assert api.client.chat.completions.create(**ask, seed=1234).choices[0].message.content == first
    three = api.client.chat.completions.create(**ask, seed=1234, n=3).choices
    assert three[0].message.content == first  # choice i is the job seeded seed + i
    assert three[2].message.content == api.client.chat.completions.create(**ask, seed=1236).choices[0].message.content
    seeds = [j.seed for j in api.backend.jobs]
    assert seeds == [1234, 1234, 1234, 1235, 1236, 1236]


def test_temperature_zero_is_the_models_greedy_answer(api, pipeline):
    res = api.client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0)
    ids = api.tok("The capital of France is")["input_ids"]
    greedy = pipeline.generate_ids([ids], 6)[0].token_ids
    assert res.choices[0].text == api.tok.decode(greedy, skip_special_tokens=True)
    stopped = api.client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0, stop=[res.choices[0].text[3:7]]
    )
    assert stopped.choices[0].text == res.choices[0].text[:3] and stopped.choices[0].finish_reason == "stop"
