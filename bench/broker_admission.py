"""Admission throughput of the broker: quote + EIP-712-signed submit at many concurrent clients.

Sets up a real local market (Anvil + contracts, three enrolled nodes, SmolLM2's manifest and
tokenizer, ``--clients`` client accounts each with escrow) and the real broker (bootstrap graph,
ledger on SQLite in a temp dir, uvicorn on 127.0.0.1 in a thread of this process, on the plain
asyncio loop as `dlis broker start` runs it) over a scripted backend: three workers with room for
every job, each job one token at once. Receipts carry a placeholder signature: settlement is off
in this bench (``settle_in_background=False``), so nothing reads them; the admission path (chain
reads, signature check, tokenizing, routing, the ledger) is what runs.

Rows, in one run:
  * ``http``: ``--clients`` aiohttp client loops in a separate process (so they do not share the
    broker's GIL) against uvicorn, each doing POST /v1/quotes then POST /v1/jobs (the job is
    answered once it ends). Authorizations are signed before the clock starts. The broker's RSS
    is sampled at 0, 1k, 5k and 10k finished jobs (memory flat = bounded growth).
  * ``direct``: the same calls on the service object in the broker's loop (no HTTP, no framework):
    what the service costs by itself.
  * ``bare``: the same clients against a FastAPI app whose two endpoints do nothing, on the same
    uvicorn: the ceiling of HTTP + framework + this client on this machine.
Ratios: http / direct and http / bare. Writes bench/results/broker_admission.json (or --out).

    .venv/bin/python bench/broker_admission.py [--clients 64] [--jobs 10000] [--direct-jobs 2000]
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

from dlis_market.chain.anvil import free_port
from dlis_market.lifetime import freeze_startup_heap

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from dlis_market.broker.schemas import JobCreate, QuoteRequest  # noqa: E402  (the bare app's bodies)

MODEL = "smollm2-135m"
PROMPT = "The capital of France is"
UNIT = 10**18
MAX_COST = UNIT // 100  # per job; the quote's bound is far below it
PRICE = 10**12
SPANS = [(0, 10), (10, 20), (20, 30)]
CACHE = Path(tempfile.gettempdir()) / "dlis-test-cache" / "v1"
RSS_AT = (0, 1000, 5000, 10000)


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def signed_bodies(spec: dict[str, Any], count: int, offset: int) -> list[dict[str, Any]]:
    """``count`` job bodies, client ``(offset + i) % clients`` each, signed (coincurve over the
    EIP-712 digest: the same signature `sign_authorization` makes, a tenth of its time)."""
    import coincurve

    from dlis_market.chain.job_market import JobAuthorization
    from dlis_market.chain.typed_data import Domain, typed_digest

    domain = Domain(**spec["domain"])
    keys = [coincurve.PrivateKey(bytes.fromhex(k)) for k in spec["keys"]]
    out = []
    for i in range(count):
        c = (offset + i) % len(keys)
        auth = JobAuthorization(spec["addresses"][c], spec["broker"], bytes.fromhex(spec["model_id"][2:]), MAX_COST,
                                secrets.randbits(64), spec["deadline"])  # fmt: skip
        rs = keys[c].sign_recoverable(typed_digest(domain, "JobAuthorization", auth.message()), hasher=None)
        sig = "0x" + rs[:64].hex() + bytes([rs[64] + 27]).hex()
        out.append({"model": MODEL, "prompt": PROMPT, "max_tokens": 1,
                    "authorization": {"client": auth.client, "nonce": str(auth.nonce), "max_cost": str(MAX_COST),
                                      "deadline": auth.deadline, "signature": sig}})  # fmt: skip
    return out


# ----------------------------------------------------------------------------- clients (subprocess)


async def client_loops(spec: dict[str, Any], bodies: list[dict[str, Any]]) -> dict[str, Any]:
    # aiohttp: its C parser costs the client process a fraction of what httpx does per request, so
    # on 2 shared cores the rows measure the server more than the load generator.
    import aiohttp

    quote = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1}
    lat: list[float] = []
    statuses: dict[str, int] = {}
    next_job = 0
    end = time.monotonic() + spec["max_seconds"]
    url = spec["url"]

    async def loop(http: aiohttp.ClientSession) -> None:
        nonlocal next_job
        while next_job < len(bodies) and time.monotonic() < end:
            body = bodies[next_job]
            next_job += 1
            t0 = time.perf_counter()
            try:
                async with http.post(url + "/v1/quotes", json=quote) as q:
                    await q.read()
                async with http.post(url + "/v1/jobs", json=body) as r:
                    await r.read()
                key = f"{q.status}/{r.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:  # counted: a transport error is an outcome too
                key = type(exc).__name__
            else:
                lat.append(time.perf_counter() - t0)
            statuses[key] = statuses.get(key, 0) + 1

    # Idle connections are dropped before uvicorn's 5 s keep-alive timeout closes them (as in soak.py).
    connector = aiohttp.TCPConnector(limit=spec["clients"], keepalive_timeout=2.0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as http:
        # warm the connections (and the broker's first-call caches) before the clock starts
        async def warm() -> None:
            async with http.get(url + "/healthz") as h:
                await h.read()

        await asyncio.gather(*(warm() for _ in range(spec["clients"])))
        t0 = time.perf_counter()
        await asyncio.gather(*(loop(http) for _ in range(spec["clients"])))
        took = time.perf_counter() - t0
    return {"jobs": len(lat), "took_s": took, "latencies_s": lat, "statuses": statuses}


def run_clients(spec: dict[str, Any], tmp: Path, name: str) -> dict[str, Any]:
    path = tmp / f"spec-{name}.json"
    path.write_text(json.dumps(spec))
    subprocess.run([sys.executable, __file__, "--clients-spec", str(path)], check=True)
    return dict(json.loads(Path(spec["out"]).read_text()))


def _cpu_s() -> float:
    """CPU seconds of this process (the broker; the clients run in another) so far."""
    t = os.times()
    return t.user + t.system


def summary(res: dict[str, Any]) -> dict[str, Any]:
    lat = res.pop("latencies_s")
    cpu = res.get("broker_cpu_s", 0.0)
    return {
        **res,
        # CPU the broker process spent per job: what bounds its rate on a core, whatever else runs
        "broker_cpu_ms_per_job": 1000 * cpu / res["jobs"] if res["jobs"] else None,
        "jobs_per_broker_cpu_s": res["jobs"] / cpu if cpu else None,
        "jobs_per_s": res["jobs"] / res["took_s"] if res["took_s"] else 0.0,
        "p50_ms": 1000 * (pct(lat, 0.5) or 0),
        "p99_ms": 1000 * (pct(lat, 0.99) or 0),
        "max_ms": 1000 * max(lat, default=0.0),
    }


# ----------------------------------------------------------------------------- broker side


class OneTokenBackend:
    """Three workers with a slot for every job; each job yields one token at once. Counts the
    jobs it finished (the RSS sampler reads it) and keeps nothing per job."""

    def __init__(self, nodes: list[str]):
        self.nodes = nodes
        self.finished = 0

    async def offers(self, model: str) -> list[Any]:
        from dlis_market.protocol.spans import SpanRecord

        return [SpanRecord(model=model, start=s, end=e, peer_id=f"peer{i}", node_address=n, throughput=50.0,
                           free_slots=10_000, queue_length=0, price_per_token=PRICE, attestation_hash="0x" + "00" * 32)
                for i, ((s, e), n) in enumerate(zip(SPANS, self.nodes, strict=True))]  # fmt: skip

    async def start(self, job: Any) -> Any:
        return OneTokenStream(self, job)

    async def unclaimed(self, job_id: bytes, peers: Any) -> list[Any]:
        return []

    async def close(self) -> None:
        pass


class OneTokenStream:
    """A job's stream on :class:`OneTokenBackend` (a module-level class: the bench must not charge
    the broker for building a class per job)."""

    def __init__(self, backend: OneTokenBackend, job: Any):
        self.backend = backend
        self.job = job

    async def _gen(self) -> Any:
        yield 504  # one token

    def tokens(self) -> Any:
        return self._gen()

    async def finish(self) -> Any:
        from dlis_market.chain.market_messages import Receipt, SignedReceipt
        from dlis_market.chain.typed_data import CompactSignature
        from dlis_market.protocol.receipts import StageReceipt
        from dlis_market.protocol.routes import RouteHop

        job, nodes = self.job, self.backend.nodes
        n = len(job.prompt_ids) + 1
        sig = CompactSignature.from_bytes(b"\x01" * 65)  # never checked: the bench measures admission
        receipts = [StageReceipt(nd, SignedReceipt(Receipt(job.job_id, b"\x00" * 32, s, e, n, b"\x02" * 32,
                                                           PRICE * n), sig))
                    for (s, e), nd in zip(SPANS, nodes, strict=True)]  # fmt: skip
        route = [RouteHop(f"peer{i}", nd, s, e, PRICE) for i, ((s, e), nd) in
                 enumerate(zip(SPANS, nodes, strict=True))]  # fmt: skip
        self.backend.finished += 1
        return route, receipts


class RssSampler:
    """Samples this process's RSS as the backend's finished-job count crosses ``RSS_AT``."""

    def __init__(self, backend: OneTokenBackend):
        self.backend = backend
        self.at: dict[int, float] = {}
        self.running = True
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while self.running:
            done = self.backend.finished
            for mark in RSS_AT:
                if done >= mark and mark not in self.at:
                    self.at[mark] = rss_mib()
            time.sleep(0.02)


def bare_app() -> Any:
    """Two endpoints that parse the same JSON bodies and answer at once: HTTP + framework only."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/v1/quotes")
    async def quotes(body: QuoteRequest) -> dict[str, Any]:
        return {"model": body.model}

    @app.post("/v1/jobs", status_code=201)
    async def jobs(body: JobCreate) -> dict[str, Any]:
        return {"id": "0x" + "00" * 32}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


