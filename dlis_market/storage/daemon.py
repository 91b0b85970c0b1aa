"""The embedded IPFS daemon: a Kubo child process behind a Kubo-compatible RPC API on 127.0.0.1,
and a read-only trustless gateway over the node's blocks.

Process layout of one node (two processes)::

    daemon process (this module)       aiohttp: RPC API on 127.0.0.1:API_PORT (/api/v0/..., private),
                                                gateway on 127.0.0.1:GATEWAY_PORT (/ipfs/..., read-only)
      └─ Kubo child (kubo_child.py)     libkubo node, swarm on /ip4/127.0.0.1/tcp/SWARM_PORT

The gateway URL is what a provider advertises to fetchers (:mod:`.gateway`): NoFetch, no
deserialized responses, no write methods. The RPC API never leaves the machine.

- In the foreground: :func:`run_daemon` (what ``dlis ipfs daemon`` runs); SIGTERM/SIGINT stop it
  cleanly (server closed, child sent SIGTERM so it runs CleanupNode, ``api.json`` removed).
- From Python: :class:`EmbeddedDaemon` starts ``python -m dlis_market.storage.daemon`` in its
  own session, waits until it is ready and gives its :class:`DaemonInfo` (API URL, gateway URL,
  peer id, swarm multiaddrs); ``stop()`` or the context manager ends it.

A ready daemon writes ``REPO/api.json`` (its :class:`DaemonInfo`), like Kubo writes ``REPO/api``:
:func:`running_daemon` finds it. Logs (``kubo.log``, ``kubo-child.log``, ``daemon.log``) go to
``REPO/logs`` unless told otherwise, never to the working directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType

from aiohttp import web

from dlis_market.settings import Settings
from dlis_market.storage.errors import DaemonError, StorageError
from dlis_market.storage.gateway import FlatfsBlocks, GatewayServer
from dlis_market.storage.kubo_process import KuboProcess, KuboProcessConfig
from dlis_market.storage.rpc_server import RpcServer

log = logging.getLogger(__name__)

API_FILE = "api.json"


@dataclass(frozen=True)
class DaemonConfig:
    repo: Path
    api_port: int = 0  # 0: any free port
    swarm_port: int = 0
    gateway_port: int = 0
    log_dir: Path | None = None  # default REPO/logs
    swarm_secret: str | None = None
    memory_limit_mb: int = 1024
    request_timeout_s: float = 60.0

    @property
    def logs(self) -> Path:
        return self.log_dir or self.repo / "logs"

    @classmethod
    def from_settings(cls, settings: Settings) -> DaemonConfig:
        s = settings.storage
        return cls(
            repo=Path(s.repo_dir) if s.repo_dir else settings.home / "ipfs",
            api_port=s.api_port,
            swarm_port=s.swarm_port,
            gateway_port=s.gateway_port,
            swarm_secret=s.swarm_secret,
            memory_limit_mb=s.memory_limit_mb,
            request_timeout_s=s.request_timeout_s,
        )


@dataclass(frozen=True)
class DaemonInfo:
    api_url: str
    peer_id: str
    multiaddrs: tuple[str, ...] = field(default_factory=tuple)
    pid: int = 0
    gateway_url: str = ""  # the read-only trustless gateway: what a provider advertises

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "multiaddrs": list(self.multiaddrs)})

    @classmethod
    def from_json(cls, text: str) -> DaemonInfo:
        data = json.loads(text)
        return cls(
            str(data["api_url"]),
            str(data["peer_id"]),
            tuple(data["multiaddrs"]),
            int(data["pid"]),
            str(data.get("gateway_url") or ""),  # absent in the api.json of older daemons
        )


async def serve(config: DaemonConfig, stop: asyncio.Event, ready: asyncio.Future[DaemonInfo] | None = None) -> None:
    """Run the daemon until ``stop`` is set; then shut the server and the Kubo child down."""
    config.repo.mkdir(parents=True, exist_ok=True)
    spool = config.repo / "spool"
    shutil.rmtree(spool, ignore_errors=True)  # leftovers of a killed daemon
    kubo = KuboProcess(
        KuboProcessConfig(
            repo=config.repo,
            log_dir=config.logs,
            swarm_port=config.swarm_port,
            swarm_secret=config.swarm_secret,
            memory_limit_mb=config.memory_limit_mb,
        )
    )
    ident = await kubo.start()
    runner = web.AppRunner(RpcServer(kubo, spool, config.request_timeout_s).app(), access_log=None)
    await runner.setup()
    blocks = FlatfsBlocks(config.repo / "blocks")
    gateway_runner = web.AppRunner(GatewayServer(blocks).app(), access_log=None)
    await gateway_runner.setup()
    api_file = config.repo / API_FILE
    try:
        blocks.check()
        api_port = await _listen(runner, config.api_port, "the RPC API", "storage.api_port", "--api-port")
        gateway_port = await _listen(
            gateway_runner, config.gateway_port, "the gateway", "storage.gateway_port", "--gateway-port"
        )
        info = DaemonInfo(
            f"http://127.0.0.1:{api_port}",
            ident.peer_id,
            ident.multiaddrs,
            os.getpid(),
            f"http://127.0.0.1:{gateway_port}",
        )
        api_file.write_text(info.to_json())
        log.info(
            "IPFS daemon ready: API %s, gateway %s, swarm %s",
            info.api_url,
            info.gateway_url,
            ", ".join(info.multiaddrs),
        )
        if ready is not None and not ready.done():
            ready.set_result(info)
        await stop.wait()
    finally:
        with contextlib.suppress(FileNotFoundError):
            if api_file.exists() and DaemonInfo.from_json(api_file.read_text()).pid == os.getpid():
                api_file.unlink()
        await gateway_runner.cleanup()
        await runner.cleanup()
        await kubo.stop()


async def _listen(runner: web.AppRunner, port: int, what: str, setting: str, flag: str) -> int:
    """Serve ``runner`` on 127.0.0.1:``port``; the port it got."""
    site = web.TCPSite(runner, "127.0.0.1", port)
    try:
        await site.start()
    except OSError as exc:
        env = "DLIS_" + setting.upper().replace(".", "__")
        raise DaemonError(
            f"cannot serve {what} on 127.0.0.1:{port} ({exc.strerror}); is another daemon running? "
            f"Set {setting} ({env}) or pass {flag} 0"
        ) from exc
    server = site._server
    assert server is not None and isinstance(server, asyncio.base_events.Server)
    return int(server.sockets[0].getsockname()[1])


def run_daemon(config: DaemonConfig, on_ready: Callable[[DaemonInfo], None] | None = None) -> None:
    """Serve in the foreground until SIGTERM or SIGINT (Ctrl-C)."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        ready: asyncio.Future[DaemonInfo] = loop.create_future()
        if on_ready is not None:
            ready.add_done_callback(lambda f: on_ready(f.result()) if not f.exception() else None)
        await serve(config, stop, ready)

    asyncio.run(main())


