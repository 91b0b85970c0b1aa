"""Two broker processes behind one API: one PostgreSQL ledger, one broker account, one chain.

Each broker runs as a real process (this module's ``__main__``: the broker's own object graph and
app, over a backend double that plays three registered workers signing real receipts, with a
delay per token so jobs are still running when it matters). The workers' "kept receipts" (what a
stage signs for a job whose opener vanished) live in a folder both brokers' doubles read, as real
stages keep them for whichever broker asks. Faults and races injected:
- the same signed job sent to both brokers at once: one admits it, the other answers 409;
- a client whose escrow covers N jobs sends 2N at once, split across the brokers: N are admitted,
  the ledger never commits more escrow than was deposited (before: each process serialized only
  its own admissions; with escrow for one job and the two admissions in flight at once, both
  brokers admitted theirs);
- kill -9 of the broker that settles, mid-run: the survivor takes the settler lease, reclaims the
  dead one's running jobs from the stages' kept receipts, and every job is settled exactly once
  on chain (one ``JobSettled`` event per job id; the escrow moved by exactly their cost + fee)
  (before: the survivor settled its own jobs and left the dead one's running for good).
And on SQLite (the default) a broker is alone, as before: no lease, no heartbeats, a restart takes
every job its predecessor left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text, update
from transformers import AutoTokenizer

from dlis_market.broker.cluster import ClusterMember
from dlis_market.broker.ledger import InstanceRow, JobRow, Ledger, NewJob, database_url
from dlis_market.chain.anvil import free_port
from dlis_market.chain.job_market import JobAuthorization, Receipt, SignedReceipt, sign_authorization, sign_receipt
from dlis_market.protocol.receipts import StageReceipt
from dlis_market.protocol.routes import RouteHop
from dlis_market.protocol.spans import SpanRecord
from dlis_market.settings import Settings
from dlis_market.types import model_id
from tests.integration.broker import conftest as broker_suite
from tests.integration.broker.pg import pg_cluster, pg_url
from tests.integration.node.node_helpers import kill_group

__all__ = ["pg_cluster", "pg_url"]  # fixtures

MODEL = "smollm2-135m"
MAX_TOKENS = 8
ROOT = Path(__file__).resolve().parents[2]


class PairBackend(broker_suite.ScriptedBackend):
    """Three workers that take ``delay_s`` per token and keep, per job, a receipt for what they
    served until the broker collects the final ones (``kept``, a folder shared like the workers)."""

    def __init__(self, nodes, domain, tokens, kept: Path, delay_s: float):
        super().__init__(nodes, domain, tokens)
        self.kept = kept
        self.delay_s = delay_s

    def _receipts(self, job_id: bytes, model: str, tokens: int) -> list[StageReceipt]:
        out = []
        for i, ((s, e), node) in enumerate(zip(broker_suite.SPANS, self.nodes, strict=True)):
            mid = bytes.fromhex(model_id(model, broker_suite.DEV_PUBLISHER)[2:])
            r = Receipt(job_id, mid, s, e, tokens, secrets.token_bytes(32), broker_suite.PRICE * tokens)
            out.append(StageReceipt(node.address, SignedReceipt(r, sign_receipt(node.key, self.domain, r)), f"peer{i}"))
        return out

    async def offers(self, model: str) -> list[SpanRecord]:  # room for every job these tests run at once
        return [o.model_copy(update={"free_slots": 64}) for o in await super().offers(model)]

    async def start(self, job):
        backend, kept = self, self.kept / job.job_id.hex()
        served = len(job.prompt_ids)

        class Stream:
            async def _gen(self):
                nonlocal served
                for t in backend.script[: job.max_new_tokens]:
                    await asyncio.sleep(backend.delay_s)
                    served += 1
                    kept.write_text(json.dumps({"model": job.model, "tokens": served}))
                    yield t

            def tokens(self):
                return self._gen()

            async def finish(self):
                kept.unlink(missing_ok=True)  # handed to this broker: no longer kept
                receipts = backend._receipts(job.job_id, job.model, served)
                route = [RouteHop(r.peer_id, r.node, r.start, r.end, broker_suite.PRICE) for r in receipts]
                return route, receipts

        return Stream()

    async def unclaimed(self, job_id: bytes, peers):
        kept = self.kept / job_id.hex()
        if not kept.exists():
            return []
        state = json.loads(kept.read_text())
        kept.unlink()
        return self._receipts(job_id, state["model"], state["tokens"])


def serve(config: Path) -> None:
    """One broker process: the broker's own graph and app over :class:`PairBackend`."""
    import logging

    import uvicorn
    from eth_account import Account

    from dlis_market.broker.bootstrap import build_graph
    from dlis_market.broker.catalog import ModelCatalog
    from dlis_market.chain.client import ChainClient

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = json.loads(config.read_text())
    settings = Settings.load()
    client = ChainClient(settings)
    catalog = ModelCatalog.from_shard_dirs([Path(cfg["shards"])], cfg["publisher"])
    graph = build_graph(settings, client, Account.from_key(cfg["broker_key"]), catalog)
    nodes = [Account.from_key(k) for k in cfg["node_keys"]]
    backend = PairBackend(nodes, graph.market.domain(), cfg["script"], Path(cfg["kept"]), cfg["delay_s"])
    app, _ = graph.app(backend)
    uvicorn.run(app, host="127.0.0.1", port=settings.broker.port, log_level="warning")


