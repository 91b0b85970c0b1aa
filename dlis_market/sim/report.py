"""Figures of a simulation run, their spread over seeds, what-if differences, and the tables.

:func:`summarize` turns one :class:`~dlis_market.sim.engine.SimResult` into flat figures (token
amounts in DLIS, 18 decimals); :func:`over_seeds` gives mean and 95 % confidence half-width per
figure; :func:`paired_difference` the same for ``changed - base`` run on the same seeds (common
random numbers: the arrivals and churn of the peers both share are identical).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from scipy import stats as sps

from dlis_market.sim.economics import break_even_fraction
from dlis_market.sim.engine import SimResult

UNIT = 10**18

# figure -> (label, unit); the order of the tables
FIGURES: dict[str, tuple[str, str]] = {
    "jobs": ("jobs arrived", ""),
    "completion": ("jobs completed", "%"),
    "no_route": ("jobs failed: no route", ""),
    "failovers_exhausted": ("jobs failed: failovers exhausted", ""),
    "failovers": ("failovers", ""),
    "latency_p50_s": ("job latency p50", "s"),
    "latency_p95_s": ("job latency p95", "s"),
    "latency_p99_s": ("job latency p99", "s"),
    "ttft_p50_s": ("time to first token p50", "s"),
    "ms_per_token_p50": ("decode ms/token p50", "ms"),
    "route_p50_ms": ("route decision p50 (wall)", "ms"),
    "route_p99_ms": ("route decision p99 (wall)", "ms"),
    "route_cpu_p99_ms": ("route decision p99 (CPU, this thread)", "ms"),
    "utilisation": ("KV-slot utilisation, all peers", "%"),
    "checks_drawn": ("spot checks drawn", ""),
    "checks_unreplicated": ("drawn checks with no replica online", ""),
    "cheaters_caught": ("cheating calls caught", ""),
    "corrupted_delivered": ("jobs delivered with a corrupted stage", ""),
    "cheater_gain_dlis": ("cheaters' gain over honesty", "DLIS"),
    "client_paid_dlis": ("clients paid", "DLIS"),
    "fees_dlis": ("protocol fees", "DLIS"),
    "slashed_dlis": ("slashed", "DLIS"),
    "gas_per_day": ("settlement gas per day", "gas"),
    "batches": ("settlement batches", ""),
    "wall_s": ("wall time of the run", "s"),
}


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan


def summarize(r: SimResult) -> dict[str, Any]:
    """Flat figures of one run plus per-device-class rows (``classes``)."""
    jobs = r.jobs
    ok = [j for j in jobs if j.status == "ok"]
    lat = [j.latency_s for j in ok]
    per_token = [1000.0 * (j.finished - j.first_token) / j.new_tokens for j in ok if j.new_tokens]
    up = sum(p.up_s for p in r.peers)
    slots = sum(p.up_s * s.profile.max_sessions for p, s in zip(r.peers, r.specs, strict=True))
    cheat = [p for p, s in zip(r.peers, r.specs, strict=True) if s.byzantine > 0]
    seconds = r.hours * 3600.0
    out: dict[str, Any] = {
        "jobs": len(jobs),
        "completion": 100.0 * len(ok) / max(len(jobs), 1),
        "no_route": sum(j.status == "no_route" for j in jobs),
        "failovers_exhausted": sum(j.status == "failovers" for j in jobs),
        "failovers": sum(j.failovers for j in jobs),
        "latency_p50_s": _pct(lat, 50),
        "latency_p95_s": _pct(lat, 95),
        "latency_p99_s": _pct(lat, 99),
        "ttft_p50_s": _pct([j.first_token - j.arrived for j in ok], 50),
        "ms_per_token_p50": _pct(per_token, 50),
        "route_p50_ms": _pct(r.route_ms, 50),
        "route_p99_ms": _pct(r.route_ms, 99),
        "route_cpu_p99_ms": _pct(r.route_cpu_ms, 99),
        "utilisation": 100.0 * sum(p.session_s for p in r.peers) / slots if slots else 0.0,
        "checks_drawn": r.checks_drawn,
        "checks_unreplicated": r.checks_unreplicated,
        "cheaters_caught": sum(p.caught for p in cheat),
        "corrupted_delivered": sum(j.corrupted_delivered for j in jobs),
        "cheater_gain_dlis": sum(p.saved - p.slashed - p.forfeited for p in cheat) / UNIT,
        "client_paid_dlis": r.ledger.client_paid / UNIT,
        "fees_dlis": r.ledger.fees / UNIT,
        "slashed_dlis": r.ledger.slashed / UNIT,
        "gas_per_day": r.gas * 86400.0 / seconds,
        "batches": r.batches,
        "wall_s": r.wall_s,
    }
    classes: dict[str, dict[str, float]] = {}
    for p, s in zip(r.peers, r.specs, strict=True):
        row = classes.setdefault(s.device, {"peers": 0, "session_s": 0.0, "slot_s": 0.0, "calls": 0, "net": 0.0})
        row["peers"] += 1
        row["session_s"] += p.session_s
        row["slot_s"] += p.up_s * s.profile.max_sessions
        row["calls"] += p.calls
        row["net"] += (p.earned - p.spent - p.slashed) / UNIT
    out["classes"] = {
        name: {
            "peers": row["peers"],
            "calls": row["calls"],
            "utilisation_pct": 100.0 * row["session_s"] / row["slot_s"] if row["slot_s"] else 0.0,
            "net_earnings_dlis": row["net"],
            "net_per_peer_hour_dlis": row["net"] / row["peers"] / r.hours,
        }
        for name, row in sorted(classes.items())
    }
    out["solver"] = r.solver
    out["online_fraction"] = up / (seconds * len(r.specs)) if r.specs else 0.0
    return out


def cheater_bound(r: SimResult) -> list[dict[str, Any]]:
    """Per byzantine peer class: R, C per call, S, the break-even fraction, and p in force."""
    rows = []
    seen = set()
    tokens = [c.prompt_tokens + c.max_new_tokens for c in r.scenario.clients]
    for s in r.specs:
        key = (s.device, s.layers.start, s.layers.end)
        if s.byzantine <= 0 or key in seen:
            continue
        seen.add(key)
        n = max(tokens)
        reward = -(-s.price_per_token // s.layers.size) * s.layers.size * n
        cost = s.profile.cost_per_token_layer * s.layers.size * n
        slashed = min(r.market.slash_amount, s.stake)
        rows.append(
            {
                "peer": f"{s.device} {s.layers}",
                "reward_dlis": reward / UNIT,
                "compute_cost_dlis": cost / UNIT,
                "slash_dlis": slashed / UNIT,
                "break_even_fraction": break_even_fraction(reward, slashed, cost),
                "check_fraction": r.market.check_fraction,
            }
        )
    return rows


def _t95(n: int) -> float:
    return float(sps.t.ppf(0.975, n - 1)) if n > 1 else math.nan


def over_seeds(runs: Sequence[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Per figure: (mean, 95 % confidence half-width) over the seeds' runs."""
    out = {}
    for key in FIGURES:
        xs = np.array([float(r[key]) for r in runs], dtype=np.float64)
        xs = xs[~np.isnan(xs)]
        if xs.size == 0:
            out[key] = (math.nan, math.nan)
            continue
        half = _t95(xs.size) * float(xs.std(ddof=1)) / math.sqrt(xs.size) if xs.size > 1 else math.nan
        out[key] = (float(xs.mean()), half)
    return out


