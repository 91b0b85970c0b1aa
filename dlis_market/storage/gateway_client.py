"""Client of a provider's trustless HTTP gateway: a file's bytes by CID, every block verified.

A file is asked for as one CAR (``GET /ipfs/{cid}?format=car`` with ``Accept:
application/vnd.ipld.car; version=1; order=dfs; dups=y``, IPIP-412, Kubo >= 0.22). The answer's
``Content-Type`` must say ``order=dfs`` and ``dups=y``; then each block that streams in must be
the next one a depth-first walk of the file's DAG expects, and must hash to its CID, before its
bytes are handed on. So nothing a gateway serves is taken on trust: a block that does not match
is :class:`ShardIntegrityError` (the gateway is lying), a cut or short CAR is
:class:`GatewayError`, and the caller drops that provider. The publication index's part sha256
is still checked by the caller on top.

:meth:`GatewayClient.probe` tells a gateway from a Kubo RPC API given by mistake: the RPC API is
an admin interface that must stay private to its machine, so a URL that answers
``/api/v0/version`` is refused with :class:`ProviderError`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import aiohttp

from dlis_market.storage.client import HttpSessionClient
from dlis_market.storage.errors import ContentTimeoutError, GatewayError, ProviderError, ShardIntegrityError
from dlis_market.storage.ipld import MAX_BLOCK, Cid, IpldError, check_block, check_car_header, decode_file_node

log = logging.getLogger(__name__)

CAR_ACCEPT = "application/vnd.ipld.car; version=1; order=dfs; dups=y"
PROBE_CID = "bafkqaaa"  # the empty identity CID: the spec's probe path
PROBE_TIMEOUT_S = 10.0
_MAX_HEADER = 64 << 10
_YIELD = 1 << 20  # hand file bytes on in chunks of about this size


class GatewayClient(HttpSessionClient):
    """``async with GatewayClient(url) as gw: stream = await gw.open_cat(cid, timeout_s=30)``."""

    def __init__(self, url: str, *, timeout_s: float = 60.0) -> None:
        super().__init__(url, timeout_s=timeout_s)

    async def probe(self, timeout_s: float = PROBE_TIMEOUT_S) -> None:
        """Check that :attr:`url` is a trustless gateway and not a Kubo RPC API.

        Raises :class:`ProviderError` for an RPC API, :class:`GatewayError` when nothing answers
        or the answer is not a trustless gateway's."""
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        try:
            async with self.session.post(f"{self.url}/api/v0/version", timeout=timeout) as response:
                body = await response.json(content_type=None) if response.status == 200 else None
            if isinstance(body, dict) and "Version" in body:
                raise ProviderError(
                    f"provider {self.url} is a Kubo RPC API (it answered /api/v0/version): that is an admin "
                    "interface that must stay private to its machine. Pass the provider's gateway URL instead "
                    "(`dlis ipfs id` on the provider prints it as gateway)"
                )
            headers = {"Accept": "application/vnd.ipld.raw"}
            url = f"{self.url}/ipfs/{PROBE_CID}?format=raw"
            async with self.session.get(url, headers=headers, timeout=timeout) as response:
                status = response.status
                await response.read()
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise GatewayError(f"no gateway answers at {self.url} ({exc}); is the provider running?") from exc
        except TimeoutError:
            raise GatewayError(f"the gateway at {self.url} gave no answer within {timeout_s:.0f}s") from None
        except ValueError:  # a body that is not JSON: not an RPC API, go on to the gateway probe
            status = 0
        if status != 200:
            raise GatewayError(
                f"{self.url} is not a trustless gateway: GET /ipfs/{PROBE_CID}?format=raw answered HTTP {status}; "
                "give the provider's gateway URL (http://HOST:PORT)"
            )

    async def open_cat(self, cid: str, *, timeout_s: float | None = None) -> CarFileStream:
        """Start reading file ``cid`` as a verified CAR; returns once the gateway answered 200.
        ``timeout_s`` bounds the wait for the answer and for each later read."""
        timeout = timeout_s or self.timeout_s
        try:
            root = Cid.parse(cid)
        except IpldError as exc:
            raise GatewayError(f"cannot ask a gateway for {cid!r}: {exc}") from None
        try:
            response = await self.session.get(
                f"{self.url}/ipfs/{root}",
                params={"format": "car", "dag-scope": "all"},
                headers={"Accept": CAR_ACCEPT},
                timeout=aiohttp.ClientTimeout(total=None, sock_read=timeout, sock_connect=min(timeout, 10)),
            )
        except aiohttp.ClientConnectionError as exc:
            raise GatewayError(f"no gateway answers at {self.url} ({exc})") from exc
        except TimeoutError:
            raise ContentTimeoutError(
                f"{cid}: the gateway at {self.url} gave no answer within {timeout:.0f}s"
            ) from None
        try:
            if response.status != 200:
                text = (await response.text())[:300].strip()
                raise GatewayError(f"gateway {self.url} answered HTTP {response.status} for {cid}: {text}")
            kind = response.headers.get("Content-Type", "").replace(" ", "").lower()
            params = set(kind.split(";")[1:])
            if not kind.startswith("application/vnd.ipld.car") or not {"order=dfs", "dups=y"} <= params:
                raise GatewayError(
                    f"gateway {self.url} answered Content-Type {kind!r} for {cid}; a CARv1 with order=dfs and dups=y "
                    "is needed (IPIP-412: Kubo >= 0.22 with Gateway.DeserializedResponses off)"
                )
        except BaseException:
            response.release()
            raise
        return CarFileStream(root, response, timeout, self.url)

    async def cat_bytes(self, cid: str, *, timeout_s: float | None = None, max_size: int = 64 << 20) -> bytes:
        stream = await self.open_cat(cid, timeout_s=timeout_s)
        parts: list[bytes] = []
        total = 0
        try:
            async for chunk in stream.chunks():
                total += len(chunk)
                if total > max_size:
                    raise GatewayError(f"{cid} from {self.url} is larger than the {max_size} bytes expected here")
                parts.append(chunk)
        finally:
            stream.release()
        return b"".join(parts)


