"""One swarm of tiny-Llama workers on loopback for the node tests of this folder (killed in finally).

Layout: layers [0, 2) on worker ``a``, [2, 4) on ``b`` and on its replica ``b2``, [4, 6) on ``c``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from node_helpers import MODEL, Swarm, TinySwarm, tiny_shards


@pytest.fixture(scope="module")
def tiny_swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinySwarm]:
    root = tmp_path_factory.mktemp("node-swarm")
    shards = tiny_shards(root, [(0, 2), (2, 4), (4, 6)], name=MODEL)
    with Swarm(root) as swarm:
        specs = [(shards, "0:2", "a"), (shards, "2:4", "b"), (shards, "2:4", "b2")]
        started = swarm.start_workers(specs)
        workers = {name: w for (_, _, name), w in zip(specs, started, strict=True)}
        # ``c`` picks its range itself: [4, 6) is the only one nobody serves yet.
        swarm.wait_spans(MODEL, 3)
        workers["c"] = swarm.start_worker(shards, "", "c", "--auto")
        yield TinySwarm(swarm, shards, workers)
