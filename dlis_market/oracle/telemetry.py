"""The oracle's telemetry intake: checks signed worker reports and keeps the accepted ones.

The wire format (EIP-712 ``Telemetry`` in the ReputationOracle's domain, ``zstd(json(SignedTelemetry))``)
is :mod:`dlis_market.protocol.telemetry`, shared with the workers that sign and send it.

:class:`TelemetryIntake` refuses, in this order, and counts each refusal by reason:
``oversized`` / ``malformed`` (decoding), ``forged`` (the signature does not recover to the
report's node), ``unregistered`` (the node is not in NodeRegistry), ``duplicate`` (this node's
report with this seq was accepted already: a copy that came another way, or the same report sent
again; harmless either way), ``superseded`` (a report the oracle never took, older than one it did:
it arrived late, e.g. from a worker's outbox after its newer report was relayed), ``stale`` (older
than ``max_age_s``) and ``future`` (more than ``max_skew_s`` ahead of the oracle's clock).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from eth_keys.exceptions import BadSignature
from eth_keys.exceptions import ValidationError as KeyValidationError
from pydantic import Field
from web3 import Web3

from dlis_market.chain.typed_data import Domain
from dlis_market.protocol.errors import TelemetryRefusedError
from dlis_market.protocol.telemetry import REFUSAL_REASONS, SignedTelemetry, decode_telemetry, telemetry_signer
from dlis_market.types import WireModel


class ReceivedTelemetry(WireModel):
    """An accepted report and when the oracle received it, by its own clock: uptime counts arrival
    slots, not the time a report claims (a report signed later and backdated fills no slot)."""

    received_at: float = Field(ge=0)
    telemetry: SignedTelemetry


class TelemetryIntake:
    """Checks telemetry blobs and keeps the accepted ones; counts every outcome by reason.

    ``is_registered(node)`` is consulted after the signature check (pass a NodeRegistry lookup;
    ``None`` accepts any correctly signed node, for tests and offline replay). ``last_seq`` may be
    seeded from stored state so that a restarted oracle still refuses replays.
    """

    def __init__(
        self,
        domain: Domain,
        *,
        max_age_s: float,
        max_skew_s: float,
        max_bytes: int,
        max_decompressed_bytes: int,
        is_registered: Callable[[str], bool] | None = None,
        clock: Callable[[], float] = time.time,
        last_seq: dict[str, int] | None = None,
        known: Callable[[str, int], bool] | None = None,
    ) -> None:
        self.domain = domain
        self.max_age_s = max_age_s
        self.max_skew_s = max_skew_s
        self.max_bytes = max_bytes
        self.max_decompressed_bytes = max_decompressed_bytes
        self.is_registered = is_registered
        self.clock = clock
        self.last_seq: dict[str, int] = dict(last_seq or {})
        # whether a (node, seq) was accepted before this process started (the service's store);
        # what this process accepted it remembers itself
        self.known = known
        self._taken: set[tuple[str, int]] = set()
        self.counts: dict[str, int] = {reason: 0 for reason in ("accepted", *REFUSAL_REASONS)}
        self.accepted: list[SignedTelemetry] = []

    def submit(self, blob: bytes) -> SignedTelemetry:
        """Decode and check ``blob``; keep and return it, or raise :class:`TelemetryRefusedError`."""
        signed = self.check(blob)
        self.accept(signed)
        return signed

    def check(self, blob: bytes) -> SignedTelemetry:
        r"""Decode and check ``blob`` without keeping it (refusals are counted): a caller that stores
        accepted reports durably stores it first, then passes it to :meth:`accept`."""
        try:
            signed = decode_telemetry(blob, self.max_bytes, self.max_decompressed_bytes)
            self._check(signed)
        except TelemetryRefusedError as exc:
            self.counts[exc.reason] += 1
            raise
        return signed

    def accept(self, signed: SignedTelemetry) -> None:
        """Keep a checked report: its seq becomes the node's last (later replays are refused)."""
        self.last_seq[signed.report.node] = signed.report.seq
        self._taken.add((signed.report.node, signed.report.seq))
        self.counts["accepted"] += 1
        self.accepted.append(signed)

    def _check(self, signed: SignedTelemetry) -> None:
        report = signed.report
        if not Web3.is_checksum_address(report.node):
            raise TelemetryRefusedError("malformed", f"node {report.node!r} is not a checksummed address")
        try:
            signer = telemetry_signer(self.domain, signed)
        except (ValueError, TypeError, BadSignature, KeyValidationError) as exc:  # unrecoverable signature
            raise TelemetryRefusedError("forged", f"signature of {report.node} does not recover: {exc}") from exc
        if signer != report.node:
            raise TelemetryRefusedError(
                "forged",
                f"report claims node {report.node} but is signed by {signer}; sign with the node key "
                f"in domain {self.domain.name} v{self.domain.version} chain {self.domain.chain_id}",
            )
        if self.is_registered is not None and not self.is_registered(report.node):
            raise TelemetryRefusedError(
                "unregistered", f"node {report.node} is not registered in NodeRegistry; `dlis node register` first"
            )
        last = self.last_seq.get(report.node)
        if last is not None and report.seq <= last:
            key = (report.node, report.seq)
            if key in self._taken or (self.known is not None and self.known(*key)):
                raise TelemetryRefusedError("duplicate", f"seq {report.seq} of {report.node} was accepted already")
            raise TelemetryRefusedError(
                "superseded",
                f"seq {report.seq} of {report.node} is below its newest accepted seq {last}; reports of a node "
                "must arrive in order (this one came too late and is not counted)",
            )
        now = self.clock()
        age = now - report.timestamp
        if age > self.max_age_s:
            raise TelemetryRefusedError(
                "stale", f"report of {report.node} is {age:.0f} s old, limit {self.max_age_s:.0f} s; check its clock"
            )
        if -age > self.max_skew_s:
            raise TelemetryRefusedError(
                "future",
                f"report of {report.node} is {-age:.0f} s ahead of the oracle clock, limit {self.max_skew_s:.0f} s",
            )

    def drain(self) -> list[SignedTelemetry]:
        """The reports accepted since the last drain (the epoch loop takes them)."""
        out, self.accepted = self.accepted, []
        return out
