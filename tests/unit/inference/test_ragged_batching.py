"""Continuous batching: sessions at different positions share one forward pass per stage step.

A stage left-pads the stacked KV caches to the longest, masks the padding out, gives each row its
own position ids and writes each row's real slots back to its own session. Every session must
come out as if it had run alone: fp32 greedy tokens identical and logits within 1e-5, bf16 far
inside the project's bf16 tolerance (``protocol.outputs.TOLERANCES``), with sessions joining
and leaving between steps. Stages with sliding-window layers (Gemma3) keep one pass per position.

On SmolLM2's layer shape (1536-wide MLP) batching *at one position*, as stages did before, already
moves fp32 logits by up to 1.05e-5 from a session alone (GEMM blocking depends on the batch size;
measured); there the bound is the project's fp32 summation-order bound instead
(``reference.fp32_logit_tolerance``, 7e-5 for this model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from dlis_market.inference.errors import SessionError
from dlis_market.inference.kv_cache import (
    RowStableLinear,
    lone_row_agrees,
    padding_mask,
    ragged_sdpa_attention,
    stabilise_rows,
    stack_caches,
)
from dlis_market.inference.manifest import ShardDtype
from dlis_market.inference.messages import StageInput
from dlis_market.inference.pipeline import Generation, LocalPipeline
from dlis_market.inference.shard_export import export_shards
from dlis_market.inference.stage import Stage
from dlis_market.protocol.outputs import TOLERANCES
from dlis_market.settings import InferenceSettings
from dlis_market.types import LayerRange

from .reference import fp32_logit_tolerance, hf_generate, load_reference

NEW_TOKENS = 6
FP32_LOGIT_TOL = 1e-5
# Four lengths: after prefill no two sessions share a position, so every decode step is ragged.
PROMPTS = [[5, 17, 3, 44, 9, 28, 60], [71, 2, 33], [12, 40, 7, 8, 19], [3]]


def smollm2_style_config() -> LlamaConfig:
    """SmolLM2-135M's layer shape (hidden 576, 9 query / 3 KV heads of 64, rope 1e5), 2 layers."""
    return LlamaConfig(
        vocab_size=128,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=2,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=64,
        rope_parameters={"rope_theta": 100000.0, "rope_type": "default"},
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )


@pytest.fixture(scope="module")
def smollm2_style_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(4321)
    model = AutoModelForCausalLM.from_config(smollm2_style_config())
    with torch.no_grad():  # larger weights than the default init, so tokens vary
        for param in model.parameters():
            if param.ndim >= 2:
                param.normal_(0.0, 0.06)
    path = tmp_path_factory.mktemp("smollm2-style")
    model.save_pretrained(path)
    return path


@pytest.fixture
def model_dir(request: pytest.FixtureRequest, tiny_model_dir: Callable[[str], Path]) -> Path:
    if request.param == "smollm2_style":
        return Path(request.getfixturevalue("smollm2_style_dir"))
    return tiny_model_dir(request.param)


def load(model_dir: Path, out: Path, dtype: ShardDtype = "fp32", stages: int = 2) -> LocalPipeline:
    export_shards(model_dir, out, stages=stages, dtype=dtype)
    return LocalPipeline.load(out)


@dataclass
class PassCounter:
    """Counts forward passes per stage (a spy: every call goes through to the real method)."""

    passes: list[list[int]] = field(default_factory=list)  # per stage: batch size of each pass

    def attach(self, stages: list[Stage], monkeypatch: pytest.MonkeyPatch) -> PassCounter:
        for stage in stages:
            seen: list[int] = []
            self.passes.append(seen)
            real = stage._run_group

            def spy(data: torch.Tensor, *args: Any, _real: Any = real, _seen: list[int] = seen) -> torch.Tensor:
                _seen.append(data.shape[0])
                return _real(data, *args)

            monkeypatch.setattr(stage, "_run_group", spy)
        return self

    def reset(self) -> None:
        for seen in self.passes:
            seen.clear()


