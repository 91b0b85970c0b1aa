"""Fingerprints on real stages (a tiny random Llama, fp32 and bf16): what a worker commits while
it decodes validates against one prefill, and what a cheater commits does not."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from dlis_market.inference.fingerprint_check import FingerprintRecorder, check_call, prefill
from dlis_market.inference.messages import StageInput
from dlis_market.inference.sampling import SamplingParams
from dlis_market.inference.shard_export import export_shards
from dlis_market.inference.stage import Stage
from dlis_market.protocol.errors import FingerprintFormatError, FingerprintShapeError
from dlis_market.protocol.fingerprint_thresholds import THRESHOLDS
from dlis_market.protocol.fingerprints import commits_to, fingerprint_from_steps
from dlis_market.types import LayerRange
from tests.integration.node.node_helpers import make_tiny_llama

PROMPTS = [[5, 17, 33, 2, 61, 8], [40, 3, 3, 90, 12, 7]]
NEW = 30  # 6 + 29 = 35 positions: a full chunk of 32 and a partial one


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """A 32-wide model gains nothing from threads; on a busy 2-core machine OpenMP's spinning
    threads made each step 30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    root = tmp_path_factory.mktemp("fingerprint-shards")
    model = make_tiny_llama(root / "model", layers=4, seed=11)
    made: dict[str, Path] = {}

    def get(dtype: str) -> Path:
        if dtype not in made:
            ranges = [LayerRange(start=0, end=2), LayerRange(start=2, end=4)]
            export_shards(model, root / dtype, ranges=ranges, dtype=dtype, name="tiny-llama")  # type: ignore[arg-type]
            made[dtype] = root / dtype
        return made[dtype]

    return get


def load(shard_dir: Path) -> list[Stage]:
    return [Stage.load(shard_dir, index=i) for i in range(2)]


@dataclass
class Job:
    """Per session: what each stage ran (one row block per step), emitted and committed."""

    tokens: list[int] = field(default_factory=list)
    inputs: list[list[torch.Tensor]] = field(default_factory=lambda: [[], []])
    emitted: list[list[torch.Tensor]] = field(default_factory=lambda: [[], []])
    fingerprints: list[bytes] = field(default_factory=list)

    def stage_inputs(self, k: int) -> torch.Tensor:
        return torch.cat(self.inputs[k])


def decode(stages: list[Stage], prompts: list[list[int]], sampling: SamplingParams | None = None) -> list[Job]:
    """Decode the prompts as one batch, one step at a time, recording fingerprints as a worker would."""
    recorders = [FingerprintRecorder(st) for st in stages]
    sids = tuple(f"s-{uuid.uuid4().hex[:8]}" for _ in prompts)
    jobs = [Job() for _ in prompts]
    for st in stages:
        for sid, p in zip(sids, prompts, strict=True):
            st.open_session(sid, len(p) + NEW, sampling)
    ids, pos = torch.tensor(prompts), [0] * len(prompts)
    for step in range(NEW):
        inp = StageInput(sids, tuple(pos), step, token_ids=ids)
        for k, st in enumerate(stages):
            data = inp.token_ids if st.is_first else inp.hidden
            assert data is not None
            out = st.forward(inp)
            recorders[k].observe(inp)
            for i, job in enumerate(jobs):
                job.inputs[k].append(data[i])
                if out.hidden is not None:
                    job.emitted[k].append(out.hidden[i])
            if out.hidden is not None:
                inp = StageInput(sids, tuple(pos), step, hidden=out.hidden)
        assert out.token_ids is not None
        for i, job in enumerate(jobs):
            job.tokens.append(int(out.token_ids[i]))
            pos[i] += ids.shape[1]
        ids = out.token_ids.reshape(-1, 1)
    for job, sid in zip(jobs, sids, strict=True):
        job.fingerprints = [r.finish(sid) for r in recorders]
    for r in recorders:
        r.close()
    for st in stages:
        for sid in sids:
            st.close_session(sid)
    return jobs


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_honest_decode_validates_against_one_prefill(shards: Callable[[str], Path], dtype: str) -> None:
    jobs = decode(load(shards(dtype)), PROMPTS)  # two sessions batched in every forward
    checker = load(shards(dtype))
    for job in jobs:
        # the recorder committed exactly the rows the first stage sent
        assert job.fingerprints[0] == fingerprint_from_steps(job.emitted[0])
        first = check_call(checker[0], job.stage_inputs(0), job.fingerprints[0], THRESHOLDS[dtype])
        last = check_call(checker[1], job.stage_inputs(1), job.fingerprints[1], THRESHOLDS[dtype], job.tokens)
        assert first.accepted and last.accepted, (first.reason, last.reason)
        assert last.tokens_checked == NEW and last.token_flips == 0
        assert len(first.fingerprint.chunks) == 2


