"""What a worker announces on the DHT, and reading the announcements of a model back.

Key ``dlis/spans/<model name>``; value = a :class:`~dlis_market.protocol.spans.SignedSpan` (the
record signed by the node key, EIP-712) as a plain dict, with a DHT expiration time the worker
refreshes periodically. The subkey is the worker's peer id followed by hivemind's owner marker
``[owner:<RSA public key>]`` of its libp2p key, and every DHT node runs hivemind's
``RSASignatureValidator`` (``node/transport.py``): a store under that subkey must carry a signature
by that libp2p key, so no other peer can overwrite or displace the worker's record in storage,
and a reader accepts the record only when the public key in the subkey hashes to the announced
peer id (the subkey is bound to the libp2p identity). The EIP-712 signature binds the record to
the node key NodeRegistry knows, so the broker can also check the node is registered under that
peer id. On clean shutdown the worker stores a signed ``online=False`` record with a later
expiration; readers skip offline, unsigned, badly signed, expired and mismatched records.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from typing import Any

import hivemind
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from multihash import coerce_code
from multihash import encode as multihash_encode

from dlis_market.chain.typed_data import Domain
from dlis_market.protocol.errors import SpanRecordError
from dlis_market.protocol.spans import SignedSpan, SignerCache, SpanRecord, check_span, parse_signed, sign_span

__all__ = [
    "SignerCache",
    "SpanRecord",
    "announce",
    "fetch_spans",
    "owner_validator",
    "parse_records",
    "spans_key",
    "withdraw",
]

log = logging.getLogger(__name__)
_OWNED = re.compile(rb"^([1-9A-HJ-NP-Za-km-z]{1,128})\[owner:(ssh-rsa [A-Za-z0-9+/=]{1,2048})\]$")


def spans_key(model: str) -> str:
    return f"dlis/spans/{model}"


def owner_validator(p2p_key: bytes | None = None) -> RSASignatureValidator:
    """hivemind's validator signing with the libp2p RSA key (protobuf form), or a throwaway key for
    a DHT that only reads and validates (drivers, bootstrap nodes)."""
    if p2p_key is None:
        return RSASignatureValidator()
    der = crypto_pb2.PrivateKey.FromString(p2p_key).data
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key.__setstate__({"_private_key": der})  # hivemind's own unpickling path for its RSA keys
    return RSASignatureValidator(key)


def peer_id_of(ssh_public_key: bytes) -> str:
    """The libp2p peer id of an RSA public key in OpenSSH form (as hivemind's owner marker holds it)."""
    public = serialization.load_ssh_public_key(ssh_public_key)
    if not isinstance(public, rsa.RSAPublicKey):
        raise ValueError("owner key is not RSA")
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    proto = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    return str(PeerID(multihash_encode(hashlib.sha256(proto).digest(), coerce_code("sha2-256"))).to_base58())


def owned_subkey(peer_id: str, validator: RSASignatureValidator) -> bytes:
    return peer_id.encode() + validator.local_public_key


def _store(dht: hivemind.DHT, signed: SignedSpan, validator: RSASignatureValidator, expiration: float) -> bool:
    r = signed.record
    subkey = owned_subkey(r.peer_id, validator)
    return bool(dht.store(spans_key(r.model), signed.model_dump(), expiration, subkey=subkey))


def announce(
    dht: hivemind.DHT, record: SpanRecord, ttl_s: float, key: bytes, domain: Domain, validator: RSASignatureValidator
) -> bool:
    now = time.time()
    record = record.model_copy(update={"announced_at": now, "expires_at": now + ttl_s})
    return _store(dht, sign_span(key, domain, record), validator, get_dht_time() + ttl_s)


def withdraw(
    dht: hivemind.DHT, record: SpanRecord, ttl_s: float, key: bytes, domain: Domain, validator: RSASignatureValidator
) -> bool:
    """Override the last announcement with a signed offline marker (expiring a little later than it)."""
    now = time.time()
    offline = record.model_copy(
        update={"online": False, "free_slots": 0, "announced_at": now, "expires_at": now + ttl_s + 1}
    )
    return _store(dht, sign_span(key, domain, offline), validator, get_dht_time() + ttl_s + 1)


def _owner_peer(subkey: Any) -> str:
    if not isinstance(subkey, bytes):
        raise SpanRecordError(f"subkey {subkey!r} carries no owner key: stored by a peer without the libp2p key")
    m = _OWNED.match(subkey)
    if m is None:
        raise SpanRecordError(f"subkey {subkey[:60]!r}.. is not '<peer id>[owner:<RSA key>]'")
    try:
        owner = peer_id_of(m.group(2))
    except ValueError as exc:
        raise SpanRecordError(f"owner key in subkey does not parse ({exc})") from exc
    if owner != m.group(1).decode():
        raise SpanRecordError(f"subkey names peer {m.group(1).decode()} but its owner key is peer {owner}'s")
    return owner


def parse_records(
    model: str, raw: Any, domain: Domain, now: float | None = None, cache: SignerCache | None = None
) -> list[SpanRecord]:
    """Online records of ``model`` from a DHT answer that the named peer's libp2p key stored and its
    node key signed, current at ``now``; every other entry is logged and dropped."""
    if raw is None or not isinstance(raw.value, dict):
        return []
    now = time.time() if now is None else now
    out = []
    for subkey, item in raw.value.items():
        try:
            owner = _owner_peer(subkey)
            record = check_span(domain, parse_signed(getattr(item, "value", None)), now, cache)
            if record.peer_id != owner or record.model != model:
                raise SpanRecordError(f"record names peer {record.peer_id} / model {record.model!r} under {owner}")
        except SpanRecordError as exc:
            log.info("ignoring a span record of %s: %s", model, exc)
            continue
        if record.online:
            out.append(record)
    return sorted(out, key=lambda r: (r.start, r.peer_id))


def fetch_spans(dht: hivemind.DHT, model: str, domain: Domain, cache: SignerCache | None = None) -> list[SpanRecord]:
    return parse_records(model, dht.get(spans_key(model), latest=True), domain, cache=cache)
