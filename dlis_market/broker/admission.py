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

from dlis_market.broker.errors import Overloaded

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
