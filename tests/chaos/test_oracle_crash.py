"""A real oracle process (`dlis oracle start`) on a real Anvil, killed with SIGKILL in the middle of
a burst of telemetry, and twice in the middle of posting an epoch (once after ``postEpoch`` reached
the chain, once before), restarted each time on the same database.

Audited through what anyone can check, the chain and the oracle's HTTP API: every report the
oracle answered 202 is in exactly one posted epoch's leaf (proofs verify on chain), no report (no
seq of a node) is in two, every posted epoch has its aggregates, and each node's privacy budget is
charged once per epoch it was in. Epochs are 3 s long so that the test stays short.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from eth_account.signers.local import LocalAccount

from dlis_market.chain.anvil import free_port
from dlis_market.chain.devnet import LocalMarket
from dlis_market.oracle.store import EpochIntent, OracleStore, database_url
from dlis_market.protocol.telemetry import (
    TelemetryMetrics,
    TelemetryReport,
    encode_telemetry,
    oracle_domain,
    sign_telemetry,
)
from dlis_market.settings import Settings

UNIT = 10**18
EPOCH_S = 3.0
MAX_AGE_S = 3.0
EPSILON = 1.0
NODES = 3
BURST = 12  # reports per node per burst
START_TIMEOUT_S = 60.0  # a loaded 2-core CI machine imports web3, FastAPI and SciPy slowly
ORACLE = "from dlis_market.cli.oracle import app; app()"


@dataclass
class Sent:
    """What the workers sent and what the oracle answered."""

    digests: dict[str, tuple[str, int]] = field(default_factory=dict)  # EIP-712 digest -> (node, seq)
    acked: set[str] = field(default_factory=set)  # digests answered 202
    next_seq: dict[str, int] = field(default_factory=lambda: defaultdict(lambda: 1))
    last_ack_at: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


class Oracle:
    def __init__(self, market: LocalMarket, state_dir: Path) -> None:
        data = market.settings.model_dump()
        data["oracle"].update(
            {
                "state_dir": state_dir,
                "epoch_s": EPOCH_S,
                "telemetry_max_age_s": MAX_AGE_S,
                "heartbeat_interval_s": 1.0,
                "dp_epsilon": EPSILON,
                "dp_budget": 1000.0,
                "dp_budget_window_epochs": 10**6,  # one window for the whole test
            }
        )
        self.settings = Settings.model_validate(data)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = state_dir.parent / "oracle.log"

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", ORACLE, "start", "--port", str(self.port)],
                env=self.settings.child_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"oracle exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.base + "/metrics", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)  # polling for readiness
        pytest.fail(f"oracle not ready in {START_TIMEOUT_S} s: {self.log.read_text()[-3000:]}")

    def story(self) -> str:
        """What the oracle said besides access lines, and what its database holds, for a failure message."""
        said = [line for line in self.log.read_text(errors="replace").splitlines() if "HTTP/1.1" not in line]
        store = OracleStore(database_url(self.settings))
        try:
            open_epochs = [i.record.epoch for i in store.open_epochs()]
            held = f"posted {store.posted_epochs()}, open {open_epochs}, with data {store.epochs_with_data(0, 2**62)}"
        finally:
            store.close()
        return held + "\n" + "\n".join(said[-60:])

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


def _rpc(market: LocalMarket, method: str, *params: object) -> object:
    return market.client.w3.provider.make_request(method, list(params))  # type: ignore[arg-type]


def _burst(oracle: Oracle, market: LocalMarket, nodes: list[LocalAccount], sent: Sent, kill_after: int | None) -> None:
    """Each node sends ``BURST`` reports (one thread per node, one request at a time); with
    ``kill_after``, the oracle is killed once that many were accepted, with requests in flight."""
    domain = oracle_domain(market.client.chain_id, market.reputation().address)
    reached = threading.Event()
    accepted = [0]
    metrics = TelemetryMetrics(uptime_s=1.0, advertised_tps=50.0, measured_tps=40.0, free_kv_slots=2)

    def send(node: LocalAccount) -> None:
        with httpx.Client(base_url=oracle.base, timeout=20) as http:
            for _ in range(BURST):
                seq = sent.next_seq[node.address]
                report = TelemetryReport(node=node.address, seq=seq, timestamp=int(time.time()), metrics=metrics)
                signed = sign_telemetry(node.key, domain, report)
                digest = "0x" + signed.digest(domain).hex()
                with sent.lock:
                    sent.digests[digest] = (node.address, seq)
                try:
                    r = http.post("/v1/telemetry", content=encode_telemetry(signed))
                except httpx.TransportError:
                    return  # killed: this seq was in flight, unanswered; it is sent again after the restart
                # 409: the unanswered copy of this seq got in before the kill
                assert r.status_code in (202, 409), r.text
                with sent.lock:
                    sent.next_seq[node.address] = seq + 1
                    if r.status_code == 202:
                        sent.acked.add(digest)
                        sent.last_ack_at = time.time()
                        accepted[0] += 1
                        if kill_after is not None and accepted[0] >= kill_after:
                            reached.set()

    threads = [threading.Thread(target=send, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    if kill_after is not None:
        assert reached.wait(60), "the burst did not get going"
        oracle.kill()
    for t in threads:
        t.join(60)


def _pending_post(market: LocalMarket, timeout_s: float) -> str:
    """The hash of a ``postEpoch`` transaction waiting in Anvil's pool (automine is off)."""
    rep = market.reputation().address.lower()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pool = _rpc(market, "txpool_content")["result"]["pending"]  # type: ignore[index]
        for by_nonce in pool.values():
            for tx in by_nonce.values():
                if (tx.get("to") or "").lower() == rep:
                    return str(tx["hash"])
        time.sleep(0.1)  # polling Anvil's pool
    pytest.fail(f"no postEpoch transaction reached the pool in {timeout_s} s")


