"""Sampling parameters reach a real sampler: the official client against the broker whose workers
run the real SmolLM2 stages in this process (the last stage's own sampler, seeded per job), in
fp32, compared with Hugging Face's model of the same weights in one process and the same sampler
functions (``inference.sampling``) applied to its logits."""

from __future__ import annotations

import asyncio
import secrets

import pytest
import torch
from transformers import AutoModelForCausalLM

from dlis_market.inference.importer import import_model
from dlis_market.inference.messages import StageInput
from dlis_market.inference.pipeline import LocalPipeline
from dlis_market.inference.sampling import SamplingParams, TokenLogprob, sample_next
from dlis_market.inference.shard_export import export_shards
from dlis_market.inference.stage import SampledOutput
from tests.chaos.test_broker_retries import signed_route
from tests.integration.broker import conftest as broker_suite
from tests.integration.broker.test_openai_params import MODEL, serve, user
from tests.integration.conftest import CACHE


def run_stages(
    pipeline: LocalPipeline, prompt: list[int], new: int, params: SamplingParams, stops: tuple[int, ...] = ()
) -> list[TokenLogprob]:
    """Every stage in this process, one step at a time, as workers run them: each sampled token
    (with its log probabilities when ``params.logprobs`` asks for them)."""
    sid = f"local-{secrets.token_hex(4)}"
    for stage in pipeline.stages:
        stage.open_session(sid, len(prompt) + new, params)
    out: list[TokenLogprob] = []
    try:
        inp = StageInput((sid,), (0,), 0, token_ids=torch.tensor([prompt]))
        for step in range(new):
            res = pipeline.step(inp)
            assert isinstance(res, SampledOutput) and res.token_ids is not None
            token = int(res.token_ids[0])
            out.append(res.logprobs[0] if res.logprobs else TokenLogprob(token, 0.0))  # type: ignore[arg-type]
            if token in stops:
                break
            inp = StageInput((sid,), (len(prompt) + step,), step + 1, token_ids=torch.tensor([[token]]))
    finally:
        for stage in pipeline.stages:
            stage.close_session(sid)
    return out


def hf_reference(
    model, prompt: list[int], new: int, params: SamplingParams, stops: tuple[int, ...] = ()
) -> tuple[list[int], list[torch.Tensor]]:
    """The same sampler on Hugging Face's logits of the whole model in one process: the token ids
    and, per token, the log-softmax of the raw logits."""
    ids, history, logps = list(prompt), [], []
    gen = params.generator()
    with torch.no_grad():
        for _ in range(new):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            token = sample_next(logits, params, None if params.greedy else gen, history)
            history.append(token)
            logps.append(torch.log_softmax(logits, -1))
            ids.append(token)
            if token in stops:
                break
    return history, logps


class ModelBackend(broker_suite.ScriptedBackend):
    """Workers that run the real model (all stages in this process) with the job's sampling."""

    def __init__(self, base: broker_suite.ScriptedBackend, pipeline: LocalPipeline):
        super().__init__(base.nodes, base.domain, [])
        self.pipeline = pipeline
        self.lock = asyncio.Lock()  # one generation at a time: the stages' session stores are not shared

    async def start(self, job):
        self.jobs.append(job)
        async with self.lock:
            sampled = await asyncio.to_thread(
                run_stages, self.pipeline, job.prompt_ids, job.max_new_tokens, job.sampling, job.stop_token_ids
            )
        tokens, backend = [t.token for t in sampled], self
        wants = job.logprobs is not None

        class Stream:
            async def _gen(self):
                for t in sampled:
                    yield t if wants else t.token

            def tokens(self):
                return self._gen()

            async def finish(self):
                return signed_route(backend, job, len(job.prompt_ids) + len(tokens))

        return Stream()


@pytest.fixture(scope="module")
def model_dir():
    return import_model("smollm2-135m", CACHE / "models", CACHE / "cache")


@pytest.fixture(scope="module")
def pipeline(model_dir, tmp_path_factory) -> LocalPipeline:
    out = tmp_path_factory.mktemp("smollm2-fp32") / "shards"
    export_shards(model_dir, out, stages=3, dtype="fp32", name=MODEL)
    return LocalPipeline.load(out)


