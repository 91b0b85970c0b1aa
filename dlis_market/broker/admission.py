"""Admission under load: a bounded FIFO queue in front of the broker's job slots.

A request takes one of ``slots`` before its route is planned and keeps it until its job ends. When
none is free it waits in line, at most ``max_waiting`` requests long and ``wait_s`` seconds;
beyond either it is refused with :class:`Overloaded` (HTTP 429 with ``Retry-After``), never with a
server error. A request waiting in line has written nothing to the ledger, so it holds no escrow.

The workers' KV-cache slots are the other bound: a request holding a broker slot whose route finds
every worker of some layer busy waits for a job to end (:meth:`AdmissionQueue.released`) or for
the next poll, then plans again, within the same deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from dlis_market.broker.errors import Overloaded
from dlis_market.chain.job_market import JobMarket
from dlis_market.chain.rpc_batch import BatchPoster, Request, StaticCalls

Q = TypeVar("Q")
R = TypeVar("R")

# Retry-After is never more than this (a client should come back and look).
MAX_RETRY_AFTER_S = 60


class AdmissionQueue:
    """``slots`` jobs at once, ``max_waiting`` more in line for up to ``wait_s`` each (FIFO)."""

    def __init__(self, slots: int, max_waiting: int, wait_s: float):
        self.slots = slots
        self.max_waiting = max_waiting
        self.wait_s = wait_s
        self._free = slots
        self._line: deque[asyncio.Future[None]] = deque()
        self._release: asyncio.Future[None] | None = None
        self._job_s = 1.0  # moving average of how long a slot is held (for Retry-After)

    @property
    def running(self) -> int:
        return self.slots - self._free

    @property
    def waiting(self) -> int:
        return len(self._line)

    def retry_after(self) -> int:
        """Seconds until a request sent again likely finds room: the line ahead of it, served
        ``slots`` at a time, at the recent time per job."""
        rounds = (len(self._line) + 1) / self.slots
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(self._job_s * rounds)))

    async def acquire(self, deadline: float) -> None:
        """Take a slot, waiting in line until ``deadline`` (``time.monotonic()``) at most."""
        if self._free > 0 and not self._line:
            self._free -= 1
            return
        if len(self._line) >= self.max_waiting:
            raise Overloaded(
                f"{self.running} jobs run and {len(self._line)} wait, the most the queue holds", self.retry_after()
            )
        ticket: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._line.append(ticket)
        try:
            async with asyncio.timeout_at(_loop_time(deadline)):
                await ticket
        except TimeoutError:
            if not ticket.cancelled() and ticket.done():
                return  # the slot was handed over as the wait ran out: keep it
            raise Overloaded(
                f"no job slot freed within {self.wait_s:.1f} s ({self.running} jobs run, {len(self._line)} wait)",
                self.retry_after(),
            ) from None
        except BaseException:
            if ticket.done() and not ticket.cancelled():
                self.release()  # handed over, but the requester left: pass it on
            raise
        finally:
            if ticket in self._line:
                self._line.remove(ticket)

    def release(self, held_s: float | None = None) -> None:
        """Give a slot back: to the first request in line, else to the pool; wakes every request
        waiting for workers to free up."""
        if held_s is not None:
            self._job_s = 0.8 * self._job_s + 0.2 * held_s
        while self._line:
            ticket = self._line.popleft()
            if not ticket.done():
                ticket.set_result(None)
                break
        else:
            self._free += 1
        if self._release is not None and not self._release.done():
            self._release.set_result(None)
        self._release = None

    async def released(self, timeout_s: float) -> None:
        """Returns when a slot is next released, or after ``timeout_s``."""
        if self._release is None:
            self._release = asyncio.get_running_loop().create_future()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(self._release)


def _loop_time(deadline: float) -> float:
    """A ``time.monotonic()`` deadline on the running loop's clock."""
    return asyncio.get_running_loop().time() + (deadline - time.monotonic())


# ---------------------------------------------------------------------------- chain reads
# What one admission reads on chain (chain time, the nonce, the client's escrow and withdrawal
# request, an API key's spending cap), sent as one JSON-RPC batch at the block "latest" instead of
# one web3 call each (each costs milliseconds of Python in web3's middleware). Reads asked while a
# batch is in flight go out together in the next one. Nothing is cached: every admission sees the
# chain as it is when its batch is answered.


