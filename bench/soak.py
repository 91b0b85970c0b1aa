"""Soak: many concurrent paying clients against one broker for a while, then the books are checked.

Sets up a real local market (Anvil + contracts, three enrolled nodes, SmolLM2's manifest and
tokenizer), the real broker (bootstrap graph, uvicorn on 127.0.0.1, ledger, settlement every 2 s)
over the backend double of the overload test: three workers with ``--capacity`` KV-cache slots
each that take ``--delay-ms`` per token and sign real receipts. ``--clients`` client loops (in a
separate process, so they do not share the broker's GIL) submit signed jobs for ``--duration``
seconds; on 429 they wait its Retry-After. Meanwhile a 10 ms ticker in the broker's event loop
records how late it wakes (the loop's stalls).

Reports: answers by status, p50/p99 latency of admitted jobs, jobs/s, loop lateness, load average;
checks every admitted job completed and settled and that the money is conserved (escrow debits =
credits to node operators + treasury). Baseline in the same run: the same clients driving the
same backend directly (a slot semaphore, no HTTP, chain or ledger) for the same time; the JSON
holds the ratios. Writes bench/results/soak.json (or --out).

    .venv/bin/python bench/soak.py [--clients 100] [--duration 60] [--capacity 8] [--delay-ms 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import httpx  # noqa: E402

from dlis_market.chain.job_market import JobAuthorization, sign_authorization  # noqa: E402
from dlis_market.chain.typed_data import Domain  # noqa: E402

MODEL = "smollm2-135m"
UNIT = 10**18
MAX_TOKENS = 8
ACCOUNTS = 10  # client accounts the client loops share (escrow per account)
CACHE = Path(tempfile.gettempdir()) / "dlis-test-cache" / "v1"


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# ----------------------------------------------------------------------------- clients (subprocess)


async def client_loops(spec: dict[str, Any]) -> list[dict[str, Any]]:
    domain = Domain(**spec["domain"])
    keys = [bytes.fromhex(k) for k in spec["keys"]]
    addrs = spec["addresses"]
    end = time.monotonic() + spec["duration"]
    out: list[dict[str, Any]] = []

    def body(i: int) -> dict[str, Any]:
        auth = JobAuthorization(addrs[i], spec["broker"], bytes.fromhex(spec["model_id"][2:]), UNIT,
                                secrets.randbits(64), spec["deadline"])  # fmt: skip
        sig = sign_authorization(keys[i], domain, auth).hex()
        return {"model": MODEL, "prompt": "The capital of France is", "max_tokens": MAX_TOKENS,
                "authorization": {"client": addrs[i], "nonce": str(auth.nonce), "max_cost": str(UNIT),
                                  "deadline": auth.deadline, "signature": sig}}  # fmt: skip

    async def loop(n: int, http: httpx.AsyncClient) -> None:
        i = n % len(keys)
        while time.monotonic() < end:
            b = body(i)
            t0 = time.monotonic()
            try:
                res = await http.post("/v1/jobs", json=b)
                status, headers = res.status_code, res.headers
                job = res.json().get("id") if status == 201 else None
            except httpx.HTTPError as exc:  # counted: a transport error is an outcome too
                status, headers, job = 0, httpx.Headers(), f"{type(exc).__name__}"
            out.append({"status": status, "latency_s": time.monotonic() - t0, "job": job})
            if status == 429:
                await asyncio.sleep(min(float(headers.get("retry-after", "1")), max(0.0, end - time.monotonic())))

    # Idle connections are dropped before uvicorn's 5 s keep-alive timeout closes them, so a client
    # back from a Retry-After wait does not race the server's close.
    limits = httpx.Limits(
        max_connections=spec["clients"], max_keepalive_connections=spec["clients"], keepalive_expiry=2.0
    )
    async with httpx.AsyncClient(base_url=spec["url"], timeout=120, limits=limits) as http:
        await asyncio.gather(*(loop(n, http) for n in range(spec["clients"])))
    return out


# ----------------------------------------------------------------------------- baseline (no HTTP)


async def direct(backend: Any, clients: int, duration: float, capacity: int) -> dict[str, Any]:
    """The same clients driving the backend directly: a slot each, tokens, receipts."""
    from dlis_market.broker.backend import BackendJob

    slots = asyncio.Semaphore(capacity)
    end = time.monotonic() + duration
    lat: list[float] = []

    async def loop() -> None:
        while time.monotonic() < end:
            t0 = time.monotonic()
            async with slots:
                stream = await backend.start(
                    BackendJob(secrets.token_bytes(32), MODEL, [1, 2, 3, 4, 5], MAX_TOKENS, UNIT, num_layers=30)
                )
                async for _ in stream.tokens():
                    pass
                await stream.finish()
            lat.append(time.monotonic() - t0)

    t0 = time.monotonic()
    await asyncio.gather(*(loop() for _ in range(clients)))
    took = time.monotonic() - t0
    return {"jobs": len(lat), "jobs_per_s": len(lat) / took, "p50_s": pct(lat, 0.5), "p99_s": pct(lat, 0.99)}


# ----------------------------------------------------------------------------- broker side


class Ticker:
    """A 10 ms timer in the broker's loop; its lateness is how long the loop was blocked."""

    def __init__(self) -> None:
        self.late: list[float] = []
        self.running = True

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while self.running:
            t = loop.time()
            await asyncio.sleep(0.01)
            self.late.append(loop.time() - t - 0.01)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--capacity", type=int, default=8, help="KV-cache slots per worker")
    ap.add_argument("--delay-ms", type=float, default=20.0, help="per token")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    ap.add_argument("--clients-spec", type=Path, help=argparse.SUPPRESS)  # the client process
    args = ap.parse_args()
    if args.clients_spec:
        spec = json.loads(args.clients_spec.read_text())
        Path(spec["out"]).write_text(json.dumps(asyncio.run(client_loops(spec))))
        return

    import uvicorn
    from machine_info import machine_info

    from dlis_market.broker.bootstrap import build_graph
    from dlis_market.broker.catalog import ModelCatalog
    from dlis_market.broker.ledger import Ledger
    from dlis_market.chain.anvil import free_port
    from dlis_market.chain.devnet import local_market
    from dlis_market.inference.importer import import_model
    from dlis_market.inference.shard_export import export_shards
    from dlis_market.types import model_id
    from tests.chaos.test_broker_overload import FixedCapacityBackend
    from tests.integration.broker.conftest import ScriptedBackend

    with tempfile.TemporaryDirectory() as tmp, local_market(
        Path(tmp) / "home", min_stake=100 * 10**18, max_authorization_lifetime_s=1800, keystore_scrypt_n=2**10
    ) as m:  # fmt: skip
        shards = CACHE / "soak-shards"
        if not (shards / "manifest.json").exists():
            export_shards(import_model(MODEL, CACHE / "models", CACHE / "cache"), shards, stages=3, dtype="bf16",
                          name=MODEL)  # fmt: skip
        ops = [m.new_funded_account(1000 * UNIT) for _ in range(3)]
        nodes = [m.enroll_node(o) for o in ops]
        m.registry().publish_model(m.deployer, MODEL, "QmShards", b"\x01" * 32, 30)
        jm = m.market()
        clients = [m.new_funded_account(1000 * UNIT) for _ in range(ACCOUNTS)]
        for c in clients:
            jm.deposit(c, 900 * UNIT)
        catalog = ModelCatalog.from_shard_dirs([shards], m.deployer.address)
        script = catalog.get(MODEL).tokenizer(" Paris is the capital of France.")["input_ids"]
        base = ScriptedBackend(nodes, jm.domain(), script)
        workers = FixedCapacityBackend(base, args.capacity, args.delay_ms / 1000)
        settings = m.settings.model_copy(
            update={"broker": m.settings.broker.model_copy(update={"settle_interval_s": 2.0})}
        )
        graph = build_graph(settings, m.client, m.broker, catalog, Ledger(f"sqlite:///{Path(tmp) / 'broker.db'}"))
        app, svc = graph.app(workers)
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_until_complete, args=(server.serve(),), daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        ticker = Ticker()
        asyncio.run_coroutine_threadsafe(ticker.run(), loop)

        payees = [o.address for o in ops] + [m.deployment_treasury()]
        escrow0 = sum(jm.escrow_of(c.address) for c in clients)
        credit0 = sum(jm.claimable_of(a) for a in payees)
        spec = {
            "url": f"http://127.0.0.1:{port}", "clients": args.clients, "duration": args.duration,
            "keys": [bytes(c.key).hex() for c in clients], "addresses": [c.address for c in clients],
            "broker": m.broker.address, "model_id": model_id(MODEL, m.deployer.address),
            "deadline": m.client.timestamp() + 1700,
            "domain": {"name": jm.domain().name, "version": jm.domain().version, "chain_id": jm.domain().chain_id,
                       "verifying_contract": jm.domain().verifying_contract},
            "out": str(Path(tmp) / "answers.json"),
        }  # fmt: skip
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        load0 = os.getloadavg()
        t0 = time.monotonic()
        subprocess.run([sys.executable, __file__, "--clients-spec", str(Path(tmp) / "spec.json")], check=True)
        took = time.monotonic() - t0
        load1 = os.getloadavg()
        ticker.running = False
        answers = json.loads(Path(spec["out"]).read_text())

        # Admitted jobs all end; then everything is settled.
        admitted = [a["job"] for a in answers if a["status"] == 201]
        deadline = time.monotonic() + 60
        while any(svc.ledger.get_job(j).status in ("queued", "running") for j in admitted):  # type: ignore[union-attr]
            if time.monotonic() > deadline:
                raise SystemExit("admitted jobs still running 60 s after the load ended")
            time.sleep(0.2)
        server.should_exit = True
        thread.join(timeout=30)
        while svc.settler.settle_once().settled_batches:
            pass
        rows = [svc.ledger.get_job(j) for j in admitted]
        completed = [r for r in rows if r is not None and r.status in ("completed", "settled")]
        settled = [r for r in completed if r.batch_id and svc.ledger.get_batch(r.batch_id).status == "settled"]  # type: ignore[union-attr]
        charged = sum(r.cost + r.fee for r in completed)
        debited = escrow0 - sum(jm.escrow_of(c.address) for c in clients)
        credited = sum(jm.claimable_of(a) for a in payees) - credit0

        baseline = asyncio.run(
            direct(FixedCapacityBackend(base, args.capacity, args.delay_ms / 1000), args.clients, args.duration,
                   args.capacity)
        )  # fmt: skip

    by_status: dict[str, int] = {}
    for a in answers:
        by_status[str(a["status"])] = by_status.get(str(a["status"]), 0) + 1
    lat = [a["latency_s"] for a in answers if a["status"] == 201]
    late = ticker.late
    result = {
        "bench": "soak",
        "clients": args.clients,
        "duration_s": args.duration,
        "took_s": took,
        "worker_capacity": args.capacity,
        "token_delay_ms": args.delay_ms,
        "max_tokens": MAX_TOKENS,
        "broker": {
            "max_concurrent_jobs": settings.broker.max_concurrent_jobs,
            "admission_queue_max": settings.broker.admission_queue_max,
            "admission_wait_s": settings.broker.admission_wait_s,
        },
        "answers_by_status": by_status,
        "non_2xx_429": sum(v for k, v in by_status.items() if k not in ("201", "429")),
        "transport_errors": sorted({str(a["job"]) for a in answers if a["status"] == 0}),
        "admitted": len(admitted),
        "completed": len(completed),
        "settled": len(settled),
        "jobs_per_s": len(completed) / took,
        "p50_s": pct(lat, 0.5),
        "p99_s": pct(lat, 0.99),
        "money": {
            "charged": str(charged),
            "escrow_debited": str(debited),
            "credited": str(credited),
            "conserved": charged == debited == credited,
        },
        "loop_lateness_ms": {
            "p50": 1000 * (pct(late, 0.5) or 0),
            "p99": 1000 * (pct(late, 0.99) or 0),
            "max": 1000 * max(late, default=0.0),
            "samples": len(late),
        },
        "baseline_direct_backend": baseline,
        "ratios_vs_direct": {
            "jobs_per_s": len(completed) / took / baseline["jobs_per_s"],
            "p50": (pct(lat, 0.5) or 0) / baseline["p50_s"] if baseline["p50_s"] else None,
        },
        "loadavg_before": load0,
        "loadavg_after": load1,
        "cpu_count": os.cpu_count(),
        "machine": machine_info(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    shown = ("answers_by_status", "transport_errors", "admitted", "settled", "jobs_per_s", "p50_s", "p99_s", "money",
             "loop_lateness_ms", "ratios_vs_direct", "loadavg_before")  # fmt: skip
    print(json.dumps({k: result[k] for k in shown}, indent=1))
    print(f"wrote {args.out}")
    if result["non_2xx_429"] or len(settled) != len(admitted) or not result["money"]["conserved"]:
        raise SystemExit("soak failed: see the figures above")


if __name__ == "__main__":
    main()
