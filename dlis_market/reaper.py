"""Watcher that kills what a process left running when it dies, SIGKILL included.

``python -m dlis_market.reaper PID`` waits for process ``PID`` to exit (a pidfd, so no
polling of its state), keeping a snapshot of the processes running below it (hivemind's DHT
process, its p2pd daemon, torch's shared-memory manager) refreshed every second. When ``PID`` is
gone, its children have been re-parented and nobody will stop them: the reaper SIGKILLs every
process of the last snapshot that is still the same process (same start time), then exits.

Only the standard library is imported: the reaper starts in ~30 ms and holds ~10 MB.
"""

from __future__ import annotations

import os
import select
import signal
import sys
from pathlib import Path

SNAPSHOT_EVERY_S = 1.0


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    if fields[0] == "Z":  # dead, only not reaped yet
        return None
    return int(fields[1]), int(fields[19])


def descendants(root: int, exclude: int) -> dict[int, int]:
    """Every live process below ``root`` (except ``exclude``), with its start time."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None:
                children.setdefault(st[0], []).append((int(entry.name), st[1]))
    out: dict[int, int] = {}
    todo = [root]
    while todo:
        for pid, started in children.get(todo.pop(), []):
            if pid != exclude and pid not in out:
                out[pid] = started
                todo.append(pid)
    return out


def watch(pid: int) -> int:
    """Block until ``pid`` exits, then kill what it left; the number of processes killed."""
    me = os.getpid()
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:  # it died before we started: nothing we can still find
        return 0
    snapshot: dict[int, int] = {}
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while not poller.poll(int(SNAPSHOT_EVERY_S * 1000)):
        snapshot = descendants(pid, exclude=me)
    os.close(fd)
    killed = 0
    for child, started in snapshot.items():
        st = _stat(child)
        if st is not None and st[1] == started:  # still the process we saw, not a reused pid
            try:
                os.kill(child, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:  # exited meanwhile
                pass
    return killed


def main() -> None:
    # A terminal's ^C reaches the whole foreground group: the reaper must outlive its parent's
    # clean shutdown to do its work afterwards, so it ignores the signals that stop the parent.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    watch(int(sys.argv[1]))


if __name__ == "__main__":
    main()
