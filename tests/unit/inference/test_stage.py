"""Stage runtime: sessions and their limits, batching, wire messages between stages, memory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dlis_market.inference.errors import ContextLengthError, SessionError, StageMismatchError
from dlis_market.inference.messages import StageInput, StageOutput, bytes_per_token, decode, encode
from dlis_market.inference.pipeline import LocalPipeline
from dlis_market.inference.sampling import SamplingParams
from dlis_market.inference.shard_export import export_shards
from dlis_market.inference.stage import Stage
from dlis_market.settings import InferenceSettings


@pytest.fixture
def shards(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> Path:
    out = tmp_path / "shards"
    export_shards(tiny_model_dir("llama"), out, stages=2)
    return out


def test_stages_talk_through_serialised_messages(shards: Path) -> None:
    """Run the two stages by hand over encoded bytes, as a network worker would; same tokens."""
    first, last = Stage.load(shards, index=0), Stage.load(shards, index=1)
    prompt = [3, 14, 15, 92, 65]
    expected = LocalPipeline([first, last]).generate_ids([prompt], 5)[0].token_ids
    for stage in (first, last):
        stage.open_session("s", 16)
    tokens, ids, pos = [], torch.tensor([prompt]), 0
    for step in range(5):
        msg = decode(encode(StageInput(("s",), (pos,), step, token_ids=ids)))
        assert isinstance(msg, StageInput)
        hidden = decode(encode(first.forward(msg)))
        assert isinstance(hidden, StageOutput) and hidden.hidden is not None
        out = last.forward(StageInput(("s",), (pos,), step, hidden=hidden.hidden))
        assert out.token_ids is not None
        tokens.append(int(out.token_ids[0]))
        pos += ids.shape[1]
        ids = out.token_ids.view(1, 1)
    assert tokens == expected
    hidden_msg = StageOutput(("s",), (0,), 0, hidden=torch.zeros(1, 1, first.config.hidden_size))
    assert bytes_per_token(hidden_msg) < first.config.hidden_size * 4 + 128


def test_batched_sessions_equal_separate_runs(shards: Path) -> None:
    pipe = LocalPipeline.load(shards)
    prompts = [[1, 2, 3, 4], [9, 8, 7, 6], [5, 5], [40, 41, 42, 43, 44, 45]]
    together = [g.token_ids for g in pipe.generate_ids(prompts, 6)]
    alone = [pipe.generate_ids([p], 6)[0].token_ids for p in prompts]
    assert together == alone
    assert all(len(stage.sessions) == 0 for stage in pipe.stages)


def test_session_limits_and_eviction(shards: Path) -> None:
    stage = Stage.load(shards, index=0, settings=InferenceSettings(max_sessions=2, max_session_tokens=32))
    stage.open_session("a", 8)
    with pytest.raises(SessionError, match="already open"):
        stage.open_session("a", 8)
    with pytest.raises(ContextLengthError, match=r"1\.\.32"):
        stage.open_session("b", 33)
    stage.open_session("b", 8)
    with pytest.raises(SessionError, match="limit 2"):
        stage.open_session("c", 8)
    assert stage.sessions.evict_idle(max_idle_s=0.0, now=float("inf")) == ["a", "b"]
    assert len(stage.sessions) == 0
    with pytest.raises(SessionError, match="not open"):
        stage.forward(StageInput(("a",), (0,), 0, token_ids=torch.tensor([[1]])))


def test_out_of_step_and_over_length_inputs_are_refused(shards: Path) -> None:
    stage = Stage.load(shards, index=0)
    stage.open_session("s", 4)
    stage.forward(StageInput(("s",), (0,), 0, token_ids=torch.tensor([[1, 2, 3]])))
    with pytest.raises(SessionError, match="replay the session from position 3"):
        stage.forward(StageInput(("s",), (0,), 1, token_ids=torch.tensor([[4]])))
    with pytest.raises(ContextLengthError, match="limit of 4"):
        stage.forward(StageInput(("s",), (3,), 1, token_ids=torch.tensor([[4, 5]])))
    assert stage.sessions.get("s").length == 3  # refused inputs changed nothing
    with pytest.raises(StageMismatchError, match="token_ids"):
        stage.forward(StageInput(("s",), (3,), 1, hidden=torch.zeros(1, 1, 32)))
    with pytest.raises(StageMismatchError, match="tokenizer"):
        stage.forward(StageInput(("s",), (3,), 1, token_ids=torch.tensor([[96]])))
    last = Stage.load(shards, index=1)
    last.open_session("s", 4)
    with pytest.raises(StageMismatchError, match="hidden size 32"):
        last.forward(StageInput(("s",), (0,), 0, hidden=torch.zeros(1, 1, 7)))


def test_seeded_sampling_is_reproducible(shards: Path) -> None:
    pipe = LocalPipeline.load(shards)
    params = SamplingParams(greedy=False, temperature=1.5, top_k=20, top_p=0.9, seed=7)
    a = pipe.generate_ids([[1, 2, 3]], 8, params)[0].token_ids
    b = pipe.generate_ids([[1, 2, 3]], 8, params)[0].token_ids
    c = pipe.generate_ids([[1, 2, 3]], 8, params.model_copy(update={"seed": 8}))[0].token_ids
    assert a == b
    assert a != c


def test_resident_memory_scales_with_range(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    export_shards(tiny_model_dir("gpt2"), tmp_path / "s", stages=4)
    export_shards(tiny_model_dir("gpt2"), tmp_path / "w", stages=1)
    middle = [Stage.load(tmp_path / "s", index=i).resident_bytes() for i in (1, 2)]
    whole = Stage.load(tmp_path / "w", index=0).resident_bytes()
    one_layer = middle[0]
    assert middle[0] == middle[1]
    assert 4 * one_layer < whole  # 4 layers plus embeddings and head
    assert one_layer < whole / 4