def paired_difference(
    base: Sequence[dict[str, Any]], changed: Sequence[dict[str, Any]]
) -> dict[str, tuple[float, float, float]]:
    """Per figure: (base mean, mean of changed - base, 95 % half-width of that difference)."""
    out = {}
    for key in FIGURES:
        pairs = [(float(b[key]), float(c[key])) for b, c in zip(base, changed, strict=True)]
        pairs = [(b, c) for b, c in pairs if not (math.isnan(b) or math.isnan(c))]
        if not pairs:
            out[key] = (math.nan, math.nan, math.nan)
            continue
        d = np.array([c - b for b, c in pairs])
        half = _t95(d.size) * float(d.std(ddof=1)) / math.sqrt(d.size) if d.size > 1 else math.nan
        out[key] = (float(np.mean([b for b, _ in pairs])), float(d.mean()), half)
    return out


def _fmt(x: float) -> str:
    if math.isnan(x):
        return "-"
    if x != 0 and (abs(x) >= 1e6 or abs(x) < 1e-3):
        return f"{x:.3g}"
    return f"{x:,.3f}".rstrip("0").rstrip(".") if not float(x).is_integer() else f"{x:,.0f}"


def print_run(
    console: Console, title: str, agg: dict[str, tuple[float, float]], runs: Sequence[dict[str, Any]]
) -> None:
    t = Table(title=title)
    t.add_column("figure")
    t.add_column("mean", justify="right")
    t.add_column("± 95 % CI", justify="right")
    t.add_column("unit")
    for key, (label, unit) in FIGURES.items():
        mean, half = agg[key]
        t.add_row(label, _fmt(mean), _fmt(half), unit)
    console.print(t)
    c = Table(title="per device class (first seed)")
    for col in ("class", "peers", "calls", "utilisation %", "net earnings DLIS", "per peer-hour DLIS"):
        c.add_column(col, justify="right" if col != "class" else "left")
    for name, row in runs[0]["classes"].items():
        c.add_row(
            name,
            str(row["peers"]),
            str(row["calls"]),
            _fmt(row["utilisation_pct"]),
            _fmt(row["net_earnings_dlis"]),
            _fmt(row["net_per_peer_hour_dlis"]),
        )
    console.print(c)


