"""Benchmark: how fast spot checks catch a cheating worker, against the sampling model, in one run.

    .venv/bin/python bench/spot_check_detection.py [--fractions 0.05,0.1,0.25,0.5,1] [--trials 6]

Starts real worker processes on 127.0.0.1 serving SmolLM2-135M (bf16, 3 stages): ``a`` [0, 10),
``byz`` [10, 20) started with ``--byzantine``, two honest replicas ``h1`` (1 thread) and ``h2``
(2 threads: other reduction order, the honest noise a check must tolerate), ``c`` [20, 30).
Jobs (8 new tokens) run through the driver; the broker's :class:`SpotChecker` re-executes the
drawn calls of [10, 20) on a replica and judges the evidence with the oracle's own rules
(:func:`check_evidence`; the on-chain slash is covered by tests/integration/node/test_byzantine_slashed.py).

* **Honest phase**: ``--honest-jobs`` jobs through ``h1`` with every call checked on ``h2``:
  false accusations (must be 0) and the largest honest difference against the bf16 tolerance.
* **Byzantine phase**: for each check fraction ``f`` and ``--trials`` fresh sampler secrets, jobs
  through ``byz`` until the first accepted evidence (capped at ``--cap`` / f jobs): jobs to detection,
  the share of drawn checks that caught it (detection given a check) and per job (detection rate).
* **Baseline**: the sampling model. A call is drawn with probability f, so per job the detection
  rate should be f and jobs to detection geometric with mean 1/f; ratios are measured / model.
* **Cost**: wall time of one check (transcripts + replay + comparison) against the job's, and of
  one fingerprint check (transcripts + one prefill on the replica) of the same call.
* **Fingerprint checks** (``--modes replay,fingerprint``): the byzantine phase again with calls
  drawn for a fingerprint check (a rejection escalates to the re-execution); and detection per
  job before (re-execution of ``--budget`` of calls) and after (the same compute spent on
  fingerprint checks: ``budget x`` the measured cost ratio of calls).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import asyncio
import json
import secrets
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration" / "node"))

from eth_account import Account  # noqa: E402
from machine_info import write_result  # noqa: E402
from node_helpers import Swarm, _wait_ready, driver_settings, run_pinned_job, wait_for_spans  # noqa: E402

from dlis_market.broker.spot_checks import SpotChecker  # noqa: E402
from dlis_market.chain.typed_data import Domain  # noqa: E402
from dlis_market.inference.importer import import_model  # noqa: E402
from dlis_market.inference.shard_export import export_shards  # noqa: E402
from dlis_market.node.driver import PipelineDriver  # noqa: E402
from dlis_market.oracle.errors import EvidenceRefusedError  # noqa: E402
from dlis_market.oracle.verification import NodeInfo, check_evidence  # noqa: E402
from dlis_market.protocol.outputs import TOLERANCES  # noqa: E402
from dlis_market.protocol.routes import RouteHop  # noqa: E402
from dlis_market.protocol.spot_checks import (  # noqa: E402
    FingerprintCheckPass,
    SpotCheckEvidence,
    SpotCheckFailure,
    SpotCheckSampler,
)

CACHE = Path(tempfile.gettempdir()) / "dlis-test-cache" / "v1"
PROMPTS = ["The capital of France is", "A haiku about autumn:", "To bake bread you need", "Python is a language that"]
RUNNER = Account.create()
PRICE = 10**12  # the workers' default price per token
ORACLE = Domain("DLIS Oracle", "1", 31337, "0x" + "77" * 20)


class OracleRules:
    """The oracle's acceptance of evidence (every node registered); counts verdicts."""

    def __init__(self, domain: Domain) -> None:
        self.domain = domain
        self.accused: list[str] = []

    async def submit(self, evidence: SpotCheckEvidence) -> dict[str, Any]:
        try:
            verdict = check_evidence(
                evidence, self.domain, lambda n: NodeInfo(n, True), ORACLE, [RUNNER.address], False
            )
        except EvidenceRefusedError as exc:
            return {"outcome": "pass" if exc.reason == "within_tolerance" else f"refused:{exc.reason}"}
        self.accused.append(verdict.accused_node)
        return {"outcome": "slashed"}

    async def report_failure(self, failure: SpotCheckFailure) -> dict[str, Any]:
        return {"recorded": True}  # every worker here keeps its transcripts

    async def report_fingerprint_pass(self, passed: FingerprintCheckPass) -> dict[str, Any]:
        return {"recorded": True}


