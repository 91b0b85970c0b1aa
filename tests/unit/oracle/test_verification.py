"""Spot-check sampling, output comparison and evidence checks with synthetic signed receipts."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from eth_account import Account

from dlis_market.chain.job_market import market_domain
from dlis_market.chain.typed_data import Domain
from dlis_market.oracle.errors import EvidenceRefusedError
from dlis_market.oracle.verification import NodeInfo, check_evidence, evidence_hash
from dlis_market.protocol.errors import SpotCheckSecretError
from dlis_market.protocol.outputs import compare_outputs, decode_output
from dlis_market.protocol.receipts import ReceiptWire
from dlis_market.protocol.spot_checks import SpotCheckSampler, StageOutputBlob, load_or_create_secret

from .evidence_helpers import RUNNER, make_evidence, reference_output, signed_receipt

DOMAIN = market_domain(31337, "0x" + "cd" * 20)
ORACLE_DOMAIN = Domain("DLIS Oracle", "1", 31337, DOMAIN.verifying_contract)
ACCUSED = Account.from_key(b"\x01" * 32)
CHECKER = Account.from_key(b"\x02" * 32)
REFEREE = Account.from_key(b"\x06" * 32)
REGISTRY = {
    ACCUSED.address: NodeInfo("0x" + "aa" * 20, True),
    CHECKER.address: NodeInfo("0x" + "bb" * 20, True),
    REFEREE.address: NodeInfo("0x" + "cc" * 20, True),
}


def lookup(node: str) -> NodeInfo | None:
    return REGISTRY.get(node)


def _refusal(evidence, require_referee: bool = False) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(EvidenceRefusedError) as err:
        check_evidence(evidence, DOMAIN, lookup, ORACLE_DOMAIN, [RUNNER.address], require_referee)
    return err.value.reason


def test_sampler_selects_the_configured_fraction_reproducibly() -> None:
    sampler = SpotCheckSampler(0.1, b"seed")
    calls = [(i.to_bytes(32, "big"), s) for i in range(5000) for s in (0, 8)]
    picked = [sampler.selected(j, s) for j, s in calls]
    assert abs(sum(picked) / len(picked) - 0.1) < 0.01  # 3 sigma = 0.0064
    assert picked == [SpotCheckSampler(0.1, b"seed").selected(j, s) for j, s in calls]
    assert picked != [SpotCheckSampler(0.1, b"other").selected(j, s) for j, s in calls]
    assert not any(SpotCheckSampler(0.0, b"s").selected(j, s) for j, s in calls[:100])
    assert all(SpotCheckSampler(1.0, b"s").selected(j, s) for j, s in calls[:100])
    with pytest.raises(ValueError):
        SpotCheckSampler(1.5, b"s")


def test_decode_bfloat16() -> None:
    x = np.array([1.0, -2.5, 3.140625], dtype=np.float32)
    bf16 = (x.view(np.uint32) >> 16).astype("<u2").tobytes()
    assert decode_output(bf16, "bfloat16").tolist() == [1.0, -2.5, 3.140625]


def test_compare_outputs_by_dtype() -> None:
    a = reference_output()
    assert compare_outputs(a, a + 1e-5, "fp32").within
    assert not compare_outputs(a, a + 0.1, "fp32").within
    assert compare_outputs(a, a * (1 + 1e-2), "bf16").within
    assert not compare_outputs(a, reference_output(seed=1), "bf16").within
    assert not compare_outputs(a, a[:-1], "fp32").within
    ids = np.array([1, 2, 3])
    assert compare_outputs(ids, ids, "ids").within and not compare_outputs(ids, ids + 1, "ids").within
    assert not compare_outputs(a, np.full_like(a, np.nan), "fp32").within
    with pytest.raises(ValueError):
        compare_outputs(a, a, "fp8")


def test_a_huge_activation_in_one_token_does_not_hide_errors_in_another() -> None:
    """SmolLM2 carries a few huge values in some tokens; errors are measured per token."""
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(4, 64))
    tokens[0, 3] = 2000.0  # an "attention sink" token with a massive activation
    cheat = tokens.copy()
    cheat[2] += rng.normal(scale=0.2, size=64)  # a 20 % error in an ordinary token
    # measured against the largest value anywhere it looks like rounding (about 3e-4)...
    assert np.max(np.abs(cheat - tokens)) / 2000.0 < 1e-3
    # ...per token it is what it is, far beyond even the int8 tolerance
    cmp = compare_outputs(tokens.ravel(), cheat.ravel(), "bf16", row_width=64)
    assert not cmp.within and cmp.rel_diff > 0.12
    # an honest re-run (rounding at bf16's 2**-8 on every value) passes
    honest = tokens * (1 + rng.uniform(-(2**-8), 2**-8, size=tokens.shape))
    assert compare_outputs(tokens.ravel(), honest.ravel(), "bf16", row_width=64).within


def test_mismatch_beyond_tolerance_is_a_verdict() -> None:
    out = reference_output()
    ev = make_evidence(ACCUSED, CHECKER, DOMAIN, out + 0.5, out)
    verdict = check_evidence(ev, DOMAIN, lookup, ORACLE_DOMAIN, [RUNNER.address])
    assert verdict.accused_operator == REGISTRY[ACCUSED.address].operator
    assert verdict.reporter == REGISTRY[CHECKER.address].operator
    assert verdict.comparison.rel_diff > 0.05
    assert verdict.evidence_hash == evidence_hash(31337, ACCUSED.address, ev.accused_receipt.receipt())
    # evidence survives JSON
    assert type(ev).model_validate_json(ev.model_dump_json()) == ev


def test_within_tolerance_refused() -> None:
    out = reference_output()
    assert _refusal(make_evidence(ACCUSED, CHECKER, DOMAIN, out + 1e-5, out)) == "within_tolerance"
    assert _refusal(make_evidence(ACCUSED, CHECKER, DOMAIN, out * 1.01, out, shard_dtype="bf16")) == "within_tolerance"


def test_bad_signatures_refused() -> None:
    out = reference_output()
    ev = make_evidence(ACCUSED, CHECKER, DOMAIN, out + 0.5, out)
    # accused receipt re-signed by an outsider
    outsider = Account.from_key(b"\x03" * 32)
    forged = ReceiptWire.from_signed(signed_receipt(outsider, DOMAIN, ev.accused_output.data))
    assert _refusal(ev.model_copy(update={"accused_receipt": forged})) == "bad_signature"
    # garbage signature bytes
    zero = ev.accused_receipt.model_copy(update={"signature": "0x" + "00" * 65})
    assert _refusal(ev.model_copy(update={"accused_receipt": zero})) == "bad_signature"
    # signed in another domain (other chain)
    other = market_domain(1, DOMAIN.verifying_contract)
    wrong_chain = make_evidence(ACCUSED, CHECKER, other, out + 0.5, out, oracle_domain=ORACLE_DOMAIN)
    assert _refusal(wrong_chain) == "bad_signature"


def test_other_refusals() -> None:
    out = reference_output()
    ev = make_evidence(ACCUSED, CHECKER, DOMAIN, out + 0.5, out)
    assert _refusal(make_evidence(ACCUSED, ACCUSED, DOMAIN, out + 0.5, out)) == "same_node"
    stranger = Account.from_key(b"\x04" * 32)
    assert _refusal(make_evidence(stranger, CHECKER, DOMAIN, out + 0.5, out)) == "unregistered"
    other_job = make_evidence(ACCUSED, CHECKER, DOMAIN, out, out, job=b"\x08" * 32)
    assert _refusal(ev.model_copy(update={"checker_receipt": other_job.checker_receipt})) == "different_call"
    swapped = StageOutputBlob.of((out + 0.25).astype("<f4").tobytes(), "float32")
    assert _refusal(ev.model_copy(update={"accused_output": swapped})) == "output_not_signed"


def test_only_trusted_runners_may_assign_checks() -> None:
    """Receipts are public once settled: a node must not be able to frame another on its own."""
    out = reference_output()
    ev = make_evidence(ACCUSED, CHECKER, DOMAIN, out + 0.5, out)
    assert _refusal(ev.model_copy(update={"runner_signature": ""})) == "unauthorized_runner"
    # the checker signing as its own runner
    self_assigned = make_evidence(ACCUSED, CHECKER, DOMAIN, out + 0.5, out, runner=CHECKER)
    assert _refusal(self_assigned) == "unauthorized_runner"
    # a runner signature does not carry over to other outputs, and names its signer
    claimed = ev.model_copy(update={"runner": CHECKER.address})
    assert _refusal(claimed) == "tampered"
    swapped = make_evidence(ACCUSED, CHECKER, DOMAIN, out + 0.7, out)
    assert _refusal(ev.model_copy(update={"accused_receipt": swapped.accused_receipt})) == "tampered"
    assert _refusal(ev.model_copy(update={"runner_signature": "0x" + "00" * 65})) == "unauthorized_runner"


def test_referee_must_side_with_the_checker() -> None:
    out = reference_output()
    confirmed = make_evidence(ACCUSED, CHECKER, DOMAIN, out + 0.5, out, referee=(REFEREE, out + 1e-6))
    verdict = check_evidence(confirmed, DOMAIN, lookup, ORACLE_DOMAIN, [RUNNER.address], require_referee=True)
    assert verdict.referee_node == REFEREE.address and verdict.accused_node == ACCUSED.address
    # the referee matches the accused: the checker is the odd one out, nothing is proven
    sides_with_accused = make_evidence(ACCUSED, CHECKER, DOMAIN, out + 0.5, out, referee=(REFEREE, out + 0.5))
    assert _refusal(sides_with_accused) == "checkers_disagree"
    # the referee matches neither
    neither = make_evidence(ACCUSED, CHECKER, DOMAIN, out + 0.5, out, referee=(REFEREE, out - 0.5))
    assert _refusal(neither) == "checkers_disagree"
    assert _refusal(make_evidence(ACCUSED, CHECKER, DOMAIN, out + 0.5, out), require_referee=True) == "referee_required"
    as_checker = make_evidence(ACCUSED, CHECKER, DOMAIN, out + 0.5, out, referee=(CHECKER, out))
    assert _refusal(as_checker) == "same_node"
    no_output = confirmed.model_copy(update={"referee_output": None})
    assert _refusal(no_output) == "tampered"  # the runner signed the referee's output labels
    assert _refusal(no_output.signed_by_runner(RUNNER.key, ORACLE_DOMAIN)) == "incomplete_referee"
    # the runner signed over the referee: stripping it to dodge the 2-of-3 rule breaks the signature
    stripped = confirmed.model_copy(update={"referee_node": None, "referee_receipt": None, "referee_output": None})
    assert _refusal(stripped) == "tampered"


def test_the_runner_signature_covers_how_outputs_are_split_and_compared() -> None:
    """Evidence that passed cannot be re-posted cut per value or under a stricter dtype."""
    out = reference_output()
    ev = make_evidence(ACCUSED, CHECKER, DOMAIN, out * 1.01, out, shard_dtype="bf16")
    assert _refusal(ev) == "within_tolerance"
    per_value = ev.model_copy(
        update={
            "accused_output": ev.accused_output.model_copy(update={"row_width": 1}),
            "checker_output": ev.checker_output.model_copy(update={"row_width": 1}),
        }
    )
    assert _refusal(per_value) == "tampered"
    assert _refusal(ev.model_copy(update={"shard_dtype": "fp32"})) == "tampered"
    # the checker's labels too: a passing evidence must not become "different" by relabelling one side
    relabelled = ev.model_copy(update={"checker_output": ev.checker_output.model_copy(update={"row_width": 1})})
    assert _refusal(relabelled) == "tampered"


def test_outputs_labelled_differently_prove_nothing() -> None:
    """Even a trusted runner's evidence whose outputs are cut or decoded differently is refused,
    not scored as an infinite difference: the labels are the runner's, not the nodes' doing."""
    out = reference_output()
    ev = make_evidence(ACCUSED, CHECKER, DOMAIN, out, out, row_width=4)
    relabelled = ev.model_copy(update={"checker_output": ev.checker_output.model_copy(update={"row_width": 1})})
    assert _refusal(relabelled.signed_by_runner(RUNNER.key, ORACLE_DOMAIN)) == "inconsistent_outputs"


def test_one_operator_cannot_be_both_accused_and_checker_or_confirm_itself() -> None:
    out = reference_output()
    same_op = {**REGISTRY, CHECKER.address: REGISTRY[ACCUSED.address]}
    ev = make_evidence(ACCUSED, CHECKER, DOMAIN, out + 0.5, out)
    with pytest.raises(EvidenceRefusedError) as err:
        check_evidence(ev, DOMAIN, same_op.get, ORACLE_DOMAIN, [RUNNER.address])
    assert err.value.reason == "same_operator"
    # a referee run by the checker's operator does not make two of three
    sybil = {**REGISTRY, REFEREE.address: REGISTRY[CHECKER.address]}
    ev = make_evidence(ACCUSED, CHECKER, DOMAIN, out + 0.5, out, referee=(REFEREE, out))
    with pytest.raises(EvidenceRefusedError) as err:
        check_evidence(ev, DOMAIN, sybil.get, ORACLE_DOMAIN, [RUNNER.address], True)
    assert err.value.reason == "same_operator"


def test_last_stage_tokens_may_differ_by_one_near_tie_per_sixteen() -> None:
    ids = np.arange(32)
    one_flip = ids.copy()
    one_flip[7] += 1  # a near-tie resolved the other way on other hardware
    assert compare_outputs(ids, one_flip, "ids").within
    three = one_flip.copy()
    three[[3, 20]] += 1
    assert not compare_outputs(ids, three, "ids").within
    short = np.arange(4)
    assert not compare_outputs(short, short + np.array([0, 0, 1, 0]), "ids").within  # under 16 tokens: exact
    assert not compare_outputs(ids, ids + 1, "ids").within  # a --byzantine last stage shifts every token


class Crash(BaseException):
    """The process dies here (not an Exception: nothing may catch and carry on)."""


def _crash(*_args: object, **_kw: object) -> None:
    raise Crash


def test_sampler_secret_is_created_whole_or_not_at_all(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "broker" / "spot_check_secret"
    monkeypatch.setattr(os, "fsync", _crash)
    with pytest.raises(Crash):
        load_or_create_secret(path)
    monkeypatch.undo()
    assert not path.exists() and list(path.parent.iterdir()) == []
    secret = load_or_create_secret(path)
    assert len(secret) == 32 and load_or_create_secret(path) == secret
    assert path.stat().st_mode & 0o777 == 0o600
    path.write_bytes(secret[:5])  # cut short by an older version's crash
    with pytest.raises(SpotCheckSecretError, match="5 bytes"):
        load_or_create_secret(path)