def alone(pipe: LocalPipeline, prompt: list[int], new_tokens: int) -> Generation:
    return pipe.generate_ids([prompt], new_tokens, want_logits=True)[0]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def rel_l2(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Worst step's relative L2 error, the measure of ``protocol.outputs.compare_outputs``."""
    return max(float((x - y).norm() / max(x.norm(), y.norm(), 1e-6)) for x, y in zip(a, b, strict=True))


def logit_tolerance(pipe: LocalPipeline, reference: list[Generation]) -> float:
    if int(pipe.config.hidden_size) <= 64:  # the tiny test models
        return FP32_LOGIT_TOL
    return fp32_logit_tolerance(pipe.config, [t for g in reference for t in g.logits])


@pytest.mark.parametrize("model_dir", ["llama", "gpt2", "smollm2_style"], indirect=True)
def test_decode_at_different_positions_is_one_pass_and_exact(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = load(model_dir, tmp_path / "shards")
    assert all(stage.mixes_positions for stage in pipe.stages)
    reference = [alone(pipe, p, NEW_TOKENS) for p in PROMPTS]

    counter = PassCounter().attach(pipe.stages, monkeypatch)
    gens = pipe.generate_ids(PROMPTS, NEW_TOKENS, want_logits=True)

    # Prefill: one pass per prompt length (4); decode: ONE pass of all 4 sessions per step.
    for seen in counter.passes:
        assert seen == [1, 1, 1, 1] + [len(PROMPTS)] * (NEW_TOKENS - 1)
    assert len({len(g.token_ids) for g in reference}) == 1 and len({tuple(g.token_ids) for g in reference}) > 1
    tolerance = logit_tolerance(pipe, reference)
    for i, (gen, ref) in enumerate(zip(gens, reference, strict=True)):
        assert gen.token_ids == ref.token_ids, f"session {i}: greedy tokens differ from the session alone"
        diff = max_diff(gen.logits, ref.logits)
        assert diff <= tolerance, f"session {i}: logits differ by {diff} > {tolerance} from the session alone"


@dataclass
class Plan:
    prompt: list[int]
    joins: int  # tick at which the session opens and prefills
    new_tokens: int
    sid: str = ""
    tokens: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)


def drive(pipe: LocalPipeline, plans: list[Plan], counter: PassCounter) -> Iterator[int]:
    """Tick by tick: new sessions open and prefill, then ONE decode step for every running session.

    Finished sessions close (leave) at once. Yields the number of sessions in each decode pass.
    """
    running: list[Plan] = []
    tick = 0
    while any(not p.tokens or len(p.tokens) < p.new_tokens for p in plans):
        for p in plans:
            if p.joins == tick:
                p.sid = f"s{plans.index(p)}"
                for stage in pipe.stages:
                    stage.open_session(p.sid, len(p.prompt) + p.new_tokens)
                out = pipe.step(StageInput((p.sid,), (0,), 0, torch.tensor([p.prompt]), None, True))
                assert out.token_ids is not None and out.logits is not None
                p.tokens.append(int(out.token_ids[0]))
                p.logits.append(out.logits[0].clone())
                running.append(p)
        decoding = [p for p in running if p.joins < tick]
        if decoding:
            counter.reset()
            ids = torch.tensor([[p.tokens[-1]] for p in decoding])
            positions = tuple(len(p.prompt) + len(p.tokens) - 1 for p in decoding)
            out = pipe.step(StageInput(tuple(p.sid for p in decoding), positions, tick, ids, None, True))
            assert out.token_ids is not None and out.logits is not None
            for i, p in enumerate(decoding):
                p.tokens.append(int(out.token_ids[i]))
                p.logits.append(out.logits[i].clone())
            assert all(seen == [len(decoding)] for seen in counter.passes), counter.passes
            yield len(set(positions))
        for p in [p for p in running if len(p.tokens) == p.new_tokens]:
            running.remove(p)
            assert all(stage.close_session(p.sid) for stage in pipe.stages)
        tick += 1


def test_sessions_join_and_leave_between_steps(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = load(tiny_model_dir("llama"), tmp_path / "shards", stages=3)
    plans = [
        Plan(PROMPTS[0], joins=0, new_tokens=5),  # leaves at tick 4
        Plan(PROMPTS[1], joins=1, new_tokens=8),
        Plan(PROMPTS[0], joins=2, new_tokens=4),  # same prompt as session 0, three positions behind
        Plan(PROMPTS[3], joins=5, new_tokens=6),  # joins after session 0 left
    ]
    counter = PassCounter().attach(pipe.stages, monkeypatch)
    distinct_positions = list(drive(pipe, plans, counter))
    assert max(distinct_positions) >= 3  # passes really mixed positions
    assert len(pipe.stages[0].sessions) == 0  # every session left and closed its cache
    monkeypatch.undo()
    for i, p in enumerate(plans):
        ref = alone(pipe, p.prompt, p.new_tokens)
        assert p.tokens == ref.token_ids, f"session {i}: greedy tokens differ from the session alone"
        diff = max_diff(p.logits, ref.logits)
        assert diff <= FP32_LOGIT_TOL, f"session {i}: logits differ by {diff} from the session alone"


def test_multi_token_steps_at_different_positions(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunked prefills (3 tokens per step) at positions 3 and 0, then 6 and 3, in one pass each."""
    pipe = load(tiny_model_dir("llama"), tmp_path / "shards")
    a, b = [5, 17, 3, 44, 9, 28, 60, 2, 11], [71, 2, 33, 8, 19, 90]

    def chunked(schedule: list[list[tuple[str, list[int], int]]]) -> dict[str, torch.Tensor]:
        """Run (session, chunk, position) steps; each inner list is one StageInput."""
        last: dict[str, torch.Tensor] = {}
        for step in schedule:
            out = pipe.step(
                StageInput(
                    tuple(s for s, _, _ in step),
                    tuple(pos for _, _, pos in step),
                    0,
                    torch.tensor([chunk for _, chunk, _ in step]),
                    None,
                    True,
                )
            )
            assert out.logits is not None
            for i, (sid, _, _) in enumerate(step):
                last[sid] = out.logits[i].clone()
        return last

    def open_all(sids: list[str]) -> None:
        for stage in pipe.stages:
            for sid in sids:
                stage.open_session(sid, 16)

    open_all(["a1", "b1", "a2", "b2"])
    # alone: each session's chunks in their own steps
    ref = chunked([[("a1", a[0:3], 0)], [("a1", a[3:6], 3)], [("a1", a[6:9], 6)]])
    ref |= chunked([[("b1", b[0:3], 0)], [("b1", b[3:6], 3)]])
    counter = PassCounter().attach(pipe.stages, monkeypatch)
    together = chunked(
        [[("a2", a[0:3], 0)], [("a2", a[3:6], 3), ("b2", b[0:3], 0)], [("a2", a[6:9], 6), ("b2", b[3:6], 3)]]
    )
    assert all(seen == [1, 2, 2] for seen in counter.passes)
    assert float((together["a2"] - ref["a1"]).abs().max()) <= FP32_LOGIT_TOL
    assert float((together["b2"] - ref["b1"]).abs().max()) <= FP32_LOGIT_TOL
    assert int(together["a2"].argmax()) == int(ref["a1"].argmax())
    assert int(together["b2"].argmax()) == int(ref["b1"].argmax())


def test_a_kept_batch_continues_in_any_order_and_gives_its_rows_back(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    """After a pass over several sessions their rows stay in its batched cache
    (``SessionStore.keep_batch``): the same sessions in another order continue it, a subset or a
    lone step gets the rows back first, and a session that closes gives the others theirs. Every
    session's tokens and logits stay those of the session alone, a kept batch is all a stage
    holds for its sessions (no token held twice), and nothing stays behind once all are closed."""
    pipe = load(tiny_model_dir("llama"), tmp_path / "shards")
    new = 8
    reference = [alone(pipe, p, new) for p in PROMPTS]
    # inference.keep_batches off: the same tokens, each session's rows split out after every pass
    unkept = LocalPipeline.load(tmp_path / "shards", InferenceSettings(keep_batches=False))
    gens = unkept.generate_ids(PROMPTS, new, want_logits=True)
    assert [g.token_ids for g in gens] == [r.token_ids for r in reference]
    sids = [f"k{i}" for i in range(len(PROMPTS))]
    tokens: list[list[int]] = [[] for _ in PROMPTS]
    logits: list[list[torch.Tensor]] = [[] for _ in PROMPTS]

    def run(rows: list[int]) -> None:
        first = not tokens[rows[0]]
        ids = torch.tensor([PROMPTS[r] if first else [tokens[r][-1]] for r in rows])
        positions = tuple(0 if first else len(PROMPTS[r]) + len(tokens[r]) - 1 for r in rows)
        out = pipe.step(StageInput(tuple(sids[r] for r in rows), positions, 0, ids, None, True))
        assert out.token_ids is not None and out.logits is not None
        for i, r in enumerate(rows):
            tokens[r].append(int(out.token_ids[i]))
            logits[r].append(out.logits[i].clone())

    for stage in pipe.stages:
        for sid in sids:
            stage.open_session(sid, 16)
    for r in range(len(PROMPTS)):  # prefills, one session each
        run([r])
    store = pipe.stages[0].sessions
    per_token = store.cache_bytes() // sum(len(p) for p in PROMPTS)
    for rows in ([0, 1, 2, 3], [3, 1, 0, 2], [1, 3], [2], [0, 2], [0, 1, 2, 3]):
        run(rows)
    held = [len(p) + len(t) - 1 for p, t in zip(PROMPTS, tokens, strict=True)]  # tokens each cache holds
    assert store.cache_bytes() == per_token * len(PROMPTS) * max(held)  # the padded batch, nothing else
    for rows in ([0, 1], [2, 3], [0, 1], [3, 2]):  # two groups that take turns keep a batch each
        run(rows)
    held = [len(p) + len(t) - 1 for p, t in zip(PROMPTS, tokens, strict=True)]
    assert store.cache_bytes() == per_token * 2 * (max(held[0:2]) + max(held[2:4]))
    for stage in pipe.stages:
        assert stage.close_session(sids[2])  # it is done; the other row of its batch goes back to its session
    assert store.cache_bytes() == per_token * (2 * max(held[0:2]) + held[3])  # that row without the padding
    run([3, 0, 1])
    for stage in pipe.stages:
        for sid in (sids[0], sids[1], sids[3]):
            assert stage.close_session(sid)
    assert store.cache_bytes() == 0
    for i, ref in enumerate(reference):
        assert tokens[i] == ref.token_ids, f"session {i}: greedy tokens differ from the session alone"
        diff = max_diff(logits[i], ref.logits)
        assert diff <= FP32_LOGIT_TOL, f"session {i}: logits differ by {diff} from the session alone"


@pytest.mark.parametrize("model_dir", ["llama", "smollm2_style"], indirect=True)
def test_bf16_stays_far_inside_the_bf16_tolerance(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = load(model_dir, tmp_path / "shards", dtype="bf16")
    reference = [alone(pipe, p, NEW_TOKENS) for p in PROMPTS]
    counter = PassCounter().attach(pipe.stages, monkeypatch)
    gens = pipe.generate_ids(PROMPTS, NEW_TOKENS, want_logits=True)
    assert all(seen[-1] == len(PROMPTS) for seen in counter.passes)  # decode ran as one pass
    # The spot-check tolerance must still separate honest from cheating: honest differences stay
    # an order of magnitude under it, as tests/unit/oracle/test_tolerance.py requires.
    limit = TOLERANCES["bf16"].max_rel_diff / 10
    for i, (gen, ref) in enumerate(zip(gens, reference, strict=True)):
        assert gen.token_ids == ref.token_ids, f"session {i}: greedy tokens differ from the session alone"
        err = rel_l2(gen.logits, ref.logits)
        assert err <= limit, f"session {i}: bf16 logits differ by {err} (relative L2) from the session alone"


def test_sliding_window_stages_keep_one_pass_per_position(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gemma3: stages with sliding layers group by position; a full-attention-only stage mixes."""
    out = tmp_path / "shards"
    # layer types: sliding, full, sliding, full -> [0, 3) has sliding layers, [3, 4) is full only
    export_shards(tiny_model_dir("gemma3"), out, ranges=[LayerRange(start=0, end=3), LayerRange(start=3, end=4)])
    pipe = LocalPipeline.load(out)
    assert [s.mixes_positions for s in pipe.stages] == [False, True]
    reference = [alone(pipe, p, NEW_TOKENS) for p in PROMPTS]
    hf = load_reference(tiny_model_dir("gemma3"))  # prompts longer than the window of 4 included
    for ref, prompt in zip(reference, PROMPTS, strict=True):
        hf_tokens, hf_logits = hf_generate(hf, prompt, NEW_TOKENS)
        assert ref.token_ids == hf_tokens
        assert max_diff(ref.logits, hf_logits) <= fp32_logit_tolerance(pipe.config, hf_logits)
    counter = PassCounter().attach(pipe.stages, monkeypatch)
    gens = pipe.generate_ids(PROMPTS, NEW_TOKENS, want_logits=True)
    sliding, full = counter.passes
    assert sliding == [1] * (len(PROMPTS) * NEW_TOKENS)  # one pass per session and step
    assert full == [1] * len(PROMPTS) + [len(PROMPTS)] * (NEW_TOKENS - 1)
    for gen, ref in zip(gens, reference, strict=True):
        assert gen.token_ids == ref.token_ids
        assert max_diff(gen.logits, ref.logits) <= FP32_LOGIT_TOL

    # Sliding caches at different lengths are never padded together, even if asked to.
    stage = pipe.stages[0]
    for sid, prompt in (("x", PROMPTS[0]), ("y", PROMPTS[1])):
        stage.open_session(sid, 16)
        stage.forward(StageInput((sid,), (0,), 0, torch.tensor([prompt])))
    caches = [stage.sessions.get(sid).cache for sid in ("x", "y")]
    with pytest.raises(SessionError, match="cannot be padded"):
        stack_caches(caches, stage.stage_config)


class GQAModule(nn.Module):
    """What SDPA attention reads from an attention module: 9 query heads over 3 KV heads (SmolLM2)."""

    num_key_value_groups = 3
    is_causal = True


def padded_attention(
    dtype: torch.dtype, new_tokens: int, lengths: list[int], gen: torch.Generator
) -> tuple[torch.Tensor, list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Rows of random q/k/v with ``lengths`` cached tokens each: the stage attention of their
    left-padded batch, and of each row alone (with the mask transformers builds for it alone)."""
    longest, module = max(lengths), GQAModule()
    rows, alone = [], []
    for n in lengths:
        q = torch.randn(1, 9, new_tokens, 64, generator=gen).to(dtype)
        k = torch.randn(1, 3, n + new_tokens, 64, generator=gen).to(dtype)
        v = torch.randn(1, 3, n + new_tokens, 64, generator=gen).to(dtype)
        mask = sdpa_mask(batch_size=1, q_length=new_tokens, kv_length=n + new_tokens, q_offset=n)
        rows.append((q, k, v))
        alone.append(ragged_sdpa_attention(module, q, k, v, mask, scaling=0.125)[0])
    keys = torch.zeros(len(lengths), 3, longest + new_tokens, 64, dtype=dtype)
    values = torch.zeros_like(keys)
    for i, (n, (_, k, v)) in enumerate(zip(lengths, rows, strict=True)):
        keys[i, :, longest - n :], values[i, :, longest - n :] = k[0], v[0]
    padding = padding_mask(lengths, new_tokens)
    batch_mask = sdpa_mask(
        batch_size=len(lengths), q_length=new_tokens, kv_length=longest + new_tokens, q_offset=longest,
        attention_mask=padding,
    )  # fmt: skip
    assert batch_mask is not None
    out, _ = ragged_sdpa_attention(module, torch.cat([r[0] for r in rows]), keys, values, batch_mask, scaling=0.125)
    return out, alone, rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("new_tokens", [1, 3])
def test_padded_rows_attend_bit_for_bit_as_alone(dtype: torch.dtype, new_tokens: int) -> None:
    """The attention of a padded batch is, row by row, bit for bit what the row gets alone: bf16
    decode rows in one float64 pass (``kv_cache.decode_attention``), the rest in SDPA row by row."""
    lengths = [0, 4, 9, 30]  # cached tokens per row; 0: a fresh session's first prefill
    out, alone, _ = padded_attention(dtype, new_tokens, lengths, torch.Generator().manual_seed(7))
    for i, alone_out in enumerate(alone):
        assert torch.equal(out[i : i + 1], alone_out), f"row {i} ({lengths[i]} cached): attention differs from alone"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_rows_do_not_depend_on_their_batch_or_padding(dtype: torch.dtype) -> None:
    """Neither the other rows nor the padding in front of a row change a bit of its decode attention
    (bf16: rounded once from float64; fp32: SDPA row by row): 40 batches of 8 rows with 1-300 cached
    tokens. And it is attention: within float rounding of exact (float64) attention on the same row
    (fp32: 1e-6; bf16: one unit in the last place)."""
    gen = torch.Generator().manual_seed(11)
    module = GQAModule()
    for _ in range(40):
        lengths = [int(n) for n in torch.randint(1, 300, (8,), generator=gen)]
        out, alone, rows = padded_attention(dtype, 1, lengths, gen)
        for i, ((q, k, v), alone_out) in enumerate(zip(rows, alone, strict=True)):
            assert torch.equal(out[i : i + 1], alone_out), f"row {i} of {lengths}: differs from the row alone"
            sdpa, _ = sdpa_attention_forward(module, q.double(), k.double(), v.double(), None, scaling=0.125)
            error = (alone_out.double() - sdpa).abs().max().item()
            bound = 1e-6 if dtype == torch.float32 else 2**-8 * sdpa.abs().max().item()
            assert error <= bound, f"row {i}: {error:.3g} from exact attention (bound {bound:.3g})"


@pytest.mark.parametrize("model_dir", ["smollm2_style"], indirect=True)
def test_bf16_batched_sessions_are_bit_identical_to_each_session_alone(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lone row's matmul takes a matrix-vector kernel that rounds differently from a batch's
    once the MLP is 1536 wide; stages compute it as a batch (``kv_cache.RowStableLinear``), so a
    bf16 session's logits do not depend on who else is served, bit for bit. (fp32 GEMM blocking
    also varies with the batch size: there the bound of the tests above holds, not equality.)"""
    pipe = load(model_dir, tmp_path / "shards", dtype="bf16")
    prompts = [*PROMPTS, *([t + 1 for t in p] for p in PROMPTS)]  # 8 sessions, 24 tokens each: a
    new = 24  # one-ulp difference of a row must survive bf16's residual adds somewhere to be seen
    reference = [alone(pipe, p, new) for p in prompts]
    counter = PassCounter().attach(pipe.stages, monkeypatch)
    gens = pipe.generate_ids(prompts, new, want_logits=True)
    assert all(seen[-1] == len(prompts) for seen in counter.passes)  # decode ran as one pass
    for i, (gen, ref) in enumerate(zip(gens, reference, strict=True)):
        assert gen.token_ids == ref.token_ids, f"session {i}: greedy tokens differ from the session alone"
        for step, (a, b) in enumerate(zip(gen.logits, ref.logits, strict=True)):
            assert torch.equal(a, b), f"session {i} step {step}: logits differ by {float((a - b).abs().max())}"


def test_stabilised_linears_give_a_lone_row_what_a_batch_gives_it() -> None:
    """Only linears whose one-row kernel rounds differently become RowStableLinear (each costs
    3-24 % in bf16), and after stabilise_rows every linear gives a lone row exactly what the row
    gets in a batch of 2 or 8, on rows other than the probe's. SmolLM2's widths: on this CPU the
    1536-wide down_proj needs it (a plain lone row differs), the 576-wide projections do not."""
    torch.manual_seed(3)
    shapes = [(576, 576), (576, 192), (576, 1536), (1536, 576)]
    model = nn.Sequential(*(nn.Linear(k, n, bias=False) for k, n in shapes)).to(torch.bfloat16)
    plain = [lone_row_agrees(m) for m in model]
    assert stabilise_rows(model, "") == plain.count(False)
    assert [type(m) is RowStableLinear for m in model] == [not p for p in plain]
    x = {k: torch.randn(64, k, dtype=torch.bfloat16) for k in {k for k, _ in shapes}}
    with torch.inference_mode():
        for m, (k, n) in zip(model, shapes, strict=True):
            rows = x[k]
            lone = torch.cat([m(rows[i : i + 1]) for i in range(len(rows))])
            pairs = torch.cat([m(rows[i : i + 1].expand(2, k))[:1] for i in range(len(rows))])
            eights = torch.cat([m(rows[i : i + 8]) for i in range(0, len(rows), 8)])
            assert torch.equal(lone, pairs), f"{k} -> {n}: {(lone != pairs).sum()} outputs differ in pairs"
            assert torch.equal(lone, eights), f"{k} -> {n}: {(lone != eights).sum()} outputs differ in eights"
            unstable = nn.functional.linear(rows, m.weight)  # the plain kernel, row by row below
            differs = any(
                not torch.equal(nn.functional.linear(rows[i : i + 1], m.weight), unstable[i : i + 1])
                for i in range(len(rows))
            )
            assert not differs or type(m) is RowStableLinear, f"{k} -> {n} left plain though its lone rows differ"
