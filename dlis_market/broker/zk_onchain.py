"""Recording proven jobs' head proofs on chain (``zk.record_on_chain``; off by default).

After the broker has verified a job's head proof (``broker/zk_proofs.py``), :class:`ProofRecorder`
queues it in a persisted outbox (written, then the loop woken: the job does not wait); the outbox's
loop hands it to ``StageProofRegistry.recordProof``,
where the chain checks it again itself (contracts/StageProofRegistry.sol) and records it under the
receipt's digest, with a ``StageProven`` event naming the job. The first proof of a circuit also
registers the circuit: the broker deploys EZKL's reusable verifier once per chain (its address
kept in ``zk_cache_dir``), renders the circuit's VKA next to its keys and registers it with the
CIRCUIT_ADMIN_ROLE it is granted at deployment (it set the circuit up itself from the public
weights, as for its own check).

Delivery follows the outbox's rule: a proof leaves the queue only once the chain recorded it, or
already has it (``AlreadyProven`` for this node: a second delivery after a crash changes nothing);
a refusal by the contract, or a row that does not parse, is kept as a dead letter with its
reason; anything else (the chain unreachable, a transaction not mined, a nonce taken, EZKL or
solcjs failing to build the verifier) is retried with backoff, after a broker restart too. A
job's answer never waits for the chain, and nothing the chain does fails a job: its proof was
verified before it was queued. Transactions share the broker account's nonce sequence with
settlement through ``ChainClient``'s send lock.

Costs (``bench/zk_onchain.py``): 1.1-1.9M gas a proof for heads up to 16 x 32 and 4 tokens, about
10-15x settling the job; the verifier 2.4M gas once per chain, each circuit 0.28-0.38M gas once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from eth_account.signers.local import LocalAccount
from eth_utils import keccak
from web3 import Web3
from web3.types import TxReceipt

from dlis_market.chain.client import ChainClient
from dlis_market.chain.errors import ContractRevertError
from dlis_market.chain.market_messages import SignedReceipt
from dlis_market.chain.stage_proofs import (
    CircuitRegistration,
    StageProofRegistry,
    VerifierBuildError,
    compile_verifier,
    deploy_verifier,
    evm_calldata,
    read_vka,
    render_verifier,
)
from dlis_market.errors import ChainError
from dlis_market.oracle.zk_verify import StageVerifyingKey
from dlis_market.protocol.outbox import Answer, Message, Outbox, Verdict
from dlis_market.protocol.receipts import ReceiptWire, StageReceipt
from dlis_market.types import WireModel

log = logging.getLogger(__name__)

RECORD_KIND = "zk-record"


class UnrecordableProofError(ChainError):
    """A queued proof that no later delivery can record (its circuit's files changed since)."""


class ProofToRecord(WireModel):
    """One verified head proof as it waits in the outbox (JSON)."""

    job_id: str
    node: str
    vk_hash: str  # of the key the broker verified the proof with (the key files may change later)
    receipt: ReceiptWire
    claim_signature: str
    proof: str  # EZKL's proof JSON
    token_ids: list[int]
    vk_path: str
    settings_path: str
    srs_path: str

    @classmethod
    def of(cls, receipt: StageReceipt, key: StageVerifyingKey, generated: list[int]) -> ProofToRecord:
        claim = receipt.proof
        if claim is None:
            raise ValueError("a receipt without a proof claim has nothing to record")
        return cls(
            job_id=receipt.signed.receipt.job_id.hex(), node=receipt.node, vk_hash=key.vk_hash.hex(),
            receipt=ReceiptWire.from_signed(receipt.signed), claim_signature=claim.signature.hex(),
            proof=claim.proof.decode(), token_ids=list(generated), vk_path=str(key.vk_path),
            settings_path=str(key.settings_path), srs_path=str(key.srs_path),
        )  # fmt: skip

    def key(self) -> StageVerifyingKey:
        return StageVerifyingKey(Path(self.settings_path), Path(self.vk_path), Path(self.srs_path))


class ProofRecorder:
    """Queues verified head proofs and records them on chain from ``account`` (see the module doc).

    Call :meth:`start` in the broker's event loop (rows an earlier run left go out) and
    :meth:`close` when it stops."""

    def __init__(self, client: ChainClient, account: LocalAccount, outbox: Outbox, cache_dir: Path) -> None:
        self.client = client
        self.account = account
        self.outbox = outbox
        self.cache_dir = cache_dir
        self.registry = StageProofRegistry(client)
        self._verifier: str | None = None
        outbox.register(RECORD_KIND, self._deliver, on_answer=self._heard)

    def start(self) -> None:
        self.outbox.start()

    async def close(self) -> None:
        await self.outbox.close()

    async def submit(self, receipt: StageReceipt, key: StageVerifyingKey, generated: list[int]) -> None:
        """Queue the verified proof of ``receipt``: persisted before this returns, delivered by the
        outbox's loop (never here: a job does not wait for the chain)."""
        item = ProofToRecord.of(receipt, key, generated)
        await self.outbox.put(RECORD_KIND, f"{item.node.lower()}:{item.job_id}", item.model_dump_json().encode())

    @staticmethod
    def _heard(message: Message, answer: Answer) -> None:
        if answer.verdict is Verdict.REFUSED:
            log.warning("zk proof %s refused on chain: %s (kept as a dead letter)", message.key, answer.detail)

    async def _deliver(self, body: bytes) -> Answer:
        try:
            item = ProofToRecord.model_validate_json(body)
            signed, vk_hash = item.receipt.signed(), bytes.fromhex(item.vk_hash)
            claim = bytes.fromhex(item.claim_signature)
            proof, instances = evm_calldata(item.proof.encode())
        except (ValueError, TypeError, KeyError, VerifierBuildError) as exc:  # a row no delivery can fix
            return Answer(Verdict.REFUSED, f"not a recordable proof: {exc}")
        try:
            tx = await asyncio.to_thread(self._record, item, signed, vk_hash, proof, instances, claim)
        except ContractRevertError as exc:
            if exc.error == "StageProofRegistryAlreadyProven":  # keyed by (receipt, node): this node's record
                return Answer(Verdict.DUPLICATE, str(exc))
            return Answer(Verdict.REFUSED, str(exc))
        except UnrecordableProofError as exc:
            return Answer(Verdict.REFUSED, str(exc))
        except Exception as exc:
            return Answer(Verdict.RETRY, f"{type(exc).__name__}: {exc}")
        log.info("zk proof of job %s recorded on chain in block %s (%s gas)", item.job_id, tx["blockNumber"],
                 tx["gasUsed"])  # fmt: skip
        return Answer(Verdict.DELIVERED, f"block {tx['blockNumber']}")

    def _record(
        self, item: ProofToRecord, signed: SignedReceipt, vk_hash: bytes, proof: bytes, instances: list[int],
        claim: bytes,
    ) -> TxReceipt:  # fmt: skip
        vka = self._circuit(item.key(), vk_hash, signed.receipt.model_id)
        return self.registry.record(self.account, signed, vk_hash, proof, instances, vka, claim, item.token_ids)

    def _circuit(self, key: StageVerifyingKey, vk_hash: bytes, model_id: bytes) -> list[bytes]:
        """The circuit's VKA words, registering the circuit on chain first if it is not yet."""
        try:
            vk = key.vk_path.read_bytes()
        except OSError as exc:
            raise UnrecordableProofError(f"the circuit's key {key.vk_path} is gone ({exc})") from exc
        if bytes(keccak(vk)) != vk_hash:
            raise UnrecordableProofError(
                f"the key at {key.vk_path} hashes to 0x{bytes(keccak(vk)).hex()}, not the 0x{vk_hash.hex()} the proof "
                "was verified with: the circuit was set up again since; its proof cannot be registered from these files"
            )
        evm = key.vk_path.parent / f"evm-{vk_hash.hex()[:16]}"  # named by the key it was rendered from
        if not (evm / "vka.bin").exists():
            # rendered from the bytes just hashed (a set-up running meanwhile cannot swap them), then
            # moved into place whole
            with tempfile.TemporaryDirectory(dir=key.vk_path.parent, prefix=".evm-") as tmp:
                frozen = Path(tmp) / "vk.key"
                frozen.write_bytes(vk)
                render_verifier(frozen, key.settings_path, key.srs_path, Path(tmp) / "evm")
                shutil.rmtree(evm, ignore_errors=True)
                os.replace(Path(tmp) / "evm", evm)
        vka = read_vka(evm / "vka.bin")
        if self.registry.circuit_of(vk_hash) is None:
            circuit = CircuitRegistration(
                vk_hash, self._verifier_address(evm / "Verifier.sol"), vka, model_id, key.output_shape[-1],
                key.output_tolerance,
            )  # fmt: skip
            try:
                self.registry.register_circuit(self.account, circuit)
            except ContractRevertError as exc:  # a peer broker registered it meanwhile
                if exc.error != "StageProofRegistryCircuitExists":
                    raise
        return vka

    def _verifier_address(self, sol: Path) -> str:
        """EZKL's reusable verifier on this chain (the same for every circuit): deployed by this
        broker once, its address kept in the zk cache."""
        if self._verifier is not None:
            return self._verifier
        w3 = self.client.w3
        path = self.cache_dir / f"halo2-verifier-{self.client.chain_id}-{self.registry.address.lower()}.json"
        if path.exists():
            kept = Web3.to_checksum_address(json.loads(path.read_text())["address"])
            if len(w3.eth.get_code(kept)) > 0:
                self._verifier = kept
                return kept
        deployed = deploy_verifier(self.client, self.account, compile_verifier(sol))
        address = str(deployed["contractAddress"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"address": address, "block": deployed["blockNumber"]}))
        self._verifier = address
        return address
