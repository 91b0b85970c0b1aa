"""Running ``brownie run deploy`` against a lasting local chain from ``dlis chain up``.

Brownie only remembers deployments on live networks, so a lasting Anvil gets a live network
entry ``dlis-anvil-<port>`` (added once, guarded: re-adding fails in brownie 1.22).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from dlis_market.chain.anvil import CHAIN_ID, REPO_ROOT
from dlis_market.chain.errors import ChainError
from dlis_market.settings import Settings


def brownie_exe() -> str:
    exe = Path(sys.executable).parent / "brownie"
    if not exe.exists():
        raise ChainError(f"brownie is not installed next to {sys.executable}; run `make setup`")
    return str(exe)


def network_name(port: int) -> str:
    return "local-anvil" if port == 8545 else f"dlis-anvil-{port}"


def ensure_network(port: int, settings: Settings, say: Callable[[str], None] = print) -> str:
    """The brownie network for a local Anvil on ``port``; when brownie does not list it yet it is
    added to brownie's own network list (``~/.brownie/network-config.yaml``) and ``say`` tells the
    user so, since that file is theirs."""
    name = network_name(port)
    listed = subprocess.run(
        [brownie_exe(), "networks", "list"], capture_output=True, text=True, cwd=REPO_ROOT, env=settings.child_env()
    )
    if f" {name}" in listed.stdout or f"{name}:" in listed.stdout:
        return name
    added = subprocess.run(
        [brownie_exe(), "networks", "add", "Ethereum", name, f"host=http://127.0.0.1:{port}", f"chainid={CHAIN_ID}"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=settings.child_env(),
    )
    if added.returncode != 0 and "already exists" not in added.stdout + added.stderr:
        raise ChainError(f"could not add brownie network {name}: {added.stdout[-500:]} {added.stderr[-500:]}")
    say(
        f"added the network {name} (http://127.0.0.1:{port}) to brownie's network list "
        f"(~/.brownie/network-config.yaml), so `brownie console --network {name}` reaches this chain; "
        f"remove it with `brownie networks delete {name}`"
    )
    return name


def _forget_brownie_deployments() -> None:
    """Drop brownie's own records of earlier local deployments.

    Brownie reloads every deployment it remembers for the chain id on connect and aborts with
    ContractNotFound when a fresh Anvil (same chain id 31337) lacks them. The project's own
    manifest ($DLIS_HOME/deployments) is the record dlis uses, so brownie's copy is disposable.
    """
    folder = REPO_ROOT / "build" / "deployments"
    shutil.rmtree(folder / str(CHAIN_ID), ignore_errors=True)
    map_file = folder / "map.json"
    if map_file.exists():
        data = json.loads(map_file.read_text())
        data.pop(str(CHAIN_ID), None)
        map_file.write_text(json.dumps(data, indent=2))


def run_deploy(port: int, settings: Settings, log: Path, say: Callable[[str], None] = print) -> None:
    """``brownie run deploy --network dlis-anvil-<port>`` from the repository; output to ``log``."""
    if not (REPO_ROOT / "brownie-config.yaml").exists():
        raise ChainError(
            f"deploying needs the dlis_market source checkout (brownie-config.yaml not found in {REPO_ROOT})"
        )
    name = ensure_network(port, settings, say)
    _forget_brownie_deployments()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.run(
            [brownie_exe(), "run", "deploy", "--network", name],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=settings.child_env(),
            timeout=600,
        )
    # Success is judged by the manifest the script writes (brownie's exit code has not been
    # reliable on live networks).
    text = log.read_text()
    if "deployment manifest:" not in text:
        raise ChainError(f"`brownie run deploy` failed (exit {proc.returncode}); see {log}:\n{text[-1500:]}")
