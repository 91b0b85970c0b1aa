"""An in-process stand-in for a Kubo RPC API, answering with the shapes Kubo documents.

Response bodies follow https://docs.ipfs.tech/reference/kubo/rpc/ (the sections named in each
handler). CIDs here are fake ("Qm" + sha256 of the bytes); content lives in a dict, so tests
can tamper with it, stall it, or count calls.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aiohttp import BodyPartReader, web


@dataclass
class FakeState:
    blobs: dict[str, bytes] = field(default_factory=dict)
    pins: set[str] = field(default_factory=set)
    connected: list[str] = field(default_factory=list)
    cat_calls: dict[str, int] = field(default_factory=dict)
    corrupt_once: set[str] = field(default_factory=set)  # first cat of these returns flipped bytes
    fail_status: list[int] = field(default_factory=list)  # next responses fail with these statuses
    unreachable_peers: set[str] = field(default_factory=set)
    corrupt_all: bool = False  # every cat returns flipped bytes (a provider that lies)
    die_after_cats: int | None = None  # after this many cats, every connection is cut mid-answer
    peer_id: str = "QmFakePeer"

    def put(self, data: bytes) -> str:
        cid = "Qm" + hashlib.sha256(data).hexdigest()[:44]
        self.blobs[cid] = data
        return cid


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
        dying = state.die_after_cats is not None and sum(state.cat_calls.values()) > state.die_after_cats
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
