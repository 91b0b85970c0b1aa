"""`dlis sim ...`: simulate a network of peers and clients, and ask what-if questions of it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from dlis_market.cli.context import console, handle_errors, state

app = typer.Typer(
    short_help="Simulate the network (SimPy) on the real scheduler and market rules; what-ifs with 95 % CIs.",
    help=(
        "Discrete-event simulation (SimPy) of the market, driving the project's own code: the scheduler "
        "(plan_route), the oracle's dropout model and reputation scoring, the spot-check sampler, the "
        "contracts' fee and slash rules, and the measured settlement gas.\n\n"
        "A scenario file (YAML/JSON) lists peers (device class, layers [start, end), price, stake, byzantine "
        "rate, own measured figures) or a random population, and client classes (Poisson rate or closed-loop "
        "users, tokens, policy). Shipped: demo (make demo's 4 workers), demo_calibrated (the same 4 as "
        "bench/sim_calibration.py measured them running, with the broker's per-job costs), byzantine (demo + "
        "a cheating laptop), scale (10,000 peers). Market rules not in the file come from the settings "
        "(DLIS_*).\n\n"
        "Examples:\n\n"
        "dlis sim run --scenario demo --seeds 5\n\n"
        "dlis sim compare --scenario demo --change add-peers=2 --seeds 10\n\n"
        "dlis sim incentive --scenario byzantine --fractions 0,0.02,0.1\n\n"
        "Device figures: laptop measured (bench/pipeline_local.py), phone, iot and server assumed (see "
        "dlis_market/sim/profiles.py); demo_calibrated holds measured ones. No PNG plots: neither matplotlib "
        "nor Pillow is installed; --out writes JSON."
    ),
    no_args_is_help=True,
)

ScenarioOpt = Annotated[
    Path,
    typer.Option(help="Scenario file (YAML or JSON), or a shipped name: demo, demo_calibrated, byzantine, scale."),
]
SeedsOpt = Annotated[int, typer.Option(min=1, help="Independent runs (seeds 0..N-1); figures get 95 % CIs.")]
HoursOpt = Annotated[float | None, typer.Option(min=0.001, help="Simulated hours (default: the scenario's).")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
OutOpt = Annotated[Path | None, typer.Option(help="Also write the JSON result to this file.")]
PlotsOpt = Annotated[Path | None, typer.Option(help="Write PNG charts into this folder.")]


def _load(ctx: typer.Context, scenario: Path) -> tuple[Any, Any]:
    from dlis_market.sim.scenario import Market, load_scenario

    sc = load_scenario(scenario)
    return sc, Market.of(sc.market, state(ctx).settings)


def _write(out: Path | None, data: dict[str, Any]) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=2, default=str) + "\n")


@app.command()
def run(
    ctx: typer.Context,
    scenario: ScenarioOpt,
    seeds: SeedsOpt = 3,
    hours: HoursOpt = None,
    as_json: JsonFlag = False,
    out: OutOpt = None,
    plots: PlotsOpt = None,
) -> None:
    """Simulate the scenario: latency percentiles, completion, utilisation, earnings per device class,
    cheaters' gain, gas per day; mean and 95 % confidence interval over seeds."""
    from dlis_market.sim.engine import run_seeds
    from dlis_market.sim.report import cheater_bound, over_seeds, print_bound, print_run, summarize, write_plots

    with handle_errors(as_json):
        sc, market = _load(ctx, scenario)
        results = run_seeds(sc, market, seeds, hours)
        runs = [summarize(r) for r in results]
        agg = over_seeds(runs)
        bound = cheater_bound(results[0])
        data = {
            "scenario": sc.name,
            "peers": len(results[0].specs),
            "hours": results[0].hours,
            "market": market.model_dump(mode="json"),
            "mean_ci95": {k: list(v) for k, v in agg.items()},
            "runs": runs,
            "incentive_bound": bound,
        }
        _write(out, data)
        drawn = write_plots(plots, results, runs) if plots is not None else []
        if as_json:
            console.print_json(json.dumps(data, default=str))
            return
        title = f"{sc.name}: {len(results[0].specs)} peers, {results[0].hours:g} h, {seeds} seed(s)"
        print_run(console, title, agg, runs)
        print_bound(console, bound)
        for path in drawn:
            console.print(f"wrote {path}")


