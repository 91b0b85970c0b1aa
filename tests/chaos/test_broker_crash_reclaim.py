"""kill -9 of the broker at points of a job's life: nothing stuck, nothing paid twice, and the
stages that served are paid.

Fault injected: SIGKILL of the `dlis broker start` process group (three real worker processes,
staked and registered on a real Anvil, keep running), then a restart on the same database:
- while the job streams tokens: the stages' sessions lose their opener; each signs a receipt for
  what it served and keeps it; the restarted broker claims them (the ``receipts`` op) and settles
  the job for what was served (before: the job failed unpaid, 13 of 32 such jobs had streamed);
- after the answer, before settlement: the recorded receipts settle once;
- right after the job was sent (admission, opening the sessions): the job settles or fails, and
  a failed one releases its escrow.
Afterwards no job is left queued or running, the client's escrow on chain moved by exactly the
settled jobs' cost + fee, and every stage was credited exactly its receipts.
"""

from __future__ import annotations

import json
import random
import secrets
import threading
import time
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer

from dlis_market.broker.ledger import Ledger
from dlis_market.chain.anvil import free_port
from dlis_market.chain.job_market import JobAuthorization, sign_authorization
from dlis_market.inference.manifest import MANIFEST_NAME, sha256_file
from dlis_market.types import model_id
from tests.integration.node.node_helpers import (
    Swarm,
    _wait_ready,
    kill_group,
    register_worker,
    start_broker,
    tiny_shards,
)

UNIT = 10**18
MODEL = "tiny-crash"
LAYOUT = {"a": "0:2", "b": "2:4", "c": "4:6"}
MAX_TOKENS = 64


def _body(market, client, prompt: str) -> dict:
    jm = market.market()
    auth = JobAuthorization(
        client.address, market.broker.address, bytes.fromhex(model_id(MODEL, market.deployer.address)[2:]),
        UNIT, secrets.randbits(64), market.client.timestamp() + 1200,
    )  # fmt: skip
    return {
        "model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "stream": True,
        "authorization": {
            "client": client.address, "nonce": str(auth.nonce), "max_cost": str(UNIT), "deadline": auth.deadline,
            "signature": sign_authorization(client.key, jm.domain(), auth).hex(),
        },
    }  # fmt: skip


def _stream_until(port: int, body: dict, kill_on: str, kill, nth: int = 1) -> str | None:
    """POST the job as a stream; call ``kill`` at the ``nth`` event of type ``kill_on`` ("sent": as
    soon as the request is out); returns the job id if an event named it."""
    job_id = None
    seen = 0
    try:
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/jobs", json=body, timeout=60) as res:
            if kill_on == "sent":
                kill()
            for line in res.iter_lines():
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                job_id = event.get("job_id", job_id)
                seen += event["type"] == kill_on
                if event["type"] == kill_on and seen >= nth:
                    kill()
                    break
    except httpx.HTTPError:  # the broker died under the request
        pass
    return job_id


FIXED_PLAN = [("token", 1), ("done", 1), ("sent", 1)]


