"""Gas report of the market contracts on a real Anvil.

Measures register, stake, settling one 3-stage job, and batches of 10 and 50 3-stage jobs (gas
per job), side by side with two baselines in the same run:
  * single: each job settled in its own transaction (batch of one);
  * push: what a client would pay to push three plain ERC-20 transfers to the three operators
    (no signatures checked, no escrow, no replay protection).
Prints ratios and writes JSON (default bench/results/gas_report.json).

    .venv/bin/python bench/gas_report.py [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

from dlis_market.chain.devnet import LocalMarket, local_market
from dlis_market.chain.job_market import (
    JobAuthorization,
    Receipt,
    SignedJob,
    SignedReceipt,
    sign_authorization,
    sign_receipt,
)

UNIT = 10**18
SPANS = [(0, 10), (10, 20), (20, 30)]


def _job(m: LocalMarket, client: Any, nodes: list[Any], model: bytes, nonce: int) -> SignedJob:
    dom = m.market().domain()
    auth = JobAuthorization(client.address, m.broker.address, model, UNIT, nonce, m.client.timestamp() + 600)
    receipts = []
    for (start, end), node in zip(SPANS, nodes, strict=True):
        r = Receipt(auth.job_id, model, start, end, 64, secrets.token_bytes(32), 10**15 + nonce)
        receipts.append(SignedReceipt(r, sign_receipt(node.key, dom, r)))
    return SignedJob(auth, sign_authorization(client.key, dom, auth), receipts)


def measure(m: LocalMarket) -> dict[str, Any]:
    staking, registry, market, token = m.staking(), m.registry(), m.market(), m.token()
    ops = [m.new_funded_account(10_000 * UNIT) for _ in range(3)]
    token.approve(ops[0], staking.address, 2**255)
    stake_gas = staking.client.transact(ops[0], staking.contract.functions.stake(staking.min_stake()))["gasUsed"]
    nodes = [m.enroll_node(o) for o in ops]
    # register gas: a fresh operator's registration (stake done first)
    extra = m.new_funded_account(10_000 * UNIT)
    staking.stake(extra, staking.min_stake())
    before = m.client.w3.eth.block_number
    m.enroll_node(extra)
    register_gas = m.client.w3.eth.get_transaction_receipt(m.client.w3.eth.get_block(before + 1)["transactions"][0])[
        "gasUsed"
    ]

    model = registry.publish_model(m.deployer, "smollm2-135m", "QmManifest", b"\x11" * 32, 30)
    client = m.new_funded_account(1_000_000 * UNIT)
    market.deposit(client, 100_000 * UNIT)

    nonce = 0
    results: dict[str, Any] = {"register": register_gas, "stake": stake_gas}
    singles = []
    for _ in range(3):
        nonce += 1
        singles.append(
            market.settle_batch(m.broker, secrets.token_bytes(32), [_job(m, client, nodes, model, nonce)])["gasUsed"]
        )
    results["settle_1_job"] = min(singles)
    for size in (10, 50):
        jobs = []
        for _ in range(size):
            nonce += 1
            jobs.append(_job(m, client, nodes, model, nonce))
        gas = market.settle_batch(m.broker, secrets.token_bytes(32), jobs)["gasUsed"]
        results[f"settle_batch_{size}"] = gas
        results[f"settle_batch_{size}_per_job"] = gas / size

    # baseline: three plain ERC-20 pushes per job, from the client to the operators
    push = 0
    for op in ops:
        push += token.transfer(client, op.address, 10**15)["gasUsed"]
    results["baseline_push_3_transfers"] = push
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gas_report.json")
    args = parser.parse_args()
    t0 = time.time()
    with tempfile.TemporaryDirectory() as home, local_market(Path(home)) as m:
        r = measure(m)
    single = r["settle_1_job"]
    ratios = {
        "batch_10_per_job_vs_single": r["settle_batch_10_per_job"] / single,
        "batch_50_per_job_vs_single": r["settle_batch_50_per_job"] / single,
        "batch_50_per_job_vs_push": r["settle_batch_50_per_job"] / r["baseline_push_3_transfers"],
    }
    report = {"gas": r, "ratios": ratios, "target_per_job_batched": 40_000, "seconds": round(time.time() - t0, 1)}
    print(f"{'operation':34s} {'gas':>12s}")
    for k, v in r.items():
        print(f"{k:34s} {v:12,.0f}")
    for k, v in ratios.items():
        print(f"{k:34s} {v:12.3f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
