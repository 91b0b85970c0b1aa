"""The Kubo child process: one libkubo node driven over a JSON-lines pipe.

Started by :class:`dlis_market.storage.kubo_process.KuboProcess` as
``python -m dlis_market.storage.kubo_child`` with its working directory set to the log folder
(libkubo writes ``./kubo.log``). Protocol, one JSON object per line:

- stdin, first line: ``{"repo": str, "swarm_port": int, "swarm_secret": str | null}``; the child
  creates the repo if needed, applies the private config, starts the node and answers
  ``{"event": "ready", "peer_id": str, "addrs": [str]}`` on its protocol pipe.
- then requests ``{"id": int, "op": str, "args": {...}}``, answered (in any order, each in its own
  thread) by ``{"id": int, "ok": true, "result": ...}`` or ``{"id": int, "ok": false, "error": str}``.

The protocol pipe is a private copy of the original stdout; fd 1 and 2 go to the log file, so
anything Go prints cannot corrupt it. stdin EOF (the parent died), SIGTERM or SIGINT stop the node
with CleanupNode and exit. Timeouts are the parent's job: it kills this process.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from dlis_market.storage.kubo_config import apply_private_config
from dlis_market.storage.libkubo import LibKubo

READY_TIMEOUT_S = 30.0


class _Stop(Exception):
    """Raised in the main thread by the signal handler."""


class KuboChild:
    def __init__(self, kubo: LibKubo, out: TextIO) -> None:
        self._kubo = kubo
        self._out = out
        self._lock = threading.Lock()
        self._ops: dict[str, Callable[[dict[str, Any]], Any]] = {
            "add": self._add,
            "get": self._get,
            "pin": self._pin,
            "unpin": self._unpin,
            "pins": lambda _args: json.loads(self._kubo.list_pins() or "[]"),
            "connect": self._connect,
            "peers": lambda _args: json.loads(self._kubo.list_peers() or "[]"),
            "id": lambda _args: self.identity(),
        }

    def send(self, message: dict[str, Any]) -> None:
        with self._lock:
            self._out.write(json.dumps(message) + "\n")
            self._out.flush()

    def identity(self) -> dict[str, Any]:
        return {"peer_id": self._kubo.node_id(), "addrs": json.loads(self._kubo.multiaddrs() or "[]")}

    def handle(self, request: dict[str, Any]) -> None:
        rid = request.get("id")
        op = self._ops.get(str(request.get("op")))
        if op is None:
            self.send({"id": rid, "ok": False, "error": f"unknown op {request.get('op')!r}"})
            return
        try:
            result = op(request.get("args") or {})
        except (RuntimeError, OSError, ValueError) as exc:  # reported to the parent, who decides
            self.send({"id": rid, "ok": False, "error": str(exc)})
            return
        self.send({"id": rid, "ok": True, "result": result})

    def _add(self, args: dict[str, Any]) -> dict[str, Any]:
        path = str(args["path"])
        cid = self._kubo.add_file(path)  # AddFile pins what it adds
        if not cid:
            raise RuntimeError(f"libkubo AddFile failed for {path}; see kubo.log")
        if not args.get("pin", True):
            self._kubo.unpin(cid)
        return {"cid": cid, "size": os.path.getsize(path)}

    def _get(self, args: dict[str, Any]) -> dict[str, Any]:
        cid, dest = str(args["cid"]), str(args["dest"])
        if not self._kubo.download(cid, dest):
            raise RuntimeError(f"could not get {cid}: invalid CID or content unavailable")
        if os.path.isdir(dest):
            raise ValueError(f"{cid} is a directory; only files can be read with cat")
        return {"size": os.path.getsize(dest)}

    def _pin(self, args: dict[str, Any]) -> str:
        cid = str(args["cid"])
        if not self._kubo.pin(cid):
            raise RuntimeError(f"pin {cid} failed: invalid CID or content unavailable")
        return cid

    def _unpin(self, args: dict[str, Any]) -> str:
        cid = str(args["cid"])
        if not self._kubo.unpin(cid):
            raise RuntimeError(f"not pinned or pinned indirectly: {cid}")
        return cid

    def _connect(self, args: dict[str, Any]) -> str:
        addr = str(args["addr"])
        if not self._kubo.connect(addr):
            raise RuntimeError(f"failure: could not connect to {addr}")
        return addr


def _start(kubo: LibKubo, init: dict[str, Any]) -> None:
    repo = Path(init["repo"])
    repo.mkdir(parents=True, exist_ok=True)
    if not (repo / "config").exists() and not kubo.create_repo():
        raise RuntimeError(f"CreateRepo failed for {repo}")
    apply_private_config(repo, int(init["swarm_port"]), init.get("swarm_secret"))
    if not kubo.run_node():
        raise RuntimeError(f"RunNode failed for {repo}; see kubo.log")


def _stop_handler(_signum: int, _frame: FrameType | None) -> None:
    raise _Stop


def main() -> int:
    out = os.fdopen(os.dup(1), "w")
    log = open("kubo-child.log", "a")  # noqa: SIM115 - held for the process lifetime
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    init = json.loads(sys.stdin.readline() or "{}")
    kubo = LibKubo(Path(init["repo"]))
    child = KuboChild(kubo, out)
    try:
        _start(kubo, init)
        # libkubo swallows SIGINT/SIGTERM once RunNode ran: take them back.
        signal.signal(signal.SIGTERM, _stop_handler)
        signal.signal(signal.SIGINT, _stop_handler)
        deadline = time.monotonic() + READY_TIMEOUT_S
        ident = child.identity()
        while not ident["addrs"] and time.monotonic() < deadline:
            time.sleep(0.05)
            ident = child.identity()
        if not ident["addrs"]:
            raise RuntimeError(f"node did not listen on its swarm port within {READY_TIMEOUT_S}s")
    except (RuntimeError, OSError, KeyError) as exc:  # reported to the parent, then exit
        child.send({"event": "failed", "error": str(exc)})
        return 1
    child.send({"event": "ready", **ident})
    pool = ThreadPoolExecutor(max_workers=16)
    try:
        for line in sys.stdin:
            if line.strip():
                pool.submit(child.handle, json.loads(line))
    except _Stop:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        kubo.cleanup()
    # Worker threads may sit inside libkubo forever (Download has no timeout): do not join them.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
