"""Crash-safe files of the oracle's state (``state_dir``).

Two kinds of file, two rules:

* whole files (``privacy.json``, ``epochs/<k>.json``, ``aggregates/<k>.json``, evidence, the
  compacted ``seqs.log``) are replaced atomically by :func:`write_atomic`: written to a temporary
  file in the same folder, flushed and fsynced, renamed over the old one, the folder fsynced. A
  crash at any point leaves either the previous file or the new one, never a torn mix;
* logs (``reports/<k>.jsonl``, ``checks/<k>.log``, ``observations/<k>.jsonl``,
  ``counted_checks.log``, ``seqs.log``) only grow by whole lines (:func:`append_line`); a crash in
  the middle of an append can leave a last line without its newline, which :func:`complete_lines`
  drops when the state is read back, so a restart never fails on it (the torn record is lost; the
  request that carried it never got its answer).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
TORN_TAIL_MAX = 1 << 20  # a record is a line of at most a few KiB: its torn part is shorter


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new content, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX + path.name + ".")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):  # written only partly or not renamed: not the state
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX: the directory entry lives in the folder)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def append_line(path: Path, line: str) -> None:
    """Append one record (no newline inside) as a whole line; a line cut short by an earlier crash
    is cut off first, so it never runs into this one."""
    if "\n" in line:
        raise ValueError(f"a state log record is one line; got {line.count(chr(10))} newlines in {line[:80]!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            tail = os.pread(fd, min(size, TORN_TAIL_MAX), size - min(size, TORN_TAIL_MAX))
            cut = tail.rfind(b"\n")
            keep = size - len(tail) + cut + 1 if cut >= 0 else max(0, size - len(tail))
            log.warning("%s: dropping %d bytes of a line cut short by a crash", path, size - keep)
            os.ftruncate(fd, keep)
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def complete_lines(path: Path) -> list[str]:
    """The whole lines of a state log; a last line cut short by a crash (no newline) is dropped."""
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.split("\n")
    if lines[-1]:
        log.warning("%s ends in a line cut short (%d bytes, a crash mid-append): ignored", path, len(lines[-1]))
    return [line for line in lines[:-1] if line]


def remove_leftovers(folder: Path) -> int:
    """Delete temporary files a crash left in ``folder`` (never part of the state); how many."""
    if not folder.exists():
        return 0
    stale = list(folder.glob(TMP_PREFIX + "*"))
    for tmp in stale:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return len(stale)
