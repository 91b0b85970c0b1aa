"""A ``privacy=high`` job's first stage, run by the job's driver on secret shares.

The driver (the broker, which the client trusts with its prompt, or a client driving the network
itself) loads the model's first stage, embeds the prompt and runs that stage's layers with
:class:`~dlis_market.node.shared_layers.PrivateLayers`: every projection goes as two additive
shares to two workers that serve the first stage, of different operators (``share_linear``).
The hidden state after the first stage enters the rest of the route as a middle stage's input,
so no worker sees the prompt's embeddings or the first stage's activations
(``node/shared_layers.py`` says exactly what each party learns).

:class:`SharePair` picks the two workers, sends the calls under tickets of the job, replaces a
worker that fails (its step runs again on the client's cut-back cache, and a step is not billed
twice: workers bill the positions they reached) and collects both workers' signed receipts
(``share_close``). Both receipts bill the same layer range; JobMarket pays a range's group of
shares when their signers come in ascending address order (``covering_receipts`` orders them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from eth_utils import to_checksum_address

from dlis_market.inference.stage import Stage
from dlis_market.node import receipts
from dlis_market.node.errors import (
    NodeError,
    NoRouteError,
    PeerUnreachableError,
    ReceiptError,
    RemoteError,
    StageFailedError,
)
from dlis_market.node.routing import usable
from dlis_market.node.shared_layers import PrivateLayers, ShareLinearBody
from dlis_market.protocol.receipts import StageReceipt
from dlis_market.protocol.routes import RouteHop
from dlis_market.protocol.spans import SpanRecord
from dlis_market.settings import NodeSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrivateEntry:
    """What a ``privacy=high`` job needs to keep its embeddings from the workers: the model's
    first stage loaded by the driver (embeddings, norms, attention; its projections go out on
    shares) and, where the chain is at hand, the operator of a node: the two share workers must
    be of different operators (None: two different nodes is all that is checked)."""

    stage: Stage
    operator_of: Callable[[str], str | None] | None = None
    hops: tuple[RouteHop, ...] = ()  # the pair a router chose (empty: the driver picks one)

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


class ShareWorkerError(NodeError):
    """A share worker failed a call: it is replaced and the step runs again."""

    def __init__(self, message: str, peer: str) -> None:
        super().__init__(message)
        self.peer = peer


class SharePair:
    """The two share workers of one job, its private layers and their bills."""

    def __init__(self, driver: ShareDriver, entry: PrivateEntry, model: str, job_id: bytes) -> None:
        self.driver, self.entry, self.model, self.job_id = driver, entry, model, job_id
        self.hops: list[RouteHop] = list(entry.hops)
        self.layers: PrivateLayers | None = None  # built on the driver's loop at the first step
        self.tokens = 0  # positions the private layers reached: what a share worker may bill
        self.replaced = 0
        self._tickets: dict[str, tuple[dict[str, Any], float]] = {}  # peer -> (ticket, renew after)

    async def pick(self, spans: list[SpanRecord], banned: set[str]) -> None:
        """Keep the healthy worker of the pair and choose the cheapest others (then the fastest)
        that serve exactly the first stage: distinct nodes of distinct operators, attested."""
        keep = [h for h in self.hops if h.peer_id not in banned]
        candidates = sorted(
            (s for s in usable(spans, banned) if (s.model, s.start, s.end) == (self.model, 0, self.entry.end)),
            key=lambda s: (s.price_per_token, -s.throughput),
        )
        operator_of = self.entry.operator_of or (lambda node: None)
        for span in candidates:
            if len(keep) == 2:
                break
            node = span.node_address.lower()
            operator = operator_of(span.node_address)
            taken = {h.node.lower() for h in keep}
            taken_ops = {operator_of(h.node) for h in keep} - {None}
            if span.peer_id in {h.peer_id for h in keep} or node in taken or (operator and operator in taken_ops):
                continue
            hop = RouteHop.of(span)
            try:
                await self.driver.verify_peer(hop)
            except NodeError as exc:
                log.warning("share worker %s refused: %s", span.peer_id, exc)
                self.driver.ban(span.peer_id)
                continue
            keep.append(hop)
        if len(keep) < 2:
            raise NoRouteError(
                f"a privacy=high job needs two workers of different operators serving the first stage "
                f"[0, {self.entry.end}) of {self.model!r}; {len(keep)} usable of {len(candidates)} announced. "
                "Start another first-stage worker under another operator, or send the job with privacy=low",
                [(0, self.entry.end)],
            )
        if self.hops and keep != self.hops:
            self.replaced += 1
        self.hops = keep

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
        async def one(hop: RouteHop, share: bytes) -> tuple[bytes, int]:
            body = ShareLinearBody(
                model=self.model, start=hop.start, end=hop.end, job_id=self.job_id, ticket=self._ticket(hop),
                layer=layer, projection=projection, position=position, rows=rows, share=share,
            )  # fmt: skip
            try:
                got = await self.driver.pool.request(
                    hop.peer_id, "share_linear", body.model_dump(), self.driver.settings.request_timeout_s
                )
                return bytes(got["out"]), int(got["cols"])
            except (RemoteError, PeerUnreachableError, KeyError, TypeError, ValueError) as exc:
                raise ShareWorkerError(f"share worker {hop.peer_id} failed {projection}: {exc}", hop.peer_id) from exc

        a, b = self.hops
        got = await asyncio.gather(one(a, share_a), one(b, share_b), return_exceptions=True)
        for answer in got:
            if isinstance(answer, BaseException):
                raise answer
        (out_a, cols_a), (out_b, cols_b) = got  # type: ignore[misc]
        if cols_a != cols_b:
            raise ShareWorkerError(f"share workers answered {cols_a} and {cols_b} columns", b.peer_id)
        return out_a, out_b, cols_a

    async def forward(self, token_ids: torch.Tensor, spans: Callable[[], Awaitable[list[SpanRecord]]]) -> torch.Tensor:
        """The hidden state after the first stage for the step's tokens; a failed worker is banned
        and replaced (``spans``: the driver's discovery), and the step runs again."""
        if self.layers is None:
            self.layers = PrivateLayers(
                self.entry.stage, self._call, asyncio.get_running_loop(), self.driver.settings.request_timeout_s
            )
        attempts = self.driver.settings.max_failovers + 1
        for attempt in range(attempts):
            try:
                hidden = await asyncio.to_thread(self.layers.forward, token_ids)
                self.tokens = self.layers.position
                return hidden
            except ShareWorkerError as exc:
                if attempt + 1 == attempts:
                    raise StageFailedError(f"giving up on the private first stage: {exc}", None) from exc
                log.warning("%s; replacing it and running the step again", exc)
                self.driver.ban(exc.peer)
                await self.pick(await spans(), self.driver.banned())
        raise AssertionError("unreachable")

    async def close(self, session_id: str) -> list[StageReceipt]:
        """Both workers' verified receipts for their shares (ascending node address); a worker
        that does not answer or bills wrongly gets nothing, as a stage would."""
        out: list[StageReceipt] = []
        timeout = self.driver.settings.request_timeout_s
        for hop in self.hops:
            try:
                answer = await self.driver.pool.request(hop.peer_id, "share_close", {"job_id": self.job_id}, timeout)
                signed = receipts.from_wire(answer.get("receipt"))
                node = self.driver.verified_node(hop.peer_id) or hop.node
                receipts.verify_receipt(self.driver.market, signed, node)
                r = signed.receipt
                if r.job_id != self.job_id or (r.start, r.end) != (hop.start, hop.end):
                    raise ReceiptError(f"share receipt of {hop.peer_id} names another job or range")
                receipts.check_bill(hop, r.tokens, r.amount, self.tokens)
                out.append(StageReceipt(to_checksum_address(node), signed, hop.peer_id, session_id, share=True))
                self.driver.succeeded(hop.peer_id)
            except (NodeError, ValueError) as exc:
                log.warning("no valid share receipt from %s for job %s: %s", hop.peer_id, self.job_id.hex()[:16], exc)
        return sorted(out, key=lambda r: int(r.node, 16))

    def prices(self) -> list[int]:
        return [h.price_per_token for h in self.hops]