def hop(w: Any) -> RouteHop:
    return RouteHop(w.peer_id, w.info["node_address"], w.info["start"], w.info["end"], PRICE)


async def job(
    driver: PipelineDriver, model: str, route: list[RouteHop], prompt: list[int], new: int
) -> tuple[Any, float]:
    t = time.perf_counter()
    finished, _ = await run_pinned_job(driver, model, route, prompt, new)
    return finished, time.perf_counter() - t


def same_cost(honest: dict[str, Any], rows: list[dict[str, Any]], budget: float) -> dict[str, Any]:
    """Detection per job of a cheating stage before (``budget`` of calls re-executed) and after
    (the same compute spent on fingerprint checks), from the measured cost ratio and each mode's
    measured detection given a check."""

    def given_check(mode: str) -> float:
        drawn = sum(r["drawn"] for r in rows if r["mode"] == mode)
        return sum(r["caught"] for r in rows if r["mode"] == mode) / drawn if drawn else 0.0

    ratio = honest["replay_over_fingerprint_cost"]
    after_fraction = min(1.0, budget * ratio)
    before = budget * given_check("replay")
    after = after_fraction * given_check("fingerprint")
    return {
        "budget_replay_fraction": budget,
        "replay_over_fingerprint_cost": ratio,
        "fingerprint_fraction_at_same_cost": after_fraction,
        "detection_given_check": {"replay": given_check("replay"), "fingerprint": given_check("fingerprint")},
        "detection_per_job_before": before,
        "detection_per_job_after": after,
        "ratio_after_over_before": after / before if before else None,
        "jobs_to_detection_before": 1 / before if before else None,
        "jobs_to_detection_after": 1 / after if after else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fractions", default="0.05,0.1,0.25,0.5,1")
    ap.add_argument("--trials", type=int, default=6, help="fresh sampler secrets per fraction")
    ap.add_argument("--cap", type=float, default=6.0, help="give up a trial after cap / f jobs")
    ap.add_argument("--honest-jobs", type=int, default=30)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--modes", default="replay,fingerprint", help="how drawn calls are checked")
    ap.add_argument("--budget", type=float, default=0.02, help="re-executed fraction the 'before' spends")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "spot_check_detection.json")
    args = ap.parse_args()
    fractions = [float(x) for x in args.fractions.split(",")]
    torch.set_num_threads(1)
    model_dir = import_model("smollm2-135m", CACHE / "models", CACHE / "cache")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [list(tok(p)["input_ids"]) for p in PROMPTS]
    results: dict[str, Any] = {"model": "smollm2-135m", "dtype": "bf16", "new_tokens": args.new_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        manifest = export_shards(model_dir, Path(tmp) / "shards", stages=3, dtype="bf16")
        r = [f"{s.layers.start}:{s.layers.end}" for s in manifest.stages]
        shards = Path(tmp) / "shards"
        with Swarm(Path(tmp) / "swarm", env={"OMP_WAIT_POLICY": "PASSIVE"}) as swarm:
            ws = {
                "a": swarm.launch(shards, r[0], "a"),
                "byz": swarm.launch(shards, r[1], "byz", "--byzantine"),
                "h1": swarm.launch(shards, r[1], "h1"),
                "h2": swarm.launch(shards, r[1], "h2", "--threads", "2"),
                "c": swarm.launch(shards, r[2], "c"),
            }
            for w in ws.values():
                w.info = _wait_ready(w.proc, 300, w.log_path)
            byz_node = ws["byz"].info["node_address"]

            async def run() -> None:
                driver = await PipelineDriver.create(swarm.initial_peers, driver_settings())
                try:
                    await wait_for_spans(driver, manifest.model_name, 5)
                    rules = OracleRules(driver.market)

                    def checker(fraction: float, eligible: Any, mode: str = "replay") -> SpotChecker:
                        fp = SpotCheckSampler(fraction, secrets.token_bytes(32)) if mode == "fingerprint" else None
                        replay = SpotCheckSampler(fraction if mode == "replay" else 0.0, secrets.token_bytes(32))
                        return SpotChecker(driver, replay, bytes(RUNNER.key), ORACLE, rules, lambda _m: ("bf16", 576),
                                           eligible=eligible, fingerprints=fp)  # fmt: skip

                    # honest: h1 checked on h2 (the cheater is not eligible as a checker)
                    honest = checker(1.0, lambda n: n != byz_node)
                    route = [hop(ws["a"]), hop(ws["h1"]), hop(ws["c"])]
                    diffs, job_s, check_s, fp_s = [], [], [], []
                    fp_outcomes: Counter[str] = Counter()
                    for i in range(args.honest_jobs):
                        finished, took = await job(driver, manifest.model_name, route, prompts[i % 4], args.new_tokens)
                        t = time.perf_counter()
                        out = await honest.check(finished, [1])
                        check_s.append(time.perf_counter() - t)
                        job_s.append(took)
                        diffs.append(out[0].rel_diff if out[0].rel_diff is not None else float("nan"))
                        if "fingerprint" in args.modes:
                            t = time.perf_counter()
                            fp_out = await honest.check(finished, [], [1])
                            fp_s.append(time.perf_counter() - t)
                            fp_outcomes[fp_out[0].outcome] += 1
                    results["honest"] = {
                        "jobs": args.honest_jobs,
                        "checked": sum(honest.counts.values()),
                        "outcomes": dict(honest.counts),
                        "false_accusations": len(rules.accused),
                        "max_rel_diff": max(diffs),
                        "bf16_tolerance": TOLERANCES["bf16"].max_rel_diff,
                        "metric": "worst token's relative L2 (protocol/outputs.py compare_outputs)",
                        "job_s_median": statistics.median(job_s),
                        "check_s_median": statistics.median(check_s),
                        "check_cost_ratio": statistics.median(check_s) / statistics.median(job_s),
                    }
                    if fp_s:
                        results["honest"] |= {
                            "fingerprint_outcomes": dict(fp_outcomes),
                            "fingerprint_check_s_median": statistics.median(fp_s),
                            "replay_over_fingerprint_cost": statistics.median(check_s) / statistics.median(fp_s),
                        }
                    print(json.dumps({"honest": results["honest"]}), flush=True)

                    # byzantine: jobs through the cheater until the first accepted evidence
                    route = [hop(ws["a"]), hop(ws["byz"]), hop(ws["c"])]
                    rows = []
                    for mode, f in [(m, f) for m in args.modes.split(",") for f in fractions]:
                        to_detect, drawn, caught, jobs = [], 0, 0, 0
                        outcomes: Counter[str] = Counter()
                        cap = max(1, round(args.cap / f))
                        for _ in range(args.trials):
                            rules.accused.clear()
                            chk = checker(f, lambda n: n != byz_node, mode)
                            for j in range(1, cap + 1):
                                finished, _ = await job(driver, manifest.model_name, route, prompts[j % 4], 4)
                                jobs += 1
                                picked = chk.schedule(finished)
                                await chk.drain()
                                outcomes.update(r.outcome for r in chk.results if r.start == 10)
                                chk.results.clear()
                                drawn += 10 in picked
                                if rules.accused:
                                    assert rules.accused == [byz_node]
                                    caught += 1
                                    to_detect.append(j)
                                    break
                        row = {
                            "mode": mode,
                            "fraction": f,
                            "trials": args.trials,
                            "jobs": jobs,
                            "detected_trials": len(to_detect),
                            "jobs_to_detection_mean": statistics.mean(to_detect) if to_detect else None,
                            "model_jobs_to_detection": 1 / f,
                            "detection_rate_per_job": caught / jobs,
                            "model_detection_rate": f,
                            "detection_given_check": caught / drawn if drawn else None,
                            "drawn": drawn,
                            "caught": caught,
                            "outcomes_of_drawn_checks": dict(outcomes),
                        }
                        if to_detect:
                            row["ratio_jobs_to_detection"] = row["jobs_to_detection_mean"] * f
                        row["ratio_detection_rate"] = row["detection_rate_per_job"] / f
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                    results["byzantine"] = rows
                    if fp_s:
                        results["same_cost"] = same_cost(results["honest"], rows, args.budget)
                        print(json.dumps({"same_cost": results["same_cost"]}), flush=True)
                finally:
                    await driver.close()

            asyncio.run(run())
    print(json.dumps(results, indent=2))
    write_result(results, args.out)


if __name__ == "__main__":
    main()
