"""A worker's announcement of the layers it serves, signed by its node key (EIP-712).

The node key is the address NodeRegistry binds to the worker's operator and peer id; it signs a
``SpanAnnouncement`` (``chain/typed_data.py``) under the NodeRegistry domain, so a reader can
tell the announcement came from that node and, with one chain lookup, that the node is
registered under the announced peer id. Every field a reader acts on is signed: range, peer id,
price, free slots, liveness, when the worker (re)started, when it announced, when it expires.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError
from web3 import Web3

from dlis_market.chain.typed_data import Domain, recover_typed, sign_typed
from dlis_market.protocol.errors import SpanRecordError
from dlis_market.types import LayerRange, WireModel

CLOCK_SKEW_S = 30.0  # an announcement may be dated this far in the reader's future
MAX_TTL_S = 3600.0  # longer-lived announcements are refused: a stolen one must not outlive a restart


class SpanRecord(WireModel):
    """One worker's announcement of the layers it serves."""

    model: str
    start: int
    end: int
    peer_id: str
    node_address: str
    throughput: float  # tokens/s through the whole range, measured by the profiler
    free_slots: int  # sessions it can still open
    # the most sessions it holds for one opener (node.max_sessions_per_opener; 0: no such limit):
    # a broker's driver is one opener for all its jobs, so its scheduler plans within this share
    opener_slots: int = 0
    queue_length: int
    price_per_token: int  # token units per token processed
    attestation_hash: str
    online: bool = True
    started_at: float = 0.0  # unix time the worker process started: a newer one is a restart
    announced_at: float = 0.0
    expires_at: float = 0.0

    @property
    def layers(self) -> LayerRange:
        return LayerRange(start=self.start, end=self.end)


class SignedSpan(WireModel):
    """What a worker stores on the DHT: the record and its node key's signature over it."""

    record: SpanRecord
    signature: bytes  # 65 bytes


def _ms(t: float) -> int:
    return max(0, round(t * 1000))


def span_message(r: SpanRecord) -> dict[str, Any]:
    try:
        attestation = bytes.fromhex(r.attestation_hash.removeprefix("0x"))
    except ValueError as exc:
        raise SpanRecordError(f"attestation hash {r.attestation_hash!r} is not hex") from exc
    if len(attestation) != 32 or not Web3.is_address(r.node_address):
        raise SpanRecordError(
            f"span record of {r.peer_id} has a {len(attestation)}-byte attestation hash (need 32) or a bad node "
            f"address {r.node_address!r}"
        )
    if min(r.start, r.end, r.free_slots, r.opener_slots, r.queue_length, r.price_per_token) < 0 or r.throughput < 0:
        raise SpanRecordError(f"span record of {r.peer_id} has a negative field")
    return {
        "model": r.model,
        "start": r.start,
        "end": r.end,
        "peerId": r.peer_id,
        "node": Web3.to_checksum_address(r.node_address),
        "throughputMilli": _ms(r.throughput),
        "freeSlots": r.free_slots,
        "openerSlots": r.opener_slots,
        "queueLength": r.queue_length,
        "pricePerToken": r.price_per_token,
        "attestationHash": attestation,
        "online": r.online,
        "startedAtMs": _ms(r.started_at),
        "announcedAtMs": _ms(r.announced_at),
        "expiresAtMs": _ms(r.expires_at),
    }


def sign_span(key: bytes | str, domain: Domain, record: SpanRecord) -> SignedSpan:
    return SignedSpan(
        record=record, signature=sign_typed(key, domain, "SpanAnnouncement", span_message(record)).signature
    )


def span_signer(domain: Domain, signed: SignedSpan) -> str:
    try:
        return recover_typed(domain, "SpanAnnouncement", span_message(signed.record), signed.signature)
    except (ValueError, TypeError) as exc:
        raise SpanRecordError(f"span record signature of {signed.record.peer_id} does not parse ({exc})") from exc


def parse_signed(raw: Any) -> SignedSpan:
    try:
        signed = SignedSpan.model_validate(raw)
        LayerRange(start=signed.record.start, end=signed.record.end)
    except (ValidationError, ValueError) as exc:
        raise SpanRecordError(f"malformed signed span record: {exc}") from exc
    return signed


class SignerCache:
    """Recovered signers of signed spans already seen (recovery costs ~20 ms; a record is read on
    every job until its worker re-announces). Keyed by the whole signed record, bounded."""

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self._signers: dict[SignedSpan, str] = {}

    def signer(self, domain: Domain, signed: SignedSpan) -> str:
        hit = self._signers.get(signed)
        if hit is None:
            hit = span_signer(domain, signed)
            if len(self._signers) >= self.max_entries:
                self._signers.clear()
            self._signers[signed] = hit
        return hit


def check_span(domain: Domain, signed: SignedSpan, now: float, cache: SignerCache | None = None) -> SpanRecord:
    """The record if its node key signed it and it is current at ``now``; SpanRecordError otherwise."""
    r = signed.record
    if r.expires_at <= now:
        raise SpanRecordError(f"span record of {r.peer_id} expired {now - r.expires_at:.0f}s ago")
    if r.announced_at > now + CLOCK_SKEW_S or r.expires_at - r.announced_at > MAX_TTL_S:
        raise SpanRecordError(
            f"span record of {r.peer_id} is dated {r.announced_at - now:.0f}s ahead or lives "
            f"{r.expires_at - r.announced_at:.0f}s (at most {MAX_TTL_S:.0f}s)"
        )
    signer = cache.signer(domain, signed) if cache is not None else span_signer(domain, signed)
    if signer.lower() != r.node_address.lower():
        raise SpanRecordError(
            f"span record of {r.peer_id} names node {r.node_address} but is signed by {signer}: forged"
        )
    return r


def missing_layers(spans: Sequence[SpanRecord], start: int, end: int) -> list[tuple[int, int]]:
    """Sub-ranges of ``[start, end)`` that no span covers, merged, in order (the driver's "no
    route" message names them; the broker asks whether there are none)."""
    gaps: list[tuple[int, int]] = []
    at = start
    for s in sorted(spans, key=lambda s: s.start):
        if s.end <= at:
            continue
        if s.start >= end:
            break
        if s.start > at:
            gaps.append((at, s.start))
        at = max(at, s.end)
        if at >= end:
            return gaps
    if at < end:
        gaps.append((at, end))
    return gaps
