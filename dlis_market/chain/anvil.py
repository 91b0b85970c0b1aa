"""A local Anvil chain on 127.0.0.1: start, reuse, stop.

``dlis chain up`` runs Anvil detached with ``--state`` (state loaded at start, dumped every few
seconds and at exit) so the market survives restarts; its pid and log live in
``$DLIS_HOME/chain/``. Test fixtures use :class:`AnvilProcess` directly on a free port.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from dlis_market.chain.errors import ChainUnavailableError

REPO_ROOT = Path(__file__).resolve().parents[2]
CHAIN_ID = 31337


def find_tool(name: str) -> str:
    """An npm-installed foundry tool: ``node_modules/.bin`` of this checkout, else PATH."""
    local = REPO_ROOT / "node_modules" / ".bin" / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found:
        return found
    raise ChainUnavailableError(f"`{name}` not found in {local.parent} or on PATH; run `make setup` (npm ci)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


# Keep the last 256 block states in memory and none on disk. By default Anvil moves older states to
# ~/.foundry/anvil/tmp and never deletes them: ~115 MB per 1,000 blocks, which filled the disk of a
# full test run. Nothing here reads state older than `latest`; evm_snapshot/evm_revert still reach
# any depth (tests/integration/chain/test_anvil_disk.py checks both).
HISTORY_FLAGS = ("--prune-history", "256")


@dataclass
class AnvilProcess:
    """One Anvil process bound to 127.0.0.1."""

    port: int
    state_file: Path | None = None
    log_file: Path | None = None
    host: str = "127.0.0.1"
    proc: subprocess.Popen[bytes] | None = None
    # OP-stack mode (`anvil --optimism`): deposit transactions and OP receipts. Anvil 1.7.1 computes
    # no L1 data fee there (receipts carry no l1Fee, no GasPriceOracle predeploy); bench/l2_settlement.py
    # models that fee from the measured transactions.
    optimism: bool = False

    @property
    def rpc_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [
            find_tool("anvil"),
            "--host", self.host,
            "--port", str(self.port),
            "--chain-id", str(CHAIN_ID),
            "--block-base-fee-per-gas", "0",
            "--gas-limit", "30000000",
            "--accounts", "10",
            *HISTORY_FLAGS,
            "--silent",
        ]  # fmt: skip
        if self.state_file is not None:
            cmd += ["--state", str(self.state_file), "--state-interval", "5"]
        if self.optimism:
            cmd.append("--optimism")
        return cmd

    def start(self, detached: bool = False, timeout_s: float = 20.0) -> AnvilProcess:
        if port_open(self.host, self.port):
            raise ChainUnavailableError(
                f"port {self.port} on {self.host} is already in use; stop what runs there or choose --port"
            )
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            self.command(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=detached
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ChainUnavailableError(
                    f"anvil exited with code {self.proc.returncode} at start; see {self.log_file or 'its output'}"
                )
            if port_open(self.host, self.port):
                return self
            time.sleep(0.05)
        self.stop()
        raise ChainUnavailableError(f"anvil did not open {self.host}:{self.port} within {timeout_s} s")

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # anvil dumps --state on SIGTERM
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def pid_file(chain_dir: Path, port: int) -> Path:
    return chain_dir / f"anvil-{port}.pid"


def start_detached(chain_dir: Path, port: int) -> AnvilProcess:
    chain_dir.mkdir(parents=True, exist_ok=True)
    anvil = AnvilProcess(
        port, state_file=chain_dir / f"anvil-{port}.state.json", log_file=chain_dir / f"anvil-{port}.log"
    )
    anvil.start(detached=True)
    assert anvil.proc is not None
    pid_file(chain_dir, port).write_text(str(anvil.proc.pid))
    return anvil


def stop_detached(chain_dir: Path, port: int, timeout_s: float = 15.0) -> bool:
    """Stop the Anvil that ``dlis chain up`` started; False when none was running."""
    path = pid_file(chain_dir, port)
    if not path.exists():
        return False
    pid = int(path.read_text().strip())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        path.unlink(missing_ok=True)
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
    path.unlink(missing_ok=True)
    return True
