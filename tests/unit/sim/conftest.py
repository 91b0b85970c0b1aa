"""Shared pieces of the simulator's tests: the shipped scenarios under the default settings."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from dlis_market.settings import Settings
from dlis_market.sim.scenario import Market, Scenario, load_scenario


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings.load(environ={})


@pytest.fixture(scope="session")
def shipped(settings: Settings) -> Callable[[str], tuple[Scenario, Market]]:
    """A shipped scenario by name and its market rules under the default settings."""

    def load(name: str) -> tuple[Scenario, Market]:
        sc = load_scenario(Path(name))
        return sc, Market.of(sc.market, settings)

    return load
