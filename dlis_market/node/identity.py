"""The node identity: a libp2p key (its peer id) and a secp256k1 signing key, both encrypted at rest.

The signing key is an Ethereum v3 keyfile (scrypt) in a :class:`~dlis_market.chain.accounts.Keystore`
(by default ``$DLIS_HOME/keystore/node.json``, so ``dlis node register --node-key node`` finds
it); its address is the node key that NodeRegistry binds to the operator and that signs receipts
and attestation reports. ``<folder>/p2p-key.enc``
holds the libp2p private key (hivemind's protobuf form) under AES-256-GCM with a scrypt key from
the same password. The daemon reads its key from a file at start, so :meth:`NodeIdentity.key_file`
writes a 0600 copy into a private temporary folder and deletes it as soon as the daemon is up.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from eth_account.signers.local import LocalAccount
from hivemind.p2p import P2P, PeerID

from dlis_market.chain.accounts import Keystore
from dlis_market.chain.errors import AccountError
from dlis_market.node.errors import IdentityError

SIGNING_KEY_NAME = "node"
P2P_KEY_FILE = "p2p-key.enc"


def _kdf(password: str, salt: bytes, n: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=8, p=1).derive(password.encode())


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def encrypt_p2p_key(key: bytes, password: str, scrypt_n: int) -> bytes:
    salt, nonce = secrets.token_bytes(16), secrets.token_bytes(12)
    box = AESGCM(_kdf(password, salt, scrypt_n)).encrypt(nonce, key, b"dlis-p2p-key")
    doc = {"version": 1, "kdf": "scrypt", "n": scrypt_n, "salt": salt.hex(), "nonce": nonce.hex(), "box": box.hex()}
    return json.dumps(doc).encode()


def decrypt_p2p_key(blob: bytes, password: str) -> bytes:
    try:
        doc = json.loads(blob)
        key = _kdf(password, bytes.fromhex(doc["salt"]), int(doc["n"]))
        return AESGCM(key).decrypt(bytes.fromhex(doc["nonce"]), bytes.fromhex(doc["box"]), b"dlis-p2p-key")
    except InvalidTag as exc:
        raise IdentityError("cannot unlock the libp2p key: wrong password or corrupt p2p-key.enc") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise IdentityError(
            f"p2p-key.enc is not a dlis encrypted key file ({exc}); delete it to make a new one"
        ) from exc


@dataclass(frozen=True)
class NodeIdentity:
    account: LocalAccount
    p2p_key: bytes

    @property
    def address(self) -> str:
        return str(self.account.address)

    @property
    def peer_id(self) -> str:
        return str(PeerID.from_identity(self.p2p_key).to_base58())

    @contextlib.contextmanager
    def key_file(self) -> Iterator[str]:
        """A private plaintext copy of the libp2p key for the daemon to read at start."""
        folder = tempfile.mkdtemp(prefix="dlis-p2p-")
        path = Path(folder) / "key"
        try:
            _write_private(path, self.p2p_key)
            yield str(path)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def load_or_create(
    folder: Path,
    password: str,
    scrypt_n: int = 2**18,
    keystore_dir: Path | None = None,
    key_name: str = SIGNING_KEY_NAME,
) -> NodeIdentity:
    """Unlock the identity (libp2p key in ``folder``, signing key ``key_name`` in ``keystore_dir``,
    default ``folder``), creating the missing keys on first use."""
    if not password:
        raise IdentityError("an empty password would leave the node keys unprotected; give a password")
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = Keystore(keystore_dir or folder)
    try:
        if not ((keystore_dir or folder) / f"{key_name}.json").exists():
            store.create(key_name, password, scrypt_n)
        account = store.load(key_name, password)
    except AccountError as exc:
        raise IdentityError(f"node signing key in {folder}: {exc}") from exc
    key_path = folder / P2P_KEY_FILE
    if not key_path.exists():
        with tempfile.TemporaryDirectory(prefix="dlis-p2p-") as tmp:
            P2P.generate_identity(str(Path(tmp) / "key"))
            raw = (Path(tmp) / "key").read_bytes()
        _write_private(key_path, encrypt_p2p_key(raw, password, scrypt_n))
    return NodeIdentity(account, decrypt_p2p_key(key_path.read_bytes(), password))


# Multihash codes a libp2p peer id may use: identity (inlined public key, ed25519/secp256k1 "12D3KooW..."
# and "16Uiu2..."), sha2-256 of a larger key (RSA, "Qm...").
_IDENTITY, _SHA2_256 = 0x00, 0x12
_MAX_INLINE_KEY = 42


def check_peer_id(text: str) -> str:
    """``text`` if it is a libp2p peer id (base58 multihash of a public key); else an
    :class:`IdentityError` that says what is wrong and where a node's peer id comes from."""
    import base58

    hint = "a node's peer id is printed by `dlis node start` (DLIS_NODE_READY) and starts with 12D3KooW or Qm"
    try:
        raw = base58.b58decode(text.strip())
    except ValueError as exc:
        raise IdentityError(f"peer id {text!r} is not base58 ({exc}); {hint}") from exc
    if len(raw) < 2:
        raise IdentityError(f"peer id {text!r} is {len(raw)} bytes decoded, too short for a multihash; {hint}")
    code, length = raw[0], raw[1]
    if code == _SHA2_256 and length == 32 and len(raw) == 34:
        return text.strip()
    if code == _IDENTITY and 0 < length <= _MAX_INLINE_KEY and len(raw) == 2 + length:
        return text.strip()
    raise IdentityError(
        f"peer id {text!r} decodes to a {len(raw)}-byte multihash with code 0x{code:02x} and length {length}, "
        f"not a sha2-256 (0x12, 32 bytes) or inlined key (0x00, at most {_MAX_INLINE_KEY} bytes); {hint}"
    )


def check_multiaddr(text: str) -> str:
    """``text`` if it parses as a multiaddr (``/ip4/127.0.0.1/tcp/31337``); else an
    :class:`IdentityError` naming what does not parse."""
    from hivemind.utils.multiaddr import Multiaddr

    try:
        return str(Multiaddr(text.strip()))
    except Exception as exc:  # hivemind's parser raises several error types, all with a clear text
        raise IdentityError(
            f"endpoint {text!r} is not a multiaddr ({exc}); use the form /ip4/HOST/tcp/PORT, "
            "e.g. /ip4/127.0.0.1/tcp/31337"
        ) from exc
