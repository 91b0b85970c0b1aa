"""Compare dropout models on heartbeat traces and print the numbers that chose DEFAULT_MODEL.

    .venv/bin/python bench/dropout_model.py [--nodes 300] [--slots 4320] [--seed 0]

Train on the first half of the nodes, test on the other half (held-out nodes, so per-node
memorisation cannot help). Brier score (lower is better, a proper scoring rule: it rewards
calibration, which the scheduler needs because failure_risk is used as a probability) and AUC
(ranking quality). The base rate and a constant prediction are shown for scale.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from dlis_market.oracle.dropout import (
    ExpSmoothingModel,
    brier,
    dataset,
    evaluate,
    fit_logistic,
    simulate_traces,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=300)
    parser.add_argument("--slots", type=int, default=4320)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    t0 = time.perf_counter()
    traces = simulate_traces(args.nodes, args.slots, args.seed)
    half = args.nodes // 2
    train, test = traces[:half], traces[half:]
    x_tr, y_tr, pts_tr = dataset(train)
    _, y_te, pts_te = dataset(test)
    rate = float(y_tr.mean())
    results: dict[str, dict[str, float]] = {
        "constant base rate": {"brier": brier(np.full_like(y_te, rate), y_te), "auc": 0.5, "rate": float(y_te.mean())}
    }
    # exponential smoothing: pick alpha on the training half by Brier
    best = min(
        (ExpSmoothingModel(alpha, rate) for alpha in (0.02, 0.05, 0.1, 0.2, 0.4)),
        key=lambda m: evaluate(m, train, pts_tr, y_tr)["brier"],
    )
    results[f"exp smoothing (alpha={best.alpha})"] = evaluate(best, test, pts_te, y_te)
    logistic = fit_logistic(x_tr, y_tr)
    results["logistic regression"] = evaluate(logistic, test, pts_te, y_te)
    base = results["constant base rate"]["brier"]
    for r in results.values():
        r["brier_skill"] = 1 - r["brier"] / base  # > 0: better than always predicting the base rate
    print(
        json.dumps(
            {
                "train_samples": len(y_tr),
                "test_samples": len(y_te),
                "results": results,
                "logistic_coef": [round(c, 3) for c in logistic.coef],
                "seconds": round(time.perf_counter() - t0, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
