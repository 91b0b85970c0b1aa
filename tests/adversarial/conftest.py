"""The integration suite's market fixtures (a real Anvil with the market deployed, fresh state per
test, real SmolLM2 shards), shared here."""

from tests.integration.conftest import market, market_session, smollm2_shards

__all__ = ["market", "market_session", "smollm2_shards"]
