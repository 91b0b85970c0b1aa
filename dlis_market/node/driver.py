"""Client-side pipeline driver: discover spans, route, open job sessions, stream tokens, fail over.

The broker uses it like this::

    driver = await PipelineDriver.create(initial_peers, settings.node)
    session = await driver.open_job(JobSpec(model="smollm2-135m", prompt_ids=ids, max_new_tokens=64,
                                            job_id=job_id, max_cost=max_cost))
    async for token in session.tokens():
        ...
    receipts = await session.close()   # signed, verified StageReceipts
    await driver.close()

A step is pushed to the first stage; each stage forwards to the next and the last one sends the
token back here: stages + 1 hops per token. When a stage fails (its stream closes, a neighbour
reports it, or no token arrives in time and a probe finds it), the driver bans it with capped
exponential backoff, replaces only its span, reopens the session on the new route and replays
the session's tokens as one prefill, so the caller sees the same greedy tokens as without the
failure. Every peer's attestation is verified before its first session, and every receipt
against the node key that attestation names.

Why one module of this size: the driver and its job sessions share the waiters that incoming
tokens resolve, the ban list and the failover path (replan, reopen, replay); a split would pass
them through private attributes, which is what this layout removed (``replay.py`` once wrote into
the driver's waiters).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import hivemind
import torch
from eth_utils import to_checksum_address

from dlis_market.chain.job_market import market_domain
from dlis_market.inference.errors import MessageError
from dlis_market.inference.messages import StageInput, decode, encode
from dlis_market.inference.sampling import SamplingParams, TokenLogprob
from dlis_market.node import attestation, dht_records, receipts
from dlis_market.node.errors import (
    BudgetError,
    NodeError,
    NoRouteError,
    PeerUnreachableError,
    ProtocolError,
    ReceiptError,
    RemoteError,
    StageFailedError,
)
from dlis_market.node.private_entry import PrivateEntry, SharePair
from dlis_market.node.protocol import (
    Channel,
    FailBody,
    OpenAnswer,
    OpenBody,
    SamplingUnsupportedError,
    StepBody,
    TokensBody,
    parse_body,
)
from dlis_market.node.routing import plan_route
from dlis_market.node.transport import ChannelPool, start_dht
from dlis_market.protocol.adapters import AdapterRef
from dlis_market.protocol.pricing import route_bound
from dlis_market.protocol.receipts import StageReceipt
from dlis_market.protocol.routes import Replan, RouteHop
from dlis_market.protocol.spans import SpanRecord
from dlis_market.protocol.tickets import SessionTicket, sign_ticket
from dlis_market.protocol.zk_claims import ZkClaim
from dlis_market.settings import NodeSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobSpec:
    model: str
    prompt_ids: list[int]
    max_new_tokens: int
    job_id: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    max_cost: int | None = None  # token units, receipts + protocol fee (the authorization's); None: no limit
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: tuple[int, ...] = ()
    num_layers: int | None = None  # from the manifest; None: the highest announced layer
    fee_bps: int = 0  # JobMarket's protocol fee, counted against max_cost (protocol.pricing)
    # The broker's router: (current route, peers to avoid) -> a new route under the job's policy
    # (stake, reputation, privacy, latency, max cost). None: the driver's own throughput routing.
    replan: Replan | None = None
    # A LoRA adapter every stage applies (protocol/adapters.py): sessions name it, receipts its model id
    adapter: AdapterRef | None = None
    proof: Literal["zk"] | None = None  # the last stage proves its head's calls (checked by the broker)
    # privacy=high: the driver runs the first stage on secret shares (node/private_entry.py) and
    # the route starts after it
    private: PrivateEntry | None = None


NodeCheck = Callable[[str, str], bool]  # (node address, peer id) -> registered on chain under that peer id

# Refusals that say the stage has no room for this job (or our ticket did not fit): route around
# the stage for this plan, but do not ban it; a ban is for a peer's own fault.
# A last stage that cannot apply the job's sampling (a worker that predates penalties or logprobs)
# is routed around the same way.
# An adapter a worker refuses (not what the chain records, or its files do not check out) is the
# job's fault, not the worker's.
NOT_A_FAULT = frozenset(
    {"CapacityError", "TicketError", "SamplingUnsupportedError", "AdapterRefusedError", "ZkUnsupportedError"}
)


@dataclass
class Ban:
    until: float  # time.monotonic()
    count: int  # bans so far without a success in between: the backoff exponent
    started_at: float  # the peer's signed start time when banned; a newer one (a restart) lifts it


class PipelineDriver:
    def __init__(
        self,
        dht: hivemind.DHT,
        pool: ChannelPool,
        settings: NodeSettings,
        broker_key: bytes | None = None,
        node_check: NodeCheck | None = None,
    ) -> None:
        self.dht = dht
        self.pool = pool
        self.settings = settings
        self.peer_id = pool.peer_id
        self.market = market_domain(settings.chain_id, settings.market_address)
        self.registry = attestation.registry_domain(settings.chain_id, settings.registry_address)
        # per session: the next token (or, for a spot-check replay of a middle stage, hidden row)
        self._waiters: dict[str, tuple[asyncio.Future[Any], frozenset[str]]] = {}
        self._bans: dict[str, Ban] = {}
        self._signers = dht_records.SignerCache()  # verified span signatures (discovery runs per job)
        # model -> (when it started, the newest DHT lookup of its spans: done or in flight)
        self._lookups: dict[str, tuple[float, asyncio.Future[list[SpanRecord]]]] = {}
        self._started: dict[str, float] = {}  # peer id -> started_at of its latest signed record
        self._verified: dict[str, str] = {}  # peer id -> node address from its verified attestation
        # Tickets are signed with the broker's account key (BROKER_ROLE); without one (a dev swarm with
        # no market) with a throwaway key, which only workers in open mode accept.
        self.broker_key = broker_key or secrets.token_bytes(32)
        self.node_check = node_check
        pool.dead_peer_callbacks.append(self._peer_closed)

    @classmethod
    async def create(
        cls,
        initial_peers: Sequence[str],
        settings: NodeSettings | None = None,
        broker_key: bytes | None = None,
        node_check: NodeCheck | None = None,
    ) -> PipelineDriver:
        settings = settings or NodeSettings()
        dht = await asyncio.to_thread(
            start_dht, initial_peers, client_mode=True, host_maddrs=[f"/ip4/{settings.host}/tcp/0"]
        )
        p2p = await dht.replicate_p2p()
        driver: PipelineDriver
        pool = ChannelPool(
            p2p, lambda ch, op, rid, body: driver._on_message(ch, op, rid, body), settings.max_message_bytes
        )
        driver = cls(dht, pool, settings, broker_key, node_check)
        await pool.serve()
        return driver

    async def close(self) -> None:
        await self.pool.close()
        await asyncio.to_thread(self.dht.shutdown)

    # ------------------------------------------------------------------ discovery, bans, trust

    async def discover(self, model: str, max_age_s: float = 0.0) -> list[SpanRecord]:
        """Current signed announcements of ``model``; with a ``node_check``, only those of nodes
        registered on chain under the announced peer id.

        ``max_age_s`` > 0: a lookup started at most that long ago serves (one in flight is joined
        rather than repeated), so a burst of jobs shares one DHT lookup. 0 (a failover, a check):
        a lookup of its own."""
        now = time.monotonic()
        last = self._lookups.get(model)
        if max_age_s > 0 and last is not None and now - last[0] <= max_age_s:
            return list(await asyncio.shield(last[1]))  # done, or in flight: joined
        lookup = asyncio.ensure_future(asyncio.to_thread(self._discover, model))
        lookup.add_done_callback(functools.partial(self._forget_failed, model))
        self._lookups[model] = (now, lookup)
        spans = await asyncio.shield(lookup)  # a caller that leaves does not cancel it for the others
        self.saw(spans)
        return list(spans)

    def _forget_failed(self, model: str, lookup: asyncio.Future[list[SpanRecord]]) -> None:
        """A failed lookup fails those waiting on it and is kept for nobody."""
        if (lookup.cancelled() or lookup.exception() is not None) and self._lookups.get(model, (0, None))[1] is lookup:
            del self._lookups[model]

    def _discover(self, model: str) -> list[SpanRecord]:
        spans = dht_records.fetch_spans(self.dht, model, self.registry, self._signers)
        if self.node_check is None:
            return spans
        out = []
        for s in spans:
            if self.node_check(s.node_address, s.peer_id):
                out.append(s)
            else:
                log.info("ignoring span of %s: node %s is not registered under that peer id", s.peer_id, s.node_address)
        return out

    def saw(self, spans: Sequence[SpanRecord]) -> None:
        """Note each peer's start time; a peer banned before a restart is forgiven."""
        for s in spans:
            self._started[s.peer_id] = max(self._started.get(s.peer_id, 0.0), s.started_at)
            ban = self._bans.get(s.peer_id)
            if ban is not None and s.started_at > ban.started_at:
                del self._bans[s.peer_id]
                log.info("lifted the ban of %s: it announced a restart", s.peer_id)

    def ban(self, peer: str) -> float:
        """Ban ``peer`` for its own failure, for ban_base_s x 2^(earlier bans), at most ban_max_s."""
        count = self._bans[peer].count if peer in self._bans else 0
        seconds = min(self.settings.ban_base_s * 2**count, self.settings.ban_max_s)
        self._bans[peer] = Ban(time.monotonic() + seconds, count + 1, self._started.get(peer, 0.0))
        self._verified.pop(peer, None)
        log.warning("banned peer %s for %.0fs", peer, seconds)
        return seconds

    def succeeded(self, peer: str) -> None:
        """A peer served a session to the end: its backoff starts over (an active ban still runs)."""
        ban = self._bans.get(peer)
        if ban is not None and ban.until <= time.monotonic():
            del self._bans[peer]

    def banned(self) -> set[str]:
        now = time.monotonic()
        return {p for p, b in self._bans.items() if b.until > now}

    def ticket(self, job_id: bytes, model: str, hop: RouteHop) -> dict[str, Any]:
        """A session ticket for ``hop`` at its routed price, for this driver's peer id to present."""
        ticket = SessionTicket(
            job_id=job_id, model=model, start=hop.start, end=hop.end, price_per_token=hop.price_per_token,
            opener=self.peer_id, expires_at=time.time() + self.settings.ticket_ttl_s,
        )  # fmt: skip
        return sign_ticket(self.broker_key, self.market, ticket).model_dump()

    async def unclaimed_receipts(self, peer: str, job_id: bytes) -> list[StageReceipt]:
        """The receipts ``peer`` signed for ``job_id``'s sessions whose opener vanished (a broker
        killed mid-job), each checked: this job, signed by the node address the peer names (the
        caller matches that node to the route it expects)."""
        answer = await self.pool.request(peer, "receipts", {"job_id": job_id}, self.settings.request_timeout_s)
        node = str(answer.get("node_address", ""))
        out = []
        for raw in answer.get("receipts") or []:
            signed = receipts.from_wire(raw)
            if signed.receipt.job_id != job_id:
                raise ReceiptError(f"{peer} answered a receipt of another job for {job_id.hex()[:16]}..")
            receipts.verify_receipt(self.market, signed, node)
            out.append(StageReceipt(to_checksum_address(node), signed, peer))
        return out

    def verified_node(self, peer_id: str) -> str | None:
        """The node signing address of a peer whose attestation verified, if any."""
        return self._verified.get(peer_id)

    async def verify_peer(self, hop: RouteHop) -> str:
        """Fetch and verify the peer's attestation (once); returns its node signing address."""
        if hop.peer_id in self._verified:
            return self._verified[hop.peer_id]
        info = await self.pool.request(hop.peer_id, "info", {}, self.settings.request_timeout_s)
        signed = attestation.parse_signed(info.get("attestation"))
        attestation.verify_report(
            signed, self.registry, peer_id=hop.peer_id, max_age_s=self.settings.attestation_max_age_s
        )
        report = signed.report
        if report.node_address.lower() != hop.node.lower():
            raise attestation.AttestationError(
                f"invalid attestation: node_address ({report.node_address} differs from the announced {hop.node})"
            )
        self._verified[hop.peer_id] = report.node_address
        return report.node_address

    # ------------------------------------------------------------------ messages from stages

    async def _on_message(self, channel: Channel, op: str, rid: int, body: dict[str, Any]) -> None:
        if op == "tokens":
            msg = parse_body(TokensBody, body)
            lps = msg.logprobs or []
            for i, (sid, token) in enumerate(zip(msg.sessions, msg.token_ids, strict=False)):
                lp = lps[i] if i < len(lps) else None
                # a log probability of another token than the one sent is dropped: the session,
                # which asked for one, then fails over (JobSession.tokens)
                value: int | TokenLogprob = lp.native() if lp is not None and lp.token == token else token
                self._resolve(sid, value=value, sender=channel.peer)
        elif op == "step":  # a stage whose next peer is this driver: a replayed middle stage's output
            try:
                inp = decode(parse_body(StepBody, body).input, self.settings.max_message_bytes)
            except MessageError as exc:
                log.info("peer %s sent a malformed step: %s", channel.peer, exc)
                return
            if isinstance(inp, StageInput) and inp.hidden is not None:
                for i, sid in enumerate(inp.session_ids):
                    self._resolve(sid, value=inp.hidden[i], sender=channel.peer)
        elif op == "fail":
            fail = parse_body(FailBody, body)
            for sid in fail.sessions:
                error = StageFailedError(f"stage {fail.peer} failed: {fail.message}", fail.peer)
                self._resolve(sid, error=error, sender=channel.peer)
        elif op == "error":
            log.info("peer %s reported: %s", channel.peer, body.get("message"))
        elif rid:
            await channel.send("error", {"message": f"op {op!r} is not served by a driver", "code": "protocol"}, rid)

    @contextlib.contextmanager
    def awaiting(self, sid: str, peers: frozenset[str]) -> Iterator[asyncio.Future[Any]]:
        """A future for the next answer to session ``sid`` (a token, hidden states or a failure)
        that only ``peers`` may resolve; forgotten when the block ends. Job sessions and replays
        (:mod:`.replay`) wait on their steps through it."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters[sid] = (fut, peers)
        try:
            yield fut
        finally:
            if self._waiters.get(sid, (None,))[0] is fut:
                self._waiters.pop(sid, None)

    def _resolve(self, sid: str, value: Any = None, error: Exception | None = None, sender: str | None = None) -> None:
        waiter = self._waiters.get(sid)
        if waiter is None or waiter[0].done():
            return
        if sender is not None and sender not in waiter[1]:  # only the session's own stages may answer it
            log.info("ignoring an answer for session %s from %s, which is not on its route", sid, sender)
            return
        if error is not None:
            waiter[0].set_exception(error)
        elif value is not None:
            waiter[0].set_result(value)

    def _peer_closed(self, peer: str) -> None:
        for sid, (fut, peers) in list(self._waiters.items()):
            if peer in peers and not fut.done():
                self._resolve(sid, error=StageFailedError(f"stream to stage {peer} closed", peer))

    # ------------------------------------------------------------------ jobs

    async def open_job(self, spec: JobSpec) -> JobSession:
        if not spec.prompt_ids or spec.max_new_tokens < 1:
            raise NodeError("a job needs a non-empty prompt and max_new_tokens >= 1")
        session = JobSession(self, spec)
        await session.establish()
        return session

    async def generate(self, spec: JobSpec) -> tuple[list[int], list[StageReceipt]]:
        """Run a whole job: its generated token ids and the verified receipts of every stage."""
        session = await self.open_job(spec)
        try:
            tokens = [t async for t in session.tokens()]
        finally:
            got = await session.close()
        return tokens, got


def replay_inputs(session_id: str, prompt: Sequence[int], generated: Sequence[int], step: int) -> list[StageInput]:
    """What rebuilds a session's KV caches on a new route exactly as the first route built them:
    the prompt's prefill, then one decode step for each generated token but the last (which the
    next ordinary step sends). The same shapes give the same numbers in every dtype; one prefill
    of prompt + generated computes the same values with other matmul shapes, and in bf16 answers
    then drifted from the uninterrupted run after tens of tokens. Pure."""
    out = [StageInput((session_id,), (0,), step, token_ids=torch.tensor([list(prompt)], dtype=torch.long))]
    for i, token in enumerate(generated[:-1]):
        out.append(
            StageInput((session_id,), (len(prompt) + i,), step, token_ids=torch.tensor([[token]], dtype=torch.long))
        )
    return out


class JobSession:
    """One generation stream over a route of stages; survives stage failures by replaying."""

    def __init__(self, driver: PipelineDriver, spec: JobSpec) -> None:
        self.driver = driver
        self.spec = spec
        self.route: list[RouteHop] = []
        self.session_id = ""
        self.generated: list[int] = []
        self.logprobs: list[TokenLogprob] = []  # one per generated token when the sampling asks for them
        self.receipts: list[StageReceipt] = []
        self.failovers = 0
        self.ttft_s: float | None = None
        self.sent_tokens = 0  # tokens pushed through the current session: what any stage may bill
        self.shares = SharePair(driver, spec.private, spec.model, spec.job_id) if spec.private else None
        self.private_inputs: list[torch.Tensor] = []  # privacy=high: each step's hidden state after the entry

    @property
    def max_length(self) -> int:
        return len(self.spec.prompt_ids) + self.spec.max_new_tokens

    async def _plan(self, skip: set[str] | None = None) -> list[RouteHop]:
        banned = self.driver.banned() | (skip or set())
        if self.route and not any(h.peer_id in banned for h in self.route):
            return list(self.route)
        if self.spec.replan is not None and self.route:
            # One router: a failover (or a refused open) replans through the broker's scheduler,
            # under the same policy and max cost as the first route.
            return list(await self.spec.replan(list(self.route), frozenset(banned)))
        spans = await self.driver.discover(self.spec.model)
        num_layers = self.spec.num_layers or max((s.end for s in spans), default=0)
        if not num_layers:
            raise StageFailedError(f"no peer announces model {self.spec.model!r} on the DHT", None)
        if self.shares is not None and not self.shares.hops:
            await self.shares.pick(spans, banned)
        if not self.route:
            return plan_route(spans, self.spec.private.end if self.spec.private else 0, num_layers, banned)
        route: list[RouteHop] = []
        for hop in self.route:  # keep healthy hops; replace only the failed span
            route += plan_route(spans, hop.start, hop.end, banned) if hop.peer_id in banned else [hop]
        return route

    async def establish(self) -> None:
        """Plan and open the session on every stage; a stage that refuses is banned and replaced."""
        attempts = self.driver.settings.max_failovers + 3
        skip: set[str] = set()  # stages without room for this job: routed around, not banned
        refused = ""  # the last refusal, for the error when no route is left
        skipped = ""  # the last stage routed around (no room, or it cannot apply the job's sampling)
        for _ in range(attempts):
            try:
                self.route = await self._plan(skip)
            except NoRouteError as exc:
                if not skipped:
                    raise
                raise NoRouteError(f"{exc}; routed around before: {skipped}", exc.missing) from exc
            prices = [h.price_per_token for h in self.route] + (self.shares.prices() if self.shares else [])
            bound = route_bound(prices, self.max_length, self.spec.fee_bps)
            if self.spec.max_cost is not None and bound.total > self.spec.max_cost:
                raise BudgetError(
                    f"the route costs up to {bound.total} units ({bound.cost} + fee {bound.fee}) for "
                    f"{self.max_length} tokens, over the job's max cost {self.spec.max_cost}; raise max_cost "
                    "or wait for cheaper peers"
                )
            self.session_id = f"{self.spec.job_id.hex()[:16]}-{uuid.uuid4().hex[:12]}"
            self.sent_tokens = 0
            opened: list[RouteHop] = []
            try:
                for i, hop in enumerate(self.route):
                    await self._open_on(hop, self.route[i + 1].peer_id if i + 1 < len(self.route) else None)
                    opened.append(hop)
                return
            except (RemoteError, PeerUnreachableError, attestation.AttestationError) as exc:
                bad = getattr(exc, "peer", None) or self.route[len(opened)].peer_id
                refused = f"{bad}: {exc}"
                if isinstance(exc, RemoteError) and exc.code in NOT_A_FAULT:
                    log.info("stage %s has no room for the session: %s", bad, exc)
                    skip.add(bad)
                    skipped = refused
                else:
                    log.warning("stage %s refused or failed the session: %s", bad, exc)
                    self.driver.ban(bad)
                await self._close_hops(opened)
        raise StageFailedError(
            f"could not open a session after {attempts} routes; the last refusal: {refused}; see the log for each", None
        )

    async def _open_on(self, hop: RouteHop, next_peer: str | None) -> None:
        await self.driver.verify_peer(hop)
        last = next_peer is None
        body = OpenBody.build(
            self.spec.sampling, last, session_id=self.session_id, model=self.spec.model, start=hop.start,
            end=hop.end, max_length=self.max_length, job_id=self.spec.job_id, reply_to=self.driver.peer_id,
            next_peer=next_peer, ticket=self.driver.ticket(self.spec.job_id, self.spec.model, hop),
            adapter=self.spec.adapter.model_dump() if self.spec.adapter is not None else None,
            proof=self.spec.proof if last else None,
        )  # fmt: skip
        need = self.spec.sampling.features if last else frozenset()
        timeout = self.driver.settings.request_timeout_s
        try:
            raw = await self.driver.pool.request(hop.peer_id, "open", body.wire(), timeout)
        except RemoteError as exc:
            if need and exc.code == "protocol":  # a worker that predates these fields refuses them by name
                raise SamplingUnsupportedError(
                    f"stage {hop.peer_id} refused the sampling fields of {sorted(need)}: {exc}", hop.peer_id
                ) from exc
            raise
        if not need:
            return
        try:
            answer: OpenAnswer | None = parse_body(OpenAnswer, {**raw, "session_id": self.session_id})
        except ProtocolError:  # a malformed answer names nothing it supports
            answer = None
        missing = need if answer is None else answer.lacks(need)
        if missing:  # it opened the session but would sample without them: refuse it, never serve silently
            with contextlib.suppress(NodeError):
                await self.driver.pool.request(hop.peer_id, "close", {"session_id": self.session_id}, timeout)
            raise SamplingUnsupportedError(
                f"last stage {hop.peer_id} does not apply {', '.join(sorted(missing))} (it supports "
                f"{sorted(answer.sampling) if answer else []}); routing around it",
                hop.peer_id,
            )

    async def _close_hops(self, hops: Sequence[RouteHop]) -> None:
        settings = self.driver.settings
        for hop in hops:
            proves = self.spec.proof is not None and bool(self.route) and hop.end == self.route[-1].end
            timeout = settings.proof_timeout_s if proves else settings.request_timeout_s
            try:
                answer = await self.driver.pool.request(hop.peer_id, "close", {"session_id": self.session_id}, timeout)
                node = self.driver.verified_node(hop.peer_id) or hop.node
                signed = receipts.checked_bill(
                    self.driver.market, answer.get("receipt"), node, hop, self.spec.job_id, self.sent_tokens
                )
                r = signed.receipt
                fingerprint = b""
                if r.tokens:  # every call served is committed to; a bill without it is refused
                    commitment = receipts.Commitment.from_wire(answer)
                    receipts.verify_commitment(self.driver.market, r, commitment, node)
                    fingerprint = commitment.fingerprint
                proof = ZkClaim.from_wire(answer) if proves else None
                signer = to_checksum_address(node)
                self.receipts.append(StageReceipt(signer, signed, hop.peer_id, self.session_id, fingerprint, proof))
                self.driver.succeeded(hop.peer_id)
            except (NodeError, ValueError) as exc:  # a dead or lying stage: no receipt, no payment
                log.warning("no valid receipt from %s for %s: %s", hop.peer_id, self.session_id, exc)

    async def _step(self, inp: StageInput) -> tuple[int, TokenLogprob | None]:
        """Push one step; the sampled token and its log probability (when the stage sent one)."""
        with self.driver.awaiting(self.session_id, frozenset(h.peer_id for h in self.route)) as fut:
            return await self._push(inp, fut)

    async def _push(self, inp: StageInput, fut: asyncio.Future[Any]) -> tuple[int, TokenLogprob | None]:
        try:
            first = self.route[0].peer_id
            await self.driver.pool.send(first, "step", {"input": encode(inp), "reply_to": self.driver.peer_id})
            self.sent_tokens += inp.num_tokens * len(inp.session_ids)
            value = await asyncio.wait_for(fut, self.driver.settings.step_timeout_s)
            if isinstance(value, TokenLogprob):
                return value.token, value
            if not isinstance(value, int):  # hidden states from a stage that is not the last one
                raise StageFailedError("a stage sent hidden states where the sampled token was due", None)
            return value, None
        except PeerUnreachableError as exc:
            raise StageFailedError(str(exc), exc.peer) from exc
        except TimeoutError:
            raise StageFailedError(
                f"no token within {self.driver.settings.step_timeout_s:.0f}s", await self._probe()
            ) from None

    async def _probe(self) -> str | None:
        """The first stage of the route that does not answer, if any."""
        for hop in self.route:
            try:
                await self.driver.pool.request(
                    hop.peer_id, "info", {}, min(5.0, self.driver.settings.request_timeout_s)
                )
            except NodeError:
                return hop.peer_id
        return None

    async def _recover(self, exc: StageFailedError) -> None:
        self.failovers += 1
        if self.failovers > self.driver.settings.max_failovers:
            raise StageFailedError(f"giving up after {self.failovers - 1} failovers: {exc}", exc.peer) from exc
        log.warning("session %s: %s; rerouting and replaying %d tokens", self.session_id, exc,
                    len(self.spec.prompt_ids) + len(self.generated))  # fmt: skip
        if exc.peer is not None:
            self.driver.ban(exc.peer)
        await self._close_hops([h for h in self.route if h.peer_id != exc.peer])
        await self.establish()

    async def tokens(self) -> AsyncIterator[int]:
        """Generated token ids, one per step, until max_new_tokens or a stop token."""
        started = time.perf_counter()
        replay = True  # the first step is the prompt's prefill, a failover's is a replay
        step = 0
        while len(self.generated) < self.spec.max_new_tokens:
            ids = [*self.spec.prompt_ids, *self.generated]
            try:
                if replay and self.generated:  # a failover: rebuild the new route's caches, outputs known
                    for again in self._replay_inputs(step):
                        await self._step(again)
                    replay = False
                position = 0 if replay else len(ids) - 1
                tokens = torch.tensor([ids if replay else ids[-1:]], dtype=torch.long)
                if self.shares is None:
                    inp = StageInput((self.session_id,), (position,), step, token_ids=tokens)
                else:  # the first stage on shares, once per step: its KV cache is the driver's own
                    if len(self.private_inputs) == len(self.generated):
                        spans = functools.partial(self.driver.discover, self.spec.model)
                        self.private_inputs.append(await self.shares.forward(tokens, spans))
                    inp = StageInput((self.session_id,), (position,), step, hidden=self.private_inputs[-1])
                token, logprob = await self._step(inp)
                if self.spec.sampling.logprobs is not None and logprob is None:
                    last = self.route[-1].peer_id
                    raise StageFailedError(f"last stage {last} sent a token without the log probability asked", last)
            except StageFailedError as exc:
                await self._recover(exc)
                replay = True
                continue
            replay = False
            step += 1
            if self.ttft_s is None:
                self.ttft_s = time.perf_counter() - started
            self.generated.append(token)
            if logprob is not None:
                self.logprobs.append(logprob)
            yield token
            if token in self.spec.stop_token_ids:
                break

    def _replay_inputs(self, step: int) -> list[StageInput]:
        """What rebuilds a new route's caches: the tokens as they went (:func:`replay_inputs`) or,
        after a private first stage, the hidden states it gave then (it does not run again)."""
        if self.shares is None:
            return replay_inputs(self.session_id, self.spec.prompt_ids, self.generated, step)
        positions = [0] + [len(self.spec.prompt_ids) + i for i in range(len(self.generated) - 1)]
        return [
            StageInput((self.session_id,), (p,), step, hidden=h)
            for p, h in zip(positions, self.private_inputs, strict=False)
        ]

    async def close(self) -> list[StageReceipt]:
        """Close the session on its route; returns every verified receipt of the job (all routes;
        a private job's share receipts first, in ascending node address)."""
        with contextlib.suppress(NodeError):
            await self._close_hops(self.route)
        self.route = []
        if self.shares is not None and self.shares.hops:
            shared = await self.shares.close(self.session_id)
            self.shares.hops = []
            return shared + list(self.receipts)
        return list(self.receipts)