@app.command()
def compare(
    ctx: typer.Context,
    scenario: ScenarioOpt,
    change: Annotated[
        list[str],
        typer.Option(
            help=(
                "What-if, repeatable (applied in order): add-peers=N, remove-device=CLASS, check-fraction=P, "
                "slash=DLIS, stake=DLIS, min-stake=DLIS, rate=X, byzantine=R."
            )
        ),
    ],
    seeds: SeedsOpt = 5,
    hours: HoursOpt = None,
    as_json: JsonFlag = False,
    out: OutOpt = None,
) -> None:
    """Run the scenario with and without the change on the same seeds and print changed - base with a
    95 % confidence interval (paired over seeds); 'significant' when the interval excludes 0."""
    from dlis_market.sim.engine import run_seeds
    from dlis_market.sim.report import paired_difference, print_compare, summarize
    from dlis_market.sim.scenario import Market, apply_change

    with handle_errors(as_json):
        sc, market = _load(ctx, scenario)
        changed = sc
        for c in change:
            changed = apply_change(changed, c)
        changed_market = Market.of(changed.market, state(ctx).settings)
        base = [summarize(r) for r in run_seeds(sc, market, seeds, hours)]
        after = [summarize(r) for r in run_seeds(changed, changed_market, seeds, hours)]
        diff = paired_difference(base, after)
        label = ", ".join(change)
        data = {
            "scenario": sc.name,
            "change": change,
            "seeds": seeds,
            "difference": {k: list(v) for k, v in diff.items()},
        }
        _write(out, data)
        if as_json:
            console.print_json(json.dumps(data, default=str))
            return
        print_compare(console, label, diff, seeds)


@app.command()
def incentive(
    ctx: typer.Context,
    scenario: ScenarioOpt,
    fractions: Annotated[
        str, typer.Option(help="Check fractions to simulate, comma-separated.")
    ] = "0,0.01,0.02,0.05,0.1",
    seeds: SeedsOpt = 3,
    hours: HoursOpt = None,
    as_json: JsonFlag = False,
    plots: PlotsOpt = None,
) -> None:
    """Cheaters' measured gain over honesty vs the spot-check fraction p, next to the break-even p
    where p (R + S) = C (R: receipt, S: slash, C: compute a cheater skips)."""
    from dlis_market.sim.engine import run_seeds
    from dlis_market.sim.errors import ScenarioError
    from dlis_market.sim.report import cheater_bound, over_seeds, print_bound, summarize
    from dlis_market.sim.scenario import apply_change

    with handle_errors(as_json):
        sc, market = _load(ctx, scenario)
        try:
            ps = [float(x) for x in fractions.split(",") if x.strip()]
        except ValueError as exc:
            raise ScenarioError(f"--fractions {fractions!r}: give numbers in [0, 1] separated by commas") from exc
        rows: list[dict[str, Any]] = []
        bound: list[dict[str, Any]] = []
        for p in ps:
            changed = apply_change(sc, f"check-fraction={p}")
            results = run_seeds(changed, market.model_copy(update={"check_fraction": p}), seeds, hours)
            runs = [summarize(r) for r in results]
            agg = over_seeds(runs)
            bound = cheater_bound(results[0])
            calls = sum(p_.calls for r in results for p_, s in zip(r.peers, r.specs, strict=True) if s.byzantine > 0)
            rows.append(
                {
                    "check_fraction": p,
                    "cheater_gain_dlis": agg["cheater_gain_dlis"],
                    "cheaters_caught": agg["cheaters_caught"][0],
                    "cheating_calls": calls / seeds,
                }
            )
        if plots is not None:
            from dlis_market.sim.plots import line_chart

            plots.mkdir(parents=True, exist_ok=True)
            path = line_chart(
                plots / "incentive.png",
                f"{sc.name}: cheaters' gain vs check fraction",
                {
                    "gain over honesty (DLIS)": (
                        [r["check_fraction"] for r in rows],
                        [r["cheater_gain_dlis"][0] for r in rows],
                    )
                },
                "check fraction p",
                "DLIS",
                marker_x=min((b["break_even_fraction"] for b in bound), default=None),
            )
            console.print(f"wrote {path}")
        if as_json:
            console.print_json(json.dumps({"rows": rows, "bound": bound}, default=str))
            return
        from rich.table import Table

        t = Table(title=f"{sc.name}: cheaters' gain over honesty vs check fraction ({seeds} seeds)")
        for col in ("p", "gain DLIS", "± 95 % CI", "calls served by cheaters", "caught"):
            t.add_column(col, justify="right")
        for r in rows:
            mean, half = r["cheater_gain_dlis"]
            t.add_row(
                f"{r['check_fraction']:g}",
                f"{mean:.6g}",
                f"{half:.3g}",
                f"{r['cheating_calls']:.1f}",
                f"{r['cheaters_caught']:.2f}",
            )
        console.print(t)
        print_bound(console, bound)
