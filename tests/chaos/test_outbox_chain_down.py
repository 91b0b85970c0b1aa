"""The oracle is up but its chain (Anvil) is unreachable while the broker submits slash evidence:
the oracle answers 5xx (it cannot verify or slash), so the evidence waits in the broker's outbox,
a retry, not a dead letter. The broker restarts (a new sink on the same outbox file), the chain
comes back, and the evidence slashes exactly once.

Real parts: the oracle (``OracleService`` + its app under uvicorn on 127.0.0.1) with its own web3
connection to the market's Anvil; the outage is that connection pointed at a port where nothing
listens (the oracle's view of a dead Anvil; the shared Anvil of the other tests keeps running)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from web3 import Web3

from dlis_market.broker.spot_checks import EVIDENCE_KIND, OracleSink
from dlis_market.chain.anvil import free_port
from dlis_market.chain.client import ChainClient
from dlis_market.oracle.service import OracleService
from dlis_market.protocol.outbox import Outbox, State
from dlis_market.settings import Settings
from tests.integration.oracle.test_worker_telemetry import ThreadedOracle
from tests.unit.oracle.evidence_helpers import make_evidence, reference_output

UNIT = 10**18


def test_evidence_waits_out_a_chain_outage_and_slashes_once(market, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = market.settings.model_dump()
    data["home"] = tmp_path / "home"
    data["oracle"]["state_dir"] = tmp_path / "oracle"
    data["outbox"].update({"retry_base_s": 0.1, "retry_max_s": 0.5, "timeout_s": 10.0})
    settings = Settings.model_validate(data)
    rpc = settings.chain.rpc_url
    w3 = Web3(Web3.HTTPProvider(rpc, request_kwargs={"timeout": 5}))
    client = ChainClient(settings, w3=w3, deployment=market.client.deployment)  # the oracle's own connection
    service = OracleService(settings, client, market.oracle, seed=0)
    ops = [market.new_funded_account(300 * UNIT) for _ in range(2)]
    accused, checker = (market.enroll_node(op, stake=300 * UNIT) for op in ops)
    out = reference_output()
    evidence = make_evidence(accused, checker, market.market().domain(), out + 1.0, out, runner=market.oracle,
                             oracle_domain=service.domain)  # fmt: skip
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    stake_before = market.staking().info(ops[0].address).active

    async def chain_down() -> tuple[dict[str, object], list[State], str]:
        box = Outbox.from_settings(settings.broker_outbox_url, settings.outbox)
        sink = OracleSink(url, box, settings.outbox.timeout_s)
        answer = await sink.submit(evidence)
        [row] = await box.pending(EVIDENCE_KIND)
        await sink.close()  # the broker stops with the evidence still queued
        return answer, [row.state], row.last_error

    async def chain_back() -> float:
        box = Outbox.from_settings(settings.broker_outbox_url, settings.outbox)
        sink = OracleSink(url, box, settings.outbox.timeout_s)
        sink.start()
        began = time.monotonic()
        while await box.pending():
            assert time.monotonic() - began < 30, "the evidence was not delivered after the chain came back"
            await asyncio.sleep(0.05)
        took = time.monotonic() - began
        assert await box.dead_letters() == []
        await sink.close()
        return took

    with ThreadedOracle(service, port):
        w3.provider.endpoint_uri = f"http://127.0.0.1:{free_port()}"  # type: ignore[attr-defined]  # Anvil gone
        answer, states, error = asyncio.run(chain_down())
        assert answer["outcome"] == "queued", answer
        assert states == [State.PENDING] and error.startswith(("503", "500")), error  # a retry, not a refusal
        assert service.slashes == 0 and market.staking().info(ops[0].address).active == stake_before
        w3.provider.endpoint_uri = rpc  # type: ignore[attr-defined]  # Anvil is back
        took = asyncio.run(chain_back())
    assert service.slashes == 1
    assert market.staking().info(ops[0].address).active == stake_before - service.config.slash_amount
    print(f"\nevidence delivered {took:.2f} s after the chain came back")
