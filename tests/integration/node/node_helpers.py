"""Helpers for node tests: tiny random models, shard sets, and worker processes on loopback.

Workers run as separate OS processes (``python -m dlis_market.cli.worker start``) in their own
process group, so killing the group also kills their p2pd daemon; every started worker is killed
in ``finally`` by :class:`Swarm`. Readiness is the worker's ``DLIS_NODE_READY`` line, not a sleep (after its
``DLIS_NODE_JOINED`` line, checked to name the same node).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hivemind
import httpx
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from typer.testing import CliRunner

from dlis_market.chain.job_market import JobAuthorization, sign_authorization
from dlis_market.cli.main import app
from dlis_market.inference.shard_export import export_shards
from dlis_market.node import dht_records
from dlis_market.node.server import JOINED_PREFIX, READY_PREFIX
from dlis_market.node.transport import start_dht
from dlis_market.protocol.spans import SpanRecord
from dlis_market.settings import NodeSettings
from dlis_market.types import LayerRange, model_id

PASSWORD = "node-test-password"
MODEL = "tiny-llama"


def make_tiny_llama(path: Path, layers: int = 6, seed: int = 1234, vocab_size: int = 96, hidden: int = 32) -> Path:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger weights than the default init, so tokens vary
        for param in model.parameters():
            if param.ndim >= 2:
                param.normal_(0.0, 0.3)
    model.save_pretrained(path)
    return path


def tiny_fp32_shards(root: Path, name: str, split: int, layers: int, **model: Any) -> tuple[Path, Path]:
    """A tiny Llama (``make_tiny_llama``) under ``root/model`` and its two fp32 shards
    ``[0, split)`` and ``[split, layers)`` under ``root/shards``, published as ``name``."""
    model_dir = make_tiny_llama(root / "model", layers=layers, **model)
    shards = root / "shards"
    ranges = [LayerRange(start=0, end=split), LayerRange(start=split, end=layers)]
    export_shards(model_dir, shards, ranges=ranges, dtype="fp32", name=name)
    return model_dir, shards


def tiny_shards(root: Path, ranges: list[tuple[int, int]], name: str = "tiny-llama", vocab_size: int = 96) -> Path:
    model_dir = make_tiny_llama(root / "model", layers=ranges[-1][1], vocab_size=vocab_size)
    out = root / "shards"
    export_shards(model_dir, out, ranges=[LayerRange(start=a, end=b) for a, b in ranges], dtype="fp32", name=name)
    return out


def published_tiny_model(market: Any, tokenizer_dir: Path, root: Path, name: str) -> Path:
    """A tiny Llama in three fp32 shards [0, 2), [2, 4), [4, 6) under ``root`` with the tokenizer
    of ``tokenizer_dir`` beside its manifest (the broker tokenizes prompts with it), published on
    ``market``'s NodeRegistry by its deployer under ``name``; returns the shard folder."""
    from transformers import AutoTokenizer

    from dlis_market.inference.manifest import MANIFEST_NAME, sha256_file

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    shards = tiny_shards(root, [(0, 2), (2, 4), (4, 6)], name=name, vocab_size=len(tok))
    tok.save_pretrained(str(shards))
    digest = bytes.fromhex(sha256_file(shards / MANIFEST_NAME))
    market.registry().publish_model(market.deployer, name, "QmTiny", digest, 6)
    return shards


def register_worker(market: Any, worker: WorkerProc, attested: bool = False) -> str:
    """Stake for a fresh operator and register the worker's own node key under its peer id (with
    the hash of the attestation it announces when ``attested``: what privacy=high routes on);
    returns the operator's address."""
    from dlis_market.chain.node_registry import Capability, DeviceClass
    from dlis_market.node import identity

    node = identity.load_or_create(worker.home / "node", PASSWORD, 1024, worker.home / "keystore").account
    operator = market.new_funded_account(market.staking().min_stake())
    market.staking().stake(operator, market.staking().min_stake())
    registry = market.registry()
    deadline = market.client.timestamp() + 3600
    binding = registry.sign_binding(node, operator.address, worker.peer_id, deadline)
    cap = Capability(8192, 100, 1000, DeviceClass.LAPTOP)
    attestation = bytes.fromhex(worker.info["attestation_hash"].removeprefix("0x")) if attested else b"\0" * 32
    registry.register(
        operator, node.address, worker.peer_id, "/ip4/127.0.0.1/tcp/1", cap, attestation, binding, deadline
    )
    return str(operator.address)


def dev_registry_domain() -> Any:
    """The NodeRegistry domain workers sign their announcements under when no chain is set."""
    from dlis_market.node.attestation import registry_domain

    return registry_domain(NodeSettings().chain_id, NodeSettings().registry_address)


def driver_settings(**overrides: Any) -> NodeSettings:
    base: dict[str, Any] = {"step_timeout_s": 30.0, "request_timeout_s": 15.0, "ban_base_s": 60.0}
    base.update(overrides)
    return NodeSettings(**base)