def random_plan(count: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    return [rng.choice([("token", rng.randrange(1, MAX_TOKENS)), ("done", 1), ("sent", 1)]) for _ in range(count)]


@pytest.mark.parametrize(
    "plan", [FIXED_PLAN, pytest.param(random_plan(20, 13), marks=pytest.mark.heavy)], ids=["3-points", "20-random"]
)
def test_broker_killed_at_each_point_leaves_nothing_stuck_and_pays_what_was_served(
    market, smollm2_shards: Path, tmp_path: Path, plan: list[tuple[str, int]]
):
    dep = market.client.deployment
    tok = AutoTokenizer.from_pretrained(str(smollm2_shards))
    shards = tiny_shards(tmp_path / "model", [(0, 2), (2, 4), (4, 6)], name=MODEL, vocab_size=len(tok))
    tok.save_pretrained(str(shards))
    market.registry().publish_model(
        market.deployer, MODEL, "QmTiny", bytes.fromhex(sha256_file(shards / MANIFEST_NAME)), 6
    )
    jm = market.market()
    log = tmp_path / "broker.log"
    db = f"sqlite:///{tmp_path / 'broker.db'}"
    port = free_port()
    with Swarm(tmp_path / "swarm", env={"DLIS_CHAIN__RPC_URL": market.settings.chain.rpc_url}) as swarm:
        chain = ["--chain-id", "31337", "--market", dep.address_of("JobMarket"), "--registry"]
        chain += [dep.address_of("NodeRegistry"), "--price", str(10**12)]
        workers = {name: swarm.launch(shards, layers, name, *chain) for name, layers in LAYOUT.items()}
        operators = {}
        for name, w in workers.items():
            w.info = _wait_ready(w.proc, 240, w.log_path)
            operators[name] = register_worker(market, w)
        swarm.wait_spans(MODEL, len(LAYOUT), registry=dep.address_of("NodeRegistry"))
        client = market.new_funded_account(50 * UNIT)
        jm.deposit(client, 10 * UNIT)
        escrow0 = jm.escrow_of(client.address)
        claim0 = {n: jm.claimable_of(a) for n, a in operators.items()}

        def broker():  # settles only when restarted (or at the end): kills land before a settle tick
            return start_broker(
                market, shards, swarm.initial_peers, port, 3600, log, DLIS_BROKER__SPOT_CHECK_FRACTION="0"
            )

        proc = broker()
        ids = []
        try:
            for i, (kill_on, nth) in enumerate(plan):
                victim = proc

                def kill(p=victim) -> None:
                    threading.Thread(target=kill_group, args=(p,), daemon=True).start()

                prompt = f"Question {i}: the capital of France is"
                ids.append(_stream_until(port, _body(market, client, prompt), kill_on, kill, nth))
                proc.wait(timeout=30)
                proc = broker()  # restart on the same database: recovery runs before it answers
        finally:
            kill_group(proc)
        # a broker settling every second settles whatever recovery completed
        ledger = Ledger(db)
        proc = start_broker(market, shards, swarm.initial_peers, port, 1, log, DLIS_BROKER__SPOT_CHECK_FRACTION="0")
        try:
            deadline = time.monotonic() + 60
            while True:
                open_ = [j for j in ledger.recent_jobs(50) if j.status not in ("settled", "failed")]
                if not open_:
                    break
                assert time.monotonic() < deadline, [(j.id, j.status, j.error) for j in open_]
                time.sleep(0.5)
        finally:
            kill_group(proc)

    jobs = {j.id: j for j in ledger.recent_jobs(50)}
    by_prompt = {json.loads(j.request_json)["prompt"]: j for j in jobs.values()}
    for i, (kill_on, _) in enumerate(plan):
        job = by_prompt.get(f"Question {i}: the capital of France is")
        if kill_on == "sent":  # killed as it was sent: it may never have been read, or ran before the kill
            continue
        assert job is not None, (i, kill_on)
        # the stages served it: paid for what they served (from their kept receipts, or the recorded ones)
        assert job.status == "settled", (i, kill_on, job.status, job.error)
        if kill_on == "token":
            assert "interrupted" in (job.error or "") and job.completion_tokens == 0
        else:
            assert job.id == ids[i]
    settled = [j for j in jobs.values() if j.status == "settled"]
    charged = escrow0 - jm.escrow_of(client.address)
    assert charged == sum(j.cost + j.fee for j in settled)  # each settled once, the rest released
    assert ledger.committed_escrow(client.address) == 0
    credited = {n: jm.claimable_of(a) - claim0[n] for n, a in operators.items()}
    node_of = {w.info["node_address"].lower(): n for n, w in workers.items()}
    owed = dict.fromkeys(operators, 0)
    for j in settled:
        assert len(j.receipts) == len(LAYOUT)
        for r in j.receipts:
            owed[node_of[r.node.lower()]] += r.amount
    assert credited == owed and all(v > 0 for v in owed.values())
