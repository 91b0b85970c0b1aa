"""Checking a client's EIP-712 job authorization before anything runs (pure, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass

from eth_account import Account

from dlis_market.broker.problems import ProblemError, bad_authorization
from dlis_market.broker.schemas import Authorization
from dlis_market.chain.job_market import JobAuthorization, authorization_signer
from dlis_market.chain.typed_data import Domain

# A job must still be settleable after it runs: require this much time before the deadline.
MIN_DEADLINE_MARGIN_S = 600


@dataclass(frozen=True)
class VerifiedAuthorization:
    auth: JobAuthorization
    signature: bytes
    signer: str

    @property
    def job_id(self) -> str:
        return "0x" + self.auth.job_id.hex()


def verify_authorization(
    given: Authorization, *, broker: str, model_id: str, domain: Domain, now: int, signer: str | None = None
) -> VerifiedAuthorization:
    """The typed data the client must have signed, with this broker and model filled in.

    Raises a 401 problem naming what is wrong: expired or too-close deadline, malformed
    signature, or a signature by someone other than the client.
    """
    if given.deadline < now + MIN_DEADLINE_MARGIN_S:
        raise bad_authorization(
            f"authorization deadline {given.deadline} is {'past' if given.deadline < now else 'too close'} "
            f"(chain time {now}); sign a new one valid for at least {MIN_DEADLINE_MARGIN_S} s"
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
        recovered = authorization_signer(domain, auth, sig)
    except (ValueError, TypeError) as exc:
        raise bad_authorization(f"signature does not decode ({exc}); sign the JobAuthorization typed data") from exc
    if recovered != expected:
        raise bad_authorization(
            f"signature recovers {recovered}, not {expected}: it was made by another key or over "
            f"different data (broker must be {broker}, model id {model_id}, chain id {domain.chain_id})"
        )
    return VerifiedAuthorization(auth, sig, recovered)


def sign_for_client(key: bytes | str, domain: Domain, auth: JobAuthorization) -> str:
    """What `dlis job submit` does for a client: the 65-byte signature as 0x-hex."""
    from dlis_market.chain.job_market import sign_authorization

    return sign_authorization(key, domain, auth).hex()


def address_of(key: bytes | str) -> str:
    return str(Account.from_key(key).address)


__all__ = ["ProblemError", "VerifiedAuthorization", "address_of", "sign_for_client", "verify_authorization"]