@dataclass
class WorkerProc:
    proc: subprocess.Popen[bytes]
    info: dict[str, Any]
    log_path: Path

    @property
    def peer_id(self) -> str:
        return str(self.info["peer_id"])

    @property
    def home(self) -> Path:
        return self.log_path.parent

    def kill(self) -> None:
        kill_group(self.proc)

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (clean shutdown: the worker withdraws its DHT record); returns the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@dataclass
class Swarm:
    root: Path
    threads: int = 1
    env: dict[str, str] = field(default_factory=dict)  # extra environment of the workers
    workers: list[WorkerProc] = field(default_factory=list)
    bootstrap: hivemind.DHT | None = None

    def __enter__(self) -> Swarm:
        self.bootstrap = start_dht([], client_mode=False)
        return self

    @property
    def initial_peers(self) -> list[str]:
        assert self.bootstrap is not None
        return [str(m) for m in self.bootstrap.get_visible_maddrs()]

    def wait_spans(
        self, model: str, count: int, timeout_s: float = 60.0, registry: str | None = None, chain_id: int = 31337
    ) -> list[SpanRecord]:
        """Block until the bootstrap DHT sees ``count`` announcements of ``model`` (signed under the
        NodeRegistry domain at ``registry``, default the dev one of workers started without a chain)."""
        from dlis_market.node.attestation import registry_domain

        domain = dev_registry_domain() if registry is None else registry_domain(chain_id, registry)
        assert self.bootstrap is not None
        deadline = time.monotonic() + timeout_s
        spans: list[SpanRecord] = []
        while time.monotonic() < deadline:
            spans = dht_records.fetch_spans(self.bootstrap, model, domain)
            if len(spans) >= count:
                return spans
            time.sleep(0.5)
        raise RuntimeError(f"only {len(spans)} of {count} spans of {model} announced within {timeout_s}s")

    def start_workers(self, specs: list[tuple[Path, str, str]], timeout_s: float = 240.0) -> list[WorkerProc]:
        """Start ``(shards, layers, name)`` workers in parallel; wait until all are ready."""
        started = [self.launch(shards, layers, name) for shards, layers, name in specs]
        for w in started:
            w.info = _wait_ready(w.proc, timeout_s, w.log_path)
        return started

    def start_worker(
        self, shards: Path | None, layers: str, name: str, *extra: str, timeout_s: float = 240.0
    ) -> WorkerProc:
        worker = self.launch(shards, layers, name, *extra)
        worker.info = _wait_ready(worker.proc, timeout_s, worker.log_path)
        return worker

    def launch(
        self, shards: Path | None, layers: str, name: str, *extra: str, env: dict[str, str] | None = None
    ) -> WorkerProc:
        home = self.root / name
        home.mkdir(parents=True, exist_ok=True)
        pw = home / "password"
        pw.write_text(PASSWORD)
        env = {
            **os.environ,
            "DLIS_HOME": str(home),
            "DLIS_CHAIN__KEYSTORE_SCRYPT_N": "1024",
            "DLIS_NODE__ANNOUNCE_EVERY_S": "2",
            "PYTHONUNBUFFERED": "1",
            **self.env,
            **(env or {}),
        }
        cmd = [sys.executable, "-m", "dlis_market.cli.worker", "start"]
        cmd += ["--shards", str(shards)] if shards is not None else []  # None: extra args say --manifest-cid
        cmd += ["--layers", layers] if layers else []  # empty: the caller passes --auto
        cmd += ["--password-file", str(pw), "--threads", str(self.threads)]
        for peer in self.initial_peers:
            cmd += ["--initial-peer", peer]
        cmd += list(extra)
        log_path = home / "worker.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env, start_new_session=True)
        worker = WorkerProc(proc, {}, log_path)
        self.workers.append(worker)
        return worker

    def __exit__(self, *exc: object) -> None:
        for w in self.workers:
            w.kill()
        if self.bootstrap is not None:
            self.bootstrap.shutdown()


def _wait_ready(proc: subprocess.Popen[bytes], timeout_s: float, log_path: Path) -> dict[str, Any]:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    buf = b""
    while time.monotonic() < deadline:
        if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
            break
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            break
        buf += chunk
        joined = None
        for line in buf.decode(errors="replace").splitlines():
            if line.startswith(JOINED_PREFIX):
                joined = json.loads(line[len(JOINED_PREFIX) :])
            if line.startswith(READY_PREFIX):
                ready = dict(json.loads(line[len(READY_PREFIX) :]))
                # the earlier line that peers may bootstrap from names the same node and addresses
                assert joined is not None, f"DLIS_NODE_READY without a DLIS_NODE_JOINED line before it:\n{buf!r}"
                assert joined == {k: ready[k] for k in ("peer_id", "maddrs", "node_address")}, (joined, ready)
                return ready
    tail = log_path.read_text(errors="replace")[-3000:]
    raise RuntimeError(f"worker did not become ready (exit {proc.poll()}):\n{tail}")


