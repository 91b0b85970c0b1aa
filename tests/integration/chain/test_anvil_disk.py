"""The Anvil every test, demo and `dlis chain up` starts keeps old block states off the disk:
by default Anvil moves each state older than its in-memory window to ~/.foundry/anvil/tmp and
never deletes it (~115 MB per 1,000 blocks; a full test run filled its machine's disk). Snapshots
taken long before, as the integration suite's per-test isolation takes them, still revert."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from dlis_market.chain.anvil import AnvilProcess, free_port

SINK = "0x000000000000000000000000000000000000dEaD"


def _rpc(url: str, method: str, params: list[Any]) -> Any:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.load(response)
    assert "error" not in answer, answer
    return answer["result"]


def _bytes_under(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _balance_once_mined(url: str, expected: int) -> int:
    """Anvil answers eth_sendTransaction before it mines the block, so read until it shows."""
    deadline = time.monotonic() + 60
    while True:
        balance = int(_rpc(url, "eth_getBalance", [SINK, "latest"]), 16)
        if balance >= expected or time.monotonic() > deadline:
            return balance
        time.sleep(0.05)


def test_a_thousand_blocks_leave_no_state_on_disk_and_old_snapshots_revert(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # Anvil's state cache lives under ~/.foundry
    anvil = AnvilProcess(port=free_port()).start()
    try:
        url = anvil.rpc_url
        sender = _rpc(url, "eth_accounts", [])[0]
        snapshot = _rpc(url, "evm_snapshot", [])
        for _ in range(1200):  # one state-changing block each, as a busy market's blocks are
            _rpc(url, "eth_sendTransaction", [{"from": sender, "to": SINK, "value": hex(1)}])
        assert _balance_once_mined(url, 1200) == 1200
        assert int(_rpc(url, "eth_blockNumber", []), 16) >= 1000

        cache = tmp_path / ".foundry" / "anvil" / "tmp"
        written = _bytes_under(cache) if cache.exists() else 0
        assert written < 1_000_000, f"{written:,} bytes of block states written under {cache}"

        assert _rpc(url, "evm_revert", [snapshot]) is True
        assert int(_rpc(url, "eth_blockNumber", []), 16) == 0
        assert int(_rpc(url, "eth_getBalance", [SINK, "latest"]), 16) == 0
        _rpc(url, "eth_sendTransaction", [{"from": sender, "to": SINK, "value": hex(5)}])
        assert _balance_once_mined(url, 5) == 5
    finally:
        anvil.stop()
