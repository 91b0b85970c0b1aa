"""Money in the simulated market: settlement, fees, slashing, and the incentive to cheat.

The rules are the contracts' (integer token units, as on chain):

* ``JobMarket._settleJob``: a job costs the sum of its receipts; the protocol fee is
  ``cost * feeBps / 10000`` (rounded down) on top; the client pays both. A receipt of a stage
  whose node is not routable at settlement is forfeited (unpaid, not charged).
* ``StakingManager.slash``: takes ``min(amount, stake)``; ``reporterShareBps`` of it goes to the
  reporter (the broker that ran the check), the rest to the treasury. A node under the minimum
  stake is not routable (``NodeRegistry.isRoutable``).

**Incentive bound.** A byzantine worker that skips a call's compute saves ``C``; the call is
spot-checked with probability ``p`` (:class:`~dlis_market.protocol.spot_checks.SpotCheckSampler`),
and then it loses the slash ``S`` and its receipt ``R`` (slashed under the minimum stake, its
unsettled receipts forfeit). Per call, cheating gains ``C - p (R + S)`` over serving honestly:
negative exactly when ``p (R + S) >= C``. :func:`cheater_trials` measures it with the real sampler.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from dlis_market.protocol.pricing import BPS, fee_on
from dlis_market.protocol.spot_checks import SpotCheckSampler


@dataclass(frozen=True)
class Slash:
    taken: int
    to_reporter: int
    to_treasury: int
    stake_after: int


def slash(stake: int, amount: int, reporter_share_bps: int) -> Slash:
    """What ``StakingManager.slash(operator, amount, ...)`` does to a stake of ``stake``."""
    taken = min(amount, stake)
    reporter = taken * reporter_share_bps // BPS
    return Slash(taken=taken, to_reporter=reporter, to_treasury=taken - reporter, stake_after=stake - taken)


@dataclass
class Ledger:
    """Every token unit that moved; :meth:`balanced` checks that none appeared or vanished."""

    client_paid: int = 0
    node_earned: int = 0
    fees: int = 0
    forfeited: int = 0  # receipts of unroutable nodes: neither paid nor charged
    slashed: int = 0
    slash_to_reporter: int = 0
    slash_to_treasury: int = 0

    def settle(self, receipts: list[tuple[int, bool]], fee_bps: int) -> tuple[int, int]:
        """Settle one job: ``receipts`` as ``(amount, node routable)``; returns ``(cost, fee)``."""
        cost = sum(a for a, ok in receipts if ok)
        fee = fee_on(cost, fee_bps)
        self.forfeited += sum(a for a, ok in receipts if not ok)
        self.node_earned += cost
        self.fees += fee
        self.client_paid += cost + fee
        return cost, fee

    def record_slash(self, s: Slash) -> None:
        self.slashed += s.taken
        self.slash_to_reporter += s.to_reporter
        self.slash_to_treasury += s.to_treasury

    def balanced(self) -> bool:
        return (
            self.client_paid == self.node_earned + self.fees
            and self.slashed == self.slash_to_reporter + self.slash_to_treasury
        )


def break_even_fraction(reward: int, slash_amount: int, compute_cost: int) -> float:
    """The least check fraction ``p`` with ``p (R + S) >= C``: cheating pays below it."""
    return compute_cost / (reward + slash_amount)


def expected_gain(p: float, reward: int, slash_amount: int, compute_cost: int) -> float:
    """Expected gain per call of cheating over serving honestly: ``C - p (R + S)``."""
    return compute_cost - p * (reward + slash_amount)


@dataclass(frozen=True)
class CheaterOutcome:
    cheaters: int
    calls: int  # calls served by cheaters, all corrupted
    caught: int
    gain: int  # total over honest: compute saved - slashes - forfeited receipts

    @property
    def gain_per_call(self) -> float:
        return self.gain / max(self.calls, 1)


def cheater_trials(
    p: float,
    reward: int,
    compute_cost: int,
    slash_amount: int,
    stake: int,
    min_stake: int,
    reporter_share_bps: int,
    *,
    cheaters: int,
    calls: int,
    seed: int,
) -> CheaterOutcome:
    """``cheaters`` workers corrupt every call for up to ``calls`` calls each, as long as they stay
    routable; each call is drawn by the real sampler at fraction ``p`` and, when drawn, slashed by
    the contract's rule and its receipt forfeited. Returns what cheating gained over honesty."""
    sampler = SpotCheckSampler(p, hashlib.sha256(f"sim-incentive:{seed}".encode()).digest())
    total_calls = caught = gain = 0
    for c in range(cheaters):
        left = stake
        for k in range(calls):
            if left < min_stake:
                break  # unroutable: no more jobs
            total_calls += 1
            job = hashlib.sha256(f"{seed}:{c}:{k}".encode()).digest()
            gain += compute_cost
            if sampler.selected(job, 0):
                caught += 1
                s = slash(left, slash_amount, reporter_share_bps)
                left = s.stake_after
                gain -= s.taken + reward
    return CheaterOutcome(cheaters=cheaters, calls=total_calls, caught=caught, gain=gain)
