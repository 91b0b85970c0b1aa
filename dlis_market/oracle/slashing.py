"""Put accepted spot-check evidence on chain: ``StakingManager.slash`` by the oracle account.

The oracle re-checks everything itself (:func:`verification.check_evidence`: a trusted runner
assigned the check, both receipt signers are registered nodes, the outputs are the signed ones and
differ beyond tolerance), refuses evidence whose hash was already used (the contract would revert
anyway), keeps the full evidence as JSON under ``evidence_dir/<evidence hash>.json`` so anyone
can audit a slash, then slashes the accused node's operator. A slash that leaves the operator
below the minimum stake makes all its nodes unroutable on chain (``NodeRegistry.isRoutable``).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from eth_account.signers.local import LocalAccount
from web3 import Web3

from dlis_market.chain.job_market import market_domain
from dlis_market.chain.node_registry import NodeRegistry
from dlis_market.chain.staking_manager import StakingManager
from dlis_market.chain.typed_data import Domain
from dlis_market.oracle.errors import EvidenceRefusedError
from dlis_market.oracle.state_files import write_atomic
from dlis_market.oracle.verification import NodeInfo, SpotCheckEvidence, Verdict, check_evidence


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
        evidence_dir: Path,
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
        self.evidence_dir = evidence_dir
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

    def submit(self, evidence: SpotCheckEvidence) -> SlashResult:
        """Verify, store and slash; raises :class:`EvidenceRefusedError` and slashes nothing otherwise."""
        verdict = self.verify(evidence)
        write_atomic(self.evidence_dir / f"0x{verdict.evidence_hash.hex()}.json", evidence.model_dump_json(indent=2))
        before = self.staking.info(verdict.accused_operator)
        receipt = self.staking.slash(
            self.slasher, verdict.accused_operator, self.amount, verdict.evidence_hash, verdict.reporter
        )
        after = self.staking.info(verdict.accused_operator)
        node = self.registry.get(verdict.accused_node)
        return SlashResult(
            evidence_hash=verdict.evidence_hash,
            accused_node=verdict.accused_node,
            operator=verdict.accused_operator,
            reporter=verdict.reporter,
            slashed=(before.active + before.unbonding) - (after.active + after.unbonding),
            tx="0x" + bytes(receipt["transactionHash"]).hex(),
            routable_after=bool(node and node.routable),
            rel_diff=verdict.comparison.rel_diff,
            tolerance=verdict.comparison.tolerance,
        )
