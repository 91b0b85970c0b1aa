"""Checking the proof a job's last stage sends when the job asked for one (``proof: zk``).

The last stage proves, with EZKL (halo2/KZG), that its final norm + LM head maps the row each
token was sampled from to logits whose best entry is that token (``inference/zk_stage.py``), and
signs a ``StageProof`` binding the proof to its receipt (``protocol/zk_claims.py``). With the proof
it sends every row its head read. The broker accepts the answer only when:

1. those rows are exactly the activations the stage's signed fingerprint commits to (so the
   proof is about the computation the fingerprint spot checks validate, not other rows);
2. the proof's input commitment is the Poseidon hash of the rows the tokens were sampled from;
3. the proof verifies against the circuit the broker sets up itself from the model's public
   weights (never a key the worker sends), is signed for the receipt, and its logits pick exactly
   the receipt's tokens (:func:`dlis_market.oracle.zk_verify.verify_stage_proof`).

A job whose proof does not check fails and nothing is charged: the client asked for a proven answer.
What it covers, exactly: the head's step from the committed activations to the tokens; the layers
before it are covered by the fingerprint and its spot checks, not by the proof.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from dlis_market.chain.typed_data import Domain
from dlis_market.inference.manifest import load_manifest
from dlis_market.inference.zk_stage import head_circuit
from dlis_market.oracle.zk_verify import StageVerifyingKey, ZkProofRefusedError, input_commitment, verify_stage_proof
from dlis_market.protocol.errors import FingerprintError
from dlis_market.protocol.fingerprints import commits_to
from dlis_market.protocol.receipts import StageReceipt
from dlis_market.settings import Settings

if TYPE_CHECKING:
    from dlis_market.inference.stage import Stage  # with transformers, on the first proof (not at start)


@dataclass(frozen=True)
class CheckedProof:
    account: str  # one line for the job's log
    key: StageVerifyingKey  # the circuit it verified against (what an on-chain record registers)


class HeadProofs:
    """Verifies head proofs for the models a broker serves (the last stage's weights loaded once
    per shard folder, circuits set up once per token count and cached under ``zk_cache_dir``)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._heads: dict[Path, Stage] = {}

    def _head(self, shard_dir: Path) -> Stage:
        if shard_dir not in self._heads:
            from dlis_market.inference.stage import Stage

            last = len(load_manifest(shard_dir).stages) - 1
            self._heads[shard_dir] = Stage.load(shard_dir, index=last)
        return self._heads[shard_dir]

    def verify(
        self,
        shard_dir: Path,
        receipt: StageReceipt,
        domain: Domain,
        prompt_tokens: int,
        generated: Sequence[int],
    ) -> CheckedProof:
        """The verified proof's one-line account and circuit; :class:`ZkProofRefusedError` otherwise."""
        claim = receipt.proof
        if claim is None or claim.error:
            why = claim.error if claim is not None else "the last stage sent none"
            raise ZkProofRefusedError("no_proof", f"the job asked for a proof of its head and got none: {why}")
        signed = receipt.signed.receipt
        head = self._head(shard_dir)
        hidden = int(head.config.hidden_size)
        rows = np.frombuffer(claim.rows, dtype="<f4")
        if rows.size != signed.tokens * hidden:
            raise ZkProofRefusedError(
                "malformed", f"{rows.size} row values sent for {signed.tokens} tokens of width {hidden}"
            )
        rows = rows.reshape(signed.tokens, hidden)
        try:
            committed = commits_to(receipt.fingerprint, [torch.from_numpy(rows.copy())])
        except FingerprintError:
            committed = False
        if not committed:
            raise ZkProofRefusedError(
                "not_committed",
                "the rows sent with the proof are not the activations the stage's fingerprint commits to",
            )
        x = rows[prompt_tokens - 1 :]
        if x.shape[0] != len(generated):
            raise ZkProofRefusedError(
                "malformed", f"{x.shape[0]} rows after the prompt's last position for {len(generated)} tokens"
            )
        began = time.perf_counter()
        circuit = head_circuit(head.model, x.shape[0], self.settings.zk_cache_dir, self.settings.zk.srs_dir)
        key = StageVerifyingKey(circuit.settings_path, circuit.vk_path, circuit.srs_path)
        verified = verify_stage_proof(
            proof=claim.proof, claim_signature=claim.signature, signed_receipt=receipt.signed, node=receipt.node,
            domain=domain, key=key, expected_input_commitment=input_commitment(x, key.input_scale),
            output=np.asarray(generated, dtype="<i8").tobytes(), output_dtype="int64",
        )  # fmt: skip
        took = time.perf_counter() - began
        account = (
            f"proof verified (zk, halo2 over {len(generated)} head calls; {len(claim.proof)} bytes, proved in "
            f"{claim.prove_ms} ms, checked in {took * 1000:.0f} ms of which halo2 {verified.verify_s * 1000:.0f} ms)"
        )
        return CheckedProof(account, key)
