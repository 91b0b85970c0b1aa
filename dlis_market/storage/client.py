"""Async client of the Kubo HTTP RPC API (aiohttp): the embedded daemon or a user's Kubo alike.

Every command is ``POST {url}/api/v0/<cmd>?arg=...`` (https://docs.ipfs.tech/reference/kubo/rpc/).
Calls time out (``timeout_s``; content reads also pass Kubo's ``timeout`` argument so the daemon
gives up too) and retry with capped exponential backoff when the daemon is unreachable or answers
5xx. A ``cat`` is retried only before its first byte: after that the caller restarts the file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import aiohttp

from dlis_market.storage.errors import ContentTimeoutError, KuboApiError, KuboUnreachableError
from dlis_market.storage.manifest_files import file_range
from dlis_market.types import Cid

log = logging.getLogger(__name__)

T = TypeVar("T")
_CHUNK = 1 << 20
_TIMEOUT_MARKERS = ("context deadline exceeded", "timeout", "timed out")


@dataclass(frozen=True)
class AddResult:
    name: str
    cid: Cid
    size: int  # Kubo: cumulative DAG size; embedded node: file size


@dataclass(frozen=True)
class PeerInfo:
    addr: str
    peer: str


@dataclass(frozen=True)
class NodeInfo:
    peer_id: str
    addresses: tuple[str, ...]
    agent_version: str


def _duration(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


class HttpSessionClient:
    """An HTTP client of one base URL whose aiohttp session lives for an ``async with`` block
    (:class:`KuboClient`, and the gateway client of :mod:`.gateway_client`)."""

    def __init__(self, url: str, *, timeout_s: float) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError(f"{type(self).__name__} used outside 'async with'")
        return self._session


class KuboClient(HttpSessionClient):
    """``async with KuboClient(url) as kubo: cid = (await kubo.add_file(p)).cid``."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 60.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
    ) -> None:
        super().__init__(url, timeout_s=timeout_s)
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s

    # ------------------------------------------------------------------ plumbing

    def _endpoint(self, cmd: str) -> str:
        return f"{self.url}/api/v0/{cmd}"

    async def _retrying(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        delay = self.backoff_s
        for n in range(self.retries + 1):
            try:
                return await attempt()
            except (KuboUnreachableError, _Retryable) as exc:
                if n == self.retries:
                    if isinstance(exc, _Retryable):
                        raise exc.error from None
                    raise
                log.info("kubo %s failed (%s); retry %d/%d in %.1fs", what, exc, n + 1, self.retries, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff_s)
        raise AssertionError("unreachable")

    async def _raise_for(self, cmd: str, response: aiohttp.ClientResponse) -> None:
        if response.status < 300:
            return
        text = await response.text()
        try:
            body = json.loads(text)
            message = str(body.get("Message", text))
            code = int(body.get("Code", 0))
        except (ValueError, AttributeError):
            message, code = text.strip() or response.reason or "", 0
        if any(m in message.lower() for m in _TIMEOUT_MARKERS):
            raise ContentTimeoutError(f"kubo {cmd}: {message}")
        error = KuboApiError(
            f"kubo {cmd} failed (HTTP {response.status}): {message}", status=response.status, code=code
        )
        if response.status >= 500 and code != 1:
            raise _Retryable(error)
        raise error

    def _params(self, args: list[str], options: dict[str, Any]) -> list[tuple[str, str]]:
        params = [("arg", a) for a in args]
        for key, value in options.items():
            if value is None:
                continue
            params.append((key, str(value).lower() if isinstance(value, bool) else str(value)))
        return params

    async def _post_json(
        self, cmd: str, args: list[str] | None = None, timeout_s: float | None = None, **options: Any
    ) -> Any:
        timeout = timeout_s or self.timeout_s

        async def attempt() -> Any:
            try:
                async with self.session.post(
                    self._endpoint(cmd),
                    params=self._params(args or [], options),
                    timeout=aiohttp.ClientTimeout(total=timeout + 5, sock_connect=min(timeout, 10)),
                ) as response:
                    await self._raise_for(cmd, response)
                    return json.loads(await response.text() or "null")
            except aiohttp.ClientConnectionError as exc:
                raise KuboUnreachableError(f"no Kubo RPC API at {self.url} ({exc}); is the daemon running?") from exc
            except TimeoutError:
                raise ContentTimeoutError(f"kubo {cmd} {args or ''} gave no answer within {timeout:.0f}s") from None

        return await self._retrying(cmd, attempt)

    # ------------------------------------------------------------------ commands

    async def version(self) -> str:
        return str((await self._post_json("version"))["Version"])

    async def id(self) -> NodeInfo:
        body = await self._post_json("id")
        return NodeInfo(str(body["ID"]), tuple(body.get("Addresses") or ()), str(body.get("AgentVersion", "")))

    async def add_file(
        self,
        path: Path,
        *,
        offset: int = 0,
        length: int | None = None,
        name: str | None = None,
        pin: bool = True,
    ) -> AddResult:
        """Add ``path`` (or ``length`` bytes of it from ``offset``) as one file, Kubo defaults (CIDv0)."""
        size = await asyncio.to_thread(os.path.getsize, path)
        end = size if length is None else min(size, offset + length)
        filename = name or path.name

        async def body() -> AsyncIterator[bytes]:
            for chunk in file_range(path, offset, end, _CHUNK):
                yield chunk

        async def attempt() -> AddResult:
            with aiohttp.MultipartWriter("form-data") as form:
                part = form.append(body(), {"Content-Type": "application/octet-stream"})
                part.set_content_disposition("form-data", name="file", filename=filename)
                try:
                    async with self.session.post(
                        self._endpoint("add"),
                        params=self._params([], {"pin": pin, "cid-version": 0}),
                        data=form,
                        timeout=aiohttp.ClientTimeout(total=None, sock_read=self.timeout_s, sock_connect=10),
                    ) as response:
                        await self._raise_for("add", response)
                        text = await response.text()
                except aiohttp.ClientConnectionError as exc:
                    raise KuboUnreachableError(f"no Kubo RPC API at {self.url} ({exc})") from exc
                except TimeoutError:
                    raise ContentTimeoutError(f"kubo add {filename}: no answer within {self.timeout_s:.0f}s") from None
            return parse_add_response(text)[-1]

        return await self._retrying("add", attempt)

    async def open_cat(self, cid: str, *, timeout_s: float | None = None) -> CatStream:
        """Start reading file ``cid``: returns once the daemon starts answering (retried until
        then). ``timeout_s`` bounds the wait for the first byte and each later read; the daemon is
        asked to give up at the same time (Kubo's ``timeout`` argument)."""
        timeout = timeout_s or self.timeout_s

        async def attempt() -> aiohttp.ClientResponse:
            try:
                response = await self.session.post(
                    self._endpoint("cat"),
                    params=self._params([cid], {"timeout": _duration(timeout)}),
                    timeout=aiohttp.ClientTimeout(total=None, sock_read=timeout + 5, sock_connect=10),
                )
            except aiohttp.ClientConnectionError as exc:
                raise KuboUnreachableError(f"no Kubo RPC API at {self.url} ({exc})") from exc
            except TimeoutError:
                raise ContentTimeoutError(f"{cid}: nobody delivered it within {timeout:.0f}s") from None
            try:
                await self._raise_for("cat", response)
            except BaseException:
                response.release()
                raise
            return response

        return CatStream(cid, await self._retrying("cat", attempt), timeout, self.url)

    async def cat(self, cid: str, *, timeout_s: float | None = None) -> AsyncIterator[bytes]:
        """Stream the bytes of file ``cid`` (see :meth:`open_cat`)."""
        stream = await self.open_cat(cid, timeout_s=timeout_s)
        try:
            async for chunk in stream.chunks():
                yield chunk
        finally:
            stream.release()

    async def cat_bytes(self, cid: str, *, timeout_s: float | None = None, max_size: int = 64 << 20) -> bytes:
        parts: list[bytes] = []
        total = 0
        async for chunk in self.cat(cid, timeout_s=timeout_s):
            total += len(chunk)
            if total > max_size:
                raise KuboApiError(f"{cid} is larger than the {max_size} bytes expected here")
            parts.append(chunk)
        return b"".join(parts)

    async def pin_add(self, cid: str, *, timeout_s: float | None = None) -> list[str]:
        t = timeout_s or self.timeout_s
        body = await self._post_json("pin/add", [cid], timeout_s=t, timeout=_duration(t))
        return [str(p) for p in body.get("Pins") or []]

    async def pin_rm(self, cid: str) -> list[str]:
        return [str(p) for p in (await self._post_json("pin/rm", [cid])).get("Pins") or []]

    async def pin_ls(self, cid: str | None = None) -> dict[str, str]:
        """Pinned CIDs with their pin type; ``cid`` given and not pinned -> KuboApiError."""
        return parse_pin_ls(await self._post_json("pin/ls", [cid] if cid else [], type="recursive"))

    async def swarm_connect(self, multiaddr: str, *, timeout_s: float | None = None) -> None:
        t = timeout_s or self.timeout_s
        await self._post_json("swarm/connect", [multiaddr], timeout_s=t, timeout=_duration(t))

    async def swarm_peers(self) -> list[PeerInfo]:
        return parse_swarm_peers(await self._post_json("swarm/peers"))


class CatStream:
    """An answered ``cat``: iterate :meth:`chunks`, then (or on error) :meth:`release`."""

    def __init__(self, cid: str, response: aiohttp.ClientResponse, timeout_s: float, url: str) -> None:
        self.cid = cid
        self._response = response
        self._timeout_s = timeout_s
        self._url = url

    async def chunks(self) -> AsyncIterator[bytes]:
        cid = self.cid
        while True:
            try:
                chunk = await self._response.content.read(_CHUNK)
            except aiohttp.ClientPayloadError as exc:
                raise KuboUnreachableError(f"cat {cid} was cut off: {exc}") from exc
            except aiohttp.ClientConnectionError as exc:
                raise KuboUnreachableError(f"cat {cid} lost the daemon at {self._url}: {exc}") from exc
            except TimeoutError:
                raise ContentTimeoutError(f"{cid}: stalled for {self._timeout_s:.0f}s mid-stream") from None
            if not chunk:
                break
            yield chunk
        # Kubo reports a mid-stream failure in the X-Stream-Error trailer, which aiohttp does
        # not expose; callers verify size and sha256, so a cut stream is caught there.
        error = self._response.headers.get("X-Stream-Error")
        if error:
            raise KuboApiError(f"cat {cid} failed mid-stream: {error}")

    def release(self) -> None:
        self._response.release()


class _Retryable(Exception):
    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def parse_add_response(text: str) -> list[AddResult]:
    """``add`` answers one JSON object per line (progress lines have no ``Hash``)."""
    results = []
    for line in text.splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        if "Hash" in entry:
            results.append(AddResult(str(entry.get("Name", "")), Cid(str(entry["Hash"])), int(entry.get("Size", 0))))
    if not results:
        raise KuboApiError(f"kubo add answered no CID: {text[:200]!r}")
    return results


def parse_pin_ls(body: Any) -> dict[str, str]:
    """``{"Keys": {cid: {"Type"}}}``, or one streamed ``{"Cid", "Type"}`` object (``stream=true``)."""
    body = body or {}
    if "Cid" in body:
        return {str(body["Cid"]): str(body.get("Type", ""))}
    keys = body.get("Keys") or {}
    return {str(cid): str((entry or {}).get("Type", "")) for cid, entry in keys.items()}


def parse_swarm_peers(body: Any) -> list[PeerInfo]:
    return [PeerInfo(str(p.get("Addr", "")), str(p.get("Peer", ""))) for p in (body or {}).get("Peers") or []]
