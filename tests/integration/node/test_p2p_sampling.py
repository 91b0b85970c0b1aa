"""Penalties, logit bias and log probabilities through three worker processes: the same tokens and
log probabilities as the same stages in this process, and a teacher-forced replay of the last
stage (what a spot check runs) samples the same tokens with the job's penalties."""

from __future__ import annotations

import asyncio
import secrets

import pytest
from node_helpers import MODEL, TinySwarm, driver_settings, wait_for_spans  # type: ignore[import-not-found]

from dlis_market.inference.pipeline import LocalPipeline
from dlis_market.inference.sampling import SamplingParams
from dlis_market.node.driver import JobSpec, PipelineDriver
from dlis_market.node.replay import Layout, checked, fetch_transcript, replay, token_rows
from tests.integration.broker.test_openai_sampling import run_stages  # the stages stepped in one process

PROMPT = [5, 9, 2, 7, 5]
NEW = 10


def test_penalties_bias_and_logprobs_through_three_workers_equal_one_process(tiny_swarm: TinySwarm) -> None:
    pipeline = LocalPipeline.load(tiny_swarm.shards)
    plain = [t.token for t in run_stages(pipeline, PROMPT, NEW, SamplingParams())]
    banned = plain[0]
    params = SamplingParams(
        frequency_penalty=1.5, presence_penalty=0.5, logit_bias=((banned, -100.0), (3, 2.0)), logprobs=3
    )
    sampled = SamplingParams(greedy=False, temperature=0.9, seed=11, frequency_penalty=0.8, logprobs=0)
    expected = run_stages(pipeline, PROMPT, NEW, params)
    expected_sampled = run_stages(pipeline, PROMPT, NEW, sampled)
    got = [t.token for t in expected]
    bias_only = [
        t.token
        for t in run_stages(
            pipeline, PROMPT, NEW, params.model_copy(update={"frequency_penalty": 0.0, "presence_penalty": 0.0})
        )
    ]
    assert banned not in got and banned not in bias_only and got != plain  # the bias bans the greedy token
    # the penalties keep the greedy answer from repeating itself where the bias alone repeats
    assert len(set(bias_only)) < NEW and len(set(got)) == NEW

    async def run() -> None:
        driver = await PipelineDriver.create(tiny_swarm.swarm.initial_peers, driver_settings())
        try:
            await wait_for_spans(driver, MODEL, 4)
            session = await driver.open_job(JobSpec(MODEL, PROMPT, NEW, sampling=params))
            tokens = [t async for t in session.tokens()]
            route = list(session.route)
            receipts = {r.signed.receipt.start: r for r in await session.close()}
            assert tokens == got
            assert [lp.token for lp in session.logprobs] == got
            for mine, ref in zip(session.logprobs, expected, strict=True):  # the raw distribution's
                assert mine.logprob == pytest.approx(ref.logprob, abs=1e-5)
                assert [t for t, _ in mine.top] == [t for t, _ in ref.top] and len(mine.top) == 3
                assert [v for _, v in mine.top] == pytest.approx([v for _, v in ref.top], abs=1e-5)
            seeded = await driver.open_job(JobSpec(MODEL, PROMPT, NEW, sampling=sampled))
            assert [t async for t in seeded.tokens()] == [t.token for t in expected_sampled]
            assert [lp.top for lp in seeded.logprobs] == [()] * NEW
            await seeded.close()

            # A spot check's replay of the last stage: its transcript (hidden states from the stage
            # before, checked against that stage's receipt) fed again to the last stage's worker in a
            # fresh session with the job's sampling samples the same tokens; without the penalties
            # and bias it would not.
            last, before = route[-1], route[-2]
            transcript = await fetch_transcript(driver, last.peer_id, session.session_id)
            layout = Layout.of_session(len(PROMPT), NEW, "float32", 32)
            rows = checked(transcript, receipts[before.start].signed.receipt.output_hash, layout, "last stage input")
            args = (MODEL, secrets.token_bytes(32), rows.inputs, len(PROMPT) + NEW)
            again, _ = await replay(driver, last, *args, params, True)
            assert again.rows == token_rows(got)
            unpenalised, _ = await replay(driver, last, *args, SamplingParams(), True)
            assert unpenalised.rows != token_rows(got)
        finally:
            await driver.close()

    asyncio.run(run())
