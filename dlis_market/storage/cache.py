"""A local content-addressed cache of fetched files: ``ROOT/sha256/ab/abcdef...``.

A file enters the cache only after its sha256 was verified, and is verified again whenever it
is used (a cache on disk can rot or be edited), so a cache hit is as trustworthy as a download.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from dlis_market.storage.manifest_files import sha256_file

log = logging.getLogger(__name__)


class FileCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path_for(self, sha256: str) -> Path:
        return self.root / "sha256" / sha256[:2] / sha256

    def materialize(self, sha256: str, size: int, dest: Path) -> bool:
        """Put the cached file with ``sha256`` at ``dest`` (verified); False on a miss."""
        cached = self.path_for(sha256)
        try:
            if cached.stat().st_size != size:
                raise ValueError("size")
        except (FileNotFoundError, ValueError):
            return False
        if sha256_file(cached) != sha256:
            log.warning("cache entry %s is corrupt: removed", cached)
            cached.unlink(missing_ok=True)
            return False
        tmp = dest.with_name(dest.name + ".partial")
        tmp.unlink(missing_ok=True)
        _link_or_copy(cached, tmp)
        os.replace(tmp, dest)
        return True

    def store(self, sha256: str, verified: Path) -> None:
        """Add an already verified file (hard link when possible)."""
        target = self.path_for(sha256)
        if target.exists():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".partial")
        tmp.unlink(missing_ok=True)
        _link_or_copy(verified, tmp)
        os.replace(tmp, target)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links unsupported: copy instead
        shutil.copyfile(src, dst)
