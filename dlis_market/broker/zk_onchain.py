"""Recording proven jobs' head proofs on chain (``zk.record_on_chain``; off by default).

After the broker has verified a job's head proof (``broker/zk_proofs.py``), :class:`ProofRecorder`
queues it in a persisted outbox; the outbox's loop hands it to ``StageProofRegistry.recordProof``,
where the chain checks it again itself (contracts/StageProofRegistry.sol) and records it under the
receipt's digest, with a ``StageProven`` event naming the job. The first proof of a circuit also
registers the circuit: the broker deploys EZKL's reusable verifier once per chain (its address
kept in ``zk_cache_dir``), renders the circuit's VKA next to its keys and registers it with the
CIRCUIT_ADMIN_ROLE it is granted at deployment (it set the circuit up itself from the public
weights, as for its own check).

Delivery follows the outbox's rule: a proof leaves the queue only once the chain recorded it, or
already has it (``AlreadyProven``: a second delivery after a crash changes nothing); a refusal by
the contract is kept as a dead letter with its reason; an unreachable chain is retried with
backoff, after a broker restart too. A job's answer never waits for the chain, and nothing the
chain does fails a job: its proof was verified before it was queued.

Costs (``bench/zk_onchain.py``): 1.1-1.8M gas a proof for heads up to 16 x 32 and 4 tokens, about
10x settling the job; the verifier 2.4M gas once per chain, each circuit 0.24-0.37M gas once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from eth_account.signers.local import LocalAccount
from web3 import Web3

from dlis_market.chain.client import ChainClient
from dlis_market.chain.errors import ContractRevertError
from dlis_market.chain.market_messages import Receipt, SignedReceipt
from dlis_market.chain.stage_proofs import (
    StageProofRegistry,
    VerifierBuildError,
    compile_verifier,
    deploy_verifier,
    evm_calldata,
    read_vka,
    render_verifier,
)
from dlis_market.chain.typed_data import CompactSignature
from dlis_market.errors import DlisError
from dlis_market.oracle.zk_verify import StageVerifyingKey
from dlis_market.protocol.outbox import Answer, Message, Outbox, Verdict
from dlis_market.protocol.receipts import StageReceipt

log = logging.getLogger(__name__)

RECORD_KIND = "zk-record"
# How far below its row's best logit a billed token's proven logit may sit, as the broker's own
# check allows (oracle.zk_verify.verify_stage_proof's tolerance), in the circuit's fixed point.
TOLERANCE = 0.1


@dataclass(frozen=True)
class ProofToRecord:
    """One verified head proof as it waits in the outbox (JSON; byte fields in hex)."""

    job_id: str
    node: str
    receipt: dict[str, str | int]
    receipt_signature: str
    claim_signature: str
    proof: str  # EZKL's proof JSON
    token_ids: list[int]
    vk_path: str
    settings_path: str
    srs_path: str

    @classmethod
    def of(cls, receipt: StageReceipt, key: StageVerifyingKey, generated: list[int]) -> ProofToRecord:
        r, claim = receipt.signed.receipt, receipt.proof
        if claim is None:
            raise ValueError("a receipt without a proof claim has nothing to record")
        return cls(
            job_id=r.job_id.hex(), node=receipt.node,
            receipt={"job_id": r.job_id.hex(), "model_id": r.model_id.hex(), "start": r.start, "end": r.end,
                     "tokens": r.tokens, "output_hash": r.output_hash.hex(), "amount": str(r.amount)},
            receipt_signature=receipt.signed.signature.signature.hex(), claim_signature=claim.signature.hex(),
            proof=claim.proof.decode(), token_ids=list(generated), vk_path=str(key.vk_path),
            settings_path=str(key.settings_path), srs_path=str(key.srs_path),
        )  # fmt: skip

    def signed_receipt(self) -> SignedReceipt:
        f = self.receipt
        r = Receipt(
            bytes.fromhex(str(f["job_id"])), bytes.fromhex(str(f["model_id"])), int(f["start"]), int(f["end"]),
            int(f["tokens"]), bytes.fromhex(str(f["output_hash"])), int(f["amount"]),
        )  # fmt: skip
        return SignedReceipt(r, CompactSignature.from_bytes(bytes.fromhex(self.receipt_signature)))

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
        self._chain = threading.Lock()  # one transaction sequence at a time (nonces)
        outbox.register(RECORD_KIND, self._deliver, on_answer=self._heard)

    def start(self) -> None:
        self.outbox.start()

    async def close(self) -> None:
        await self.outbox.close()

    async def submit(self, receipt: StageReceipt, key: StageVerifyingKey, generated: list[int]) -> None:
        """Queue the verified proof of ``receipt`` (persisted before this returns) and try once."""
        item = ProofToRecord.of(receipt, key, generated)
        await self.outbox.send(RECORD_KIND, f"{item.node.lower()}:{item.job_id}", json.dumps(asdict(item)).encode())

    @staticmethod
    def _heard(message: Message, answer: Answer) -> None:
        if answer.verdict is Verdict.REFUSED:
            log.warning("zk proof %s refused on chain: %s (kept as a dead letter)", message.key, answer.detail)

    async def _deliver(self, body: bytes) -> Answer:
        try:
            item = ProofToRecord(**json.loads(body))
        except (ValueError, TypeError) as exc:
            return Answer(Verdict.REFUSED, f"not a queued proof: {exc}")
        try:
            return await asyncio.to_thread(self._record, item)
        except ContractRevertError as exc:
            if exc.error == "StageProofRegistryAlreadyProven":
                return Answer(Verdict.DUPLICATE, str(exc))
            return Answer(Verdict.REFUSED, str(exc))
        except VerifierBuildError as exc:  # the circuit's files are gone or EZKL cannot render them
            return Answer(Verdict.REFUSED, str(exc))
        except (DlisError, OSError, ValueError) as exc:  # the chain unreachable, a tx not mined: try later
            return Answer(Verdict.RETRY, f"{type(exc).__name__}: {exc}")

    def _record(self, item: ProofToRecord) -> Answer:
        key = item.key()
        proof, instances = evm_calldata(item.proof.encode())
        with self._chain:
            vka = self._circuit(key)
            tx = self.registry.record(
                self.account, item.signed_receipt(), key.vk_hash, proof, instances, vka,
                bytes.fromhex(item.claim_signature), item.token_ids,
            )  # fmt: skip
        log.info("zk proof of job %s recorded on chain in block %s (%s gas)", item.job_id, tx["blockNumber"],
                 tx["gasUsed"])  # fmt: skip
        return Answer(Verdict.DELIVERED, f"block {tx['blockNumber']}")

    def _circuit(self, key: StageVerifyingKey) -> list[bytes]:
        """The circuit's VKA words, registering the circuit on chain first if it is not yet."""
        vka_file = key.vk_path.parent / "vka.bin"
        if not vka_file.exists():
            render_verifier(key.vk_path, key.settings_path, key.srs_path, key.vk_path.parent / "evm")
            (key.vk_path.parent / "evm" / "vka.bin").replace(vka_file)
        vka = read_vka(vka_file)
        verifier, _, _, _ = self.registry.circuit_of(key.vk_hash)
        if int(verifier, 16) == 0:
            vocab = key.output_shape[-1]
            tolerance = int(TOLERANCE * 2**key.output_scale)
            try:
                self.registry.register_circuit(self.account, key.vk_hash, self._verifier_address(key), vka, vocab,
                                               tolerance)  # fmt: skip
            except ContractRevertError as exc:  # a peer broker registered it meanwhile
                if exc.error != "StageProofRegistryCircuitExists":
                    raise
        return vka

    def _verifier_address(self, key: StageVerifyingKey) -> str:
        """EZKL's reusable verifier on this chain: deployed by this broker once, its address kept."""
        if self._verifier is not None:
            return self._verifier
        w3 = self.client.w3
        path = self.cache_dir / f"halo2-verifier-{self.client.chain_id}-{self.registry.address.lower()}.json"
        if path.exists():
            kept = Web3.to_checksum_address(json.loads(path.read_text())["address"])
            if len(w3.eth.get_code(kept)) > 0:
                self._verifier = kept
                return kept
        rendered = render_verifier(key.vk_path, key.settings_path, key.srs_path, self.cache_dir / "evm-verifier")
        deployed = deploy_verifier(self.client, self.account, compile_verifier(rendered.sol))
        address = str(deployed["contractAddress"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"address": address, "block": deployed["blockNumber"]}))
        self._verifier = address
        return address
