"""Helpers of the storage integration tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from dlis_market.storage.daemon import EmbeddedDaemon

NodeFactory = Callable[[str], EmbeddedDaemon]


def write_shards(root: Path, sizes: dict[str, int]) -> Path:
    """A shard folder: random files plus a manifest.json listing path/size/sha256."""
    files = []
    for rel, size in sizes.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with path.open("wb") as out:
            left = size
            while left:
                block = os.urandom(min(left, 1 << 20))
                out.write(block)
                digest.update(block)
                left -= len(block)
        files.append({"path": rel, "size": size, "sha256": digest.hexdigest()})
    (root / "manifest.json").write_text(json.dumps({"num_layers": 2, "files": files}))
    return root
