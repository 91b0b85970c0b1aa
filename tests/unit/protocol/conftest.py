"""The outbox's exactly-once test runs against a real oracle on a real Anvil: the integration
suite's market fixture, shared here."""

from tests.integration.conftest import market, market_session

__all__ = ["market", "market_session"]
