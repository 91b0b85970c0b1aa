"""The broker's inference backend over worker pipelines (hivemind DHT + libp2p streams).

Discovery, push-mode streaming, failover with replay and receipt verification are the pipeline
driver's; this adapter maps its spans to scheduler offers, hands it the scheduler's route, and
turns its verified receipts into the broker's records. :class:`P2PBatchSigner` asks the workers
of a settlement batch for their Merkle batch receipts over the same driver's streams.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING

from dlis_market.broker.backend import (
    BackendJob,
    BatchSignatures,
    BatchSigningRequest,
    ProofCheck,
)
from dlis_market.broker.observations import JobObserver, observe_job
from dlis_market.broker.spot_checks import FinishedSession, SpotChecker
from dlis_market.errors import BrokerError
from dlis_market.inference.sampling import TokenLogprob
from dlis_market.node import receipts
from dlis_market.node.driver import JobSession, JobSpec, PipelineDriver
from dlis_market.node.errors import NodeError
from dlis_market.node.private_entry import PrivateEntry
from dlis_market.node.protocol import BatchReceiptAnswer, parse_body
from dlis_market.protocol.receipts import StageReceipt
from dlis_market.protocol.routes import RouteHop
from dlis_market.protocol.spans import SpanRecord
from dlis_market.settings import NodeSettings

log = logging.getLogger(__name__)


if TYPE_CHECKING:
    from dlis_market.chain.node_registry import NodeRegistry


class RegisteredPeers:
    """Whether a node is registered (active) on NodeRegistry under a peer id: the check that ties a
    signed DHT announcement to the chain. Answers are cached ``ttl_s`` per node (discovery runs per job)."""

    def __init__(self, registry: NodeRegistry, ttl_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.registry = registry
        self.ttl_s = ttl_s
        self.clock = clock
        self._cache: dict[str, tuple[float, str | None, str | None]] = {}  # node -> (read at, peer, operator)

    def _read(self, node: str) -> tuple[float, str | None, str | None]:
        key = node.lower()
        hit = self._cache.get(key)
        now = self.clock()
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit
        rec = self.registry.get(node)
        peer = rec.peer_id if rec is not None and rec.active else None
        self._cache[key] = (now, peer, rec.operator if rec is not None else None)
        return self._cache[key]

    def peer_of(self, node: str) -> str | None:
        return self._read(node)[1]

    def operator_of(self, node: str) -> str | None:
        """The operator account that registered ``node`` (None: not registered)."""
        return self._read(node)[2]

    def __call__(self, node: str, peer_id: str) -> bool:
        return self.peer_of(node) == peer_id


class P2PJobStream:
    def __init__(
        self,
        driver: PipelineDriver,
        session: JobSession,
        checker: SpotChecker | None = None,
        observer: JobObserver | None = None,
        routed_tps: dict[str, float] | None = None,
        reports: set[asyncio.Task[None]] | None = None,
        check_proof: ProofCheck | None = None,
    ):
        self.driver = driver
        self.session = session
        self.checker = checker
        self.observer = observer
        self.routed_tps = routed_tps or {}
        self.first_route = list(session.route)
        self.started = time.perf_counter()
        self.check_proof = check_proof  # the service's check of a zk job's proof (None: no proof asked)
        self._reports = reports if reports is not None else set()

    def tokens(self) -> AsyncIterator[int | TokenLogprob]:
        return self._tokens()

    async def _tokens(self) -> AsyncIterator[int | TokenLogprob]:
        wants = self.session.spec.sampling.logprobs is not None
        tokens = self.session.tokens()
        try:
            async for token in tokens:  # the session keeps each token's log probability as it yields it
                yield self.session.logprobs[-1] if wants else token
        finally:
            await tokens.aclose()  # type: ignore[attr-defined]

    async def finish(self) -> tuple[list[RouteHop], list[StageReceipt]]:
        hops = list(self.session.route)
        shares = list(self.session.shares.hops) if self.session.shares is not None else []
        got = await self.session.close()
        if self.check_proof is not None:  # the answer counts only with its proof (raises otherwise)
            last = next((r for r in got if r.proof is not None), None)
            if last is None:
                raise BrokerError("the job asked for a proof and its last stage gave no valid receipt")
            await self.check_proof(last, self.session.spec.prompt_ids, self.session.generated)
        if self.checker is not None:  # receipts are signed: draw stage calls to re-execute elsewhere
            self.checker.schedule(FinishedSession.of(self.session, hops))
        if self.observer is not None:  # what each stage did, signed by us, for the oracle's reputation
            final = {h.peer_id for h in hops}
            observations = observe_job(
                self.session.spec.job_id,
                hops,
                len(self.session.generated),
                time.perf_counter() - self.started,
                failed=[h for h in self.first_route if h.peer_id not in final],
                routed_tps=self.routed_tps,
            )
            task = asyncio.create_task(self.observer.report(observations))  # never delays the job
            self._reports.add(task)
            task.add_done_callback(self._reports.discard)
        return shares + hops, got  # a private job's share workers lead its route record


class P2PBatchSigner:
    """Asks every node of a batch at once for its ``BatchReceipt`` signature (the ``batch_receipt``
    op on the driver's libp2p streams), each within ``timeout_s``. Runs the requests on the
    driver's event loop ``loop``; called from the settler's thread."""

    def __init__(self, driver: PipelineDriver, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self.driver = driver
        self.loop = loop
        self.timeout_s = timeout_s

    def sign_batches(self, broker: str, batch_id: bytes, requests: Sequence[BatchSigningRequest]) -> BatchSignatures:
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # no loop in this thread: the expected case
            running = None
        if running is self.loop:
            raise BrokerError(
                "P2PBatchSigner.sign_batches blocks until the nodes answer: call it from a worker thread "
                "(asyncio.to_thread), not from the event loop that drives the P2P streams"
            )
        fut = asyncio.run_coroutine_threadsafe(self._ask_all(broker, batch_id, requests), self.loop)
        try:
            return fut.result(self.timeout_s + 5)
        except concurrent.futures.TimeoutError:  # the loop is stalled: nobody answered in time
            fut.cancel()
            why = f"no answer within {self.timeout_s:.1f} s (the broker's event loop did not run the request)"
            return BatchSignatures({}, {r.node: why for r in requests})

    async def _ask_all(self, broker: str, batch_id: bytes, requests: Sequence[BatchSigningRequest]) -> BatchSignatures:
        answers = await asyncio.gather(*(self._ask(broker, batch_id, r) for r in requests))
        out = BatchSignatures({}, {})
        for req, (sig, why) in zip(requests, answers, strict=True):
            if sig is not None:
                out.signatures[req.node] = sig
            else:
                out.refusals[req.node] = why
        return out

    async def _ask(self, broker: str, batch_id: bytes, req: BatchSigningRequest) -> tuple[bytes | None, str]:
        if req.peer_id is None:
            return None, "no peer id on NodeRegistry: cannot be reached"
        body = {"broker": broker, "batch_id": batch_id, "receipts": [receipts.to_wire(r) for r in req.receipts]}
        try:
            raw = await asyncio.wait_for(
                self.driver.pool.request(req.peer_id, "batch_receipt", body, self.timeout_s), self.timeout_s
            )
            answer = parse_body(BatchReceiptAnswer, raw)
        except TimeoutError:
            return None, f"{req.peer_id} did not answer within {self.timeout_s:.1f} s"
        except NodeError as exc:  # unreachable, refused (RemoteError), or a malformed answer
            return None, f"{req.peer_id}: {exc}"
        if answer.node_address.lower() != req.node.lower():
            return None, f"{req.peer_id} answered for node {answer.node_address}, not {req.node}"
        return answer.signature, ""


class P2PBackend:
    def __init__(self, driver: PipelineDriver, checker: SpotChecker | None = None, observer: JobObserver | None = None):
        self.driver = driver
        self.checker = checker
        self.observer = observer
        self._throughput: dict[str, float] = {}  # peer id -> throughput of its last signed record
        self._reports: set[asyncio.Task[None]] = set()

    @classmethod
    async def connect(
        cls,
        initial_peers: Sequence[str],
        settings: NodeSettings,
        broker_key: bytes | None = None,
        node_check: Callable[[str, str], bool] | None = None,
    ) -> P2PBackend:
        """``broker_key`` signs session tickets (the BROKER_ROLE account); ``node_check`` (e.g.
        :class:`RegisteredPeers`) admits only announcements of nodes registered under their peer id."""
        return cls(await PipelineDriver.create(initial_peers, settings, broker_key, node_check))

    async def offers(self, model: str) -> list[SpanRecord]:
        spans = await self.driver.discover(model, self.driver.settings.discovery_max_age_s)
        self._throughput.update({s.peer_id: s.throughput for s in spans})
        return [s for s in spans if s.online and s.peer_id not in self.driver.banned()]

    async def start(self, job: BackendJob) -> P2PJobStream:
        private = None
        if job.private_shares:
            if job.private_shard_dir is None:
                raise BrokerError("a private job names its share workers but no folder holding its first stage")
            from dlis_market.inference.stage import Stage  # transformers: on the first private job, not at start

            stage = await asyncio.to_thread(Stage.load, job.private_shard_dir, None, 0)  # one per job: it is rewired
            check = self.driver.node_check
            operator_of = check.operator_of if isinstance(check, RegisteredPeers) else None
            private = PrivateEntry(stage, operator_of, tuple(job.private_shares), job.private_partner)
        spec = JobSpec(
            model=job.model,
            prompt_ids=list(job.prompt_ids),
            max_new_tokens=job.max_new_tokens,
            job_id=job.job_id,
            max_cost=job.max_cost,
            sampling=job.sampling,
            stop_token_ids=job.stop_token_ids,
            num_layers=job.num_layers,
            fee_bps=job.fee_bps,
            replan=job.replan,
            adapter=job.adapter,
            proof=job.proof,
            private=private,
        )
        session = JobSession(self.driver, spec)
        if job.route:
            session.route = list(job.route)
        await session.establish()
        return P2PJobStream(
            self.driver, session, self.checker, self.observer, dict(self._throughput), self._reports, job.check_proof
        )

    def batch_signer(self, timeout_s: float) -> P2PBatchSigner:
        """Merkle settlement's node-signing step over this backend's driver; build it inside the
        broker's event loop (it runs its requests there)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError as exc:
            raise BrokerError(
                "the P2P batch signer runs its requests on the broker's event loop: build the service "
                "(BrokerGraph.service) inside that loop"
            ) from exc
        return P2PBatchSigner(self.driver, loop, timeout_s)

    async def unclaimed(self, job_id: bytes, peers: Sequence[str]) -> list[StageReceipt]:
        async def ask(peer: str) -> list[StageReceipt]:
            try:
                got = await self.driver.unclaimed_receipts(peer, job_id)
            except (NodeError, ValueError) as exc:  # gone, or lying: nothing from it
                log.info("no unclaimed receipts of job %s from %s: %s", job_id.hex()[:16], peer, exc)
                return []
            return got

        # all at once: a dead peer of the old route costs one request timeout, not one each
        answers = await asyncio.gather(*(ask(p) for p in dict.fromkeys(peers)))
        return [found for answer in answers for found in answer]

    async def close(self) -> None:
        if self._reports:  # observations already handed to the outbox finish their write
            await asyncio.wait(set(self._reports), timeout=10)
        if self.checker is not None:
            await self.checker.close()
        await self.driver.close()
