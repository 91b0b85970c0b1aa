"""Binding of contracts/ReputationOracle.sol."""

from __future__ import annotations

from collections.abc import Sequence

from eth_account.signers.local import LocalAccount
from web3.types import TxReceipt

from dlis_market.chain.client import ChainClient


class ReputationOracle:
    def __init__(self, client: ChainClient):
        self.client = client
        self.contract = client.contract("ReputationOracle")
        self.address = self.contract.address

    def post_epoch(
        self, oracle: LocalAccount, epoch: int, nodes: Sequence[str], scores_bps: Sequence[int], telemetry_root: bytes
    ) -> TxReceipt:
        fn = self.contract.functions.postEpoch(epoch, list(nodes), list(scores_bps), telemetry_root)
        return self.client.transact(oracle, fn)

    def latest(self, node: str) -> tuple[int, int]:
        score, epoch = self.contract.functions.latestReputation(node).call()
        return int(score), int(epoch)

    def at(self, node: str, epoch: int) -> int:
        return int(self.contract.functions.reputationAt(node, epoch).call())

    def latest_epoch(self) -> int:
        return int(self.contract.functions.latestEpoch().call())

    def telemetry_root(self, epoch: int) -> bytes:
        root, _, _ = self.contract.functions.epochInfo(epoch).call()
        return bytes(root)

    def verify(self, epoch: int, leaf: bytes, proof: Sequence[bytes]) -> bool:
        return bool(self.contract.functions.verifyTelemetry(epoch, leaf, list(proof)).call())
