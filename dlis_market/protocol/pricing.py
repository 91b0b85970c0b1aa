"""What a job may cost: the one price function of the market.

JobMarket is the reference these functions are tested against (``tests/unit/protocol``): a stage's
receipt may bill its price per token times the tokens the session pushed through it; the client
pays the receipts plus a protocol fee of ``cost * feeBps / 10000`` rounded down; and the receipts
plus that fee must stay within the client's ``maxCost``. The broker's quote and admission, the
scheduler's route choice, the driver's failover budget and the receipts themselves all price with
these functions, so a route that passes one of them passes the contract. (``chain.job_market``,
the contract's own bindings below this package, reads the fee from the contract and applies the
same rule in its preflight.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

BPS = 10_000  # basis points, as JobMarket's _BPS


def stage_charge(price_per_token: int, tokens: int) -> int:
    """What one stage may bill for ``tokens`` tokens: a receipt's ``amount`` at most."""
    return price_per_token * tokens


def fee_on(cost: int, fee_bps: int) -> int:
    """The protocol fee on ``cost`` (rounded down, as JobMarket settles it)."""
    return cost * fee_bps // BPS


@dataclass(frozen=True)
class Bound:
    """The most a job may cost: the stages' receipts and the fee on them."""

    cost: int
    fee: int

    @property
    def total(self) -> int:
        return self.cost + self.fee


def route_bound(prices_per_token: Iterable[int], tokens: int, fee_bps: int) -> Bound:
    """Upper bound for a route whose stages charge ``prices_per_token`` and each see at most
    ``tokens`` tokens (prompt plus every new token: each stage processes all of them)."""
    cost = sum(stage_charge(p, tokens) for p in prices_per_token)
    return Bound(cost, fee_on(cost, fee_bps))


def cost_budget(max_total: int, fee_bps: int) -> int:
    """The largest stage cost whose total with the fee stays within ``max_total``; what a route
    may charge under an authorization (or a policy) of ``max_total``."""
    if max_total <= 0:
        return 0
    cost = max_total * BPS // (BPS + fee_bps)
    while cost + 1 + fee_on(cost + 1, fee_bps) <= max_total:
        cost += 1
    while cost > 0 and cost + fee_on(cost, fee_bps) > max_total:
        cost -= 1
    return cost