class CarFileStream:
    """An answered CAR request: :meth:`chunks` yields the file's bytes, verified block by block."""

    def __init__(self, root: Cid, response: aiohttp.ClientResponse, timeout_s: float, url: str) -> None:
        self.root = root
        self._response = response
        self._timeout_s = timeout_s
        self._url = url

    @contextmanager
    def _mid_car(self) -> Iterator[None]:
        """A lost connection or a stall while reading the body, as the caller's errors."""
        try:
            yield
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            raise GatewayError(f"the CAR of {self.root} from {self._url} was cut off: {exc}") from exc
        except TimeoutError:
            raise ContentTimeoutError(
                f"{self.root}: the gateway at {self._url} stalled for {self._timeout_s:.0f}s mid-CAR"
            ) from None

    async def _read(self, n: int) -> bytes:
        with self._mid_car():
            try:
                return await self._response.content.readexactly(n)
            except asyncio.IncompleteReadError as exc:
                raise GatewayError(
                    f"the CAR of {self.root} from {self._url} was cut off ({len(exc.partial)} of {n} bytes of a "
                    "section)"
                ) from None

    async def _read_first(self) -> bytes:
        """One byte, or b"" at the end of the body."""
        with self._mid_car():
            return await self._response.content.read(1)

    async def _varint(self, *, eof_ok: bool) -> int | None:
        value = shift = 0
        while True:
            if shift == 0:  # the first byte: a clean end of the CAR may come instead
                first = await self._read_first()
                if not first:
                    if eof_ok:
                        return None
                    raise GatewayError(f"the CAR of {self.root} from {self._url} is empty")
                byte = first[0]
            else:
                byte = (await self._read(1))[0]
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7
            if shift > 63:
                raise GatewayError(f"the CAR of {self.root} from {self._url} has a malformed section length")

    async def chunks(self) -> AsyncIterator[bytes]:
        """The file's bytes in order. Each block must be the next in a depth-first walk from the
        root and hash to its CID; the CAR must end exactly when the walk does."""
        header_len = await self._varint(eof_ok=False)
        if header_len is None or not 0 < header_len <= _MAX_HEADER:
            raise GatewayError(f"the CAR of {self.root} from {self._url} has a header of {header_len} bytes")
        try:
            check_car_header(await self._read(header_len))
        except IpldError as exc:
            raise GatewayError(f"gateway {self._url} sent no CARv1 for {self.root}: {exc}") from None
        expected: list[Cid] = [self.root]  # the walk's stack: next block on top
        pending: list[bytes] = []
        pending_size = 0
        while expected:
            want = expected.pop()
            if want.is_identity:  # its bytes are in the CID: never sent as a block
                block: bytes = want.digest
            else:
                block = await self._next_block(want)
            try:
                node = decode_file_node(want, block)
            except IpldError as exc:
                raise ShardIntegrityError(f"gateway {self._url} served {self.root}: {exc}") from None
            if node.data:
                pending.append(bytes(node.data))
                pending_size += len(node.data)
                if pending_size >= _YIELD:
                    yield b"".join(pending)
                    pending, pending_size = [], 0
            expected.extend(reversed(node.links))
        if pending:
            yield b"".join(pending)
        if await self._varint(eof_ok=True) is not None:
            raise GatewayError(f"the CAR of {self.root} from {self._url} has blocks after the file's last one")

    async def _next_block(self, want: Cid) -> bytes:
        size = await self._varint(eof_ok=True)
        if size is None:
            raise GatewayError(f"the CAR of {self.root} from {self._url} ended before block {want}: incomplete")
        if not 0 < size <= MAX_BLOCK + 64:
            raise GatewayError(f"the CAR of {self.root} from {self._url} has a section of {size} bytes")
        section = await self._read(size)
        try:
            got, at = Cid.read(section)
        except IpldError as exc:
            raise GatewayError(f"the CAR of {self.root} from {self._url}: {exc}") from None
        if got != want:
            raise ShardIntegrityError(
                f"gateway {self._url} served wrong bytes for {self.root}: block {got} where the DAG has {want} next"
            )
        block = section[at:]
        try:
            check_block(want, block)
        except IpldError as exc:
            raise ShardIntegrityError(f"gateway {self._url} served wrong bytes for {self.root}: {exc}") from None
        return block

    def release(self) -> None:
        self._response.release()
