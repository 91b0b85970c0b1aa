"""The broker's fast JobAuthorization check agrees with the one generic EIP-712 path
(chain/typed_data.py) on the digest, the signer, the job id and on what it refuses: a forger gains
nothing from the shortcut."""

from __future__ import annotations

import secrets

import pytest
from eth_account import Account

from dlis_market.broker.auth import VerifiedAuthorization, authorization_digest, recover_authorization
from dlis_market.chain.job_market import JobAuthorization, authorization_signer, sign_authorization
from dlis_market.chain.typed_data import Domain, typed_digest

DOMAINS = [
    Domain("DLIS JobMarket", "1", 31337, "0x5FbDB2315678afecb367f032d93F642f64180aa3"),
    Domain("DLIS JobMarket", "1", 1, "0x" + secrets.token_hex(20)),
]


def random_auth(client: str) -> JobAuthorization:
    return JobAuthorization(
        client, Account.create().address, secrets.token_bytes(32), secrets.randbits(secrets.choice([8, 64, 256])),
        secrets.randbits(secrets.choice([1, 64, 256])), secrets.randbits(40),
    )  # fmt: skip


@pytest.mark.parametrize("domain", DOMAINS)
def test_digest_signer_and_job_id_match_the_generic_path(domain: Domain) -> None:
    for _ in range(20):
        key = Account.create()
        auth = random_auth(key.address)
        assert authorization_digest(domain, auth) == typed_digest(domain, "JobAuthorization", auth.message())
        sig = sign_authorization(key.key, domain, auth).signature
        assert recover_authorization(domain, auth, sig) == authorization_signer(domain, auth, sig) == key.address
        verified = VerifiedAuthorization(auth, sig, key.address)
        assert verified.job_id == "0x" + auth.job_id.hex()


def test_forged_and_malformed_signatures_are_refused_alike() -> None:
    domain, key = DOMAINS[0], Account.create()
    auth = random_auth(key.address)
    sig = bytearray(sign_authorization(key.key, domain, auth).signature)
    other = JobAuthorization(auth.client, auth.broker, auth.model_id, auth.max_cost + 1, auth.nonce, auth.deadline)
    assert recover_authorization(domain, other, bytes(sig)) == authorization_signer(domain, other, bytes(sig))
    assert recover_authorization(domain, other, bytes(sig)) != key.address  # over other data: another signer
    for bad in (bytes(sig[:64]), bytes(sig[:64]) + b"\x05", bytes(32) + bytes(sig[32:]), bytes(64) + b"\x1b"):
        with pytest.raises(ValueError):  # verify_authorization answers 401 for it
            recover_authorization(domain, auth, bad)
        with pytest.raises(Exception):  # noqa: B017 - the generic path refuses them too (not all as ValueError)
            authorization_signer(domain, auth, bad)