@pytest.fixture(scope="module")
def hf(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


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


def chat_ids(api, text: str) -> list[int]:
    return api.service.catalog.get(MODEL).encode_prompt(None, [{"role": "user", "content": text}])


REPEAT = "Write the word blue five times."


def test_penalties_equal_the_sampler_on_the_models_logits_stream_and_not(api, hf):
    eos = api.service.catalog.get(MODEL).eos_token_ids
    ids = chat_ids(api, REPEAT)
    greedy, _ = hf_reference(hf, ids, 12, SamplingParams(), eos)
    penalised = SamplingParams(presence_penalty=0.6, frequency_penalty=1.2)
    want, _ = hf_reference(hf, ids, 12, penalised, eos)
    assert want != greedy  # the penalties change the answer
    ask = {"model": MODEL, "messages": user(REPEAT), "max_tokens": 12, "temperature": 0, "presence_penalty": 0.6,
           "frequency_penalty": 1.2}  # fmt: skip
    res = api.client.chat.completions.create(**ask)
    assert res.choices[0].message.content == api.tok.decode(want, skip_special_tokens=True)
    chunks = list(api.client.chat.completions.create(**ask, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == res.choices[0].message.content
    # sampled, seeded: the same generator draws on the same penalised distribution
    sampled = SamplingParams(greedy=False, temperature=0.9, seed=5, presence_penalty=-1.0, frequency_penalty=0.5)
    want, _ = hf_reference(hf, ids, 10, sampled, eos)
    res = api.client.chat.completions.create(**{**ask, "max_tokens": 10, "temperature": 0.9, "seed": 5,
                                                "presence_penalty": -1.0, "frequency_penalty": 0.5})  # fmt: skip
    assert res.choices[0].message.content == api.tok.decode(want, skip_special_tokens=True)


def test_logit_bias_bans_the_greedy_token_stream_and_not(api, hf):
    prompt = "The capital of France is"
    ids = api.tok(prompt)["input_ids"]
    greedy, logps = hf_reference(hf, ids, 4, SamplingParams())
    banned = SamplingParams(logit_bias=((greedy[0], -100.0),))
    want, _ = hf_reference(hf, ids, 4, banned)
    second = int(torch.topk(logps[0], 2).indices[1])
    assert want[0] == second != greedy[0]  # the next best token takes its place
    ask = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0, "logit_bias": {str(greedy[0]): -100}}
    res = api.client.completions.create(**ask)
    assert res.choices[0].text == api.tok.decode(want, skip_special_tokens=True)
    chunks = list(api.client.completions.create(**ask, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == res.choices[0].text
    forced = api.client.completions.create(**{**ask, "logit_bias": {str(second): 100}, "max_tokens": 2})
    assert forced.choices[0].text == api.tok.decode([second, second])  # +100 forces it every step


def test_chat_logprobs_are_the_models_log_softmax_stream_and_not(api, hf):
    eos = api.service.catalog.get(MODEL).eos_token_ids
    ids = chat_ids(api, "Name a colour.")
    want, logps = hf_reference(hf, ids, 6, SamplingParams(), eos)
    ask = {"model": MODEL, "messages": user("Name a colour."), "max_tokens": 6, "temperature": 0, "logprobs": True,
           "top_logprobs": 5}  # fmt: skip
    res = api.client.chat.completions.create(**ask)
    content = res.choices[0].logprobs.content
    assert len(content) == len(want)
    for entry, token, logp in zip(content, want, logps, strict=True):
        assert entry.token == api.tok.decode([token]) and bytes(entry.bytes).decode() == entry.token
        assert entry.logprob == pytest.approx(float(logp[token]), abs=1e-4)
        best = torch.topk(logp, 5)
        assert [t.token for t in entry.top_logprobs] == [api.tok.decode([int(i)]) for i in best.indices]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True) and entry.top_logprobs[0].logprob == entry.logprob  # greedy
    chunks = list(api.client.chat.completions.create(**ask, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, pytest.approx(e.logprob, abs=1e-6)) for e in content]


def test_completion_logprobs_are_raw_even_with_penalties_stream_and_not(api, hf):
    """The log probabilities are of the model's raw distribution (before bias, penalties and
    temperature, as vLLM's default), while the token is chosen from the adjusted one."""
    prompt = "Blue, blue, blue,"
    ids = api.tok(prompt)["input_ids"]
    first = hf_reference(hf, ids, 1, SamplingParams())[0][0]
    params = SamplingParams(frequency_penalty=2.0, logit_bias=((first, -100.0),))
    want, logps = hf_reference(hf, ids, 5, params)
    ask = {"model": MODEL, "prompt": prompt, "max_tokens": 5, "temperature": 0, "frequency_penalty": 2.0,
           "logit_bias": {str(first): -100}, "logprobs": 3}  # fmt: skip
    res = api.client.completions.create(**ask)
    lp = res.choices[0].logprobs
    assert lp.tokens == [api.tok.decode([t]) for t in want] and "".join(lp.tokens) == res.choices[0].text
    assert lp.token_logprobs == pytest.approx([float(logps[i][t]) for i, t in enumerate(want)], abs=1e-4)
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(want))]
    for top, logp, token in zip(lp.top_logprobs, logps, want, strict=True):
        best = torch.topk(logp, 3)
        expected = {api.tok.decode([int(i)]): float(v) for i, v in zip(best.indices, best.values, strict=True)}
        expected.setdefault(api.tok.decode([token]), float(logp[token]))  # the sampled one, as vLLM adds it
        assert top == pytest.approx(expected, abs=1e-4)
    # the first token is not the model's best (banned), yet its log probability is the raw one
    assert want[0] != int(torch.argmax(logps[0])) == first and lp.token_logprobs[0] > -30
    chunks = list(api.client.completions.create(**ask, stream=True))
    parts = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == lp.tokens
    assert [v for p in parts for v in p.token_logprobs] == pytest.approx(lp.token_logprobs, abs=1e-6)
