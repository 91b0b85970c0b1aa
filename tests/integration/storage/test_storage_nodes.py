"""Publish on one real IPFS node, fetch from others, over a private loopback swarm."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from kubo_helpers import NodeFactory, write_shards  # type: ignore[import-not-found]

from dlis_market.storage.client import KuboClient
from dlis_market.storage.daemon import DaemonConfig, EmbeddedDaemon
from dlis_market.storage.errors import (
    ContentTimeoutError,
    DaemonError,
    KuboUnreachableError,
    ShardIntegrityError,
    StorageError,
)
from dlis_market.storage.fetch import CONNECT_TIMEOUT_S, fetch_model
from dlis_market.storage.kubo_process import STOP_GRACE_S, KuboProcessConfig
from dlis_market.storage.publication import Publication
from dlis_market.storage.publish import publish_model


def _same_tree(a: Path, b: Path, rels: list[str]) -> bool:
    return all((a / r).read_bytes() == (b / r).read_bytes() for r in rels)


def _no_partials(out: Path) -> bool:
    return not any(p.name.endswith(".partial") for p in out.rglob("*")) if out.exists() else True


def test_publish_on_a_fetch_on_b_then_c_from_b(kubo_nodes: NodeFactory, tmp_path: Path) -> None:
    rels = ["stage0/w.bin", "stage1/w.bin"]
    shards = write_shards(tmp_path / "shards", {rels[0]: 3_000_000, rels[1]: 1_000_001})
    a, b, c = kubo_nodes("a"), kubo_nodes("b"), kubo_nodes("c")

    async def main() -> None:
        async with (
            KuboClient(a.info.api_url) as ka,
            KuboClient(b.info.api_url) as kb,
            KuboClient(c.info.api_url) as kc,
        ):
            published = await publish_model(ka, shards, part_size=1 << 20)
            pins = await ka.pin_ls()
            assert published.manifest_cid in pins
            await fetch_model(
                kb, published.manifest_cid, tmp_path / "out-b", providers=a.info.multiaddrs, part_timeout_s=30
            )
            # A goes away; C only knows B, which now serves what it fetched.
            await asyncio.to_thread(a.stop)
            await fetch_model(
                kc, published.manifest_cid, tmp_path / "out-c", providers=b.info.multiaddrs, part_timeout_s=30
            )
            assert b.info.peer_id in {p.peer for p in await kc.swarm_peers()}

    asyncio.run(main())
    for out in ("out-b", "out-c"):
        assert _same_tree(shards, tmp_path / out, [*rels, "manifest.json"])
        assert _no_partials(tmp_path / out)


def test_tampered_shard_detected_and_refused(kubo_nodes: NodeFactory, tmp_path: Path) -> None:
    shards = write_shards(tmp_path / "shards", {"w.bin": 500_000})
    a, b = kubo_nodes("a"), kubo_nodes("b")
    evil = tmp_path / "evil.bin"
    evil.write_bytes(os.urandom(500_000))

    async def main() -> None:
        async with KuboClient(a.info.api_url) as ka, KuboClient(b.info.api_url) as kb:
            published = await publish_model(ka, shards)
            raw = await ka.cat_bytes(published.manifest_cid)
            doc = json.loads(raw)
            doc["files"][0]["parts"][0]["cid"] = (await ka.add_file(evil)).cid  # same size, other bytes
            tampered = tmp_path / "tampered.json"
            tampered.write_bytes(Publication.model_validate(doc).to_bytes())
            tampered_cid = (await ka.add_file(tampered)).cid
            with pytest.raises(ShardIntegrityError, match="corrupt twice"):
                await fetch_model(kb, tampered_cid, tmp_path / "out", providers=a.info.multiaddrs, part_timeout_s=30)

    asyncio.run(main())
    assert not (tmp_path / "out" / "w.bin").exists()
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert _no_partials(tmp_path / "out")


def test_cid_nobody_has_times_out_clearly(kubo_nodes: NodeFactory, tmp_path: Path) -> None:
    a, b = kubo_nodes("a"), kubo_nodes("b")
    # A valid CIDv0 (of 1 MB of random bytes) that no node of this test holds.
    nobody_has = "QmRvoQJAjRcm97jPnrzDu6YDyqnzmRHFi76fNTumsDkZfp"

    async def main() -> None:
        async with KuboClient(b.info.api_url, retries=0) as kb:
            started = time.monotonic()
            with pytest.raises(ContentTimeoutError, match=r"not delivered within 3s") as info:
                await fetch_model(kb, nobody_has, tmp_path / "o", providers=a.info.multiaddrs, part_timeout_s=3)
            elapsed = time.monotonic() - started
            # fetch_model waits at most for the provider connect and one part: never for the
            # daemon's 30 s request timeout or the client's 60 s one (measured: 3.0 s).
            assert elapsed < CONNECT_TIMEOUT_S + 3, f"gave up after {elapsed:.1f}s"
            assert nobody_has in str(info.value) and a.info.multiaddrs[0] in str(info.value)
            print(info.value)
            assert (await kb.id()).peer_id == b.info.peer_id  # the node was restarted and still answers

    asyncio.run(main())


def test_daemon_killed_mid_transfer_gives_clean_error(kubo_nodes: NodeFactory, tmp_path: Path) -> None:
    shards = write_shards(tmp_path / "shards", {"w.bin": 4_000_000})
    a, b = kubo_nodes("a"), kubo_nodes("b")
    out = tmp_path / "out"

    async def main() -> None:
        async with (
            KuboClient(a.info.api_url) as ka,
            KuboClient(b.info.api_url, retries=1, backoff_s=0.1) as kb,
        ):
            published = await publish_model(ka, shards, part_size=1 << 20)
            killed = False

            def progress(done: int, total: int) -> None:
                nonlocal killed
                partial = out / "w.bin.partial"
                if not killed and partial.exists() and partial.stat().st_size > 0:
                    b.kill()  # B's daemon dies while w.bin is being written
                    killed = True

            with pytest.raises(StorageError) as info:
                await fetch_model(
                    kb,
                    published.manifest_cid,
                    out,
                    providers=a.info.multiaddrs,
                    part_timeout_s=30,
                    progress=progress,
                )
            assert killed
            print(type(info.value).__name__, info.value)
            assert isinstance(info.value, KuboUnreachableError)

    asyncio.run(main())
    assert not (out / "w.bin").exists() and not (out / "manifest.json").exists()
    assert _no_partials(out)


def test_nodes_only_use_loopback(kubo_nodes: NodeFactory, tmp_path: Path) -> None:
    a, b = kubo_nodes("a"), kubo_nodes("b")
    cfg = json.loads((a.config.repo / "config").read_text())
    assert cfg["Bootstrap"] == [] and cfg["Addresses"]["Swarm"][0].startswith("/ip4/127.0.0.1/tcp/")
    assert (a.config.repo / "swarm.key").exists()
    assert all(m.startswith("/ip4/127.0.0.1/") for m in a.info.multiaddrs)
    assert (a.config.logs / "kubo.log").exists()
    shards = write_shards(tmp_path / "shards", {"w.bin": 1000})

    async def exchange() -> None:
        # Real swarm traffic (connect, provide, bitswap) instead of waiting a guessed time for a
        # misconfigured node to dial out: whatever the nodes dial, they have dialled by now.
        async with KuboClient(a.info.api_url) as ka, KuboClient(b.info.api_url) as kb:
            published = await publish_model(ka, shards)
            await fetch_model(kb, published.manifest_cid, tmp_path / "out", providers=a.info.multiaddrs)

    asyncio.run(exchange())
    for node in (a, b):
        for proc in [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)]:
            for conn in proc.connections(kind="inet"):
                assert conn.laddr.ip in ("127.0.0.1", "::1"), conn
                if conn.raddr:
                    assert conn.raddr.ip in ("127.0.0.1", "::1"), conn


def test_ipfs_daemon_cli_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    cmd = [sys.executable, "-c", "from dlis_market.cli.ipfs import app; app()", "daemon", "--repo", str(repo)]
    proc = subprocess.Popen(
        [*cmd, "--api-port", "0", "--swarm-port", "0"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stderr is not None
        lines = []
        # Ready within the Kubo child's own start timeout, else the daemon has failed anyway.
        deadline = time.monotonic() + KuboProcessConfig.start_timeout_s
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            if "swarm:" in line or not line:
                break
        assert any("RPC API: http://127.0.0.1:" in x for x in lines), lines
        info = json.loads((repo / "api.json").read_text())
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "the Kubo child process should be running"
        proc.send_signal(signal.SIGTERM)
        # The daemon gives its Kubo child STOP_GRACE_S before SIGKILL; a clean stop is well within
        # twice that, a hung one is not.
        assert proc.wait(timeout=2 * STOP_GRACE_S) == 0
        assert not (repo / "api.json").exists()
        _gone, alive = psutil.wait_procs(children, timeout=STOP_GRACE_S)
        assert not alive
        assert info["pid"] == proc.pid
        assert not (tmp_path / "kubo.log").exists()  # logs stay in the repo's log folder
        assert (repo / "logs" / "kubo.log").exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_busy_api_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        node = EmbeddedDaemon(DaemonConfig(repo=tmp_path / "repo", api_port=port))
        try:
            with pytest.raises(DaemonError, match=rf"exited at start.*127\.0\.0\.1:{port}.*in use"):
                node.start(timeout_s=60)
        finally:
            node.kill()