async def wait_for_spans(driver: Any, model: str, count: int, timeout_s: float = 60.0) -> list[Any]:
    """Poll the DHT until ``count`` spans of ``model`` are announced (announcements are async)."""
    import asyncio

    deadline = time.monotonic() + timeout_s
    spans: list[Any] = []
    while time.monotonic() < deadline:
        spans = await driver.discover(model)
        if len(spans) >= count:
            return spans
        await asyncio.sleep(0.5)
    raise RuntimeError(f"only {len(spans)} of {count} spans of {model} announced within {timeout_s}s")


# ----------------------------------------------------------------------------- whole-market processes


def cli(env: dict[str, str], *args: str) -> str:
    """Run the dlis CLI in-process; assert it succeeded; its stdout."""
    res = CliRunner().invoke(app, list(args), env=env)
    assert res.exit_code == 0, res.output
    return res.stdout


def spawn_service(cmd: list[str], env: dict[str, str], log: Path, ready_url: str, timeout_s: float = 120) -> Any:
    """Start ``dlis ...`` as a process in its own group (logging to ``log``); return it once
    ``ready_url`` answers 200. A process that exits first fails with the end of its log."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dlis_market.cli.main", *cmd], env={**os.environ, **env},
        stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(ready_url, timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    stop(proc)
    raise AssertionError(f"`dlis {' '.join(cmd[:2])}` did not start:\n" + log.read_text()[-3000:])


def start_broker(
    market: Any, shards: Path, peers: list[str], port: int, settle_s: float, log: Path, **extra_env: str
) -> subprocess.Popen[bytes]:
    """`dlis broker start` as a process on the market's chain; returns once /healthz answers."""
    env = {
        **market.settings.to_env(),
        **extra_env,
        "DLIS_BROKER__PORT": str(port),
        "DLIS_BROKER__SETTLE_INTERVAL_S": str(settle_s),
        "DLIS_BROKER__DATABASE_URL": f"sqlite:///{log.parent / 'broker.db'}",
    }
    cmd = ["broker", "start", "--model-dir", str(shards)]
    for p in peers:
        cmd += ["--initial-peer", p]
    return spawn_service(cmd, env, log, f"http://127.0.0.1:{port}/healthz")  # type: ignore[no-any-return]


def start_oracle(market: Any, port: int, log: Path, **extra_env: str) -> subprocess.Popen[bytes]:
    """`dlis oracle start` as a process on the market's chain (state next to ``log``)."""
    env = {
        **market.settings.to_env(),
        "DLIS_ORACLE__PORT": str(port),
        "DLIS_ORACLE__STATE_DIR": str(log.parent / "oracle"),
        **extra_env,
    }
    return spawn_service(["oracle", "start"], env, log, f"http://127.0.0.1:{port}/metrics", 60)  # type: ignore[no-any-return]


def paid_job(
    market: Any, port: int, client: Any, model: str, prompt: str, max_tokens: int, **extra: Any
) -> dict[str, Any]:
    """POST /v1/jobs to the broker on ``port`` under a fresh authorization signed by ``client``
    (max cost 1 DLIS, 20 minutes to settle: within JobMarket's authorization lifetime), with the
    ``extra`` fields of the request (e.g. ``policy``); asserts the job completed and returns it."""
    mid = bytes.fromhex(model_id(model, market.deployer.address)[2:])
    auth = JobAuthorization(client.address, market.broker.address, mid, 10**18,
                            secrets.randbits(128), market.client.timestamp() + 1200)  # fmt: skip
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "authorization": {
        "client": client.address, "nonce": str(auth.nonce), "max_cost": str(auth.max_cost), "deadline": auth.deadline,
        "signature": sign_authorization(client.key, market.market().domain(), auth).hex()}, **extra}  # fmt: skip
    res = httpx.post(f"http://127.0.0.1:{port}/v1/jobs", json=body, timeout=300)
    assert res.status_code == 201, res.text
    job: dict[str, Any] = res.json()
    assert job["status"] == "completed", job
    return job


async def run_pinned_job(
    driver: Any, model: str, route: list[Any], prompt: list[int], new: int, adapter: Any = None, proof: Any = None
) -> tuple[Any, list[int]]:
    """One job on exactly ``route`` (driver-side, no broker): its FinishedSession (what a spot check
    needs) and its tokens. Fails if the job failed over or a receipt was refused."""
    from dlis_market.broker.spot_checks import FinishedSession
    from dlis_market.node.driver import JobSession, JobSpec

    spec = JobSpec(model=model, prompt_ids=prompt, max_new_tokens=new, adapter=adapter, proof=proof)
    session = JobSession(driver, spec)
    session.route = list(route)
    await session.establish()
    tokens = [t async for t in session.tokens()]
    hops = list(session.route)
    await session.close()
    finished = FinishedSession.of(session, hops)
    assert finished is not None, "the job failed over or a receipt was refused; see the worker logs"
    return finished, tokens


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group (kill -9 of the process and what it started), then reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, SIGKILL after 30 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@dataclass
class TinySwarm:
    """The tiny-Llama swarm of ``conftest.tiny_swarm``: workers by name (a, b, b2, c)."""

    swarm: Swarm
    shards: Path
    workers: dict[str, WorkerProc]
