"""The worker: serves one layer range of a model over libp2p streams and announces it on the DHT.

Start-up: unlock the identity, start the DHT daemon with the node's libp2p key, pick the range
(given, or ``auto`` from the swarm's announcements), load and verify the shards, profile, sign an
attestation report, accept streams, announce; then print one ``DLIS_NODE_READY {json}`` line.
Steps are pushed: a stage forwards its output straight to the next peer of the session's route
and the last stage sends the sampled tokens to the session's caller (``reply_to``).

Every call is committed to: at close, with its receipt, the stage signs a fingerprint of the
activations of the session (the rows it sent; at the last stage the hidden states its head read),
and it answers ``fingerprint_check`` requests for other stages' calls (:mod:`.call_checks`).

Why one module of this size: every handler (open, step, close, receipts, batch_receipt, transcript) reads and
changes the same live state of one worker (its sessions, the compute queue and batch, the peers
that opened sessions, the signing key); the stage runtime is :mod:`dlis_market.inference.stage`,
sessions :mod:`.sessions`, receipts :mod:`.receipts`, transcripts :mod:`.transcripts`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from eth_utils import keccak

from dlis_market.chain.job_market import market_domain
from dlis_market.errors import DlisError
from dlis_market.inference.errors import ContextLengthError, SessionError, ZkStageError
from dlis_market.inference.fingerprint_check import FingerprintRecorder
from dlis_market.inference.manifest import MANIFEST_NAME, load_manifest, sha256_file
from dlis_market.inference.messages import StageInput, StageOutput, decode, encode, split_input
from dlis_market.inference.stage import SampledOutput, Stage
from dlis_market.inference.zk_stage import head_circuit, head_unsupported, prove_stage
from dlis_market.lifetime import IdentityLock, freeze_startup_heap, start_reaper
from dlis_market.node import attestation, byzantine, call_checks, dht_records, identity, profiler, receipts
from dlis_market.node.adapters import WorkerAdapters
from dlis_market.node.brokers import BrokerCheck
from dlis_market.node.errors import CapacityError, NodeError, ProtocolError, ZkUnsupportedError
from dlis_market.node.metrics import WorkerMetrics, kv_capacity_bytes
from dlis_market.node.model_identity import registered_model, resolve_model_id
from dlis_market.node.protocol import (
    SUPPORTED_SAMPLING,
    BatchReceiptBody,
    Channel,
    CloseBody,
    FailBody,
    OpenAnswer,
    OpenBody,
    ReceiptsBody,
    SamplingUnsupportedError,
    StepBody,
    WireLogprob,
    parse_body,
)
from dlis_market.node.routing import choose_range
from dlis_market.node.sessions import (
    LATE_RETRY_CYCLES,
    MERGE_CYCLES,
    RELAY_WAIT_S,
    Batch,
    QueuedStep,
    WorkerSession,
    plan_batches,
    row_bytes,
)
from dlis_market.node.shared_layers import ShareCloseBody, SharedProjections, ShareLinearBody
from dlis_market.node.telemetry import TelemetryRecorder, WorkerTelemetry
from dlis_market.node.transcripts import Transcript, TranscriptRequest, TranscriptStore
from dlis_market.node.transport import ChannelPool, start_dht
from dlis_market.protocol import tickets
from dlis_market.protocol.adapters import AdapterRef, split_model
from dlis_market.protocol.errors import FingerprintError, TicketError
from dlis_market.protocol.outbox import Outbox, sqlite_url
from dlis_market.protocol.spans import SpanRecord
from dlis_market.protocol.zk_claims import sign_stage_proof
from dlis_market.settings import Settings
from dlis_market.types import ZERO_ADDRESS, LayerRange

log = logging.getLogger(__name__)
READY_PREFIX = "DLIS_NODE_READY "
# printed as soon as the DHT listens, before the stage loads: peers may bootstrap from it from then on
JOINED_PREFIX = "DLIS_NODE_JOINED "


@dataclass
class WorkerConfig:
    shard_dir: Path
    identity_dir: Path
    password: str
    settings: Settings
    layers: LayerRange | None = None  # None: choose automatically
    reprofile: bool = False
    key_name: str = identity.SIGNING_KEY_NAME  # signing key in settings.keystore_dir
    device: str | None = None  # auto|cpu|cuda for the stage; None: settings.node.device
    # called with {"peer_id", "maddrs", "node_address"} once the DHT listens (before the stage loads)
    on_joined: Callable[[dict[str, Any]], None] | None = None


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.settings = config.settings
        self.node = config.settings.node
        self.sessions: dict[str, WorkerSession] = {}
        self.queue: asyncio.Queue[QueuedStep] = asyncio.Queue()
        self.stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.domain = market_domain(self.node.chain_id, self.node.market_address)
        self.live_transcripts: dict[str, Transcript] = {}  # open sessions
        self.unclaimed = receipts.UnclaimedReceipts(self.node.unclaimed_receipts, self.node.unclaimed_receipt_s)
        # every receipt signed, by leaf: a batch root is signed over these only (batch_receipt op)
        self.signed = receipts.SignedReceipts(self.node.signed_receipts, self.node.signed_receipt_s)
        self.lock = IdentityLock(config.identity_dir)
        self.transcripts = TranscriptStore(
            self.node.transcript_retain_bytes, self.node.transcript_retain_s, self.node.transcript_bytes_per_opener
        )
        self.brokers = BrokerCheck(config.settings)
        self.registry = attestation.registry_domain(self.node.chain_id, self.node.registry_address)
        self.started_at = time.time()
        # one forward at a time on the stage: the compute loop's passes and the prefills of
        # fingerprint checks (the last stage's recorder must see only its sessions' passes)
        self.compute = asyncio.Lock()
        self.recorder: FingerprintRecorder | None = None
        # sessions waited for in vain (_gather): not waited for again until they run in step with others
        self._late: set[str] = set()
        self._late_at: dict[str, float] = {}  # when each was found late (node.merge_groups retries them)
        # node.merge_groups: when each session's last one-token step arrived, and the time one takes
        # to come round the pipeline (a moving average over every session's steps)
        self._arrived: dict[str, float] = {}
        self._cycle_s: float | None = None

    # ------------------------------------------------------------------ start / stop

    def _maddrs(self) -> list[str]:
        return [str(m) for m in self.dht.get_visible_maddrs()]

    async def start(self) -> dict[str, Any]:
        if self.settings.inference.threads:
            torch.set_num_threads(self.settings.inference.threads)
        self.lock.acquire()  # before anything else: a second process on this identity stops here
        scrypt_n = self.settings.chain.keystore_scrypt_n
        self.identity = identity.load_or_create(
            self.config.identity_dir,
            self.config.password,
            scrypt_n,
            keystore_dir=self.settings.keystore_dir,
            key_name=self.config.key_name,
        )
        manifest = load_manifest(self.config.shard_dir)
        log.info("worker %s: joining the DHT on %s:%d", self.identity.address, self.node.host, self.node.port)
        manifest_sha = sha256_file(self.config.shard_dir / MANIFEST_NAME)
        self.served_id = await asyncio.to_thread(resolve_model_id, self.settings, manifest.model_name, manifest_sha)
        self.validator = dht_records.owner_validator(self.identity.p2p_key)  # owns our DHT subkey
        with self.identity.key_file() as key_path:
            self.dht = await asyncio.to_thread(
                start_dht,
                self.node.initial_peers,
                client_mode=False,
                identity_path=key_path,
                host_maddrs=[f"/ip4/{self.node.host}/tcp/{self.node.port}"],
                validator=self.validator,
            )
        self.p2p = await self.dht.replicate_p2p()
        self.peer_id = self.p2p.peer_id.to_base58()
        if self.config.on_joined is not None:
            self.config.on_joined(
                {"peer_id": self.peer_id, "maddrs": self._maddrs(), "node_address": self.identity.address}
            )
        layers = self.config.layers
        if layers is None:
            spans = await asyncio.to_thread(dht_records.fetch_spans, self.dht, manifest.model_name, self.registry)
            layers = choose_range(spans, [s.layers for s in manifest.stages])
        device = self.config.device or self.node.device
        log.info("loading %s layers %s on %s from %s", manifest.model_name, layers, device, self.config.shard_dir)
        self.stage = await asyncio.to_thread(
            Stage.load, self.config.shard_dir, layers, None, self.settings.inference, device
        )
        log.info("measuring this stage's throughput (kept in %s; --reprofile measures again)", self.config.identity_dir)
        self.profile = await asyncio.to_thread(
            profiler.cached_profile, self.config.identity_dir, self.stage, self.config.reprofile
        )
        has_chain = int(self.node.registry_address, 16) != 0
        self.adapters = WorkerAdapters(
            self.settings, self.stage, manifest_sha, (lambda mid: registered_model(self.settings, mid)) if has_chain
            else None, lambda aid: any(s.adapter_id == aid for s in self.sessions.values()),
        )  # fmt: skip
        if self.stage.is_last:  # commits to the hidden states its head reads (it sends tokens); after profiling
            self.recorder = FingerprintRecorder(self.stage)
        # a client's private layers on secret shares, billed per (job, caller) at this node's price
        self.shared = SharedProjections(
            self.stage,
            lambda job_id, broker: receipts.ReceiptLedger(
                job_id, self.served_id.model_id, self.stage.layers.start, self.stage.layers.end,
                self.node.price_per_token, broker=broker,
            ),
        )  # fmt: skip
        entry = self.stage.entry
        report = attestation.AttestationReport(
            peer_id=self.peer_id,
            node_address=self.identity.address,
            code_hash=attestation.code_hash(),
            model=manifest.model_name,
            start=layers.start,
            end=layers.end,
            shards={entry.file.path: entry.file.sha256, manifest.config_file.path: manifest.config_file.sha256},
            hardware=self.profile,
            timestamp=int(time.time()),
        )
        self.attestation = attestation.sign_report(bytes(self.identity.account.key), self.registry, report)
        if self.brokers.open_mode:
            log.warning(
                "no JobMarket address and no trusted brokers: this worker opens sessions on any validly signed "
                "ticket; pass --market (and DLIS_CHAIN__RPC_URL) to serve only the market's brokers"
            )
        self.pool = ChannelPool(self.p2p, self._on_message, self.node.max_message_bytes)
        self.pool.gone_peer_callbacks.append(self._opener_gone)
        await self.pool.serve()
        self._tasks = [asyncio.create_task(self._compute_loop()), asyncio.create_task(self._announce_loop())]
        metrics_url = self._start_metrics()
        self.telemetry = self._telemetry()  # signed reports: DHT + oracle (node/telemetry.py)
        self._tasks.append(asyncio.create_task(self.telemetry.run(self.stop)))
        return {
            "peer_id": self.peer_id,
            "maddrs": self._maddrs(),
            "model": manifest.model_name,
            "model_id": "0x" + self.served_id.model_id.hex(),
            "publisher": self.served_id.publisher,
            "start": layers.start,
            "end": layers.end,
            "node_address": self.identity.address,
            "attestation_hash": "0x" + report.report_hash().hex(),
            "throughput": self.profile.throughput(layers.size),
            "metrics_url": metrics_url,
        }

    def _start_metrics(self) -> str | None:
        inf = self.settings.inference
        dtype_bytes = 4 if self.stage.dtype == "fp32" else 2
        self.metrics = WorkerMetrics(
            kv_used=lambda: float(self.stage.sessions.cache_bytes()),
            kv_capacity=kv_capacity_bytes(
                self.stage.stage_config, self.stage.layers.size, inf.max_sessions, inf.max_session_tokens, dtype_bytes
            ),
            sessions=lambda: float(len(self.stage.sessions)),
        )
        if self.node.metrics_port is None:
            return None
        port = self.metrics.serve(self.node.host, self.node.metrics_port)
        return f"http://{self.node.host}:{port}/metrics"

    def advertised_throughput(self) -> float:
        measured = self.profile.throughput(self.stage.layers.size)
        return measured * byzantine.OVERSTATE if self.node.byzantine > 0 else measured

    def record(self) -> SpanRecord:
        return SpanRecord(
            model=self.stage.manifest.model_name,
            start=self.stage.layers.start,
            end=self.stage.layers.end,
            peer_id=self.peer_id,
            node_address=self.identity.address,
            throughput=self.advertised_throughput(),
            # share work (a private job's first stage) holds no KV slot, but is load routers must see
            free_slots=max(0, self.stage.sessions.max_sessions - len(self.stage.sessions) - self.shared.active()),
            opener_slots=min(self.node.max_sessions_per_opener, self.stage.sessions.max_sessions),
            queue_length=self.queue.qsize(),
            price_per_token=self.node.price_per_token,
            attestation_hash="0x" + self.attestation.report.report_hash().hex(),
            started_at=self.started_at,
        )

    def _announce(self, record: SpanRecord, withdraw: bool = False) -> bool:
        do = dht_records.withdraw if withdraw else dht_records.announce
        key = bytes(self.identity.account.key)
        return do(self.dht, record, self.node.announce_ttl_s, key, self.registry, self.validator)

    async def _announce_loop(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(Exception):  # a metric only; the daemon may be busy or restarting
                self.metrics.dht_peers.set(len(await self.p2p.list_peers()))
            ok = await asyncio.to_thread(self._announce, self.record())
            if not ok:
                log.warning(
                    "announcing %s on the DHT failed; retrying in %.0fs", self.stage.layers, self.node.announce_every_s
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), self.node.announce_every_s)

    async def shutdown(self) -> None:
        self.stop.set()
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(DlisError, OSError, RuntimeError):  # best effort: the TTL expires it anyway
            await asyncio.to_thread(self._announce, self.record(), True)
        await self.pool.close()
        await asyncio.to_thread(self.dht.shutdown)
        self.lock.release()

    # ------------------------------------------------------------------ requests

    async def _on_message(self, channel: Channel, op: str, rid: int, body: dict[str, Any]) -> None:
        try:
            if op == "step":
                self._enqueue(channel, parse_body(StepBody, body))
                return
            if op == "open":
                answer = await self._open(channel.peer, parse_body(OpenBody, body))
            elif op == "close":
                answer = await self._close(channel.peer, parse_body(CloseBody, body))
            elif op == "receipts":
                job = parse_body(ReceiptsBody, body).job_id
                answer = {"receipts": self.unclaimed.get(job), "node_address": self.identity.address}
            elif op == "batch_receipt":
                batch = parse_body(BatchReceiptBody, body)
                answer = receipts.sign_batch(
                    self.signed, bytes(self.identity.account.key), self.domain, self.identity.address,
                    batch.broker, batch.batch_id, batch.receipts,
                )  # fmt: skip
            elif op == "transcript":
                req = parse_body(TranscriptRequest, body)
                answer = self.transcripts.get(req.session_id, channel.peer).to_wire()
            elif op == "share_linear":
                answer = await self._share_linear(channel.peer, parse_body(ShareLinearBody, body))
            elif op == "share_close":
                job_id = parse_body(ShareCloseBody, body).job_id
                async with self.compute:  # after any share_linear of the caller's still computing
                    ledger = self.shared.close(job_id, channel.peer)
                answer = {"receipt": receipts.to_wire(self._sign(ledger)), "node_address": self.identity.address}
            elif op == "fingerprint_check":
                answer = await self._fingerprint_check(channel.peer, parse_body(call_checks.FingerprintCheckBody, body))
            elif op == "info":
                answer = {"attestation": self.attestation.model_dump(), "record": self.record().model_dump()}
            elif op == "error":
                log.info("peer %s reported: %s", channel.peer, body.get("message"))
                return
            else:
                raise ProtocolError(f"op {op!r} is not served by a stage")
        except DlisError as exc:
            code = "protocol" if isinstance(exc, ProtocolError) else type(exc).__name__
            await channel.send("error", {"message": str(exc), "code": code}, rid)
            return
        if rid:
            try:
                await channel.send("reply", answer, rid)
            except ProtocolError as exc:  # e.g. a transcript over the frame limit: say so, keep the stream
                await channel.send("error", {"message": str(exc), "code": "too_large"}, rid)

    async def _check_ticket(self, sender: str, ticket: dict[str, Any] | None, job_id: bytes) -> str:
        """The broker that signed a current ticket for exactly this job on this stage; TicketError otherwise."""
        served = self.stage.layers
        signer = tickets.check_ticket(
            self.domain, tickets.parse_ticket(ticket), job_id=job_id, model=self.stage.manifest.model_name,
            start=served.start, end=served.end, min_price=self.node.price_per_token, opener=sender,
        )  # fmt: skip
        known = self.brokers.cached(signer)
        if known is None:
            known = await asyncio.to_thread(self.brokers.is_broker, signer)
        if not known:
            raise TicketError(
                f"session ticket is signed by {signer}, which holds no BROKER_ROLE on JobMarket "
                f"{self.node.market_address}; sessions are opened by the market's brokers only"
            )
        return signer

    def _check_served(self, model: str, start: int, end: int, job_id: bytes) -> None:
        served = self.stage.layers
        if model != self.stage.manifest.model_name or (start, end) != (served.start, served.end):
            raise NodeError(
                f"this node serves {self.stage.manifest.model_name!r} layers {served}, not {model!r} "
                f"[{start}, {end}); its DHT record is stale or forged, route around it"
            )
        if len(job_id) != 32:
            raise ProtocolError(f"job id must be 32 bytes, got {len(job_id)}")

    async def _open(self, sender: str, req: OpenBody) -> dict[str, Any]:
        served = self.stage.layers
        self._check_served(req.model, req.start, req.end, req.job_id)
        if (req.next_peer is None) != self.stage.is_last:
            raise NodeError(f"stage {served} {'is' if self.stage.is_last else 'is not'} the last stage of the model")
        broker = await self._check_ticket(sender, req.ticket, req.job_id)
        if req.proof == "zk":
            why = "not the last stage" if not self.stage.is_last else None
            why = why or head_unsupported(self.stage.manifest, self.settings.zk.max_head_params)
            if why is not None:
                raise ZkUnsupportedError(f"no proof of this stage's calls: {why}")
        adapter = await self._adapter(req.adapter)
        # checked after the (possibly awaited) ticket check, with no await until the session is in
        if req.session_id in self.sessions or req.session_id in self.transcripts:
            # a reused id would replace the kept transcript of the first session (its opener's data)
            raise NodeError(f"session id {req.session_id!r} is in use or was used recently; open with a fresh id")
        mine = sum(1 for s in self.sessions.values() if s.opened_by == sender)
        if mine >= self.node.max_sessions_per_opener:
            raise CapacityError(
                f"peer {sender} already holds {mine} sessions here, the limit per opener; close one first"
            )
        sampling = req.sampling()  # SamplingUnsupportedError: the opener routes around, no fault of ours
        try:
            self.stage.check_sampling(sampling)
        except SessionError as exc:  # e.g. a logit_bias id outside this model's vocabulary
            raise SamplingUnsupportedError(str(exc)) from exc
        held = len(self.stage.sessions)
        if held >= self.stage.sessions.max_sessions:
            raise CapacityError(
                f"stage already holds {held} sessions (limit {self.stage.sessions.max_sessions}); route elsewhere "
                "or retry when one closes"
            )
        try:
            self.stage.open_session(
                req.session_id, req.max_length, sampling, adapter.adapter_id if adapter is not None else None
            )
        except ContextLengthError as exc:  # the job does not fit this stage: not the stage's fault
            raise CapacityError(str(exc)) from exc
        # an adapter's receipts name its own model id (the job is authorized and settled under it)
        model_id = adapter.model_id if adapter is not None else self.served_id.model_id
        ledger = receipts.ReceiptLedger(
            req.job_id, model_id, served.start, served.end, self.node.price_per_token, broker=broker
        )
        self.sessions[req.session_id] = WorkerSession(
            req.session_id, req.reply_to, req.next_peer, sender, ledger,
            adapter_id=adapter.adapter_id if adapter is not None else None,
            head_rows=[] if req.proof == "zk" else None,
        )  # fmt: skip
        self.live_transcripts[req.session_id] = Transcript(req.session_id, req.job_id, sender)
        # The sampling features this worker applies (the last stage's); a driver refuses a worker
        # whose answer lacks one its job needs instead of silently serving without it.
        return OpenAnswer(session_id=req.session_id, sampling=SUPPORTED_SAMPLING).model_dump()

    async def _adapter(self, raw: dict[str, Any] | None) -> AdapterRef | None:
        """The session's adapter, attached (fetched and checked on first use); None: the base model."""
        if raw is None:
            return None
        ref = parse_body(AdapterRef, raw)
        base, _ = split_model(ref.name)
        if base != self.stage.manifest.model_name:
            raise NodeError(f"adapter {ref.name} is over {base!r}; this node serves {self.stage.manifest.model_name!r}")
        await self.adapters.ensure(ref, self.compute)
        return ref

    def _drop_session(self, sid: str) -> None:
        """Forget a session nobody will close (abandoned, failed): no transcript; if it served
        tokens, its receipt is signed and kept for a restarted broker to claim (``receipts``)."""
        self.stage.close_session(sid)
        dropped = self.sessions.pop(sid, None)
        self.live_transcripts.pop(sid, None)
        if dropped is not None:
            self.telemetry.recorder.on_session_closed(dropped.ledger.job_id, False, dropped.ledger.tokens)
            if dropped.ledger.tokens > 0:
                self.unclaimed.put(self._sign(dropped.ledger))

    def _opener_gone(self, peer: str) -> None:
        """The opener's stream ended (it closed or died): free its sessions' slots now, not after
        ``session_idle_s``; a live driver keeps its stream open for all its sessions."""
        gone = [sid for sid, s in self.sessions.items() if s.opened_by == peer]
        for sid in gone:
            self._drop_session(sid)
        shared = self.shared.close_all(peer)  # its private jobs' share work: signed and kept as well
        for ledger in shared:
            self.unclaimed.put(self._sign(ledger))
        if gone or shared:
            log.info(
                "peer %s went away: closed its %d open sessions and %d jobs of shares", peer, len(gone), len(shared)
            )

    async def _close(self, sender: str, req: CloseBody) -> dict[str, Any]:
        session = self.sessions.get(req.session_id)
        if session is None:
            raise NodeError(f"session {req.session_id!r} is not open on this node (closed, expired or never opened)")
        if session.opened_by != sender:
            raise NodeError(f"session {req.session_id!r} was opened by another peer; only it may close it")
        del self.sessions[req.session_id]
        self.stage.close_session(req.session_id)
        transcript = self.live_transcripts.pop(req.session_id, None)
        if transcript is not None and not self.transcripts.put(transcript):
            log.info("transcript of %s (%d bytes) not kept: over the per-opener or store budget",
                     req.session_id, transcript.nbytes)  # fmt: skip
        self.telemetry.recorder.on_session_closed(session.ledger.job_id, True, session.ledger.tokens)
        signed = self._sign(session.ledger)
        answer = {"receipt": receipts.to_wire(signed), "node_address": self.identity.address}
        if session.ledger.tokens:  # the call's commitment: what a fingerprint check validates
            fingerprint = session.fingerprint.finish().to_bytes()
            key = bytes(self.identity.account.key)
            answer |= receipts.commit(key, self.domain, signed.receipt, fingerprint).to_wire()
        if session.head_rows:
            answer |= await self._prove(signed.receipt, session.head_rows)
        return answer

    async def _prove(self, receipt: receipts.Receipt, head_rows: list[torch.Tensor]) -> dict[str, Any]:
        """A zk session's proof of its head: the row each token was sampled from (the last of each
        step) through the final norm + LM head, signed for the receipt; with every row the head
        read (what the fingerprint commits to), so a verifier can tie the proof to the commitment.
        The circuit's setup traces the stage's own head modules: under the compute lock, never
        beside a forward pass; proving (EZKL alone) runs beside the stage's work."""
        rows = torch.cat(head_rows).float()
        x = torch.stack([step[-1] for step in head_rows]).float()
        zk = self.settings.zk
        began = time.perf_counter()
        try:
            async with self.compute:
                circuit = await asyncio.to_thread(
                    head_circuit, self.stage.model, x.shape[0], self.settings.zk_cache_dir, zk.srs_dir
                )
            proof = await asyncio.to_thread(prove_stage, circuit, x, False)
        except ZkStageError as exc:  # no proof: the opener's job fails, nothing is forged
            log.warning("could not prove the head of a zk session: %s", exc)
            return {"proof_error": str(exc)[:500]}
        vk_hash = bytes(keccak(circuit.vk_path.read_bytes()))
        signature = sign_stage_proof(bytes(self.identity.account.key), self.domain, receipt, proof.proof, vk_hash)
        return {
            "proof": proof.proof, "proof_signature": signature, "proof_rows": rows.numpy().tobytes(),
            "prove_ms": round((time.perf_counter() - began) * 1000),
        }  # fmt: skip

    async def _share_linear(self, sender: str, req: ShareLinearBody) -> dict[str, Any]:
        """One projection of a client's private layer on one share of its activations (a ticket
        of the job on this range, as for a session; node/shared_layers.py)."""
        self._check_served(req.model, req.start, req.end, req.job_id)
        broker = await self._check_ticket(sender, req.ticket, req.job_id)
        async with self.compute:
            try:
                return await asyncio.to_thread(self.shared.apply, req, sender, broker)
            except DlisError:
                raise
            except Exception as exc:  # answered as an error: the caller's stream and sessions stay
                raise ProtocolError(f"share_linear failed here: {type(exc).__name__}: {exc}") from exc

    async def _fingerprint_check(self, sender: str, req: call_checks.FingerprintCheckBody) -> dict[str, Any]:
        """Validate another stage's call of a job from its fingerprint with one prefill (a spot
        check's cheap first look, asked by a broker holding a ticket for the job on this range)."""
        self._check_served(req.model, req.start, req.end, req.job_id)
        await self._check_ticket(sender, req.ticket, req.job_id)
        adapter = await self._adapter(req.adapter)
        applied = self.adapters.applied(adapter.adapter_id if adapter is not None else None)
        max_tokens = self.stage.sessions.token_limit
        args = (self.stage, self.recorder, req, self.node.max_message_bytes, max_tokens, applied)
        try:
            async with self.compute:
                check = await asyncio.to_thread(call_checks.run_check, *args)
        except FingerprintError as exc:  # bytes that are no fingerprint of this call: the runner's to judge
            raise ProtocolError(f"fingerprint check: {exc}") from exc
        return call_checks.FingerprintCheckAnswer.of(check, self.identity.address).model_dump()

    def _sign(self, ledger: receipts.ReceiptLedger) -> receipts.SignedReceipt:
        """Sign a session's receipt and keep its leaf, for the broker that opened it to settle it
        under a batch root (``batch_receipt``)."""
        signed = receipts.sign(ledger, bytes(self.identity.account.key), self.domain)
        if ledger.broker is not None:
            self.signed.put(signed, ledger.broker)
        return signed

    def _forward(self, inp: StageInput) -> tuple[StageOutput, list[tuple[str, torch.Tensor]]]:
        """One pass of the stage and, at the last stage, each session's rows its head read."""
        try:
            out = self.stage.forward(inp)
        except BaseException:
            if self.recorder is not None:
                self.recorder.abandon(inp)
            raise
        return out, self.recorder.rows(inp) if self.recorder is not None else []

    def _enqueue(self, channel: Channel, req: StepBody) -> None:
        msg = decode(req.input, self.node.max_message_bytes)
        if not isinstance(msg, StageInput):
            raise ProtocolError("a step must carry a stage input, not an output")

        def on_error(text: str) -> None:
            self._spawn(channel.send("error", {"message": text, "code": "step"}))

        # A previous stage sends the rows of a whole pass in one message (_deliver); each session
        # queues alone, so that one closed or misplaced session is refused without the others.
        if self.node.merge_groups and self.stage.is_first and msg.num_tokens == 1:
            self._note_cycle(msg.session_ids)
        for one in split_input(msg):
            self.queue.put_nowait(QueuedStep(one, req.reply_to, channel.peer, on_error))

    def _note_cycle(self, session_ids: Sequence[str], now: float | None = None) -> None:
        """Measure the pipeline's cycle at the first stage: the time between two one-token steps of
        a session is one trip round the pipeline and its caller (moving average, weight 0.2)."""
        now = time.monotonic() if now is None else now
        if len(self._arrived) > 2 * len(self.sessions) + 8:  # forget closed sessions
            self._arrived = {sid: t for sid, t in self._arrived.items() if sid in self.sessions}
        for sid in session_ids:
            last = self._arrived.get(sid)
            self._arrived[sid] = now
            if last is not None:
                cycle = now - last
                self._cycle_s = cycle if self._cycle_s is None else 0.8 * self._cycle_s + 0.2 * cycle

    def _telemetry(self) -> WorkerTelemetry:
        """This worker's signed telemetry: what it serves and measured, to the DHT and, when an
        oracle and a ReputationOracle are configured, through an outbox in its identity folder."""
        node, stage, profile = self.node, self.stage, self.profile
        recorder = TelemetryRecorder(
            served=stage.layers,
            advertised_tps=profile.throughput(stage.layers.size),
            free_kv_slots=lambda: stage.sessions.max_sessions - len(stage.sessions),
            gflops=profile.gemm_flops / 1e9,
            memory_mib=profile.free_memory >> 20,
        )
        box = self.settings.outbox
        outbox = None
        if node.oracle_url and node.reputation_address.lower() != ZERO_ADDRESS:
            url = node.outbox_url or sqlite_url(self.config.identity_dir / "outbox.db")
            outbox = Outbox.from_settings(url, box)
        return WorkerTelemetry(
            recorder,
            node_key=bytes(self.identity.account.key),
            node_address=self.identity.address,
            chain_id=node.chain_id,
            reputation_address=node.reputation_address,
            dht=self.dht,
            interval_s=node.telemetry_interval_s,
            oracle_url=node.oracle_url,
            outbox=outbox,
            keep_unsent=box.telemetry_keep,
            post_timeout_s=box.timeout_s,
        )

    # ------------------------------------------------------------------ compute

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(self._quiet(coro))
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    @staticmethod
    async def _quiet(coro: Any) -> None:
        try:
            await coro
        except NodeError as exc:  # a peer went away while we answered it: its caller reroutes
            log.info("could not deliver a message: %s", exc)

    def _check(self, inp: StageInput) -> None:
        for sid in inp.session_ids:
            if sid not in self.sessions:
                raise NodeError(f"session {sid!r} is not open on this node; open it and replay its tokens")
        self.stage.check_input(inp)  # the stage's own validation, without side effects

    async def _compute_loop(self) -> None:
        pending: deque[QueuedStep] = deque()
        expiry_every = max(1.0, min(self.node.session_idle_s / 4, 10.0))
        last_expiry = time.monotonic()
        while True:
            if not pending:
                with contextlib.suppress(TimeoutError):
                    pending.append(await asyncio.wait_for(self.queue.get(), expiry_every))
            while not self.queue.empty():
                pending.append(self.queue.get_nowait())
            if pending:
                await self._gather(pending)
            if time.monotonic() - last_expiry >= expiry_every:
                last_expiry = time.monotonic()
                for sid in self.stage.sessions.evict_idle(self.node.session_idle_s):
                    dropped = self.sessions.pop(sid, None)
                    self.live_transcripts.pop(sid, None)
                    if dropped is not None:  # never closed by its opener: an abandoned or failed session
                        ledger = dropped.ledger
                        self.telemetry.recorder.on_session_closed(ledger.job_id, False, ledger.tokens)
            if not pending:
                continue
            batches, refused, deferred = plan_batches(list(pending), self._check, self.node.max_batch_sessions)
            pending = deque(deferred)
            for step, reason in refused:
                self._report(step, list(step.inp.session_ids), reason, self.peer_id)
            for batch in batches:
                await self._run(batch)

    def _awaited(self, queued: set[str]) -> set[str]:
        """Open sessions whose next step is due here and not queued: prefilled (a prompt runs in a
        pass of its own token count anyway), not at their last position (the driver feeds every
        token but the last, so such a session sends no more steps), and not late."""
        if len(self._late) > len(self.sessions):  # forget closed sessions
            self._late &= self.sessions.keys()
        if self.node.merge_groups and self.stage.is_first and self._cycle_s and self._late:
            stale = time.monotonic() - LATE_RETRY_CYCLES * self._cycle_s
            self._late -= {sid for sid in self._late if self._late_at.get(sid, 0.0) < stale}
            self._late_at = {sid: t for sid, t in self._late_at.items() if sid in self._late}
        store = self.stage.sessions
        due = set()
        for sid in self.sessions:
            if sid in queued or sid in self._late or sid not in store:
                continue
            session = store.get(sid)
            if 0 < session.length < session.max_length - 1:
                due.add(sid)
        return due

    async def _gather(self, pending: deque[QueuedStep]) -> None:
        """Wait for the steps of open sessions that are due here, so that sessions at different
        positions run in one forward pass (continuous batching across the pipeline).

        The first stage waits up to ``node.batch_wait_ms``: the driver pushes each session's step
        on its own, and sessions that started apart (prompts of other lengths prefill in passes of
        their own) come round as separate groups; waiting for the other group, when it comes
        within the wait, merges them for the rest of the generation, and on 2 shared cores a pass
        of 8 rows costs far less than two of 4. Later stages get a pass's rows in one message
        (:meth:`_deliver`), so they wait at most ``RELAY_WAIT_S`` for jitter: a long wait there,
        while the first stage holds back the group this stage waits for, would stall both. A
        session waited for in vain is late: not waited for again until it runs in one pass with
        sessions that are not (a slow caller costs one wait, not one per step); with
        ``node.merge_groups``, the first stage waits for it again ``LATE_RETRY_CYCLES`` cycles later.

        With ``node.merge_groups`` the first stage waits, for a decode step, up to ``MERGE_CYCLES``
        times the measured cycle (:meth:`_note_cycle`; at least ``batch_wait_ms``, at most
        ``merge_wait_max_ms``): every group of sessions comes round within one cycle, so all of
        them merge into one pass and then travel together. That is what stages sharing a machine's
        cores want: a pass of 8 rows costs little more than one of 3, and the cores are not split
        between three small passes at once."""
        wait_s = self.node.batch_wait_ms / 1000
        if not self.stage.is_first:
            wait_s = min(wait_s, RELAY_WAIT_S)
        elif self.node.merge_groups and self._cycle_s and any(step.inp.num_tokens == 1 for step in pending):
            # every group of sessions that travels the pipeline apart comes round within one cycle
            wait_s = max(wait_s, min(MERGE_CYCLES * self._cycle_s, self.node.merge_wait_max_ms / 1000))
        if wait_s <= 0:
            return
        deadline = time.monotonic() + wait_s
        queued = {sid for step in pending for sid in step.inp.session_ids}
        while len(queued) < self.node.max_batch_sessions and (due := self._awaited(queued)):
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError
                step = await asyncio.wait_for(self.queue.get(), left)
            except TimeoutError:
                self._late |= due
                if self.node.merge_groups:  # retried (_awaited); otherwise no time is needed
                    now = time.monotonic()
                    self._late_at.update((sid, now) for sid in due)
                return
            pending.append(step)
            queued.update(step.inp.session_ids)

    async def _run(self, batch: Batch) -> None:
        inp = batch.merged()
        if not self._late.issuperset(inp.session_ids):  # back in step with the others
            self._late.difference_update(inp.session_ids)
        phase = "prefill" if inp.num_tokens > 1 else "decode"  # tokens per session in this pass
        began = time.perf_counter()
        try:
            with self.metrics.step_seconds.labels(phase).time():
                async with self.compute:
                    out, head_rows = await asyncio.to_thread(self._forward, inp)
        except DlisError as exc:  # the stage closed those sessions; their callers reopen and replay
            for step in batch.steps:
                self._report(step, list(step.inp.session_ids), str(exc), self.peer_id)
            for sid in inp.session_ids:  # nobody will close them here: forget them now
                dropped = self.sessions.pop(sid, None)
                self.live_transcripts.pop(sid, None)
                if dropped is not None:
                    self.telemetry.recorder.on_session_closed(dropped.ledger.job_id, False, dropped.ledger.tokens)
            return
        self.telemetry.recorder.on_step(phase, inp.num_tokens * len(inp.session_ids), time.perf_counter() - began)
        computed = out
        if self.node.byzantine > 0:  # TEST ONLY (node/byzantine.py)
            out = byzantine.corrupt(out, self.node.byzantine, int(self.stage.config.vocab_size))
        # what each session's fingerprint commits to: the rows sent (the head's inputs at the last stage)
        committed = computed if self.node.byzantine_commits_computed else out
        for sid, head_in in head_rows:
            if (session := self.sessions.get(sid)) is not None:
                session.fingerprint.add(head_in)
                if session.head_rows is not None:
                    session.head_rows.append(head_in)
        for i, sid in enumerate(inp.session_ids):
            transcript = self.live_transcripts.get(sid)
            if transcript is not None:
                transcript.record(inp, i)
        rows = {sid: i for i, sid in enumerate(out.session_ids)}
        data = out.hidden if out.hidden is not None else out.token_ids
        for step in batch.steps:
            for sid in step.inp.session_ids:
                session = self.sessions.get(sid)
                if session is not None and data is not None:  # None: closed while it ran
                    session.ledger.record(step.inp.num_tokens, row_bytes(data[rows[sid]]))
                    if committed.hidden is not None:
                        session.fingerprint.add(committed.hidden[rows[sid]])
        self._spawn(self._deliver(batch.steps, out, rows))

    async def _deliver(self, steps: list[QueuedStep], out: StageOutput, rows: dict[str, int]) -> None:
        """Send a pass's outputs on, one message per destination (next stage or caller) rather
        than one per session: each message costs both ends' event loops and p2pd a round of work,
        and the next stage gets the pass's rows at once instead of waiting for them."""
        to: dict[tuple[str, str, bool], list[tuple[QueuedStep, int]]] = {}
        for step in steps:
            for sid in step.inp.session_ids:
                dest = step.reply_to
                if out.token_ids is None:
                    session = self.sessions.get(sid)
                    if session is None:
                        continue  # closed while it ran: nobody waits for it
                    dest = session.next_peer or step.reply_to
                to.setdefault((dest, step.reply_to, step.inp.want_logits), []).append((step, rows[sid]))
        for (dest, reply_to, want_logits), members in to.items():
            idx = [i for _, i in members]
            sids = [out.session_ids[i] for i in idx]
            if out.token_ids is not None:
                body: dict[str, Any] = {
                    "sessions": sids,
                    "step": out.step,
                    "token_ids": [int(out.token_ids[i]) for i in idx],
                }
                lps = out.logprobs if isinstance(out, SampledOutput) and out.logprobs else ()
                if lps and any(lps[i] is not None for i in idx):  # only sessions that asked: older drivers never see it
                    body["logprobs"] = [
                        None if (lp := lps[i]) is None else WireLogprob.of(lp).model_dump() for i in idx
                    ]
                try:
                    await self.pool.send(dest, "tokens", body)
                except NodeError as exc:  # the caller went away: its sessions end with it; send the others'
                    log.info("could not deliver tokens to %s: %s", dest, exc)
                continue
            assert out.hidden is not None  # non-last stages always return hidden states
            nxt = StageInput(
                tuple(sids),
                tuple(out.positions[i] for i in idx),
                out.step,
                hidden=out.hidden[idx],
                want_logits=want_logits,
            )
            try:
                await self.pool.send(dest, "step", {"input": encode(nxt), "reply_to": reply_to})
            except NodeError as exc:
                reported: set[int] = set()  # each step once (QueuedStep is unhashable)
                for step, _ in members:
                    if id(step) not in reported:
                        reported.add(id(step))
                        failed = [sid for sid in step.inp.session_ids if sid in sids]
                        self._report(step, failed, f"next stage unreachable: {exc}", dest)

    def _report(self, step: QueuedStep, sids: list[str], reason: str, failed_peer: str) -> None:
        if step.on_error is not None:
            step.on_error(reason)
        body = FailBody(sessions=sids, step=step.inp.step, peer=failed_peer, message=reason).model_dump()
        self._spawn(self.pool.send(step.reply_to, "fail", body))


async def serve_forever(config: WorkerConfig) -> None:
    start_reaper()  # the DHT process and p2pd die with us, even on SIGKILL
    if config.on_joined is None:
        config.on_joined = lambda info: print(JOINED_PREFIX + json.dumps(info), flush=True)
    worker = Worker(config)
    info = await worker.start()
    freeze_startup_heap()  # the model, torch and hivemind, loaded once
    print(READY_PREFIX + json.dumps(info), flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop.set)
    await worker.stop.wait()
    await worker.shutdown()
