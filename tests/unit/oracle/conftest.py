"""Shared helpers of the oracle unit tests: node keys, a domain and signed reports."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from dlis_market.chain.typed_data import Domain
from dlis_market.protocol.telemetry import (
    SignedTelemetry,
    TelemetryMetrics,
    TelemetryReport,
    oracle_domain,
    sign_telemetry,
)

NOW = 1_800_000_000


@pytest.fixture()
def domain() -> Domain:
    return oracle_domain(31337, "0x" + "ab" * 20)


@pytest.fixture()
def node_key() -> LocalAccount:
    return Account.from_key(b"\x11" * 32)


def metrics(**kw: object) -> TelemetryMetrics:
    base: dict[str, object] = {"uptime_s": 100.0, "advertised_tps": 50.0, "measured_tps": 45.0, "free_kv_slots": 4}
    base.update(kw)
    return TelemetryMetrics.model_validate(base)


@pytest.fixture()
def make_report(domain: Domain, node_key: LocalAccount) -> Callable[..., SignedTelemetry]:
    def make(seq: int = 1, timestamp: int = NOW, key: LocalAccount | None = None, **kw: object) -> SignedTelemetry:
        k = key or node_key
        report = TelemetryReport(node=k.address, seq=seq, timestamp=timestamp, metrics=metrics(**kw))
        return sign_telemetry(k.key, domain, report)

    return make
