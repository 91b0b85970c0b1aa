"""Telemetry intake rate of the real oracle service on a real Anvil (not a test: a measurement).

    .venv/bin/python -m tests.integration.oracle.intake_bench [--reports 400] [--nodes 8]

Reports are signed beforehand (the workers' cost, not the oracle's); the figure is accepted
reports per second through ``OracleService.submit_telemetry`` (decode, signature recovery,
registry lookup cached per heartbeat interval, and the durable write), one thread; and the CPU
time per report, which a machine shared with other work disturbs less than the wall time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from dlis_market.chain.devnet import local_market
from dlis_market.oracle.service import OracleService
from dlis_market.protocol.telemetry import TelemetryMetrics, TelemetryReport, encode_telemetry, sign_telemetry
from dlis_market.settings import Settings

UNIT = 10**18


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=int, default=400)
    parser.add_argument("--nodes", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, local_market(Path(tmp) / "home", min_stake=100 * UNIT) as market:
        data = market.settings.model_dump()
        data["oracle"].update({"state_dir": Path(tmp) / "oracle"})
        service = OracleService(Settings.model_validate(data), market.client, market.oracle, seed=0)
        nodes = [market.enroll_node(market.new_funded_account(300 * UNIT), stake=300 * UNIT) for _ in range(args.nodes)]
        metrics = TelemetryMetrics(
            uptime_s=60.0, advertised_tps=50.0, measured_tps=40.0, free_kv_slots=2, latencies_ms=(20.0,) * 32
        )
        now = int(time.time())
        blobs = [
            encode_telemetry(
                sign_telemetry(
                    node.key,
                    service.domain,
                    TelemetryReport(node=node.address, seq=i + 1, timestamp=now, metrics=metrics),
                )
            )
            for i in range(args.reports // args.nodes)
            for node in nodes
        ]
        for node in nodes:  # warm the registry cache: the figure is the intake, not the first chain read
            service._registered(node.address)
        t0, cpu0 = time.perf_counter(), time.process_time()
        for blob in blobs:
            service.submit_telemetry(blob)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        print(
            f"{len(blobs)} reports from {len(nodes)} nodes in {elapsed:.2f} s: {len(blobs) / elapsed:.0f} reports/s "
            f"({1000 * cpu / len(blobs):.2f} ms CPU each: {len(blobs) / cpu:.0f} reports per CPU second)"
        )


if __name__ == "__main__":
    main()
