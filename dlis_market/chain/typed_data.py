"""EIP-712 typed data of the market: every signed message's fields, and the one builder for them.

Every message type any component signs is registered in :data:`TYPES`, and every signature, digest
and recovery goes through :func:`full_message` (:func:`sign_typed`, :func:`recover_typed`,
:func:`typed_digest`): no other module writes the ``{"types", "primaryType", "domain",
"message"}`` structure. The Solidity contracts hold the on-chain types' strings as ``*_TYPEHASH``
constants; the contract tests assert ``keccak256(type_string(...))`` here equals the on-chain
constant and that signatures made here verify on chain. Every domain carries the chain id and the
verifying contract.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eth_account import Account
from eth_account.messages import SignableMessage, encode_typed_data
from eth_keys.exceptions import BadSignature
from eth_utils import keccak

# Field lists, in signing order. Those the contracts check (NodeBinding, JobAuthorization, Receipt,
# BatchReceipt, PaymentTicket) must match the contracts' type strings exactly; changing any list
# changes every signature of its type.
NODE_BINDING = [
    ("operator", "address"),
    ("node", "address"),
    ("peerId", "string"),
    ("deadline", "uint256"),
]
JOB_AUTHORIZATION = [
    ("client", "address"),
    ("broker", "address"),
    ("modelId", "bytes32"),
    ("maxCost", "uint256"),
    ("nonce", "uint256"),
    ("deadline", "uint256"),
]
RECEIPT = [
    ("jobId", "bytes32"),
    ("modelId", "bytes32"),
    ("start", "uint32"),
    ("end", "uint32"),
    ("tokens", "uint32"),
    ("outputHash", "bytes32"),
    ("amount", "uint256"),
]
# A node's one receipt for all its stages in a JobMarket.settleBatchMerkle batch: ``root`` is the
# Merkle root of its leaves (each the EIP-712 struct hash of a ``Receipt``, in batch order).
BATCH_RECEIPT = [
    ("node", "address"),
    ("broker", "address"),
    ("batchId", "bytes32"),
    ("root", "bytes32"),
    ("total", "uint256"),
    ("count", "uint32"),
]
# A client's probabilistic payment to one node (JobMarket.redeemWinningTicket): wins when
# keccak256(r ++ vs ++ recipientRand) < winProb and then pays faceValue.
PAYMENT_TICKET = [
    ("client", "address"),
    ("broker", "address"),
    ("recipient", "address"),
    ("faceValue", "uint256"),
    ("winProb", "uint256"),
    ("recipientRandHash", "bytes32"),
    ("nonce", "uint256"),
    ("deadline", "uint256"),
]
# Off-chain only (signed and checked by peers, never by a contract): a worker's DHT announcement,
# signed by its node key under the NodeRegistry domain (dlis_market/protocol/spans.py), and a
# broker's permission to open a session, signed under the JobMarket domain (protocol/tickets.py).
# Times are unix milliseconds; throughput is tokens/s x 1000.
SPAN_ANNOUNCEMENT = [
    ("model", "string"),
    ("start", "uint32"),
    ("end", "uint32"),
    ("peerId", "string"),
    ("node", "address"),
    ("throughputMilli", "uint64"),
    ("freeSlots", "uint32"),
    ("openerSlots", "uint32"),
    ("queueLength", "uint32"),
    ("pricePerToken", "uint256"),
    ("attestationHash", "bytes32"),
    ("online", "bool"),
    ("startedAtMs", "uint64"),
    ("announcedAtMs", "uint64"),
    ("expiresAtMs", "uint64"),
]
SESSION_TICKET = [
    ("jobId", "bytes32"),
    ("model", "string"),
    ("start", "uint32"),
    ("end", "uint32"),
    ("pricePerToken", "uint256"),
    ("opener", "string"),
    ("expiresAtMs", "uint64"),
]
# A client's permission to read one job's prompt and answer until ``expiry`` (unix seconds),
# signed under the JobMarket domain and checked by the broker (dlis_market/broker/auth.py).
JOB_READ = [("jobId", "bytes32"), ("expiry", "uint256")]
# A client's request for an API key at one broker (dlis_market/broker/apikeys.py): proves the
# account over HTTP; the spending cap itself is what the client then authorizes on chain
# (JobMarket.setSpender). ``deadline`` bounds the request's life; ``nonce`` makes each one unique.
API_KEY_REQUEST = [
    ("client", "address"),
    ("broker", "address"),
    ("cap", "uint256"),
    ("expiresAt", "uint64"),
    ("nonce", "uint256"),
    ("deadline", "uint64"),
]
# A worker's attestation report (dlis_market/node/attestation.py), signed by its node key under the
# NodeRegistry domain; ``reportHash`` is keccak256 of the report's canonical JSON.
NODE_ATTESTATION = [("reportHash", "bytes32"), ("node", "address"), ("peerId", "string"), ("timestamp", "uint64")]
# The rest are signed under the oracle's domain (dlis_market/protocol/telemetry.py oracle_domain).
# A worker's telemetry report, signed by its node key; ``metricsHash`` is keccak256 of the metrics'
# canonical JSON, and the digest is the Merkle leaf of an epoch (dlis_market/protocol/telemetry.py).
TELEMETRY = [
    ("node", "address"),
    ("seq", "uint64"),
    ("timestamp", "uint64"),
    ("metricsHash", "bytes32"),
]
# A spot-check runner's evidence that two nodes' outputs of one stage call differ
# (dlis_market/protocol/spot_checks.py).
SPOT_CHECK = [
    ("accused", "address"),
    ("checker", "address"),
    ("jobId", "bytes32"),
    ("modelId", "bytes32"),
    ("start", "uint32"),
    ("end", "uint32"),
    ("tokens", "uint32"),
    ("inputHash", "bytes32"),
    ("accusedOutputHash", "bytes32"),
    ("checkerOutputHash", "bytes32"),
    ("referee", "address"),  # zero when the evidence has no referee
    ("refereeOutputHash", "bytes32"),
    # how each output splits into tokens and how its bytes decode: all under the runner's signature,
    # or anyone relaying a passing evidence could make the outputs "differ" by re-labelling them
    ("rowWidth", "uint32"),
    ("checkerRowWidth", "uint32"),
    ("refereeRowWidth", "uint32"),
    ("shardDtype", "string"),
    ("elementDtype", "string"),
    ("checkerElementDtype", "string"),
    ("refereeElementDtype", "string"),
]
# A runner's statement that a node withheld what a drawn spot check needed (protocol/spot_checks.py).
SPOT_CHECK_FAILURE = [
    ("node", "address"),
    ("jobId", "bytes32"),
    ("start", "uint32"),
    ("end", "uint32"),
    ("reason", "string"),
]
# A spot-check runner's statement that a replica accepted ``node``'s call from its signed activation
# fingerprint (one prefill): a passed verification for its reputation. ``fingerprintHash`` is the
# sha256 the node signed in its StageFingerprint, so the pass is of exactly that commitment.
FINGERPRINT_CHECK_PASS = [
    ("node", "address"),
    ("checker", "address"),
    ("jobId", "bytes32"),
    ("start", "uint32"),
    ("end", "uint32"),
    ("fingerprintHash", "bytes32"),
]
# A node's claim that a zero-knowledge proof is of the stage call its receipt bills
# (dlis_market/oracle/zk_verify.py): ``receiptDigest`` is the receipt's EIP-712 digest under the
# JobMarket domain, ``instancesHash`` keccak256 of the proof's public instances as 32-byte words,
# ``vkHash`` keccak256 of the verification key. Signed under the JobMarket domain too.
STAGE_PROOF = [
    ("receiptDigest", "bytes32"),
    ("instancesHash", "bytes32"),
    ("vkHash", "bytes32"),
]
# A node's commitment to the activations of the stage call its receipt bills
# (dlis_market/protocol/fingerprints.py, node/receipts.py): ``receiptDigest`` as in StageProof,
# ``fingerprintHash`` sha256 of the fingerprint bytes. Signed under the JobMarket domain; checked
# by the driver with every receipt and by the spot-check runner against a replica's prefill.
STAGE_FINGERPRINT = [
    ("receiptDigest", "bytes32"),
    ("fingerprintHash", "bytes32"),
]
# What the broker measured a node do for one job (dlis_market/oracle/observations.py).
STAGE_OBSERVATION = [
    ("node", "address"),
    ("jobId", "bytes32"),
    ("start", "uint32"),
    ("end", "uint32"),
    ("tokens", "uint32"),
    ("latencyMs", "uint32"),
    ("routedMilliTps", "uint64"),
    ("ok", "bool"),
]
TYPES: dict[str, list[tuple[str, str]]] = {
    "NodeBinding": NODE_BINDING,
    "JobAuthorization": JOB_AUTHORIZATION,
    "Receipt": RECEIPT,
    "BatchReceipt": BATCH_RECEIPT,
    "PaymentTicket": PAYMENT_TICKET,
    "SpanAnnouncement": SPAN_ANNOUNCEMENT,
    "SessionTicket": SESSION_TICKET,
    "JobRead": JOB_READ,
    "ApiKeyRequest": API_KEY_REQUEST,
    "NodeAttestation": NODE_ATTESTATION,
    "Telemetry": TELEMETRY,
    "SpotCheck": SPOT_CHECK,
    "SpotCheckFailure": SPOT_CHECK_FAILURE,
    "FingerprintCheckPass": FINGERPRINT_CHECK_PASS,
    "StageObservation": STAGE_OBSERVATION,
    "StageProof": STAGE_PROOF,
    "StageFingerprint": STAGE_FINGERPRINT,
}
EIP712_DOMAIN = [
    ("name", "string"),
    ("version", "string"),
    ("chainId", "uint256"),
    ("verifyingContract", "address"),
]

# EIP-712 domain names/versions of the verifying contracts.
REGISTRY_DOMAIN = ("DLIS NodeRegistry", "1")
MARKET_DOMAIN = ("DLIS JobMarket", "1")


def type_string(primary: str) -> str:
    fields = ",".join(f"{t} {n}" for n, t in TYPES[primary])
    return f"{primary}({fields})"


def type_hash(primary: str) -> bytes:
    return keccak(text=type_string(primary))


@dataclass(frozen=True)
class Domain:
    name: str
    version: str
    chain_id: int
    verifying_contract: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "chainId": self.chain_id,
            "verifyingContract": self.verifying_contract,
        }


@dataclass(frozen=True)
class CompactSignature:
    """EIP-2098 compact signature (r, vs) as the contracts take it, plus the 65-byte form."""

    r: bytes
    vs: bytes
    signature: bytes

    def hex(self) -> str:
        return "0x" + self.signature.hex()

    @classmethod
    def from_bytes(cls, signature: bytes) -> CompactSignature:
        if len(signature) != 65:
            raise ValueError(f"signature must be 65 bytes, got {len(signature)}")
        r, s, v = signature[:32], signature[32:64], signature[64]
        if v < 27:
            v += 27
        vs_int = int.from_bytes(s, "big") | ((v - 27) << 255)
        return cls(r=r, vs=vs_int.to_bytes(32, "big"), signature=signature)


def full_message(domain: Domain, primary: str, message: dict[str, Any]) -> dict[str, Any]:
    """The EIP-712 typed data of ``message``, a ``primary`` registered in :data:`TYPES`."""
    return {
        "types": {
            "EIP712Domain": [{"name": n, "type": t} for n, t in EIP712_DOMAIN],
            primary: [{"name": n, "type": t} for n, t in TYPES[primary]],
        },
        "primaryType": primary,
        "domain": domain.as_dict(),
        "message": message,
    }


def _signable(domain: Domain, primary: str, message: dict[str, Any]) -> SignableMessage:
    return encode_typed_data(full_message=full_message(domain, primary, message))


def typed_digest(domain: Domain, primary: str, message: dict[str, Any]) -> bytes:
    """The 32-byte EIP-712 digest ``keccak256(0x1901 ++ domainSeparator ++ hashStruct(message))``: what
    a signature signs and what a Merkle leaf over signed messages commits to."""
    signable = _signable(domain, primary, message)
    return bytes(keccak(b"\x19" + signable.version + signable.header + signable.body))


def sign_typed(private_key: bytes | str, domain: Domain, primary: str, message: dict[str, Any]) -> CompactSignature:
    signed = Account.sign_message(_signable(domain, primary, message), private_key)
    return CompactSignature.from_bytes(bytes(signed.signature))


def recover_typed(domain: Domain, primary: str, message: dict[str, Any], signature: bytes) -> str:
    """The address that signed ``message`` (checksummed). A forged signature recovers another
    address; one that recovers no key at all (e.g. r = s = 0) raises ValueError, like any other
    malformed signature, so callers refuse it with one ``except ValueError``."""
    if len(signature) != 65:  # eth_keys raises its own ValidationError (no ValueError) for these
        raise ValueError(f"a signature is 65 bytes (r, s, v), got {len(signature)}")
    try:
        return str(Account.recover_message(_signable(domain, primary, message), signature=signature))
    except BadSignature as exc:
        raise ValueError(f"the signature recovers no public key ({exc})") from exc


def job_id(client: str, nonce: int) -> bytes:
    """keccak256(abi.encode(client, nonce)), as ``JobMarket.jobIdOf``."""
    from eth_abi import encode

    return keccak(encode(["address", "uint256"], [client, nonce]))
