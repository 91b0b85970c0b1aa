"""Broker fixtures: real SmolLM2 shards (for the manifest and tokenizer), a real chain, and a
backend double that plays three registered workers (the P2P path has its own tests)."""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from dlis_market.broker.backend import (
    BackendJob,
    BatchSignatures,
    BatchSigningRequest,
)
from dlis_market.broker.bootstrap import build_graph
from dlis_market.broker.catalog import ModelCatalog
from dlis_market.broker.ledger import Ledger
from dlis_market.chain.job_market import (
    BatchReceipt,
    Receipt,
    SignedReceipt,
    merkle_root,
    receipt_leaf,
    receipt_signer,
    sign_batch_receipt,
    sign_receipt,
)
from dlis_market.protocol.receipts import StageReceipt
from dlis_market.protocol.routes import RouteHop
from dlis_market.protocol.spans import SpanRecord
from tests.integration.conftest import DEV_PUBLISHER

PRICE = 10**12  # token units per token per stage


def span(model: str, peer: str, node: str, start: int, end: int, free_slots: int) -> SpanRecord:
    """A worker's announcement as the broker plans over it (50 tokens/s at PRICE, not attested)."""
    return SpanRecord(
        model=model, start=start, end=end, peer_id=peer, node_address=node, throughput=50.0,
        free_slots=free_slots, queue_length=0, price_per_token=PRICE, attestation_hash="0x" + "00" * 32,
    )  # fmt: skip


SPANS = [(0, 10), (10, 20), (20, 30)]


class LocalBatchSigner:
    """Plays the nodes' ``batch_receipt`` op with their registered keys: a node signs one
    BatchReceipt over its receipts in the batch, and only over receipts it signed itself (each
    per-stage signature must recover to it), as a worker signs only over leaves it signed.
    ``silent`` nodes never answer (down, or too slow); ``liars`` sign a total one unit higher."""

    def __init__(self, nodes, domain, silent=(), liars=()):
        self.keys = {n.address.lower(): n.key for n in nodes}
        self.domain = domain
        self.silent = {a.lower() for a in silent}
        self.liars = {a.lower() for a in liars}
        self.asked: list[tuple[bytes, str, int]] = []  # (batch id, node, receipts) per request

    def sign_batches(self, broker: str, batch_id: bytes, requests: list[BatchSigningRequest]) -> BatchSignatures:
        out = BatchSignatures({}, {})
        for req in requests:
            self.asked.append((batch_id, req.node, len(req.receipts)))
            node = req.node.lower()
            if node in self.silent or node not in self.keys:
                out.refusals[req.node] = "did not answer within the timeout"
                continue
            forged = [
                r for r in req.receipts if receipt_signer(self.domain, r.receipt, r.signature.signature).lower() != node
            ]
            if forged:
                out.refusals[req.node] = f"refused: {len(forged)} receipt(s) not signed by this node"
                continue
            total = sum(r.receipt.amount for r in req.receipts) + (node in self.liars)
            root = merkle_root([receipt_leaf(r.receipt) for r in req.receipts])
            batch = BatchReceipt(req.node, broker, batch_id, root, total, len(req.receipts))
            out.signatures[req.node] = sign_batch_receipt(self.keys[node], self.domain, batch).signature
        return out


class ScriptedBackend:
    """Plays three workers: emits the given tokens and signs real EIP-712 receipts with the
    registered node keys, exactly as workers do."""

    def __init__(self, nodes, domain, tokens: list[int], offers: bool = True):
        self.nodes = nodes
        self.domain = domain
        self.script = tokens
        self.has_offers = offers
        self.jobs: list[BackendJob] = []
        self.signer = LocalBatchSigner(nodes, domain)

    def batch_signer(self, timeout_s: float) -> LocalBatchSigner:
        """The broker settles through the Merkle path, its nodes signing with their local keys."""
        return self.signer

    async def offers(self, model: str) -> list[SpanRecord]:
        if not self.has_offers:
            return []
        return [
            span(model, f"peer{i}", n.address, s, e, free_slots=4)
            for i, ((s, e), n) in enumerate(zip(SPANS, self.nodes, strict=True))
        ]

    async def start(self, job: BackendJob):
        self.jobs.append(job)
        backend = self

        class Stream:
            async def _gen(self) -> AsyncIterator[int]:
                for t in backend.script[: job.max_new_tokens]:
                    yield t

            def tokens(self) -> AsyncIterator[int]:
                return self._gen()

            async def finish(self):
                n = len(job.prompt_ids) + min(len(backend.script), job.max_new_tokens)
                receipts = []
                for (s, e), node in zip(SPANS, backend.nodes, strict=True):
                    r = Receipt(
                        job.job_id,
                        bytes.fromhex(model_id_of(job.model)[2:]),
                        s,
                        e,
                        n,
                        secrets.token_bytes(32),
                        PRICE * n,
                    )
                    sig = sign_receipt(node.key, backend.domain, r)
                    receipts.append(StageReceipt(node.address, SignedReceipt(r, sig)))
                route = [
                    RouteHop(f"peer{i}", nd.address, s, e, PRICE)
                    for i, ((s, e), nd) in enumerate(zip(SPANS, backend.nodes, strict=True))
                ]
                return route, receipts

        return Stream()

    async def close(self) -> None:
        pass


def model_id_of(name: str) -> str:
    from dlis_market.types import model_id

    return model_id(name, DEV_PUBLISHER)


@pytest.fixture()
def broker_env(market, smollm2_shards, tmp_path):
    """A BrokerService on the real chain with three enrolled nodes and the SmolLM2 model published."""

    ops = [market.new_funded_account(1000 * 10**18) for _ in range(3)]
    nodes = [market.enroll_node(o) for o in ops]
    market.registry().publish_model(market.deployer, "smollm2-135m", "QmShards", b"\x01" * 32, 30)
    client = market.new_funded_account(100 * 10**18)
    catalog = ModelCatalog.from_shard_dirs([smollm2_shards], market.deployer.address)
    tok = catalog.get("smollm2-135m").tokenizer
    script = tok(" Paris is the capital of France.")["input_ids"]
    backend = ScriptedBackend(nodes, market.market().domain(), script)
    ledger = Ledger(f"sqlite:///{tmp_path / 'broker.db'}")
    service = build_graph(market.settings, market.client, market.broker, catalog, ledger).service(backend)
    return market, service, backend, ops, nodes, client


# ----------------------------------------------------------------------------- browser
# A live uvicorn server for the broker app and headless Debian Chromium driven by Playwright.

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "browser"
CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium tries public hosts (see ENVIRONMENT.md).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """uvicorn serving an ASGI app on 127.0.0.1 in a thread of this process."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


@pytest.fixture()
def live_server():
    servers: list[LiveServer] = []

    def start(app) -> LiveServer:
        srv = LiveServer(app).__enter__()
        servers.append(srv)
        return srv

    try:
        yield start
    finally:
        for srv in servers:
            srv.__exit__()


# Module scope, not session: Playwright's sync API keeps an event loop running while it is open,
# and later tests that call asyncio.run() would fail under it.
@pytest.fixture(scope="module")
def chromium() -> Iterator[object]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make setup` (it installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / ".gitignore").write_text("*\n")  # screenshots are test output, never committed
    return ARTIFACTS
