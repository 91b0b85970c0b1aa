"""A ``privacy=high`` job's first stage, run by the job's driver on secret shares.

The driver (the broker, which the client trusts with its prompt, or a client driving the network
itself) loads the model's first stage, embeds the prompt and runs that stage's layers with
:class:`~dlis_market.node.shared_layers.PrivateLayers`: every projection goes as two additive
shares to two workers that serve the first stage, of different operators (``share_linear``).
The hidden state after the first stage enters the rest of the route as a middle stage's input,
so no worker sees the prompt's embeddings or the first stage's activations
(``node/shared_layers.py`` says exactly what each party learns).

:class:`SharePair` checks the two workers (a router's pair, or its own pick), sends the calls
under tickets of the job, checks each worker's answer on its own (a wrong or late one is that
worker's fault), replaces a worker that fails at no higher price (its step runs again on the
client's cut-back cache) and collects both workers' signed receipts (``share_close``). A worker
bills the session positions it computed, from the one it joined at: a step that runs again is
not billed twice, and a replacement does not bill what its predecessor computed. Both receipts
bill the same layer range; JobMarket pays a range's group of shares when their signers come in
ascending address order (``covering_receipts`` orders them).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from eth_utils import to_checksum_address

from dlis_market.node import receipts
from dlis_market.node.errors import (
    NodeError,
    NoRouteError,
    PeerUnreachableError,
    RemoteError,
)
from dlis_market.node.routing import usable
from dlis_market.node.shared_layers import PROJECTIONS, PrivateLayers, ShareLinearBody
from dlis_market.protocol.receipts import StageReceipt
from dlis_market.protocol.routes import RouteHop
from dlis_market.protocol.spans import SpanRecord
from dlis_market.settings import NodeSettings

if TYPE_CHECKING:
    from dlis_market.inference.stage import Stage  # the caller loads it (transformers stays out of a broker's start)


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrivateEntry:
    """What a ``privacy=high`` job needs to keep its embeddings from the workers: the model's
    first stage loaded by the driver (embeddings, norms, attention; its projections go out on
    shares), the pair a router chose (empty: the driver picks the cheapest two), and how a
    failed worker is replaced: ``partner(survivor, avoid, max_price)`` returns another worker of
    the stage under the router's policy (None: the driver's own pick, which checks only that
    nodes, and operators where ``operator_of`` knows them, differ)."""

    stage: Stage
    operator_of: Callable[[str], str | None] | None = None
    hops: tuple[RouteHop, ...] = ()
    partner: Callable[[RouteHop, frozenset[str], int], Awaitable[RouteHop]] | None = None

    @property
    def end(self) -> int:
        """The first layer the rest of the route serves."""
        return self.stage.layers.end


class ShareDriver(Protocol):
    """What of the pipeline driver the pair uses (``node/driver.py`` imports this module)."""

    settings: NodeSettings
    pool: Any  # node.transport.ChannelPool
    market: Any  # chain.typed_data.Domain of JobMarket

    def ticket(self, job_id: bytes, model: str, hop: RouteHop) -> dict[str, Any]: ...
    async def verify_peer(self, hop: RouteHop) -> str: ...
    def verified_node(self, peer_id: str) -> str | None: ...
    def ban(self, peer: str) -> float: ...
    def banned(self) -> set[str]: ...
    def succeeded(self, peer: str) -> None: ...


class PrivateStageError(NodeError):
    """The private first stage failed for good (every replacement failed too): the job ends."""


class ShareWorkerError(NodeError):
    """A share worker failed a call (unreachable, late, refused, or a malformed answer): it is
    replaced and the step runs again."""

    def __init__(self, message: str, peer: str) -> None:
        super().__init__(message)
        self.peer = peer


# The private layers' steps block a thread on network round trips: their own pool, so that
# concurrent private jobs never hold the threads the broker's ledger and planning run in.
_STEPS = concurrent.futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="private-entry")


class SharePair:
    """The two share workers of one job, its private layers and their bills."""

    def __init__(self, driver: ShareDriver, entry: PrivateEntry, model: str, job_id: bytes) -> None:
        self.driver, self.entry, self.model, self.job_id = driver, entry, model, job_id
        self.hops: list[RouteHop] = list(entry.hops)
        self.layers: PrivateLayers | None = None  # built on the driver's loop at the first step
        self.replaced = 0
        self.sent = 0  # the furthest position the stage's first projection was sent for: what is billable
        self.joined: dict[str, int] = {h.peer_id: 0 for h in self.hops}  # peer -> position it joined at
        self._verified: set[str] = set()
        self._cols: dict[tuple[int, str], int] = {}  # (layer, projection) -> output width
        self._step: asyncio.Future[torch.Tensor] | None = None  # the step in its thread, if running
        self._tickets: dict[str, tuple[dict[str, Any], float]] = {}  # peer -> (ticket, renew after)

    async def pick(self, spans: list[SpanRecord], banned: set[str]) -> None:
        """The driver's own pick (no router): keep the pair's healthy worker and add the cheapest
        (then fastest) others serving exactly the first stage: distinct nodes, of distinct
        operators where known, verified, and no dearer than the worker they replace."""
        keep = [h for h in self.hops if h.peer_id not in banned]
        cap = max((h.price_per_token for h in self.hops if h.peer_id in banned), default=None)
        # a worker that served this job before and was replaced would bill from where it first
        # joined, over positions its replacement computed: it is not taken again
        banned = banned | (set(self.joined) - {h.peer_id for h in keep})
        candidates = sorted(
            (
                s
                for s in usable(spans, banned)
                if (s.model, s.start, s.end) == (self.model, 0, self.entry.end)
                and (cap is None or s.price_per_token <= cap)
            ),
            key=lambda s: (s.price_per_token, -s.throughput),
        )
        operator_of = self.entry.operator_of or (lambda node: None)
        for span in candidates:
            if len(keep) == 2:
                break
            operator = operator_of(span.node_address)
            taken = {h.node.lower() for h in keep}
            taken_ops = {operator_of(h.node) for h in keep} - {None}
            if span.peer_id in {h.peer_id for h in keep} or span.node_address.lower() in taken:
                continue
            if operator and operator in taken_ops:
                continue
            hop = RouteHop.of(span)
            try:
                await self._verify(hop)
            except ShareWorkerError as exc:
                log.warning("%s", exc)
                self.driver.ban(span.peer_id)
                continue
            keep.append(hop)
        if len(keep) < 2:
            raise NoRouteError(
                f"a privacy=high job needs two workers of different operators serving the first stage "
                f"[0, {self.entry.end}) of {self.model!r}; {len(keep)} usable of {len(candidates)} announced"
                + (f" at most at the replaced worker's price {cap}" if cap is not None else "")
                + ". Start another first-stage worker under another operator, or send the job with privacy=low",
                [(0, self.entry.end)],
            )
        self._adopt(keep)

    def _adopt(self, pair: list[RouteHop]) -> None:
        at = self.layers.position if self.layers is not None else 0
        for hop in pair:
            self.joined.setdefault(hop.peer_id, at)
        if self.hops and pair != self.hops:
            self.replaced += 1
        self.hops = pair

    async def _replace(self, failed: str, spans: Callable[[], Awaitable[list[SpanRecord]]]) -> None:
        """Replace ``failed`` (banned already) under the router's policy, or by the driver's pick
        (its verification then runs with the step, so a replacement that fails it is replaced too)."""
        survivor = next((h for h in self.hops if h.peer_id != failed), None)
        gone = next((h for h in self.hops if h.peer_id == failed), None)
        if self.entry.partner is None or survivor is None or gone is None:
            await self.pick(await spans(), self.driver.banned())
            return
        avoid = frozenset(self.driver.banned() | set(self.joined))  # nobody who served this job before
        new = await self.entry.partner(survivor, avoid, gone.price_per_token)
        self._adopt([survivor, new])

    async def _verify(self, hop: RouteHop) -> None:
        """The worker's attestation and node key, once (as for a stage before its first session)."""
        if hop.peer_id in self._verified:
            return
        try:
            await self.driver.verify_peer(hop)
        except NodeError as exc:
            raise ShareWorkerError(f"share worker {hop.peer_id} failed verification: {exc}", hop.peer_id) from exc
        self._verified.add(hop.peer_id)

    def _ticket(self, hop: RouteHop) -> dict[str, Any]:
        held = self._tickets.get(hop.peer_id)
        if held is None or time.time() > held[1]:
            ticket = self.driver.ticket(self.job_id, self.model, hop)
            held = (ticket, time.time() + self.driver.settings.ticket_ttl_s / 2)
            self._tickets[hop.peer_id] = held
        return held[0]

    async def _call(
        self, layer: int, projection: str, position: int, rows: int, share_a: bytes, share_b: bytes
    ) -> tuple[bytes, bytes, int]:
        cols = self._cols[(layer, projection)]
        if (layer, projection) == (self.entry.stage.layers.start, "q_proj"):
            self.sent = max(self.sent, position + rows)
        timeout = self.driver.settings.request_timeout_s

        async def one(hop: RouteHop, share: bytes) -> bytes:
            body = ShareLinearBody(
                model=self.model, start=hop.start, end=hop.end, job_id=self.job_id, ticket=self._ticket(hop),
                layer=layer, projection=projection, position=position, rows=rows, share=share,
            )  # fmt: skip
            try:
                got = await asyncio.wait_for(
                    self.driver.pool.request(hop.peer_id, "share_linear", body.model_dump(), timeout), 2 * timeout
                )
                out = bytes(got["out"])
            except (RemoteError, PeerUnreachableError, TimeoutError, KeyError, TypeError, ValueError) as exc:
                raise ShareWorkerError(f"share worker {hop.peer_id} failed {projection}: {exc!r}", hop.peer_id) from exc
            if len(out) != 8 * rows * cols or int(got.get("cols", -1)) != cols:
                raise ShareWorkerError(
                    f"share worker {hop.peer_id} answered {projection} with {len(out)} bytes of {got.get('cols')!r} "
                    f"columns, not {8 * rows * cols} of {cols}",
                    hop.peer_id,
                )
            return out

        a, b = self.hops
        got = await asyncio.gather(one(a, share_a), one(b, share_b), return_exceptions=True)
        for answer in got:
            if isinstance(answer, BaseException):
                raise answer
        out_a, out_b = got
        assert isinstance(out_a, bytes) and isinstance(out_b, bytes)
        return out_a, out_b, cols

    def _layers(self) -> PrivateLayers:
        if self.layers is None:
            timeout = self.driver.settings.request_timeout_s
            # each call's requests time out on their own (2x); the thread waits past that
            self.layers = PrivateLayers(self.entry.stage, self._call, asyncio.get_running_loop(), 4 * timeout + 5)
            stage = self.entry.stage
            for i, block in enumerate(stage.family.get_layers(stage.model)):
                for projection, parent in PROJECTIONS.items():
                    linear = getattr(getattr(block, parent), projection)
                    self._cols[(stage.layers.start + i, projection)] = int(linear.cols)
        return self.layers

    async def forward(self, token_ids: torch.Tensor, spans: Callable[[], Awaitable[list[SpanRecord]]]) -> torch.Tensor:
        """The hidden state after the first stage for the step's tokens; a failed worker is banned
        and replaced (``spans``: the driver's discovery), and the step runs again."""
        layers = self._layers()
        attempts = self.driver.settings.max_failovers + 1
        loop = asyncio.get_running_loop()
        failed: ShareWorkerError | None = None
        for _ in range(attempts):
            try:
                if failed is not None:  # replace the failed worker (and any replacement that fails its check)
                    log.warning("%s; replacing it and running the step again", failed)
                    self.driver.ban(failed.peer)
                    await self._replace(failed.peer, spans)
                for hop in self.hops:  # a router's pair, or a replacement: checked before its first call
                    await self._verify(hop)
                self._step = loop.run_in_executor(_STEPS, layers.forward, token_ids)
                return await asyncio.shield(self._step)
            except ShareWorkerError as exc:
                failed = exc
        # Not a StageFailedError: the route after the private stage is healthy, and replaying it
        # would only give the share workers another round of attempts; the job ends here.
        raise PrivateStageError(
            f"giving up on the private first stage after {attempts} attempts: {failed}; the job ends unpaid for "
            "the share work not receipted"
        )

    async def close(self, session_id: str) -> list[StageReceipt]:
        """Both workers' verified receipts for their shares (ascending node address); a worker
        that does not answer or bills wrongly gets nothing, as a stage would. A step still
        running (the job was cancelled mid-step) ends first, so its calls are billed and known."""
        timeout = self.driver.settings.request_timeout_s
        if self._step is not None and not self._step.done():
            await asyncio.wait({self._step}, timeout=timeout)  # a cancellation of close still cancels it
        got = await asyncio.gather(*(self._close_one(hop, session_id) for hop in self.hops))
        return sorted((r for r in got if r is not None), key=lambda r: int(r.node, 16))

    async def _close_one(self, hop: RouteHop, session_id: str) -> StageReceipt | None:
        """One worker's receipt, verified; None for a worker that gives none or bills wrongly."""
        timeout = self.driver.settings.request_timeout_s
        try:
            answer = await self.driver.pool.request(hop.peer_id, "share_close", {"job_id": self.job_id}, timeout)
            node = self.driver.verified_node(hop.peer_id) or hop.node
            sent = self.sent - self.joined.get(hop.peer_id, 0)  # the positions sent since it joined
            signed = receipts.checked_bill(self.driver.market, answer.get("receipt"), node, hop, self.job_id, sent)
            self.driver.succeeded(hop.peer_id)
            return StageReceipt(to_checksum_address(node), signed, hop.peer_id, session_id, share=True)
        except (NodeError, ValueError) as exc:
            log.warning("no valid share receipt from %s for job %s: %s", hop.peer_id, self.job_id.hex()[:16], exc)
            return None

    def prices(self) -> list[int]:
        return [h.price_per_token for h in self.hops]
