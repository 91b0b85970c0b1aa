"""Checking a client's EIP-712 job authorization before anything runs (pure, no I/O)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from coincurve import PublicKey
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_hash.auto import keccak
from eth_utils import to_checksum_address

from dlis_market.broker.problems import ProblemError, bad_authorization
from dlis_market.broker.schemas import Authorization
from dlis_market.chain.job_market import JobAuthorization
from dlis_market.chain.typed_data import JOB_AUTHORIZATION, Domain, full_message, recover_typed, sign_typed, type_hash

# A job must still be settleable after it runs: require this much time before the deadline.
MIN_DEADLINE_MARGIN_S = 600
# Clients sign deadlines this far inside JobMarket's max authorization lifetime (clock skew, the
# blocks mined between signing and admission), and never more than an hour ahead.
SIGNING_MARGIN_S = 60
MAX_SIGNED_TTL_S = 3600


def signing_deadline(now: int, max_lifetime: int) -> int:
    """The deadline a client (or the broker for an API key) signs: as long as JobMarket settles."""
    return now + min(max_lifetime, MAX_SIGNED_TTL_S) - SIGNING_MARGIN_S


@dataclass(frozen=True)
class VerifiedAuthorization:
    auth: JobAuthorization
    signature: bytes
    signer: str

    @property
    def job_id(self) -> str:
        """``JobMarket.jobIdOf(client, nonce)``: keccak256(abi.encode(client, nonce))."""
        return "0x" + keccak(_word_address(self.auth.client) + self.auth.nonce.to_bytes(32, "big")).hex()


# ---------------------------------------------------------------------------- fast recovery
# A JobAuthorization's EIP-712 digest, built from the one definition of its fields
# (typed_data.JOB_AUTHORIZATION, every one a static 32-byte word) without eth_account's generic
# encoder, and its signer recovered with coincurve: a tenth of the time of ``authorization_signer``,
# the same answer (tests/unit/broker/test_auth_digest.py holds them equal).
_SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_AUTH_TYPEHASH = type_hash("JobAuthorization")
_STATIC = {"address", "bytes32", "uint256"}
if {t for _, t in JOB_AUTHORIZATION} - _STATIC:  # a dynamic field needs the generic encoder
    raise ImportError(f"JobAuthorization has fields other than {sorted(_STATIC)}: fast digest would be wrong")


def _word_address(address: str) -> bytes:
    return bytes(12) + bytes.fromhex(address[2:])


@functools.lru_cache(maxsize=16)
def _domain_separator(domain: Domain) -> bytes:
    """hashStruct(domain), as eth_account computes it (once per domain)."""
    blank = JobAuthorization("0x" + "00" * 20, "0x" + "00" * 20, bytes(32), 0, 0, 0).message()
    return bytes(encode_typed_data(full_message=full_message(domain, "JobAuthorization", blank)).header)


def authorization_digest(domain: Domain, auth: JobAuthorization) -> bytes:
    """The EIP-712 digest a client signs for ``auth`` (equal to ``typed_digest(domain,
    "JobAuthorization", auth.message())``)."""
    words = [_AUTH_TYPEHASH]
    message = auth.message()
    for name, kind in JOB_AUTHORIZATION:
        value = message[name]
        if kind == "address":
            words.append(_word_address(value))
        elif kind == "bytes32":
            if len(value) != 32:
                raise ValueError(f"{name} must be 32 bytes, got {len(value)}")
            words.append(bytes(value))
        else:
            words.append(int(value).to_bytes(32, "big"))  # OverflowError past uint256: refused by the schema first
    return keccak(b"\x19\x01" + _domain_separator(domain) + keccak(b"".join(words)))


def recover_authorization(domain: Domain, auth: JobAuthorization, signature: bytes) -> str:
    """The checksummed address that signed ``auth`` (a forged signature recovers another one); a
    ValueError when the signature does not decode, as ``authorization_signer`` raises."""
    if len(signature) != 65:
        raise ValueError(f"signature must be 65 bytes, got {len(signature)}")
    r, s, v = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:64], "big"), signature[64]
    v = v - 27 if v >= 27 else v
    if v not in (0, 1) or not 0 < r < _SECP256K1_N or not 0 < s < _SECP256K1_N:
        raise ValueError(f"signature values out of range (v {signature[64]}); sign the typed data again")
    compact = signature[:64] + bytes([v])
    public = PublicKey.from_signature_and_message(compact, authorization_digest(domain, auth), hasher=None)
    return str(to_checksum_address(keccak(public.format(compressed=False)[1:])[12:]))


def verify_authorization(
    given: Authorization,
    *,
    broker: str,
    model_id: str,
    domain: Domain,
    now: int,
    max_lifetime: int,
    signer: str | None = None,
) -> VerifiedAuthorization:
    """The typed data the client must have signed, with this broker and model filled in.

    Raises a 401 problem naming what is wrong: expired or too-close deadline, a deadline further
    ahead than JobMarket settles (``max_lifetime`` seconds), malformed signature, or a signature by
    someone other than the client.
    """
    if given.deadline < now + MIN_DEADLINE_MARGIN_S:
        raise bad_authorization(
            f"authorization deadline {given.deadline} is {'past' if given.deadline < now else 'too close'} "
            f"(chain time {now}); sign a new one valid for at least {MIN_DEADLINE_MARGIN_S} s"
        )
    if given.deadline > now + max_lifetime:
        raise bad_authorization(
            f"authorization deadline {given.deadline} is {given.deadline - now} s after chain time {now}, over "
            f"JobMarket's max authorization lifetime of {max_lifetime} s (it would not settle); sign one "
            f"valid for at most {max_lifetime} s"
        )
    auth = JobAuthorization(
        client=given.client,
        broker=broker,
        model_id=bytes.fromhex(model_id[2:]),
        max_cost=given.max_cost,
        nonce=given.nonce,
        deadline=given.deadline,
    )
    sig = bytes.fromhex(given.signature[2:])
    expected = signer or given.client
    try:
        recovered = recover_authorization(domain, auth, sig)
    except (ValueError, TypeError) as exc:
        raise bad_authorization(f"signature does not decode ({exc}); sign the JobAuthorization typed data") from exc
    if recovered != expected:
        raise bad_authorization(
            f"signature recovers {recovered}, not {expected}: it was made by another key or over "
            f"different data (broker must be {broker}, model id {model_id}, chain id {domain.chain_id})"
        )
    return VerifiedAuthorization(auth, sig, recovered)


# ---------------------------------------------------------------------------- reading a job
# A job's prompt and answer belong to its client: to read them the client signs a ``JobRead``
# (chain/typed_data.py) naming the job and an expiry; the broker checks it like an authorization.
MAX_READ_TTL_S = 24 * 3600  # a read permission is refused if it claims to last longer than this


def _job_read(job_id: str, expiry: int) -> dict[str, Any]:
    return {"jobId": bytes.fromhex(job_id.removeprefix("0x")), "expiry": expiry}


def sign_job_read(key: bytes | str, domain: Domain, job_id: str, expiry: int) -> str:
    """The client's permission to read one job's prompt and answer until ``expiry``, as the
    ``X-DLIS-Job-Read`` header value ``<expiry>:<0x signature>``."""
    return f"{expiry}:{sign_typed(key, domain, 'JobRead', _job_read(job_id, expiry)).hex()}"


def verify_job_read(proof: str, *, domain: Domain, job_id: str, client: str, now: int) -> None:
    """Check an ``<expiry>:<0x signature>`` read permission for ``job_id`` by its ``client``, or raise
    a 401 problem saying what is wrong."""
    expiry_s, _, sig_hex = proof.strip().partition(":")
    if not expiry_s.isdigit() or len(expiry_s) > 20 or len(sig_hex) != 132 or not sig_hex.startswith("0x"):
        raise bad_read("the read permission must be `<expiry unix seconds>:<0x + 130 hex digits>`")
    expiry = int(expiry_s)
    if expiry < now:
        raise bad_read(f"the read permission expired at {expiry} (now {now}); sign a new JobRead")
    if expiry > now + MAX_READ_TTL_S:
        raise bad_read(f"the read permission runs until {expiry}, over {MAX_READ_TTL_S} s from now ({now})")
    try:
        signer = recover_typed(domain, "JobRead", _job_read(job_id, expiry), bytes.fromhex(sig_hex[2:]))
    except (ValueError, TypeError) as exc:
        raise bad_read(f"the read signature does not decode ({exc}); sign the JobRead typed data") from exc
    if signer != client:
        raise ProblemError(
            403, "not-your-job", "Not your job", f"the read permission is signed by {signer}, not the job's client"
        )


def bad_read(reason: str) -> ProblemError:
    return ProblemError(401, "bad-read-permission", "Bad read permission", reason)


def sign_for_client(key: bytes | str, domain: Domain, auth: JobAuthorization) -> str:
    """What `dlis job submit` does for a client: the 65-byte signature as 0x-hex."""
    from dlis_market.chain.job_market import sign_authorization

    return sign_authorization(key, domain, auth).hex()


def address_of(key: bytes | str) -> str:
    return str(Account.from_key(key).address)


__all__ = [
    "ProblemError",
    "VerifiedAuthorization",
    "address_of",
    "sign_for_client",
    "sign_job_read",
    "verify_authorization",
    "verify_job_read",
]
