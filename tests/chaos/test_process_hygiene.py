"""Process hygiene of a worker killed with SIGKILL (reliability issue).

A worker runs three processes: itself, hivemind's DHT process (a fork) and the go-libp2p daemon
p2pd under it. Killed with SIGKILL, the worker cannot clean up, and before the fix its DHT process
and p2pd ran on (~650 MB per crash, and a restart next to them was unreachable). Two workers on one
identity both started and fought over one peer id. Here: a real tiny-model worker, real kill -9.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.integration.node.node_helpers import Swarm, tiny_shards


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited while we looked
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] == "Z":  # a zombie is dead already, only not reaped
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def alive(pids: set[int]) -> set[int]:
    out = set()
    for p in pids:
        try:
            state = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        if state[state.rindex(")") + 2] != "Z":
            out.add(p)
    return out


def test_kill_9_leaves_no_process_behind_and_a_restart_is_reachable(tmp_path: Path) -> None:
    shards = tiny_shards(tmp_path / "model", [(0, 3), (3, 6)])
    with Swarm(tmp_path / "swarm") as swarm:
        first = swarm.start_worker(shards, "0:3", "w0")
        tree = descendants(first.proc.pid)
        cmdlines = {p: Path(f"/proc/{p}/cmdline").read_bytes() for p in tree}
        assert any(b"p2pd" in c for c in cmdlines.values()), cmdlines  # the DHT daemon runs below it

        # a second worker on the same identity refuses to start, saying which process holds it
        second = swarm.launch(shards, "0:3", "w0")
        assert second.proc.wait(timeout=120) != 0
        assert "already running" in second.log(), second.log()
        swarm.workers.remove(second)

        # kill -9 of the worker alone (not its process group): nothing below it survives
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while alive(tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(tree), {p: cmdlines[p][:80] for p in alive(tree)}

        # a restart on the same identity starts at once and serves under the same peer id
        again = swarm.start_worker(shards, "0:3", "w0")
        assert again.peer_id == first.peer_id
