"""Transcripts: what a stage keeps per session for spot checks, bounded, readable by the opener only."""

from __future__ import annotations

import hashlib

import pytest
import torch

from dlis_market.inference.messages import StageInput, StageOutput
from dlis_market.node.byzantine import corrupt, corrupted
from dlis_market.node.errors import NodeError, ProtocolError
from dlis_market.node.replay import token_steps
from dlis_market.node.sessions import row_bytes
from dlis_market.node.transcripts import Transcript, TranscriptBody, TranscriptStep, TranscriptStore


def hidden_steps(sid: str, h: int = 8) -> list[StageInput]:
    torch.manual_seed(0)
    prefill = StageInput((sid, "other"), (0, 0), 0, hidden=torch.randn(2, 4, h, dtype=torch.bfloat16))
    decode = StageInput((sid,), (4,), 1, hidden=torch.randn(1, 1, h, dtype=torch.bfloat16))
    return [prefill, decode]


def test_transcript_records_rows_that_hash_like_the_previous_stages_receipt() -> None:
    steps = hidden_steps("s")
    t = Transcript("s", b"j" * 32, "peer")
    t.record(steps[0], 0)
    t.record(steps[1], 0)
    # the previous stage hashed exactly these rows into its receipt's outputHash
    expected = hashlib.sha256(row_bytes(steps[0].hidden[0]) + row_bytes(steps[1].hidden[0])).digest()
    assert t.sha256() == expected and t.tokens == 5 and t.dtype == "bfloat16"
    # the wire round trip gives back the same inputs, replayable as the same steps
    back = TranscriptBody.model_validate(t.to_wire()).transcript("peer")
    replayed = back.inputs("fresh")
    assert back.sha256() == expected
    assert [i.positions for i in replayed] == [(0,), (4,)]
    assert torch.equal(replayed[0].hidden[0], steps[0].hidden[0]) and replayed[1].session_ids == ("fresh",)


def test_malformed_transcript_rows_are_refused() -> None:
    wire = {"session_id": "s", "job_id": b"j" * 32, "dtype": "float32", "steps": [
        {"position": 0, "tokens": 2, "data": b"\x00" * 12}]}  # fmt: skip
    with pytest.raises(ProtocolError, match="not whole rows"):
        TranscriptBody.model_validate(wire).transcript("peer")
    with pytest.raises(ProtocolError, match="not allowed"):
        TranscriptBody.model_validate({**wire, "dtype": "complex64"}).transcript("peer")


def test_store_is_bounded_in_age_and_bytes_and_readable_by_the_opener_only() -> None:
    now = [0.0]
    store = TranscriptStore(max_bytes=100, max_age_s=10, clock=lambda: now[0])

    def make(sid: str, n: int, opener: str = "driver") -> Transcript:
        t = Transcript(sid, b"j" * 32, opener)
        t.record(StageInput((sid,), (0,), 0, token_ids=torch.zeros(1, n, dtype=torch.long)), 0)
        return t

    store.put(make("a", 5))  # 40 bytes
    store.put(make("b", 5))
    assert store.get("a", "driver").tokens == 5
    with pytest.raises(NodeError, match="opened by another peer"):
        store.get("a", "stranger")
    store.put(make("c", 5))  # 120 bytes > 100: the oldest goes
    with pytest.raises(NodeError, match="no transcript"):
        store.get("a", "driver")
    assert store.nbytes == 80 and len(store) == 2
    store.put(make("huge", 20))  # over the whole budget: not kept, nothing else lost
    assert len(store) == 2
    now[0] = 11.0
    with pytest.raises(NodeError, match="no transcript"):
        store.get("b", "driver")
    assert store.nbytes == 0


def test_first_stage_inputs_are_the_prompt_then_every_generated_token_but_the_last() -> None:
    rows = token_steps("s", [5, 6, 7], [8, 9, 10])
    assert [i.positions for i in rows.inputs] == [(0,), (3,), (4,)]
    assert [i.token_ids.tolist() for i in rows.inputs if i.token_ids is not None] == [[[5, 6, 7]], [[8]], [[9]]]
    assert rows.data == torch.tensor([5, 6, 7, 8, 9]).numpy().astype("<i8").tobytes()


def test_byzantine_corruption_is_per_session_and_large() -> None:
    sids = tuple(f"s{i}" for i in range(400))
    share = sum(corrupted(s, 0.25) for s in sids) / len(sids)
    # which sessions are corrupted is a hash of the session id (deterministic on any machine); as a
    # binomial draw of 400 at p = 0.25 its sd is 0.022, so the bounds are p +- 3.2 sd
    assert 0.18 < share < 0.32
    assert all(corrupted(s, 1.0) for s in sids) and not any(corrupted(s, 0.0) for s in sids)
    hidden = torch.randn(2, 3, 16)
    out = StageOutput(("x", "y"), (0, 0), 0, hidden=hidden)
    bad = corrupt(out, 1.0, vocab_size=100)
    assert bad.hidden is not None
    rel = (bad.hidden - hidden).abs().max() / hidden.abs().max()
    assert rel > 0.1  # far beyond every dtype's tolerance (protocol/outputs.py)
    assert corrupt(out, 0.0, 100) is out
    ids = StageOutput(("x",), (0,), 0, token_ids=torch.tensor([99]))
    assert corrupt(ids, 1.0, vocab_size=100).token_ids.tolist() == [0]


def test_the_runner_cuts_transcripts_into_its_own_layout_whatever_steps_a_stage_claims() -> None:
    from dlis_market.node.replay import Layout, TranscriptMalformedError, checked

    honest = Transcript("s", b"j" * 32, "driver")
    steps = hidden_steps("s")
    honest.record(steps[0], 0)
    honest.record(steps[1], 0)
    layout = Layout.of_session(prompt_tokens=4, generated=2, dtype="bfloat16", width=8)
    assert layout.steps == ((0, 4), (4, 1)) and layout.tokens == 5
    want = checked(honest, honest.sha256(), layout, "input")
    # a stage that regroups the same bytes (one step, "tokens" = every value) changes nothing
    regrouped = Transcript("s", b"j" * 32, "driver", "bfloat16")
    regrouped.steps.append(TranscriptStep(0, 40, b"".join(s.data for s in honest.steps)))
    got = checked(regrouped, honest.sha256(), layout, "input")
    assert got.rows == want.rows and got.width == 8
    assert [i.positions for i in got.inputs] == [(0,), (4,)]
    assert got.inputs[0].hidden is not None and tuple(got.inputs[0].hidden.shape) == (1, 4, 8)
    # bytes that do not fit the session are refused (the runner counts them as withheld)
    short = Transcript("s", b"j" * 32, "driver", "bfloat16", [TranscriptStep(0, 4, honest.steps[0].data)])
    with pytest.raises(TranscriptMalformedError, match="not 5 tokens x 8 values"):
        checked(short, short.sha256(), layout, "input")


def test_a_transcript_that_does_not_hash_to_the_signed_output_is_refused() -> None:
    from dlis_market.node.replay import Layout, TranscriptMismatchError, checked

    t = Transcript("s", b"j" * 32, "driver")
    t.record(hidden_steps("s")[1], 0)
    with pytest.raises(TranscriptMismatchError, match="hashes to"):
        checked(t, b"\x00" * 32, Layout.of_session(1, 1, "bfloat16", 8), "input")