class Pair:
    """Two broker processes on one ledger (``url``), same account, same chain; killed on exit."""

    def __init__(self, market, shards: Path, url: str, tmp: Path, delay_s: float, **env: str):
        self.market, self.url, self.tmp = market, url, tmp
        ops = [market.new_funded_account(1000 * 10**18) for _ in range(3)]
        self.nodes = [market.enroll_node(o) for o in ops]
        market.registry().publish_model(market.deployer, MODEL, "QmShards", b"\x01" * 32, 30)
        tok = AutoTokenizer.from_pretrained(str(shards))
        (tmp / "kept").mkdir()
        self.config = tmp / "pair.json"
        self.config.write_text(json.dumps({
            "shards": str(shards), "publisher": market.deployer.address, "broker_key": market.broker.key.hex(),
            "node_keys": [n.key.hex() for n in self.nodes], "kept": str(tmp / "kept"), "delay_s": delay_s,
            "script": tok(" Paris is the capital of France, and")["input_ids"][:MAX_TOKENS],
        }))  # fmt: skip
        self.env = {"DLIS_BROKER__DATABASE_URL": url, "DLIS_BROKER__HEARTBEAT_INTERVAL_S": "0.3",
                    "DLIS_BROKER__INSTANCE_STALE_S": "1.5", "DLIS_BROKER__SETTLE_INTERVAL_S": "0.5", **env}  # fmt: skip
        self.ports = [free_port(), free_port()]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs = [tmp / "broker-a.log", tmp / "broker-b.log"]

    def __enter__(self) -> Pair:
        for port, log in zip(self.ports, self.logs, strict=True):
            env = {**os.environ, **self.market.settings.to_env(), **self.env, "DLIS_BROKER__PORT": str(port)}
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "tests.chaos.test_broker_pair_pg", str(self.config)], env=env, cwd=ROOT,
                stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
            ))  # fmt: skip
        for proc, port, log in zip(self.procs, self.ports, self.logs, strict=True):
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, log.read_text()[-3000:]
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            kill_group(proc)

    def body(self, client, max_cost: int, stream: bool = True) -> dict:
        m = self.market
        mid = bytes.fromhex(model_id(MODEL, m.deployer.address)[2:])
        auth = JobAuthorization(client.address, m.broker.address, mid, max_cost, secrets.randbits(64),
                                m.client.timestamp() + 1200)  # fmt: skip
        sig = sign_authorization(client.key, m.market().domain(), auth).hex()
        return {"model": MODEL, "prompt": "The capital of France is", "max_tokens": MAX_TOKENS, "stream": stream,
                "authorization": {"client": client.address, "nonce": str(auth.nonce), "max_cost": str(max_cost),
                                  "deadline": auth.deadline, "signature": sig}}  # fmt: skip


