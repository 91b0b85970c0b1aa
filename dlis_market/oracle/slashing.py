"""Put accepted spot-check evidence on chain: ``StakingManager.slash`` by the oracle account.

The oracle re-checks everything itself (:func:`verification.check_evidence`: a trusted runner
assigned the check, both receipt signers are registered nodes, the outputs are the signed ones and
differ beyond tolerance), refuses evidence whose hash was already used (the contract would revert
anyway), records the full evidence as a slash *intent* in the oracle's database (:mod:`store`: anyone
can audit a slash), then slashes the accused node's operator and records the result with the
verification results it yields, in one transaction. A crash between the two leaves an intent that
:meth:`Slasher.reconcile` finishes on restart from the chain's ``evidenceUsed`` view (used: done;
not used: sent now). A slash that leaves the operator below the minimum stake makes all its nodes
unroutable on chain (``NodeRegistry.isRoutable``).
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass

from eth_account.signers.local import LocalAccount
from web3 import Web3

from dlis_market.chain.errors import ContractRevertError
from dlis_market.chain.job_market import market_domain
from dlis_market.chain.node_registry import NodeRegistry
from dlis_market.chain.staking_manager import StakingManager
from dlis_market.chain.typed_data import Domain
from dlis_market.errors import ChainError
from dlis_market.oracle.errors import EvidenceRefusedError
from dlis_market.oracle.store import OracleStore, SlashIntent
from dlis_market.oracle.verification import NodeInfo, Verdict, check_evidence
from dlis_market.protocol.spot_checks import SpotCheckEvidence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlashResult:
    evidence_hash: bytes
    accused_node: str
    operator: str
    reporter: str
    slashed: int  # token units actually taken
    tx: str
    routable_after: bool
    rel_diff: float
    tolerance: float

    def as_dict(self) -> dict[str, object]:
        return {
            "evidence_hash": "0x" + self.evidence_hash.hex(),
            "accused_node": self.accused_node,
            "operator": self.operator,
            "reporter": self.reporter,
            "slashed": str(self.slashed),
            "tx": self.tx,
            "routable_after": self.routable_after,
            "rel_diff": self.rel_diff,
            "tolerance": self.tolerance,
        }


class Slasher:
    """Verifies evidence against the chain's registry and slashes on StakingManager."""

    def __init__(
        self,
        staking: StakingManager,
        registry: NodeRegistry,
        market_address: str,
        slasher: LocalAccount,
        amount: int,
        store: OracleStore,
        oracle_domain: Domain,
        runners: Collection[str] = (),
        require_referee: bool = False,
    ) -> None:
        """``runners``: addresses allowed to assign spot checks; the slasher account always is."""
        if amount <= 0:
            raise ValueError(f"slash amount must be positive, got {amount}")
        self.staking = staking
        self.registry = registry
        self.domain = market_domain(staking.client.chain_id, Web3.to_checksum_address(market_address))
        self.slasher = slasher
        self.amount = amount
        self.store = store
        self.oracle_domain = oracle_domain
        self.runners = {*runners, slasher.address}
        self.require_referee = require_referee

    def lookup(self, node: str) -> NodeInfo | None:
        rec = self.registry.get(node)
        return None if rec is None else NodeInfo(operator=rec.operator, active=rec.active)

    def verify(self, evidence: SpotCheckEvidence) -> Verdict:
        verdict = check_evidence(
            evidence, self.domain, self.lookup, self.oracle_domain, self.runners, self.require_referee
        )
        if self.staking.contract.functions.evidenceUsed(verdict.evidence_hash).call():
            raise EvidenceRefusedError(
                "already_slashed",
                f"evidence 0x{verdict.evidence_hash.hex()} (node {verdict.accused_node}, this job and range) "
                "was already used for a slash",
            )
        return verdict

    def submit(self, evidence: SpotCheckEvidence, epoch: int) -> SlashResult:
        """Verify, record the intent, slash, record the result (the accused failed and the checker
        passed a verification in ``epoch``); raises :class:`EvidenceRefusedError` and slashes
        nothing when the evidence proves nothing."""
        verdict = self.verify(evidence)
        intent = SlashIntent(
            evidence_hash="0x" + verdict.evidence_hash.hex(),
            epoch=epoch,
            accused_node=Web3.to_checksum_address(verdict.accused_node),
            checker_node=Web3.to_checksum_address(verdict.checker_node),
            operator=Web3.to_checksum_address(verdict.accused_operator),
            reporter=Web3.to_checksum_address(verdict.reporter),
            amount=self.amount,
        )
        intent = self.store.intend_slash(intent, evidence.model_dump_json(indent=2))
        return self._execute(intent, verdict.comparison.rel_diff, verdict.comparison.tolerance)

    def _execute(self, intent: SlashIntent, rel_diff: float, tolerance: float) -> SlashResult:
        """Send a recorded slash and record its result (a revert is recorded as the refusal, then raised)."""
        evidence_hash = bytes.fromhex(intent.evidence_hash[2:])
        before = self.staking.info(intent.operator)
        try:
            receipt = self.staking.slash(self.slasher, intent.operator, intent.amount, evidence_hash, intent.reporter)
        except ContractRevertError as exc:
            self.store.fail_slash(intent.evidence_hash, str(exc))
            raise
        after = self.staking.info(intent.operator)
        node = self.registry.get(intent.accused_node)
        result = SlashResult(
            evidence_hash=evidence_hash,
            accused_node=intent.accused_node,
            operator=intent.operator,
            reporter=intent.reporter,
            slashed=(before.active + before.unbonding) - (after.active + after.unbonding),
            tx="0x" + bytes(receipt["transactionHash"]).hex(),
            routable_after=bool(node and node.routable),
            rel_diff=rel_diff,
            tolerance=tolerance,
        )
        self.store.finish_slash(intent.evidence_hash, result.as_dict())
        return result

    def reconcile(self) -> int:
        """Finish the slash intents a crash left (at start): evidence the chain already used is
        recorded as done, the rest is sent now. How many were finished either way."""
        done = 0
        for intent in self.store.open_slashes():
            used = self.staking.contract.functions.evidenceUsed(bytes.fromhex(intent.evidence_hash[2:])).call()
            if used:
                done += self.store.finish_slash(intent.evidence_hash, {"reconciled": "evidence used on chain"})
                continue
            try:
                self._execute(intent, float("nan"), float("nan"))
            except ChainError as exc:  # a refusal is recorded; an unreachable chain leaves the intent for next start
                log.error("slash %s of %s not finished: %s", intent.evidence_hash, intent.accused_node, exc)
                continue
            done += 1
        return done