async def direct(svc: Any, bodies: list[dict[str, Any]], clients: int, max_seconds: float) -> dict[str, Any]:
    """The same quote + submit + wait on the service object, ``clients`` at once."""
    from dlis_market.broker.schemas import Policy

    reqs = [JobCreate.model_validate(b) for b in bodies]
    lat: list[float] = []
    errors: dict[str, int] = {}
    nxt = 0
    end = time.monotonic() + max_seconds

    async def loop() -> None:
        nonlocal nxt
        while nxt < len(reqs) and time.monotonic() < end:
            req = reqs[nxt]
            nxt += 1
            t0 = time.perf_counter()
            try:
                await svc.quote(MODEL, PROMPT, None, 1, Policy())
                row = await svc.submit(req)
                await svc.wait(row.id)
            except Exception as exc:  # counted: a refusal is an outcome of the bench
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                continue
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(clients)))
    return {"jobs": len(lat), "took_s": time.perf_counter() - t0, "latencies_s": lat, "errors": errors}


def serve(app: Any, loop: asyncio.AbstractEventLoop) -> Any:
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    asyncio.run_coroutine_threadsafe(server.serve(), loop)
    while not server.started:
        time.sleep(0.05)
    return server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--direct-jobs", type=int, default=2_000)
    ap.add_argument("--bare-jobs", type=int, default=5_000)
    ap.add_argument("--max-seconds", type=float, default=180.0, help="per row")
    ap.add_argument("--profile", type=Path, help="cProfile the broker process during the http row into this file")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "broker_admission.json")
    ap.add_argument("--clients-spec", type=Path, help=argparse.SUPPRESS)  # the client process
    args = ap.parse_args()
    if args.clients_spec:
        spec = json.loads(args.clients_spec.read_text())
        bodies = signed_bodies(spec, spec["jobs"], 0)
        Path(spec["out"]).write_text(json.dumps(asyncio.run(client_loops(spec, bodies))))
        return

    from machine_info import machine_info

    from dlis_market.broker.bootstrap import build_graph
    from dlis_market.broker.catalog import ModelCatalog
    from dlis_market.broker.ledger import Ledger
    from dlis_market.chain.devnet import local_market
    from dlis_market.inference.importer import import_model
    from dlis_market.inference.shard_export import export_shards
    from dlis_market.types import model_id

    with tempfile.TemporaryDirectory() as tmp_s, local_market(
        Path(tmp_s) / "home", min_stake=100 * 10**18, max_authorization_lifetime_s=1800, keystore_scrypt_n=2**10
    ) as m:  # fmt: skip
        tmp = Path(tmp_s)
        shards = CACHE / "admission-shards"
        if not _loads(shards):
            export_shards(import_model(MODEL, CACHE / "models", CACHE / "cache"), shards, stages=3, dtype="bf16",
                          name=MODEL)  # fmt: skip
        nodes = [m.enroll_node(m.new_funded_account(1000 * UNIT)) for _ in range(3)]
        m.registry().publish_model(m.deployer, MODEL, "QmShards", b"\x01" * 32, 30)
        jm = m.market()
        clients = [m.new_funded_account(300 * UNIT) for _ in range(args.clients)]
        for c in clients:
            jm.deposit(c, 200 * UNIT)
        catalog = ModelCatalog.from_shard_dirs([shards], m.deployer.address)
        backend = OneTokenBackend([n.address for n in nodes])
        graph = build_graph(m.settings, m.client, m.broker, catalog, Ledger(f"sqlite:///{tmp / 'broker.db'}"))
        app, svc = graph.app(backend, settle_in_background=False)
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()
        server = serve(app, loop)
        bare_server = serve(bare_app(), loop)
        d = jm.domain()
        spec: dict[str, Any] = {
            "clients": args.clients, "max_seconds": args.max_seconds,
            "keys": [bytes(c.key).hex() for c in clients], "addresses": [c.address for c in clients],
            "broker": m.broker.address, "model_id": model_id(MODEL, m.deployer.address),
            "deadline": m.client.timestamp() + 1700,
            "domain": {"name": d.name, "version": d.version, "chain_id": d.chain_id,
                       "verifying_contract": d.verifying_contract},
        }  # fmt: skip
        freeze_startup_heap()  # as `dlis broker start` does before it serves
        sampler = RssSampler(backend)
        sampler.thread.start()
        load0 = os.getloadavg()
        cpu0 = _cpu_s()
        prof = None
        if args.profile:
            import cProfile

            prof = cProfile.Profile()  # of the broker's event loop thread (worker threads are not seen)
            asyncio.run_coroutine_threadsafe(_call(prof.enable), loop).result()
        http_row = run_clients({**spec, "jobs": args.jobs, "url": f"http://127.0.0.1:{server.config.port}",
                                "out": str(tmp / "http.json")}, tmp, "http")  # fmt: skip
        if prof is not None:
            asyncio.run_coroutine_threadsafe(_call(prof.disable), loop).result()
            prof.dump_stats(str(args.profile))
        for _ in range(100):  # the last jobs' done callbacks
            if backend.finished >= http_row["jobs"]:
                break
            time.sleep(0.05)
        time.sleep(0.2)
        sampler.running = False
        http_row["broker_cpu_s"] = _cpu_s() - cpu0
        rss_end = rss_mib()
        load1 = os.getloadavg()

        bodies = signed_bodies(spec, args.direct_jobs, 0)
        cpu0 = _cpu_s()
        direct_row = asyncio.run_coroutine_threadsafe(
            direct(svc, bodies, args.clients, args.max_seconds), loop
        ).result()
        direct_row["broker_cpu_s"] = _cpu_s() - cpu0
        cpu0 = _cpu_s()
        bare_row = run_clients({**spec, "jobs": args.bare_jobs, "url": f"http://127.0.0.1:{bare_server.config.port}",
                                "out": str(tmp / "bare.json")}, tmp, "bare")  # fmt: skip
        bare_row["broker_cpu_s"] = _cpu_s() - cpu0
        server.should_exit = bare_server.should_exit = True
        time.sleep(0.5)
        ledger_jobs = len(svc.ledger.recent_jobs(500))
        live_left = len(svc._live)

    http_s, direct_s, bare_s = summary(http_row), summary(direct_row), summary(bare_row)
    result = {
        "bench": "broker_admission",
        "clients": args.clients,
        "transport": "aiohttp (separate process) -> uvicorn on 127.0.0.1 (asyncio loop, " + _parser() + ")",
        "backend": "scripted: 3 workers, one token per job, placeholder receipt signatures, settlement off",
        "http": http_s,
        "direct_service": direct_s,
        "bare_fastapi": bare_s,
        "ratios": {
            "http_vs_direct_jobs_per_s": http_s["jobs_per_s"] / direct_s["jobs_per_s"] if direct_s["jobs"] else None,
            "http_vs_bare_jobs_per_s": http_s["jobs_per_s"] / bare_s["jobs_per_s"] if bare_s["jobs"] else None,
            "http_vs_direct_cpu_per_job": (http_s["broker_cpu_ms_per_job"] or 0) / direct_s["broker_cpu_ms_per_job"]
            if direct_s["jobs"]
            else None,
        },
        "rss_mib_at_jobs": {str(k): round(v, 1) for k, v in sorted(sampler.at.items())},
        "rss_mib_end": round(rss_end, 1),
        "live_event_buffers_left": live_left,
        "ledger_recent_jobs": ledger_jobs,
        "loadavg_before": load0,
        "loadavg_after_http": load1,
        "cpu_count": os.cpu_count(),
        "machine": machine_info(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{'row':8s} {'jobs':>6s} {'jobs/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'cpu ms/job':>10s}  statuses/errors")
    for name, row in (("http", http_s), ("direct", direct_s), ("bare", bare_s)):
        extra = row.get("statuses") or row.get("errors")
        print(
            f"{name:8s} {row['jobs']:6d} {row['jobs_per_s']:8.1f} {row['p50_ms']:8.1f} {row['p99_ms']:8.1f} "
            f"{row['broker_cpu_ms_per_job'] or 0:10.2f}  {extra}"
        )
    print("ratios", json.dumps(result["ratios"]))
    print("rss MiB at finished jobs", result["rss_mib_at_jobs"], "end", result["rss_mib_end"])
    print("loadavg", load0, load1)
    print(f"wrote {args.out}")


def _parser() -> str:
    """The HTTP parser uvicorn picks (httptools when installed, else h11)."""
    try:
        import httptools  # noqa: F401
    except ImportError:
        return "h11"
    return "httptools"


def _loads(shards: Path) -> bool:
    """Whether cached shards exist and their manifest is current (else they are exported again)."""
    from dlis_market.inference.errors import ManifestError
    from dlis_market.inference.manifest import load_manifest

    try:
        load_manifest(shards)
    except (OSError, ManifestError):
        return False
    return True


async def _call(fn: Any) -> None:
    fn()


if __name__ == "__main__":
    main()