def post_all(targets: list[tuple[int, dict]], on_admitted=None) -> list[tuple[int, list[dict]]]:
    """POST every (port, body) at once (a barrier releases them together); each answer's status
    and, for a stream, its events. ``on_admitted(i)`` runs when answer ``i`` is a 201 stream."""
    barrier = threading.Barrier(len(targets))
    out: list[tuple[int, list[dict]]] = [(0, [])] * len(targets)

    def one(i: int, port: int, body: dict) -> None:
        barrier.wait()
        events: list[dict] = []
        try:
            with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/jobs", json=body, timeout=60) as res:
                out[i] = (res.status_code, events)
                if res.status_code == 201 and on_admitted is not None:
                    on_admitted(i)
                for line in res.iter_lines():
                    if line.startswith("data:"):
                        events.append(json.loads(line[5:]))
        except httpx.HTTPError:  # the broker was killed under the request
            pass

    threads = [threading.Thread(target=one, args=(i, p, b)) for i, (p, b) in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    return out


def _admissions(answers: list[tuple[int, list[dict]]], per_client: int) -> list[Counter[int]]:
    return [Counter(st for st, _ in answers[k : k + per_client]) for k in range(0, len(answers), per_client)]


def test_two_brokers_admit_a_job_once_and_never_over_commit_escrow(market, smollm2_shards, pg_url, tmp_path):
    """(1) The same signed job sent to both brokers at once: one admits it, the other answers 409.
    (2) The ledger stalls writes (an injected table lock, as a long migration or backup would)
    while a client with escrow for one job sends two, one per broker: both admissions are in
    flight at once. (3) Several clients at once, each with escrow for ``n`` jobs sending ``2n``
    split across the brokers, at full speed. (One pair of broker processes for all three: each
    start costs seconds.)"""
    max_cost = 10**16
    with Pair(market, smollm2_shards, pg_url, tmp_path, delay_s=0.4) as pair:
        ledger = Ledger(pg_url)
        client = market.new_funded_account(10**18)
        market.market().deposit(client, 10 * max_cost)
        body = pair.body(client, max_cost)
        answers = post_all([(pair.ports[0], body), (pair.ports[1], body)])
        assert sorted(status for status, _ in answers) == [201, 409], answers
        assert [j.nonce for j in ledger.recent_jobs(10)] == [int(body["authorization"]["nonce"])]

        def race(n: int, clients: int, stall: bool) -> None:
            payers = [market.new_funded_account(10**18) for _ in range(clients)]
            for c in payers:
                market.market().deposit(c, n * max_cost)
            committed: list[int] = []  # most escrow committed to one client, read as admissions answer

            def admitted(_i: int) -> None:
                committed.append(max(ledger.committed_escrow(c.address) for c in payers))

            targets = [(pair.ports[i % 2], pair.body(c, max_cost)) for c in payers for i in range(2 * n)]
            answers: list[tuple[int, list[dict]]] = []
            sender = threading.Thread(target=lambda: answers.extend(post_all(targets, on_admitted=admitted)))
            with stalled(pg_url, waiters=2 if stall else 0):
                sender.start()
            sender.join()
            for c, got in zip(payers, _admissions(answers, 2 * n), strict=True):
                assert got == {201: n, 402: n}, (c.address, got, answers)
                assert ledger.committed_escrow(c.address) <= n * max_cost
            assert max(committed) <= n * max_cost, committed

        race(1, 1, stall=True)
        race(2, 3, stall=False)


@contextlib.contextmanager
def stalled(url: str, waiters: int):
    """Hold a lock on ``jobs`` that stops inserts (reads go on) until ``waiters`` ledger sessions
    wait on a lock (an insert, or a lock of the ledger's own), then let them all go."""
    engine = create_engine(url)
    try:
        with engine.connect() as hold, engine.connect() as watch:
            if waiters:
                hold.execute(text("LOCK TABLE jobs IN SHARE MODE"))
            yield
            deadline = time.monotonic() + 30
            q = text("SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                     "WHERE NOT l.granted AND d.datname = current_database()")  # fmt: skip
            while waiters and watch.execute(q).scalar_one() < waiters:
                assert time.monotonic() < deadline, "the brokers' admissions never reached the ledger"
                watch.rollback()
                time.sleep(0.05)
            time.sleep(0.3)  # both in flight: release
            hold.rollback()
    finally:
        engine.dispose()


def _settled_events(market) -> Counter[str]:
    jm = market.market()
    start = market.client.deployment.contracts["JobMarket"].block
    logs = jm.contract.events.JobSettled.get_logs(from_block=start)
    return Counter("0x" + bytes(e["args"]["jobId"]).hex() for e in logs)


def test_settling_broker_killed_mid_run_survivor_settles_every_job_once(market, smollm2_shards, pg_url, tmp_path):
    # 8 tokens at 0.6 s: each job runs ~4.8 s, so all four are still running when the kill comes
    # 0.6 s after the last one started, even if admissions spread over seconds on a busy machine
    with Pair(market, smollm2_shards, pg_url, tmp_path, delay_s=0.6) as pair:
        jm = market.market()
        client = market.new_funded_account(10 * 10**18)
        jm.deposit(client, 10**18)
        escrow0 = jm.escrow_of(client.address)
        deadline = time.monotonic() + 20  # the settler is whichever process took the lease first
        while not any("settles now" in log.read_text() for log in pair.logs):
            assert time.monotonic() < deadline, [log.read_text()[-2000:] for log in pair.logs]
            time.sleep(0.1)
        victim = next(i for i, log in enumerate(pair.logs) if "settles now" in log.read_text())
        bodies = [pair.body(client, 10**16) for _ in range(4)]
        ledger = Ledger(pg_url)

        def kill_mid_run() -> None:  # once all four run, a few tokens in
            until = time.monotonic() + 30
            while sum(j.status == "running" for j in ledger.recent_jobs(10)) < 4 and time.monotonic() < until:
                time.sleep(0.05)
            time.sleep(0.6)
            kill_group(pair.procs[victim])

        killer = threading.Thread(target=kill_mid_run)
        killer.start()
        post_all([(pair.ports[i % 2], b) for i, b in enumerate(bodies)])
        killer.join()
        deadline = time.monotonic() + 30
        while True:
            jobs = ledger.recent_jobs(10)
            if len(jobs) == 4 and all(j.status == "settled" for j in jobs):
                break
            survivor = pair.logs[1 - victim].read_text()[-3000:]
            assert time.monotonic() < deadline, ([(j.id, j.status, j.owner, j.error) for j in jobs], survivor)
            time.sleep(0.3)
    killed = {int(b["authorization"]["nonce"]) for i, b in enumerate(bodies) if i % 2 == victim}
    for j in jobs:
        if j.nonce in killed:  # reclaimed by the survivor from the stages' kept receipts
            assert "interrupted" in (j.error or ""), j.error
        assert len(j.receipts) == 3 and j.cost > 0
    events = _settled_events(market)
    assert {j.id: events[j.id] for j in jobs} == {j.id: 1 for j in jobs}, events
    assert escrow0 - jm.escrow_of(client.address) == sum(j.cost + j.fee for j in jobs)


def test_peer_ledgers_share_the_settle_epoch_one_lease_and_each_orphan_once(pg_url):
    """The pieces the pair relies on, on one PostgreSQL database without brokers: a settlement
    recorded by one process moves the epoch another process's admissions check; one lease
    holder at a time, handed over when it leaves; a dead peer's running job taken by exactly one
    of two live processes looking at once."""
    a, b, c = Ledger(pg_url), Ledger(pg_url), Ledger(pg_url)
    route = [{"node": "0x" + "11" * 20, "peer_id": "p0", "start": 0, "end": 30}]
    job = NewJob("0x" + "22" * 32, "0x" + "33" * 20, 1, MODEL, "0x" + "44" * 32, {}, 5, 10**10, "0x", route=route,
                 owner=a.instance)  # fmt: skip
    a.create_job(job)
    with a.session() as s:  # a completed job in a batch, settled by b
        row = s.get(JobRow, job.id)
        row.status = "completed"
    batch = b.create_batch([job.id])
    before = a.epoch()
    b.mark_batch_settled(batch, None, None)
    assert a.epoch() == before + 1 and a.settle_epoch == 0  # a's own counter never moved

    members = [ClusterMember(x, "0x" + "55" * 20, 0.1) for x in (a, b, c)]
    for m in members:
        m.join()
    assert [m.is_settler() for m in members] == [True, False, False]
    members[0].leave()  # a stops: its lease goes with its connection
    deadline = time.monotonic() + 5
    while not any(m.is_settler() for m in members[1:]):
        assert time.monotonic() < deadline, "no peer took the settler lease over"
        time.sleep(0.05)
    assert sum(m.is_settler() for m in members) == 1

    orphan = NewJob("0x" + "66" * 32, "0x" + "33" * 20, 2, MODEL, "0x" + "44" * 32, {}, 5, 10**10, "0x",
                    route=route, owner=a.instance)  # fmt: skip
    a.create_job(orphan)
    # a beat moments ago (it left after its last beat): not stale by a minute's measure
    assert b.recover_interrupted("r", 60.0, restarted=False) == ([], [], [])
    # a's last beat an hour back: stale by a minute's measure, while b and c (beating every 0.1 s)
    # stay fresh by it however busy the machine is (with 0.5 s, a stalled heartbeat thread let
    # both racers take the job, one from the other)
    with a.session() as s:
        s.execute(
            update(InstanceRow).where(InstanceRow.id == a.instance).values(heartbeat_at=InstanceRow.heartbeat_at - 3600)
        )
    taken: list[tuple[list[str], list[str], list[str]]] = []
    racers = [
        threading.Thread(target=lambda x=x: taken.append(x.recover_interrupted("r", 60.0, False))) for x in (b, c)
    ]
    for t in racers:
        t.start()
    for t in racers:
        t.join()
    assert sorted(r[2] for r in taken) == [[], [orphan.id]]
    assert a.get_job(orphan.id).owner in (b.instance, c.instance)
    for m in members[1:]:
        m.leave()


def test_sqlite_default_is_one_broker_alone(tmp_path):
    settings = Settings.load(environ={"DLIS_HOME": str(tmp_path)})
    url = database_url(settings)
    assert url.startswith("sqlite:///")
    ledger = Ledger(url)
    assert not ledger.shared
    member = ClusterMember(ledger, "0x" + "00" * 20, 0.1)
    member.join()  # nothing to join: no heartbeat, and it always settles
    assert member.is_settler() and member._thread is None
    route = [{"node": "0x" + "11" * 20, "peer_id": "p0", "start": 0, "end": 30}]
    job = NewJob("0x" + "22" * 32, "0x" + "33" * 20, 1, MODEL, "0x" + "44" * 32, {}, 5, 10**10, "0x", route=route,
                 owner="another-live-process")  # fmt: skip
    ledger.create_job(job)
    # a restart takes every job its predecessor left, whoever it names (one process, no heartbeats)
    assert Ledger(url).recover_interrupted("interrupted", 15.0, restarted=False) == ([], [], [job.id])
    assert ledger.epoch() == ledger.settle_epoch == 0


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
