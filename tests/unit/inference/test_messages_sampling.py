"""Wire messages (round trip, validation) and sampling filters."""

from __future__ import annotations

import msgpack
import pytest
import torch

from dlis_market.inference.errors import MessageError
from dlis_market.inference.messages import StageInput, StageOutput, decode, encode
from dlis_market.inference.sampling import SamplingParams, filter_logits, sample_next


def test_round_trip_keeps_dtype_and_bits() -> None:
    hidden = torch.randn(2, 3, 8).to(torch.bfloat16)
    msg = StageOutput(("a", "b"), (0, 5), 4, hidden=hidden)
    back = decode(encode(msg))
    assert isinstance(back, StageOutput)
    assert back.session_ids == ("a", "b") and back.positions == (0, 5) and back.step == 4
    assert back.hidden is not None and back.hidden.dtype == torch.bfloat16
    assert torch.equal(back.hidden, hidden)
    inp = decode(encode(StageInput(("a",), (0,), 0, token_ids=torch.tensor([[1, 2]]), want_logits=True)))
    assert isinstance(inp, StageInput) and inp.want_logits and inp.num_tokens == 2


def _body(**overrides: object) -> bytes:
    body = msgpack.unpackb(encode(StageInput(("a",), (0,), 0, token_ids=torch.tensor([[1, 2]]))))
    body.update(overrides)
    return msgpack.packb(body, use_bin_type=True)


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (b"\xc1garbage", "not valid msgpack"),
        (_body(v=2), "version 2"),
        (_body(kind="x"), "kind"),
        (_body(positions=[0, 1]), "1 sessions but 2 positions"),
        (_body(tensors={"token_ids": {"dtype": "int64", "shape": [1, 3], "data": b"\x00" * 16}}), "needs 24 bytes"),
        (_body(tensors={"token_ids": {"dtype": "uint8", "shape": [1], "data": b"\x00"}}), "dtype"),
        (_body(tensors={"weights": {"dtype": "int64", "shape": [1], "data": b"\x00" * 8}}), "unexpected"),
    ],
)
def test_malformed_messages_are_typed_errors(blob: bytes, match: str) -> None:
    with pytest.raises(MessageError, match=match):
        decode(blob)


def test_size_limit() -> None:
    blob = encode(StageOutput(("a",), (0,), 0, hidden=torch.zeros(1, 64, 64)))
    with pytest.raises(MessageError, match="limit"):
        decode(blob, max_bytes=len(blob) - 1)


def test_filters() -> None:
    logits = torch.tensor([1.0, 3.0, 2.0, 0.5])
    top1 = SamplingParams(greedy=False, top_k=1)
    assert all(sample_next(logits, top1, top1.generator()) == 1 for _ in range(5))
    kept = filter_logits(logits, SamplingParams(greedy=False, top_k=2)).isfinite()
    assert kept.tolist() == [False, True, True, False]
    nucleus = filter_logits(logits, SamplingParams(greedy=False, top_p=0.5)).isfinite()
    assert nucleus.tolist() == [False, True, False, False]
    assert sample_next(logits, SamplingParams(), None) == 1
