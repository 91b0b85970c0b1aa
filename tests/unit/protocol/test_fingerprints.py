"""Fingerprints as a checker receives them from a stranger: exact round trips, honest rounding
accepted, other values / inputs rejected, and malformed bytes refused with a typed error."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from dlis_market.errors import DlisError
from dlis_market.protocol.fingerprint_thresholds import THRESHOLDS, validate
from dlis_market.protocol.fingerprints import (
    PRIMES,
    Fingerprint,
    FingerprintBuilder,
    FingerprintFormatError,
    FingerprintShapeError,
    bf16_bits,
    commit,
    evaluate,
    fingerprint_size,
    interpolate,
    top_indices,
)


def states(tokens: int = 70, hidden: int = 48, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, hidden, generator=gen) * torch.rand(hidden, generator=gen) * 4


def test_polynomial_recovers_every_committed_value_exactly() -> None:
    rng = np.random.default_rng(1)
    for p in (PRIMES[0], PRIMES[-1]):
        xs = rng.choice(p, size=128, replace=False)
        ys = rng.integers(0, 0xFF80, size=128)
        coeffs = interpolate(xs, ys, p)
        assert coeffs.shape == (128,) and coeffs.max() < p
        assert (evaluate(coeffs, xs, p) == ys).all()


def test_round_trip_bytes_and_size() -> None:
    fp = commit(states(), topk=64, chunk_tokens=32)
    data = fp.to_bytes()
    # 2 entries per token: two full chunks of 32 tokens and one of 6; 12-byte header, 2-byte modulus
    assert len(data) == fingerprint_size(70, 48, 64, 32) == 12 + 2 * (2 + 2 * 64) + (2 + 2 * 12)
    again = Fingerprint.from_bytes(data)
    assert again.to_bytes() == data
    assert (again.num_tokens, again.hidden_size, len(again.chunks)) == (70, 48, 3)
    for a, b in zip(fp.chunks, again.chunks, strict=True):
        assert a.modulus == b.modulus and (a.coeffs == b.coeffs).all()


def test_builder_step_by_step_equals_commit_over_all_rows() -> None:
    hidden = states()
    builder = FingerprintBuilder(topk=64, chunk_tokens=32)
    builder.add(hidden[:11])  # the prefill
    for t in range(11, 70):  # one row per decode step
        builder.add(hidden[t : t + 1])
    assert builder.finish().to_bytes() == commit(hidden, topk=64, chunk_tokens=32).to_bytes()


def test_same_states_pass_with_zero_error_and_rounding_noise_passes() -> None:
    hidden = states()
    fp = commit(hidden).to_bytes()
    exact = validate(fp, hidden, THRESHOLDS["fp32"])
    assert exact.accepted and exact.margin == 0.0
    noisy = hidden * (1 + 2e-3 * torch.randn(hidden.shape, generator=torch.Generator().manual_seed(5)))
    assert validate(fp, noisy, THRESHOLDS["bf16"]).accepted


def test_other_states_and_one_corrupted_token_are_rejected() -> None:
    hidden = states()
    fp = commit(hidden).to_bytes()
    other = validate(fp, states(seed=9), THRESHOLDS["nf4"])  # the loosest row
    assert not other.accepted and "exponent mismatches" in other.reason
    corrupted = hidden.clone()
    rms = corrupted[40].pow(2).mean().sqrt()
    corrupted[40] += 0.5 * rms * torch.randn(48, generator=torch.Generator().manual_seed(3))  # byzantine.py's noise
    verdict = validate(commit(corrupted).to_bytes(), hidden, THRESHOLDS["bf16"])
    assert not verdict.accepted
    assert [f.split(":")[0] for f in verdict.failures] == ["chunk 1"]  # only the chunk holding token 40


def test_ties_pick_lower_indices_first() -> None:
    bits = bf16_bits(torch.tensor([[1.0, -3.0, 3.0, 2.0]]))
    assert top_indices(bits, 2).tolist() == [1, 2]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d[:5],  # shorter than the header
        lambda d: d[:-1],  # truncated inside a chunk
        lambda d: d[:-2],  # one coefficient missing
        lambda d: d + b"\0\0",  # padded
        lambda d: bytes([9]) + d[1:],  # another version
        lambda d: d[:8] + struct.pack("<I", 0) + d[12:],  # zero tokens
        lambda d: d[:8] + struct.pack("<I", 2**32 - 1) + d[12:],  # claims more tokens than it holds
        lambda d: d[:12] + struct.pack("<H", 65000) + d[14:],  # a modulus outside the primes
        lambda d: d[:14] + struct.pack("<H", 65535) + d[16:],  # a coefficient >= the modulus
        lambda d: b"",
    ],
)
def test_malformed_bytes_are_refused_with_a_typed_error(mutate: object) -> None:
    data = commit(states(), topk=32).to_bytes()
    with pytest.raises(FingerprintFormatError) as info:
        Fingerprint.from_bytes(mutate(data))  # type: ignore[operator]
    assert isinstance(info.value, DlisError)
    with pytest.raises(FingerprintFormatError):
        validate(mutate(data), states(), THRESHOLDS["bf16"])  # type: ignore[operator]


def test_fingerprint_of_another_length_or_width_is_refused() -> None:
    fp = commit(states()).to_bytes()
    with pytest.raises(FingerprintShapeError, match="70 tokens"):
        validate(fp, states(tokens=69), THRESHOLDS["bf16"])
    with pytest.raises(FingerprintShapeError, match="hidden 48"):
        validate(fp, states(hidden=40), THRESHOLDS["bf16"])


def test_non_finite_states_cannot_be_committed() -> None:
    hidden = states()
    hidden[3, 4] = float("nan")
    with pytest.raises(DlisError, match="inf or NaN"):
        commit(hidden)


def test_wide_hidden_states_whose_indices_exceed_the_prime_still_validate_exactly() -> None:
    hidden = states(tokens=40, hidden=4096)  # 32 x 4096 indices per chunk, twice the largest prime
    fp = commit(hidden)
    verdict = validate(fp.to_bytes(), hidden, THRESHOLDS["fp32"])
    assert verdict.accepted and verdict.margin == 0.0
    assert all(c.modulus in PRIMES for c in fp.chunks)