@pytest.fixture()
def automine(market: LocalMarket) -> Iterator[None]:
    try:
        yield
    finally:
        _rpc(market, "evm_setAutomine", True)


def _post_killed(oracle: Oracle, market: LocalMarket, mined: bool) -> None:
    """Stop mining, wait for the oracle's next ``postEpoch``, kill the oracle while it waits for the
    receipt; then mine the transaction (the chain has the epoch) or drop it (it never got there)."""
    _rpc(market, "evm_setAutomine", False)
    tx = _pending_post(market, 4 * (EPOCH_S + MAX_AGE_S))
    oracle.kill()
    if mined:
        _rpc(market, "evm_mine")
        receipt = market.client.w3.eth.get_transaction_receipt(tx)  # type: ignore[arg-type]
        assert receipt["status"] == 1
    else:
        _rpc(market, "anvil_dropAllTransactions")
    _rpc(market, "evm_setAutomine", True)


def test_sigkill_during_intake_and_epoch_posts(market: LocalMarket, tmp_path: Path, automine: None) -> None:
    t0 = time.monotonic()
    nodes = [market.enroll_node(market.new_funded_account(300 * UNIT), stake=300 * UNIT) for _ in range(NODES)]
    oracle = Oracle(market, tmp_path / "oracle")
    sent = Sent()
    try:
        oracle.start()
        _burst(oracle, market, nodes, sent, kill_after=NODES * BURST // 2)  # 1. mid-burst
        oracle.start()
        _burst(oracle, market, nodes, sent, kill_after=None)
        _post_killed(oracle, market, mined=True)  # 2. postEpoch on chain, not recorded as posted
        [intent] = _open_intents(oracle)
        assert market.reputation().telemetry_root(intent.record.epoch).hex() == intent.record.root[2:]
        oracle.start()
        _burst(oracle, market, nodes, sent, kill_after=None)
        _post_killed(oracle, market, mined=False)  # 3. postEpoch recorded as intended, never mined
        [intent] = _open_intents(oracle)
        assert market.reputation().latest_epoch() < intent.record.epoch
        oracle.start()
        rep = market.reputation()
        last = int(sent.last_ack_at // EPOCH_S)  # every accepted report arrived in this epoch or before
        deadline = time.monotonic() + 6 * (EPOCH_S + MAX_AGE_S)  # a loaded CI machine posts slowly
        while rep.latest_epoch() < last and time.monotonic() < deadline:
            time.sleep(0.2)  # polling the chain for the epoch loop's posts
        assert rep.latest_epoch() >= last, (
            f"epoch {last} was not posted (chain at {rep.latest_epoch()}): {oracle.story()}"
        )
        _audit(oracle, market, nodes, sent)
    finally:
        if oracle.proc is not None and oracle.proc.poll() is None:
            oracle.proc.terminate()
            oracle.proc.wait(10)
    assert time.monotonic() - t0 < 90


def _open_intents(oracle: Oracle) -> list[EpochIntent]:
    """The epochs the killed oracle recorded as being posted (read from its database)."""
    store = OracleStore(database_url(oracle.settings))
    try:
        return store.open_epochs()
    finally:
        store.close()


def _audit(oracle: Oracle, market: LocalMarket, nodes: list[LocalAccount], sent: Sent) -> None:
    rep = market.reputation()
    posted = [int(e) for e in rep.contract.functions.epochs().call()]
    assert len(posted) == len(set(posted))
    counted: dict[str, list[int]] = defaultdict(list)  # node -> seqs in posted leaves
    seen: list[str] = []
    epochs_of: dict[str, int] = defaultdict(int)
    with httpx.Client(base_url=oracle.base, timeout=10) as http:
        for epoch in posted:
            agg = http.get(f"/v1/aggregates/{epoch}")
            assert agg.status_code == 200, f"epoch {epoch}: {agg.text}"
            for node in nodes:
                r = http.get(f"/v1/proof/{node.address}/{epoch}")
                if r.status_code == 404 and "was not scored" in r.text:
                    continue
                assert r.status_code == 200, f"epoch {epoch} node {node.address}: {r.text}"
                proof = r.json()
                assert rep.verify(
                    epoch, bytes.fromhex(proof["leaf_hash"][2:]), [bytes.fromhex(p[2:]) for p in proof["proof"]]
                )
                assert proof["leaf"]["reports"] == len(proof["report_digests"])
                if proof["report_digests"]:
                    epochs_of[node.address] += 1
                for digest in proof["report_digests"]:
                    assert digest in sent.digests, f"epoch {epoch} counts a report nobody sent: {digest}"
                    counted[sent.digests[digest][0]].append(sent.digests[digest][1])
                    seen.append(digest)
        for node in nodes:
            privacy = http.get(f"/v1/nodes/{node.address}").json()["privacy"]
            assert privacy["spent"] == pytest.approx(EPSILON * epochs_of[node.address]), node.address
    lost = sent.acked - set(seen)
    assert not lost, f"{len(lost)} accepted reports are in no posted epoch"
    assert len(seen) == len(set(seen)), "a report was counted twice"
    for node, seqs in counted.items():
        assert len(seqs) == len(set(seqs)), f"a seq of {node} was counted twice: {sorted(seqs)}"
    assert len(sent.acked) >= NODES * BURST * 2  # the bursts did run
