"""TEST ONLY: how a ``--byzantine`` worker cheats, so that spot checks can be shown to catch it.

A byzantine worker computes honestly, then corrupts the outputs of a fraction ``rate`` of its
sessions (chosen by hashing the session id, so a session is corrupted at every step or never):
hidden states get Gaussian noise of half their RMS (what serving garbage, skipping layers or
running a far cheaper model looks like, relative differences of ~0.1-1), sampled token ids at
the last stage are shifted by one. It signs receipts over what it actually sent, as a cheater
that wants to be paid must, and announces ``OVERSTATE`` times its measured throughput to win
routes. Nothing in a real deployment sets ``node.byzantine``.
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch

from dlis_market.inference.messages import StageOutput

OVERSTATE = 10.0


def corrupted(session_id: str, rate: float) -> bool:
    draw = int.from_bytes(hashlib.sha256(b"byzantine:" + session_id.encode()).digest()[:8], "big")
    return draw < rate * 2**64


def corrupt(out: StageOutput, rate: float, vocab_size: int) -> StageOutput:
    """``out`` with the rows of the chosen sessions corrupted (the same object when none is)."""
    rows = [i for i, sid in enumerate(out.session_ids) if corrupted(sid, rate)]
    if not rows:
        return out
    if out.hidden is not None:
        hidden = out.hidden.clone()
        for i in rows:
            key = hashlib.sha256(f"{out.session_ids[i]}:{out.step}".encode()).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(key[:4], "big"))
            row = hidden[i].float()
            rms = row.pow(2).mean().sqrt().clamp_min(1e-3)
            hidden[i] = (row + 0.5 * rms * torch.randn(row.shape, generator=gen)).to(hidden.dtype)
        return dataclasses.replace(out, hidden=hidden)
    assert out.token_ids is not None  # the last stage outputs token ids
    ids = out.token_ids.clone()
    for i in rows:
        ids[i] = (ids[i] + 1) % vocab_size
    return dataclasses.replace(out, token_ids=ids)
