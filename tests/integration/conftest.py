"""Fixtures of the integration suite, re-exported by tests/adversarial and tests/chaos: one real
Anvil per test session with the market deployed (same sequence as `brownie run deploy`), and a
fresh chain state for every test (evm_snapshot / evm_revert). Not in tests/conftest.py: the
brownie contract suite defines fixtures of the same names, and a root definition breaks its order."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dlis_market.chain.devnet import LocalMarket, local_market
from dlis_market.inference.importer import import_model
from dlis_market.inference.shard_export import export_shards

# Anvil's dev account 0 deploys the market and publishes the models in these suites. Model ids are
# namespaced by publisher: ``types.model_id(name, DEV_PUBLISHER)``.
DEV_PUBLISHER = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
# Shared with the inference tests' cache: the real SmolLM2 is imported once per machine.
CACHE = Path(tempfile.gettempdir()) / "dlis-test-cache" / "v1"


@pytest.fixture(scope="session")
def market_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMarket]:
    home: Path = tmp_path_factory.mktemp("dlis-home")
    # Small, readable parameters: 100 DLIS minimum stake, 1 h unbonding, 1 h withdraw delay (usable
    # for 1 h once ready), authorizations at most 30 min ahead at settlement, 2.5 % fee.
    with local_market(
        home,
        min_stake=100 * 10**18,
        unbonding_period_s=3600,
        withdraw_delay_s=3600,
        withdraw_window_s=3600,
        max_authorization_lifetime_s=1800,
        keystore_scrypt_n=2**10,
    ) as m:
        assert m.deployer.address == DEV_PUBLISHER, m.deployer.address
        yield m


@pytest.fixture()
def market(market_session: LocalMarket) -> Iterator[LocalMarket]:
    snap = market_session.snapshot()
    try:
        yield market_session
    finally:
        market_session.revert(snap)


@pytest.fixture(scope="session")
def smollm2_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real SmolLM2-135M in three bf16 shards (manifest + tokenizer), made once per session."""
    model_dir = import_model("smollm2-135m", CACHE / "models", CACHE / "cache")
    out = tmp_path_factory.mktemp("smollm2-shards") / "shards"
    export_shards(model_dir, out, stages=3, dtype="bf16", name="smollm2-135m")
    return out
