"""Gas report of the market contracts on a real Anvil.

Measures register, stake, and settling 3-stage jobs alone and in batches of 10 and 50, through the
settlement paths in the same run:
  * per-receipt (``settleBatch``): every stage signs its own receipt;
  * Merkle (``settleBatchMerkle``): every node signs one batch receipt over the Merkle root of its
    stages; the contract rebuilds the roots from the jobs' leaves;
  * solo (``settleJob``, one job alone): the per-stage receipts, stages packed one word each, the
    nodes and model looked up in one registry call, no batch id stored; sent through the binding's
    ``JobMarket.settle_job``, the call the broker makes for a batch of one job;
and two baselines: each job settled in its own transaction (a batch of one through the batch
paths), and three plain ERC-20 pushes to the operators (no signatures checked, no escrow, no
replay protection). Also redeeming a
probabilistic payment ticket, and what tickets cost per job and how much they make an operator's
daily income vary, at the demo's prices (binomial model, checked against a seeded simulation).
With ``--breakdown`` it traces the settlements (debug_traceCall) and splits gas into calldata,
signature recovery, storage, registry calls, events and the rest, per job in a batch of 50.
Prints ratios and writes JSON (default bench/results/gas_report.json).

    .venv/bin/python bench/gas_report.py [--breakdown] [--out FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import secrets
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from hexbytes import HexBytes

from dlis_market.chain.devnet import LocalMarket, local_market
from dlis_market.chain.job_market import (
    JobAuthorization,
    MerkleJob,
    PaymentTicket,
    Receipt,
    SignedBatchReceipt,
    SignedJob,
    SignedReceipt,
    batch_receipts,
    merkle_batch_args,
    rand_commitment,
    sign_authorization,
    sign_batch_receipt,
    sign_payment_ticket,
    sign_receipt,
    single_job_args,
    win_threshold,
)

UNIT = 10**18
SPANS = [(0, 10), (10, 20), (20, 30)]
TOKENS = 64  # tokens each stage bills per job (the demo's chat prompt + 24 new tokens is about this)
# The demo's workers (scripts/demo.sh): price per token of the [0,10), [10,20), [20,30) stages.
DEMO_PRICES = (1_000_000_000_000, 2_000_000_000_000, 3_000_000_000_000)
DEMO_JOB_S = 0.648  # one demo job end to end (README "Measurements"): a busy one-session day's job count
TICKET_PROBS = (1.0, 0.1, 0.01)
TARGET_BATCH_50 = 25_000
TARGET_ALONE = 120_000


def _job(m: LocalMarket, client: Any, nodes: list[Any], model: bytes, nonce: int) -> SignedJob:
    dom = m.market().domain()
    auth = JobAuthorization(client.address, m.broker.address, model, UNIT, nonce, m.client.timestamp() + 600)
    receipts = []
    for (start, end), node in zip(SPANS, nodes, strict=True):
        r = Receipt(auth.job_id, model, start, end, TOKENS, secrets.token_bytes(32), 10**15 + nonce)
        receipts.append(SignedReceipt(r, sign_receipt(node.key, dom, r)))
    return SignedJob(auth, sign_authorization(client.key, dom, auth), receipts)


def _merkle(
    m: LocalMarket, jobs: list[SignedJob], keys: Mapping[str, bytes], batch_id: bytes
) -> tuple[list[MerkleJob], dict[str, SignedBatchReceipt]]:
    dom = m.market().domain()
    mjobs = [MerkleJob.from_signed(j, dom) for j in jobs]
    receipts = batch_receipts(m.broker.address, batch_id, mjobs)
    signed = {n: SignedBatchReceipt(b, sign_batch_receipt(keys[n], dom, b)) for n, b in receipts.items()}
    return mjobs, signed


def _breakdown(m: LocalMarket, fn: Any) -> dict[str, int]:
    """Gas of ``fn`` sent by the broker, by category, from a debug_traceCall of it (top-level
    opcodes; a call's cost includes what ran inside it)."""
    w3 = m.client.w3
    tx = fn.build_transaction({"from": m.broker.address, "gas": 25_000_000})
    call = {"from": m.broker.address, "to": tx["to"], "data": tx["data"], "gas": hex(25_000_000)}
    opts = {"disableStorage": True, "disableMemory": True}
    logs = w3.provider.make_request("debug_traceCall", [call, "latest", opts])["result"]["structLogs"]  # type: ignore[arg-type]
    data = bytes.fromhex(tx["data"][2:])
    out: collections.Counter[str] = collections.Counter()
    out["intrinsic"] = 21_000
    out["calldata"] = 4 * data.count(0) + 16 * (len(data) - data.count(0))
    registry = int(m.registry().address, 16)
    top = [i for i, s in enumerate(logs) if s["depth"] == 1]
    for a, b in zip(top, [*top[1:], None], strict=True):
        s = logs[a]
        cost = s["gas"] - logs[b]["gas"] if b is not None else s["gasCost"]
        op = s["op"]
        if op == "STATICCALL":
            to = int(s["stack"][-2], 16)
            op = "ecrecover" if to == 1 else ("registry calls" if to == registry else "other calls")
        elif op in ("SSTORE", "SLOAD"):
            op = "storage"
        elif op.startswith("LOG"):
            op = "events"
        elif op == "KECCAK256":
            op = "keccak"
        else:
            op = "execution (decode, memory, checks)"
        out[op] += cost
    out["refund"] = -logs[-1].get("refund", 0) if logs else 0
    return dict(out)


def measure(m: LocalMarket, breakdown: bool = False) -> dict[str, Any]:
    staking, registry, market, token = m.staking(), m.registry(), m.market(), m.token()
    ops = [m.new_funded_account(10_000 * UNIT) for _ in range(3)]
    token.approve(ops[0], staking.address, 2**255)
    stake_gas = staking.client.transact(ops[0], staking.contract.functions.stake(staking.min_stake()))["gasUsed"]
    nodes = [m.enroll_node(o) for o in ops]
    keys: dict[str, bytes] = {str(n.address): bytes(n.key) for n in nodes}
    # register gas: a fresh operator's registration (stake done first)
    extra = m.new_funded_account(10_000 * UNIT)
    staking.stake(extra, staking.min_stake())
    before = m.client.w3.eth.block_number
    m.enroll_node(extra)
    register_tx = HexBytes(m.client.w3.eth.get_block(before + 1)["transactions"][0])  # type: ignore[arg-type]  # hashes: not full_transactions
    register_gas = m.client.w3.eth.get_transaction_receipt(register_tx)["gasUsed"]

    model = registry.publish_model(m.deployer, "smollm2-135m", "QmManifest", b"\x11" * 32, 30)
    client = m.new_funded_account(1_000_000 * UNIT)
    market.deposit(client, 100_000 * UNIT)

    nonce = 0
    results: dict[str, Any] = {"register": register_gas, "stake": stake_gas}
    traces: dict[str, dict[str, int]] = {}

    def jobs_of(size: int) -> list[SignedJob]:
        nonlocal nonce
        out = []
        for _ in range(size):
            nonce += 1
            out.append(_job(m, client, nodes, model, nonce))
        return out

    def per_receipt(jobs: list[SignedJob], tag: str | None) -> int:
        bid = secrets.token_bytes(32)
        if tag:
            traces[tag] = _breakdown(m, market.contract.functions.settleBatch(bid, [j.as_tuple() for j in jobs]))
        return int(market.settle_batch(m.broker, bid, jobs)["gasUsed"])

    def merkle(jobs: list[SignedJob], tag: str | None) -> int:
        bid = secrets.token_bytes(32)
        mjobs, signed = _merkle(m, jobs, keys, bid)
        if tag:
            traces[tag] = _breakdown(
                m, market.contract.functions.settleBatchMerkle(bid, *merkle_batch_args(mjobs, signed))
            )
        return int(market.settle_batch_merkle(m.broker, bid, mjobs, signed)["gasUsed"])

    def solo(jobs: list[SignedJob], tag: str | None) -> int:
        (job,) = jobs
        if tag:
            traces[tag] = _breakdown(m, market.contract.functions.settleJob(single_job_args(job)))
        return int(market.settle_job(m.broker, job)["gasUsed"])

    # alone: the least of three (the first pays for a fresh nonce word)
    for name, settle in (("", per_receipt), ("merkle_", merkle), ("solo_", solo)):
        results[f"settle_{name}1_job"] = min(
            settle(jobs_of(1), f"{name or 'per_receipt_'}1" if breakdown and i == 2 else None) for i in range(3)
        )
    for size in (10, 50):
        for name, settle in (("", per_receipt), ("merkle_", merkle)):
            tag = f"{name or 'per_receipt_'}{size}" if breakdown else None
            gas = settle(jobs_of(size), tag)
            results[f"settle_{name}batch_{size}"] = gas
            results[f"settle_{name}batch_{size}_per_job"] = gas / size

    results["redeem_ticket"] = _ticket_gas(m, client, nodes[2])

    # baseline: three plain ERC-20 pushes per job, from the client to the operators
    push = 0
    for op in ops:
        push += token.transfer(client, op.address, 10**15)["gasUsed"]
    results["baseline_push_3_transfers"] = push
    if breakdown:
        results["breakdown"] = _per_job_breakdown(traces)
    return results


def _ticket_gas(m: LocalMarket, client: Any, node: Any) -> int:
    """Gas of redeeming a winning p = 1 ticket to ``node`` (the least of three)."""
    market, dom = m.market(), m.market().domain()
    gas = []
    for nonce in range(3):
        rand = int.from_bytes(secrets.token_bytes(32), "big")
        t = PaymentTicket(
            client.address,
            m.broker.address,
            node.address,
            DEMO_PRICES[2] * TOKENS,
            win_threshold(1.0),
            rand_commitment(rand),
            nonce,
            m.client.timestamp() + 600,
        )
        gas.append(
            int(market.redeem_winning_ticket(m.deployer, t, sign_payment_ticket(client.key, dom, t), rand)["gasUsed"])
        )
    return min(gas)


def _per_job_breakdown(traces: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Per path: gas by category of a job alone, and per job in a batch of 50 (the average and the
    marginal cost of one more job, (batch 50 - batch 10) / 40); settleJob only alone."""
    out: dict[str, Any] = {"solo": {"alone": traces["solo_1"]}}
    for path in ("per_receipt_", "merkle_"):
        t1, t10, t50 = traces[f"{path}1"], traces[f"{path}10"], traces[f"{path}50"]
        keys = sorted(set(t1) | set(t10) | set(t50))
        out[path.rstrip("_")] = {
            "alone": t1,
            "batch_50_average_per_job": {k: round(t50.get(k, 0) / 50) for k in keys},
            "batch_50_marginal_per_job": {k: round((t50.get(k, 0) - t10.get(k, 0)) / 40) for k in keys},
        }
    return out


def ticket_model(redeem_gas: int, days: int = 2_000, seed: int = 7) -> dict[str, Any]:
    """Probabilistic tickets at the demo's prices: expected gas per 3-stage job (one ticket per
    stage, only winners are redeemed) and the spread of the [20,30) operator's daily income.

    An operator paid E per job by tickets that win with probability p (face value E/p) over N jobs
    a day earns (E/p) * Binomial(N, p): mean N*E, standard deviation E*sqrt(N*(1-p)/p). The same
    figures from a seeded simulation of ``days`` days check the formula."""
    per_job = DEMO_PRICES[2] * TOKENS  # token units the [20,30) stage earns per job
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"expected_income_per_job_units": per_job, "jobs_per_day": {}, "by_p": {}}
    loads = {"light (1,000 jobs/day)": 1_000, "busy (one session all day)": int(86_400 / DEMO_JOB_S)}
    out["jobs_per_day"] = loads
    for p in TICKET_PROBS:
        row: dict[str, Any] = {"expected_gas_per_job": round(len(SPANS) * p * redeem_gas)}
        for label, n in loads.items():
            sd = per_job * math.sqrt(n * (1 - p) / p)
            sim = rng.binomial(n, p, size=days) * (per_job / p)
            row[label] = {
                "mean_dlis": n * per_job / UNIT,
                "sd_dlis": sd / UNIT,
                "sd_over_mean": sd / (n * per_job),
                "simulated_mean_dlis": float(sim.mean()) / UNIT,
                "simulated_sd_dlis": float(sim.std()) / UNIT,
            }
        out["by_p"][str(p)] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gas_report.json")
    parser.add_argument("--breakdown", action="store_true", help="trace the settlements and split their gas")
    args = parser.parse_args()
    t0 = time.time()
    with tempfile.TemporaryDirectory() as home, local_market(Path(home)) as m:
        r = measure(m, breakdown=args.breakdown)
    breakdown = r.pop("breakdown", None)
    single = r["settle_1_job"]
    solo = r["settle_solo_1_job"]
    ratios = {
        "solo_vs_per_receipt_alone": solo / single,
        "solo_vs_merkle_alone": solo / r["settle_merkle_1_job"],
        "solo_vs_push": solo / r["baseline_push_3_transfers"],
        "batch_10_per_job_vs_single": r["settle_batch_10_per_job"] / single,
        "batch_50_per_job_vs_single": r["settle_batch_50_per_job"] / single,
        "batch_50_per_job_vs_push": r["settle_batch_50_per_job"] / r["baseline_push_3_transfers"],
        "merkle_vs_per_receipt_alone": r["settle_merkle_1_job"] / single,
        "merkle_vs_per_receipt_batch_10": r["settle_merkle_batch_10_per_job"] / r["settle_batch_10_per_job"],
        "merkle_vs_per_receipt_batch_50": r["settle_merkle_batch_50_per_job"] / r["settle_batch_50_per_job"],
        "merkle_batch_50_per_job_vs_push": r["settle_merkle_batch_50_per_job"] / r["baseline_push_3_transfers"],
    }
    tickets = ticket_model(r["redeem_ticket"])
    targets = {
        "merkle_batch_50_per_job": [r["settle_merkle_batch_50_per_job"], TARGET_BATCH_50],
        "best_alone": [min(single, r["settle_merkle_1_job"], solo), TARGET_ALONE],
    }
    report = {
        "gas": r,
        "ratios": ratios,
        "targets": {k: {"gas": v, "target": t, "met": v <= t} for k, (v, t) in targets.items()},
        "tickets": tickets,
        "breakdown": breakdown,
        "loadavg": os.getloadavg(),
        "seconds": round(time.time() - t0, 1),
    }
    print(f"{'operation':34s} {'gas':>12s}")
    for k, v in r.items():
        print(f"{k:34s} {v:12,.0f}")
    for k, v in ratios.items():
        print(f"{k:34s} {v:12.3f}x")
    for k, (v, t) in targets.items():
        print(f"target {k:27s} {v:12,.0f} <= {t:,}: {'met' if v <= t else 'NOT met'}")
    print("tickets (3 stages, one ticket each; income of the [20,30) operator at the demo's price):")
    for p, row in tickets["by_p"].items():
        print(f"  p={p:5s} expected gas/job {row['expected_gas_per_job']:9,d}")
        for label in tickets["jobs_per_day"]:
            x = row[label]
            print(
                f"    {label:28s} mean {x['mean_dlis']:.4f} DLIS/day, sd {x['sd_dlis']:.4f} "
                f"({100 * x['sd_over_mean']:.1f}%), simulated sd {x['simulated_sd_dlis']:.4f}"
            )
    if breakdown:
        for path, parts in breakdown.items():
            print(f"breakdown {path}: per job in a batch of 50 (marginal) | alone")
            marginal = parts.get("batch_50_marginal_per_job", {})
            for k in sorted(parts["alone"], key=lambda k: -parts["alone"][k]):
                print(f"  {k:36s} {marginal.get(k, 0):9,d} | {parts['alone'][k]:9,d}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