def print_bound(console: Console, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    t = Table(title="incentive bound per byzantine peer kind: cheating loses when p (R + S) >= C")
    for col in ("peer", "R DLIS", "C DLIS", "S DLIS", "break-even p", "p in force"):
        t.add_column(col, justify="right" if col != "peer" else "left")
    for r in rows:
        t.add_row(
            r["peer"],
            _fmt(r["reward_dlis"]),
            _fmt(r["compute_cost_dlis"]),
            _fmt(r["slash_dlis"]),
            f"{r['break_even_fraction']:.3g}",
            f"{r['check_fraction']:.3g}",
        )
    console.print(t)


def print_compare(console: Console, change: str, diff: dict[str, tuple[float, float, float]], seeds: int) -> None:
    t = Table(title=f"what if {change}: changed - base, paired over {seeds} seeds")
    for col in ("figure", "base", "difference", "± 95 % CI", "unit", ""):
        t.add_column(col, justify="left" if col in ("figure", "") else "right")
    for key, (label, unit) in FIGURES.items():
        base, d, half = diff[key]
        sig = "" if math.isnan(half) or abs(d) <= half else "significant"
        t.add_row(label, _fmt(base), _fmt(d), _fmt(half), unit, sig)
    console.print(t)


def write_plots(folder: Path, results: Sequence[SimResult], runs: Sequence[dict[str, Any]]) -> list[Path]:
    """PNG charts of a run over seeds: latency percentiles, completion, utilisation and earnings per
    device class, cheaters' gain and settlement gas per seed."""
    from dlis_market.sim.plots import bar_chart, line_chart

    folder.mkdir(parents=True, exist_ok=True)
    qs = list(range(1, 100))
    series = {}
    for r in results[:5]:
        lat = [j.latency_s for j in r.jobs if j.status == "ok"]
        if lat:
            series[f"seed {r.seed}"] = (qs, [float(v) for v in np.percentile(lat, qs)])
    seeds = [f"seed {r.seed}" for r in results]
    classes = runs[0]["classes"]
    name = results[0].scenario.name
    return [
        line_chart(folder / "latency.png", f"{name}: job latency", series, "percentile", "seconds"),
        bar_chart(folder / "completion.png", f"{name}: jobs completed", seeds, [r["completion"] for r in runs], "%"),
        bar_chart(
            folder / "utilisation.png",
            f"{name}: KV-slot utilisation",
            list(classes),
            [v["utilisation_pct"] for v in classes.values()],
            "%",
        ),
        bar_chart(
            folder / "earnings.png",
            f"{name}: net earnings per peer-hour",
            list(classes),
            [v["net_per_peer_hour_dlis"] for v in classes.values()],
            "DLIS",
        ),
        bar_chart(
            folder / "cheater_gain.png",
            f"{name}: cheaters' gain over honesty",
            seeds,
            [r["cheater_gain_dlis"] for r in runs],
            "DLIS",
        ),
        bar_chart(
            folder / "gas.png", f"{name}: settlement gas per day", seeds, [r["gas_per_day"] for r in runs], "gas"
        ),
    ]