@dataclass(frozen=True)
class ChainSnapshot:
    """One admission's chain reads, all at the same block."""

    timestamp: int
    nonce_used: bool
    escrow: int
    withdrawal: tuple[int, int, int]  # (amount, ready_at, expires_at); zeros when none
    spender: tuple[int, int] | None  # (remaining cap, expiry) of the API key's spender, if asked
    read_at: float  # time.monotonic() when the answer came


class ChainReads:
    """Batched reads of JobMarket for admissions (:mod:`dlis_market.chain.rpc_batch`)."""

    def __init__(self, market: JobMarket):
        self.market = market
        self.calls = StaticCalls(market.contract, ("nonceUsed", "escrowOf", "pendingWithdrawal", "spenderOf"))
        self.poster = BatchPoster(market.client.w3, market.client.settings.chain.tx_timeout_s)
        self._batches: Batcher[Request, Any] = Batcher(self.poster.post)

    async def admission(self, client: str, nonce: int, broker: str, spender: str | None = None) -> ChainSnapshot:
        """Chain time, whether ``nonce`` of ``client`` was used, its escrow and withdrawal request
        held for ``broker``, and ``spender``'s cap (when given), in one batch."""
        names = ["nonceUsed", "escrowOf", "pendingWithdrawal"]
        asks = [  # all queued before anything awaits: they go out in one batch
            self._batches.submit(("eth_getBlockByNumber", ["latest", False])),
            self._call("nonceUsed", client, nonce),
            self._call("escrowOf", client, broker),
            self._call("pendingWithdrawal", client, broker),
        ]
        if spender is not None:
            names.append("spenderOf")
            asks.append(self._call("spenderOf", client, spender))
        block, *answers = await asyncio.gather(*asks)
        used, escrow, withdrawal, *cap = (self.calls.decode(n, a) for n, a in zip(names, answers, strict=True))
        return ChainSnapshot(
            timestamp=int(block["timestamp"], 16),
            nonce_used=bool(used[0]),
            escrow=escrow[0],
            withdrawal=(withdrawal[0], withdrawal[1], withdrawal[2]),
            spender=(cap[0][0], cap[0][1]) if cap else None,
            read_at=time.monotonic(),
        )

    async def escrow(self, client: str, broker: str) -> tuple[int, tuple[int, int, int], float]:
        """(escrow, withdrawal request, when read) of ``client`` held for ``broker``, read again."""
        raw_escrow, raw_withdrawal = await asyncio.gather(
            self._call("escrowOf", client, broker), self._call("pendingWithdrawal", client, broker)
        )
        escrow, w = self.calls.decode("escrowOf", raw_escrow), self.calls.decode("pendingWithdrawal", raw_withdrawal)
        return escrow[0], (w[0], w[1], w[2]), time.monotonic()

    def _call(self, fn: str, *args: int | str) -> asyncio.Future[Any]:
        return self._batches.submit(self.calls.request(fn, *args))


class Batcher(Generic[Q, R]):
    """Coalesces calls made while one is in flight: ``process`` runs in a worker thread on every
    item asked meanwhile, one batch at a time, and returns each item's result or exception, in
    order. Under load a batch holds what arrived during the previous one; alone, an item goes at
    once. (Bound to the running event loop; a new loop starts afresh.)"""

    def __init__(self, process: Callable[[list[Q]], Sequence[R | Exception]]):
        self.process = process
        self._queued: list[tuple[Q, asyncio.Future[R]]] = []
        self._sender: asyncio.Task[None] | None = None

    def submit(self, item: Q) -> asyncio.Future[R]:
        loop = asyncio.get_running_loop()
        if self._sender is None or self._sender.done() or self._sender.get_loop() is not loop:
            self._queued = [q for q in self._queued if q[1].get_loop() is loop]
            self._sender = loop.create_task(self._drain())
        fut: asyncio.Future[R] = loop.create_future()
        self._queued.append((item, fut))
        return fut

    async def _drain(self) -> None:
        while self._queued:
            batch, self._queued = self._queued, []
            try:
                results = await asyncio.to_thread(self.process, [item for item, _ in batch])
            except Exception as exc:  # the whole batch failed: each of its callers gets the error
                results = [exc] * len(batch)
            for (_, fut), res in zip(batch, results, strict=True):
                if fut.done():
                    continue
                if isinstance(res, Exception):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)
