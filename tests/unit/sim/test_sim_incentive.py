"""Cheating has negative expected value exactly when p (R + S) >= C, on the real parameters.

R is a ``make demo`` laptop's receipt for a 64-token job (2e12 token units per token for its
span), S the settings' slash amount, the stake the settings' minimum; the spot-check draws are the
real :class:`SpotCheckSampler`'s and the slash is the contract's rule. C (the compute a cheater
skips) is the free variable: it is set from p so that ``k = p (R + S) / C`` lands on either side
of 1, and the measured gain over honesty must have the bound's sign.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlis_market.settings import Settings
from dlis_market.sim.economics import break_even_fraction, cheater_trials, expected_gain

REAL = Settings.load(environ={})
REWARD = 2 * 10**12 * 64
SLASH = REAL.oracle.slash_amount
STAKE = REAL.chain.min_stake
CHEATERS, CALLS = 1000, 200


def _trial(p: float, k: float, seed: int) -> tuple[float, int]:
    cost = round(p * (REWARD + SLASH) / k)
    out = cheater_trials(
        p,
        REWARD,
        cost,
        SLASH,
        STAKE,
        REAL.chain.min_stake,
        REAL.chain.reporter_share_bps,
        cheaters=CHEATERS,
        calls=CALLS,
        seed=seed,
    )
    return out.gain_per_call, cost


PROPERTY = settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(p=st.floats(0.05, 0.5), k=st.floats(1.3, 4.0), seed=st.integers(0, 2**16))
def test_cheating_loses_when_checks_cover_the_saving(p: float, k: float, seed: int) -> None:
    gain, cost = _trial(p, k, seed)
    assert expected_gain(p, REWARD, SLASH, cost) <= 0
    assert gain < 0, f"p {p:.3f}, k {k:.2f}: cheaters gained {gain:.3g} per call"


@PROPERTY
@given(p=st.floats(0.05, 0.5), k=st.floats(0.05, 0.6), seed=st.integers(0, 2**16))
def test_cheating_pays_well_below_the_bound(p: float, k: float, seed: int) -> None:
    gain, cost = _trial(p, k, seed)
    assert expected_gain(p, REWARD, SLASH, cost) > 0
    assert gain > 0, f"p {p:.3f}, k {k:.2f}: cheaters lost {gain:.3g} per call"


def test_the_settings_check_fraction_deters_skipping_a_demo_laptops_compute() -> None:
    """With the deployed defaults, skipping even a whole receipt's worth of compute does not pay."""
    p = REAL.broker.spot_check_fraction
    assert p >= break_even_fraction(REWARD, SLASH, REWARD)
    assert expected_gain(p, REWARD, SLASH, REWARD) < 0
