"""Attacker: an outsider on the path between the spot-check runner (the broker) and the oracle, or
anyone holding a copy of evidence (it is plain JSON over HTTP), who edits what the runner signed so
that an honest node is slashed; and a flooder who posts an endless body to the evidence endpoints.

Real Anvil with the real contracts, the real oracle service and its HTTP app, evidence signed as
the runner signs it (:func:`dlis_market.protocol.spot_checks.build_evidence`). Everything that
decides a verdict is under the runner's signature, so an edited evidence is refused: nothing
slashed, nothing stored, nothing counted. A body over the limit is refused with 413 before it is
read, let alone parsed.
"""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from eth_account.signers.local import LocalAccount
from fastapi import FastAPI
from fastapi.testclient import TestClient

from dlis_market.chain.devnet import LocalMarket
from dlis_market.oracle.server import create_app
from dlis_market.oracle.service import OracleService
from dlis_market.oracle.store import SlashStatus
from dlis_market.protocol.spot_checks import SpotCheckEvidence
from dlis_market.settings import Settings
from tests.unit.oracle.evidence_helpers import make_evidence, reference_output

UNIT = 10**18
STAKE = 300 * UNIT
WIDTH = 4  # values per token: 64 tokens in the reference output


@dataclass
class Oracle:
    service: OracleService
    app: FastAPI
    http: TestClient
    nodes: list[LocalAccount]  # accused, checker, referee: three operators
    operators: list[LocalAccount]
    state_dir: Path


@pytest.fixture()
def oracle(market: LocalMarket, tmp_path: Path) -> Oracle:
    data = market.settings.model_dump()
    data["oracle"].update({"state_dir": tmp_path / "oracle"})
    service = OracleService(Settings.model_validate(data), market.client, market.oracle, seed=0)
    operators = [market.new_funded_account(STAKE) for _ in range(3)]
    nodes = [market.enroll_node(op, stake=STAKE) for op in operators]
    app = create_app(service)
    return Oracle(service, app, TestClient(app), nodes, operators, tmp_path / "oracle")


def _post(http: TestClient, body: str) -> httpx.Response:
    return http.post("/v1/spot-checks", content=body, headers={"content-type": "application/json"})


def _edited(evidence: SpotCheckEvidence, **blobs: dict[str, object]) -> str:
    """The evidence as JSON with some output blobs' metadata changed (signature untouched)."""
    update = {name: getattr(evidence, name).model_copy(update=changes) for name, changes in blobs.items()}
    return evidence.model_copy(update=update).model_dump_json()


def _assert_nothing_happened(market: LocalMarket, oracle: Oracle) -> None:
    for op in oracle.operators:
        assert market.staking().info(op.address).active == STAKE
    for status in SlashStatus:  # no slash intended, done or failed: nothing stored
        assert oracle.service.store.slashes(status) == {}
    assert oracle.service.slashes == 0
    assert not any(oracle.service._checks.values())  # no pass, no failure counted for anyone


@pytest.mark.parametrize(
    "edit",
    [
        {"checker_output": {"row_width": 1}},  # per value instead of per token
        {"checker_output": {"element_dtype": "bfloat16"}},  # same bytes read as another dtype
        {"checker_output": {"row_width": 0}},  # the whole output as one token
    ],
    ids=["checker-row-width", "checker-dtype", "checker-one-row"],
)
def test_passing_evidence_with_edited_checker_metadata_is_refused(
    market: LocalMarket, oracle: Oracle, edit: dict[str, dict[str, object]]
) -> None:
    accused, checker, _ = oracle.nodes
    out = reference_output()
    passing = make_evidence(
        accused, checker, market.market().domain(), out + 1e-6, out, runner=market.oracle,
        oracle_domain=oracle.service.domain, row_width=WIDTH,
    )  # fmt: skip
    edited = _post(oracle.http, _edited(passing, **edit))
    assert edited.status_code == 422, edited.text
    assert edited.json()["reason"] == "tampered", edited.json()
    _assert_nothing_happened(market, oracle)
    # the untouched evidence still passes: the refusal is about the edit, not the call
    assert _post(oracle.http, passing.model_dump_json()).json()["outcome"] == "pass"


def test_refereed_evidence_with_edited_checker_and_referee_metadata_is_refused(
    market: LocalMarket, oracle: Oracle
) -> None:
    """A faulty checker accuses an honest node; the referee sides with the accused (refused as
    ``checkers_disagree``). Reading the checker's and the referee's outputs as one row dilutes the
    checker's one bad token below tolerance and makes the referee "differ" from the accused."""
    accused, checker, referee = oracle.nodes
    out = reference_output()
    faulty = out.copy()
    faulty[:WIDTH] *= 1.01  # one token off by 1 %: beyond fp32's 2e-3 per token, 1.2e-3 over all 64
    evidence = make_evidence(
        accused, checker, market.market().domain(), out, faulty, runner=market.oracle,
        oracle_domain=oracle.service.domain, referee=(referee, out), row_width=WIDTH,
    )  # fmt: skip
    honest = _post(oracle.http, evidence.model_dump_json())
    assert honest.status_code == 422 and honest.json()["reason"] == "checkers_disagree", honest.text
    one_row = {"row_width": 0}
    framed = _post(oracle.http, _edited(evidence, checker_output=one_row, referee_output=one_row))
    assert framed.status_code == 422, framed.text
    assert framed.json()["reason"] == "tampered", framed.json()
    _assert_nothing_happened(market, oracle)


class _Flood:
    """An endless-looking body: ``total`` bytes of a JSON string, handed out 1 MiB at a time; counts
    how much of it the server pulled."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.sent = 0
        self.chunk = b"a" * (1 << 20)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b'{"accused_node": "'
        while self.sent < self.total:
            self.sent += len(self.chunk)
            yield self.chunk
        yield b'"}'


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
@pytest.mark.parametrize("path", ["/v1/spot-checks", "/v1/spot-checks/failures"])
def test_oversized_evidence_body_is_refused_unread(oracle: Oracle, path: str, declared: bool) -> None:
    total = 50 << 20
    limit = oracle.service.config.evidence_max_bytes
    assert limit < total
    flood = _Flood(total)
    headers = {"content-type": "application/json"}
    if declared:
        headers["content-length"] = str(total + 20)

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=oracle.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://oracle") as http:
            return await http.post(path, content=flood, headers=headers)

    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        res = asyncio.run(send())
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"{path} declared={declared}: {res.status_code} in {elapsed:.3f} s, pulled {flood.sent >> 20} MiB, "
          f"peak {peak / 2**20:.1f} MiB")  # fmt: skip
    assert res.status_code == 413, res.text[:300]
    assert res.json()["reason"] == "oversized"
    assert flood.sent <= limit + len(flood.chunk)  # stopped at the limit, never read to the end
    if declared:
        assert flood.sent == 0  # refused on the declared length alone
    assert peak < limit + (8 << 20)  # at most the limit was buffered, never the 50 MiB
    # (the time is printed, not asserted: the bytes read and held decide, on any machine)
    assert oracle.service.slashes == 0
