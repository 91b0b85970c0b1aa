"""A client sends what costs the broker much and the client little: huge bodies, prompts far over
the context, big unsigned requests. Against a real uvicorn server on 127.0.0.1 (real chain and
BrokerService; the backend double plays the workers). Each is refused fast and cheap, and the
event loop keeps answering everyone else meanwhile."""

from __future__ import annotations

import secrets
import threading
import time

import httpx

from dlis_market.broker.app import create_app
from dlis_market.chain.job_market import JobAuthorization, sign_authorization
from dlis_market.types import model_id
from tests.integration.broker import conftest as broker_suite
from tests.integration.conftest import DEV_PUBLISHER

broker_env = broker_suite.broker_env  # the broker suite's fixture
live_server = broker_suite.live_server  # the broker suite's fixture
UNIT = 10**18
MODEL = "smollm2-135m"


def authorization(market, client) -> dict:
    auth = JobAuthorization(
        client.address, market.broker.address, bytes.fromhex(model_id(MODEL, DEV_PUBLISHER)[2:]), UNIT,
        secrets.randbits(64),
        market.client.timestamp() + 900,
    )  # fmt: skip
    sig = sign_authorization(client.key, market.market().domain(), auth)
    return {"client": client.address, "nonce": str(auth.nonce), "max_cost": str(UNIT),
            "deadline": auth.deadline, "signature": sig.hex()}  # fmt: skip


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def flood_while_probing(url: str, path: str, body: dict) -> tuple[httpx.Response, float, list[float], float]:
    """POST ``body`` in one thread while another client keeps calling /healthz: the response,
    its time, every health-check latency seen while it was in flight, and how much the resident
    memory of this process (server included) rose meanwhile, in MiB."""
    out: dict[str, object] = {}
    sent = threading.Event()

    def post() -> None:
        with httpx.Client(timeout=120) as c:
            t0 = time.perf_counter()
            sent.set()
            out["res"] = c.post(url + path, json=body)
            out["s"] = time.perf_counter() - t0

    t = threading.Thread(target=post)
    t.start()
    sent.wait()
    probes: list[float] = []
    rss0 = peak = rss_mib()
    with httpx.Client(timeout=30) as probe:
        while t.is_alive() or not probes:
            t0 = time.perf_counter()
            assert probe.get(url + "/healthz").status_code == 200
            probes.append(time.perf_counter() - t0)
            peak = max(peak, rss_mib())
    t.join()
    return out["res"], out["s"], probes, peak - rss0  # type: ignore[return-value]


def test_huge_bodies_and_prompts_are_refused_fast(broker_env, live_server):
    market, service, backend, ops, nodes, client = broker_env
    market.market().deposit(client, 2 * UNIT)
    srv = live_server(create_app(service, settle_in_background=False))

    # 5 MB of chat messages, each within the per-message limit: refused before it is parsed.
    big = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "lorem ipsum " * 16_000} for _ in range(27)],
        "max_tokens": 8,
        "authorization": authorization(market, client),
    }
    res, took, probes, grew = flood_while_probing(srv.url, "/v1/jobs", big)
    print(f"5 MB body: {res.status_code} in {took:.2f} s, RSS +{grew:.0f} MiB; /healthz max {max(probes):.3f} s")
    assert res.status_code == 413, res.text[:300]
    assert res.json()["type"].endswith("request-too-large")
    # Bounds sit between the two behaviours with a wide margin each way, so machine speed does not
    # decide the outcome: before the fix this body took 3.9-9.3 s, grew RSS by 447-536 MiB and
    # blocked /healthz for 3.8-9.1 s; after it, 0.03-0.05 s, +0-1 MiB, <= 38 ms (2 loaded cores).
    assert took < 2.0 and max(probes) < 1.0 and grew < 100

    # Under the body limit but far over the model's context: 413 at admission, and the
    # tokenizer does not hold the event loop while it works.
    long = {**big, "messages": [{"role": "user", "content": "lorem ipsum " * 15_000} for _ in range(5)]}
    long["authorization"] = authorization(market, client)
    res, took, probes, grew = flood_while_probing(srv.url, "/v1/jobs", long)
    print(f"900 kB prompt: {res.status_code} in {took:.2f} s, RSS +{grew:.0f} MiB; /healthz max {max(probes):.3f} s")
    assert res.status_code == 413, res.text[:300]
    assert res.json()["type"].endswith("prompt-too-long")
    # before: /healthz blocked 0.37-0.64 s while the prompt was tokenized on the loop; after: <= 29 ms
    assert took < 5.0 and max(probes) < 1.0

    # A big request without a valid signature is refused before anything expensive.
    unsigned = {**long, "authorization": {**authorization(market, client), "signature": "0x" + "11" * 65}}
    res, took, probes, grew = flood_while_probing(srv.url, "/v1/jobs", unsigned)
    print(f"unsigned 900 kB: {res.status_code} in {took:.2f} s, RSS +{grew:.0f} MiB")
    assert res.status_code == 401, res.text[:300]
    assert took < 2.0

    # The same without a Content-Length (chunked): refused once the limit is passed.
    def chunks():
        for _ in range(64):
            yield b" " * (64 << 10)  # 4 MiB in all

    with httpx.Client(timeout=30) as c:
        t0 = time.perf_counter()
        res = c.post(srv.url + "/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
        assert res.status_code == 413 and res.json()["type"].endswith("request-too-large")
        assert time.perf_counter() - t0 < 2.0

    assert backend.jobs == [] and service.ledger.recent_jobs() == []