def running_daemon(repo: Path, timeout_s: float = 2.0) -> DaemonInfo | None:
    """The daemon serving ``repo`` if one is up and answers ``/api/v0/version``, else None."""
    try:
        info = DaemonInfo.from_json((repo / API_FILE).read_text())
    except (FileNotFoundError, ValueError, KeyError):
        return None
    try:
        request = urllib.request.Request(f"{info.api_url}/api/v0/version", method="POST")
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            response.read()
    except (urllib.error.URLError, OSError):
        return None
    return info


class EmbeddedDaemon:
    """An embedded daemon in its own process: ``with EmbeddedDaemon(cfg) as d: d.info.api_url``."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None
        self._info: DaemonInfo | None = None

    @property
    def info(self) -> DaemonInfo:
        if self._info is None:
            raise DaemonError("the embedded daemon is not started; call start() first")
        return self._info

    def start(self, timeout_s: float = 90.0) -> DaemonInfo:
        cfg = self.config
        cfg.logs.mkdir(parents=True, exist_ok=True)
        payload = {**asdict(cfg), "repo": str(cfg.repo), "log_dir": str(cfg.logs)}
        with (cfg.logs / "daemon.log").open("ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dlis_market.storage.daemon"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_file,
                cwd=cfg.logs,
                start_new_session=True,
            )
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write((json.dumps(payload) + "\n").encode())
        self.process.stdin.close()
        deadline = time.monotonic() + timeout_s
        line = _readline_until(self.process.stdout, deadline)
        if not line:
            with contextlib.suppress(subprocess.TimeoutExpired):  # EOF on stdout precedes the exit status
                self.process.wait(timeout=5)
            exited = self.process.poll() is not None
            self.kill()
            log_text = (cfg.logs / "daemon.log").read_text(errors="replace").strip().splitlines()
            last = next((x for x in reversed(log_text) if "error" in x.lower()), log_text[-1] if log_text else "")
            how = "exited at start" if exited else f"did not become ready within {timeout_s:.0f}s"
            raise DaemonError(
                f"embedded IPFS daemon (repo {cfg.repo}) {how}: "
                f"{last.strip()} (see {cfg.logs}/daemon.log and kubo-child.log)"
            )
        self._info = DaemonInfo.from_json(line)
        return self._info

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM (clean shutdown of server and Kubo child), SIGKILL after ``timeout_s``."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the daemon; its Kubo child sees its pipe close and exits by itself."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def __enter__(self) -> EmbeddedDaemon:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _readline_until(stream: object, deadline: float) -> str:
    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)  # type: ignore[arg-type]
    buf = b""
    fd = stream.fileno()  # type: ignore[attr-defined]
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not sel.select(left):
            return ""
        chunk = os.read(fd, 65536)
        if not chunk:
            return ""
        buf += chunk
    return buf.split(b"\n", 1)[0].decode()


def _main() -> None:
    data = json.loads(sys.stdin.readline())
    config = DaemonConfig(
        repo=Path(data["repo"]),
        api_port=int(data["api_port"]),
        swarm_port=int(data["swarm_port"]),
        gateway_port=int(data.get("gateway_port", 0)),
        log_dir=Path(data["log_dir"]),
        swarm_secret=data.get("swarm_secret"),
        memory_limit_mb=int(data["memory_limit_mb"]),
        request_timeout_s=float(data["request_timeout_s"]),
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    def announce(info: DaemonInfo) -> None:
        sys.stdout.write(info.to_json() + "\n")
        sys.stdout.flush()

    try:
        run_daemon(config, announce)
    except StorageError as exc:  # reported in daemon.log, which EmbeddedDaemon.start quotes
        log.error("%s", exc)
        sys.exit(1)


if __name__ == "__main__":
    _main()
