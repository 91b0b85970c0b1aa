"""Accounts: encrypted keystores (Ethereum v3 keyfiles, scrypt) and the dev chain's accounts.

Keystores live in ``$DLIS_HOME/keystore/<name>.json``. The well-known Anvil dev keys are usable
only on dev chain ids (31337, 1337); on any other chain they are refused.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount

from dlis_market.chain.errors import AccountError, DevKeyRefusedError
from dlis_market.settings import DEV_CHAIN_IDS

Account.enable_unaudited_hdwallet_features()

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
DEFAULT_SCRYPT_N = 2**18


@lru_cache(maxsize=4)
def dev_accounts(mnemonic: str, count: int = 10) -> tuple[LocalAccount, ...]:
    """The accounts Anvil funds at start (same mnemonic, BIP-44 path m/44'/60'/0'/0/i)."""
    return tuple(Account.from_mnemonic(mnemonic, account_path=f"m/44'/60'/0'/0/{i}") for i in range(count))


def refuse_dev_key(account: LocalAccount, chain_id: int, mnemonic: str) -> None:
    if chain_id in DEV_CHAIN_IDS:
        return
    if account.address in {a.address for a in dev_accounts(mnemonic)}:
        raise DevKeyRefusedError(
            f"{account.address} is a publicly known development key and chain {chain_id} is not a dev "
            "chain; create a real account with `dlis account new NAME`"
        )


@dataclass(frozen=True)
class KeystoreEntry:
    name: str
    address: str
    path: Path


class Keystore:
    def __init__(self, folder: Path):
        self.folder = folder

    def _path(self, name: str) -> Path:
        if not _NAME.match(name):
            raise AccountError(f"account name {name!r} is invalid; use 1-64 letters, digits, '.', '_' or '-'")
        return self.folder / f"{name}.json"

    def create(self, name: str, password: str, scrypt_n: int = DEFAULT_SCRYPT_N) -> KeystoreEntry:
        return self.import_key(name, Account.create().key, password, scrypt_n)

    def import_key(
        self, name: str, private_key: bytes | str, password: str, scrypt_n: int = DEFAULT_SCRYPT_N
    ) -> KeystoreEntry:
        if not password:
            raise AccountError("an empty password would leave the key unprotected; give a password")
        path = self._path(name)
        if path.exists():
            raise AccountError(f"account {name!r} already exists at {path}; choose another name")
        try:
            account = Account.from_key(private_key)
        except (ValueError, TypeError) as exc:
            raise AccountError(f"not a valid secp256k1 private key ({exc}); give 32 bytes as 64 hex digits") from exc
        data = Account.encrypt(account.key, password, kdf="scrypt", iterations=scrypt_n)
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh)
        os.replace(tmp, path)
        return KeystoreEntry(name, account.address, path)

    def list(self) -> list[KeystoreEntry]:
        if not self.folder.exists():
            return []
        out = []
        for path in sorted(self.folder.glob("*.json")):
            try:
                address = "0x" + json.loads(path.read_text())["address"].removeprefix("0x")
            except (ValueError, KeyError):
                continue  # not a keyfile: skip it rather than fail the listing
            out.append(KeystoreEntry(path.stem, _checksum(address), path))
        return out

    def load(self, name: str, password: str) -> LocalAccount:
        path = self._path(name)
        if not path.exists():
            known = ", ".join(e.name for e in self.list()) or "none"
            raise AccountError(
                f"no account named {name!r} in {self.folder} (known: {known}); create it with `dlis account new {name}`"
            )
        try:
            key = Account.decrypt(json.loads(path.read_text()), password)
        except ValueError as exc:
            raise AccountError(f"cannot unlock account {name!r}: wrong password or corrupt keyfile {path}") from exc
        return Account.from_key(key)


def _checksum(address: str) -> str:
    from web3 import Web3

    return str(Web3.to_checksum_address(address))
