"""Pure pieces of the chain layer: amounts, signatures, dev-key refusal, settings."""

from __future__ import annotations

import pytest
from eth_account import Account

from dlis_market.chain.accounts import Keystore, dev_accounts, refuse_dev_key
from dlis_market.chain.dlis_token import fmt_units, to_units
from dlis_market.chain.errors import AccountError, DevKeyRefusedError
from dlis_market.chain.job_market import JobAuthorization, authorization_signer, market_domain, sign_authorization
from dlis_market.chain.typed_data import CompactSignature, type_string
from dlis_market.errors import ConfigError
from dlis_market.settings import Settings

MNEMONIC = "test test test test test test test test test test test junk"


def test_amounts_are_exact_integers():
    assert to_units("12.5") == 12_500_000_000_000_000_000
    assert to_units(1) == 10**18
    assert fmt_units(to_units("0.000000000000000001")) == "0.000000000000000001"
    assert fmt_units(3 * 10**18) == "3"
    with pytest.raises(ValueError, match="more than 18 decimals"):
        to_units("0.0000000000000000001")
    with pytest.raises(ValueError, match="negative"):
        to_units("-1")


def test_type_strings_are_the_solidity_ones():
    assert type_string("JobAuthorization") == (
        "JobAuthorization(address client,address broker,bytes32 modelId,uint256 maxCost,uint256 nonce,uint256 deadline)"
    )
    assert type_string("NodeBinding") == "NodeBinding(address operator,address node,string peerId,uint256 deadline)"


def test_compact_signature_roundtrip_and_forgery():
    client, other = Account.create(), Account.create()
    dom = market_domain(31337, "0x" + "22" * 20)
    auth = JobAuthorization(client.address, other.address, b"\x01" * 32, 5, 1, 99)
    sig = sign_authorization(client.key, dom, auth)
    assert authorization_signer(dom, auth, sig.signature) == client.address
    vs = int.from_bytes(sig.vs, "big")
    assert (vs >> 255) == sig.signature[64] - 27  # EIP-2098 parity bit
    changed = JobAuthorization(client.address, other.address, b"\x01" * 32, 6, 1, 99)
    assert authorization_signer(dom, changed, sig.signature) != client.address
    with pytest.raises(ValueError, match="65 bytes"):
        CompactSignature.from_bytes(b"\x00" * 64)


def test_dev_keys_refused_off_dev_chains():
    dev = dev_accounts(MNEMONIC)[0]
    assert dev.address == "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
    refuse_dev_key(dev, 31337, MNEMONIC)  # fine on the dev chain
    with pytest.raises(DevKeyRefusedError, match="chain 1 is not a dev chain"):
        refuse_dev_key(dev, 1, MNEMONIC)
    refuse_dev_key(Account.create(), 1, MNEMONIC)


def test_keystore_encrypts_and_checks_password(tmp_path):
    ks = Keystore(tmp_path / "ks")
    entry = ks.create("op", "pw", scrypt_n=2**10)
    assert b"pw" not in entry.path.read_bytes()
    assert oct(entry.path.stat().st_mode & 0o777) == "0o600"
    assert ks.load("op", "pw").address == entry.address
    with pytest.raises(AccountError, match="wrong password"):
        ks.load("op", "nope")
    with pytest.raises(AccountError, match="invalid"):
        ks.create("../escape", "pw")
    with pytest.raises(AccountError, match="empty password"):
        ks.create("x", "")


def test_settings_env_and_overrides():
    s = Settings.load(
        overrides={"chain": {"fee_bps": 100, "rpc_url": None}},
        environ={"DLIS_CHAIN__RPC_URL": "http://127.0.0.1:1", "DLIS_HOME": "/tmp/h", "OTHER": "x"},
    )
    assert s.chain.rpc_url == "http://127.0.0.1:1" and s.chain.fee_bps == 100 and str(s.home) == "/tmp/h"
    assert Settings.load(environ=s.to_env()).chain == s.chain
    with pytest.raises(ConfigError, match="DLIS_CHAIN__FEE_BPS"):
        Settings.load(environ={"DLIS_CHAIN__FEE_BPS": "lots"})
    with pytest.raises(ConfigError, match="DLIS_NOPE"):
        Settings.load(environ={"DLIS_NOPE": "1"})