def test_sampled_tokens_are_rederived_from_the_prefill(shards: Callable[[str], Path]) -> None:
    sampling = SamplingParams(greedy=False, temperature=0.9, top_p=0.9, seed=7)
    [job] = decode(load(shards("fp32")), PROMPTS[:1], sampling)
    checker = load(shards("fp32"))
    ok = check_call(checker[1], job.stage_inputs(1), job.fingerprints[1], THRESHOLDS["fp32"], job.tokens, sampling)
    assert ok.accepted and ok.token_flips == 0
    shifted = [(t + 1) % 96 for t in job.tokens]  # node/byzantine.py at the last stage
    bad = check_call(checker[1], job.stage_inputs(1), job.fingerprints[1], THRESHOLDS["fp32"], shifted, sampling)
    assert not bad.accepted and bad.fingerprint.accepted and bad.token_flips == NEW
    assert bad.implausible_tokens > bad.allowed_flips and "implausible" in bad.reason


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_noise_on_one_token_in_a_chunk_is_rejected(shards: Callable[[str], Path], dtype: str) -> None:
    [job] = decode(load(shards(dtype)), PROMPTS[:1])
    steps = [s.clone() for s in job.emitted[0]]
    row = steps[10][0].float()  # decode step 10: position 15, in the first chunk
    noise = torch.randn(row.shape, generator=torch.Generator().manual_seed(4))
    steps[10][0] = (row + 0.5 * row.pow(2).mean().sqrt() * noise).to(steps[10].dtype)  # byzantine.py's noise
    checker = load(shards(dtype))
    verdict = check_call(checker[0], job.stage_inputs(0), fingerprint_from_steps(steps), THRESHOLDS[dtype])
    assert not verdict.accepted
    assert [f.split(":")[0] for f in verdict.fingerprint.failures] == ["chunk 0"]
    assert verdict.fingerprint.chunks[0].worst_token == 15


def test_committing_to_honest_states_while_sending_others_is_caught(shards: Callable[[str], Path]) -> None:
    [job] = decode(load(shards("bf16")), PROMPTS[:1])
    assert commits_to(job.fingerprints[0], job.emitted[0])
    sent = [s.clone() for s in job.emitted[0]]
    sent[3] = sent[3] * 1.5  # what the next stage got is not what the fingerprint commits to
    assert not commits_to(job.fingerprints[0], sent)
    with pytest.raises(FingerprintFormatError):
        commits_to(job.fingerprints[0][:-1], sent)


def test_fingerprint_of_another_input_is_rejected(shards: Callable[[str], Path]) -> None:
    a, b = decode(load(shards("bf16")), PROMPTS)
    checker = load(shards("bf16"))
    for k in (0, 1):
        verdict = check_call(checker[k], b.stage_inputs(k), a.fingerprints[k], THRESHOLDS["bf16"])
        assert not verdict.accepted and "exponent mismatches" in verdict.reason


def test_malformed_or_truncated_fingerprint_is_refused(shards: Callable[[str], Path]) -> None:
    [job] = decode(load(shards("fp32")), PROMPTS[:1])
    checker = load(shards("fp32"))
    fp = job.fingerprints[0]
    for bad in (fp[:-3], fp[:10], fp + b"\x00\x00", b"not a fingerprint"):
        with pytest.raises(FingerprintFormatError):
            check_call(checker[0], job.stage_inputs(0), bad, THRESHOLDS["fp32"])
    with pytest.raises(FingerprintShapeError, match="35 tokens"):  # the call was longer than that
        check_call(checker[0], job.stage_inputs(0)[:-1], fp, THRESHOLDS["fp32"])


def test_prefill_matches_the_decoded_states(shards: Callable[[str], Path]) -> None:
    [job] = decode(load(shards("fp32")), PROMPTS[:1])
    checker = load(shards("fp32"))
    hidden = prefill(checker[0], job.stage_inputs(0)).hidden
    emitted = torch.cat(job.emitted[0]).float()
    assert hidden.shape == emitted.shape == (35, 32)
    torch.testing.assert_close(hidden, emitted, rtol=1e-4, atol=1e-5)
    with pytest.raises(FingerprintShapeError, match=r"hidden states \[T, 32\]"):
        prefill(checker[1], job.stage_inputs(0))  # token ids given to a later stage
