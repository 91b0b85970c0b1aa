"""The explorer on a node without ``ots_*``/tracing methods says so instead of failing; the
broker's metrics count each job once (the dashboard's queries are checked against a real
Prometheus in tests/integration/broker/test_ops_prometheus.py)."""

from __future__ import annotations

from typing import Any

from prometheus_client import generate_latest

from dlis_market.broker.ledger import JobRow
from dlis_market.broker.metrics import BrokerMetrics
from dlis_market.explorer.rpc import ExplorerRpc
from dlis_market.explorer.views import Explorer, address_view, tx_view

UNIT = 10**18


class _PlainNode:
    """A provider that answers like a node with only the standard eth_* namespace."""

    def __init__(self, inner: Any):
        self.inner = inner

    def make_request(self, method: str, params: Any) -> Any:
        if method.split("_")[0] in ("ots", "debug", "trace"):
            return {"jsonrpc": "2.0", "id": 1, "error": {"code": -32601, "message": f"Method not found: {method}"}}
        return self.inner.make_request(method, params)


class _W3:
    def __init__(self, provider: Any):
        self.provider = provider


def test_explorer_degrades_without_ots_and_traces(market):
    ex = Explorer(market.client)
    ex.rpc = ExplorerRpc(_W3(_PlainNode(market.client.w3.provider)))  # type: ignore[arg-type]
    account = market.new_funded_account(5 * UNIT)
    receipt = market.market().deposit(account, 2 * UNIT)
    view = tx_view(ex, "0x" + bytes(receipt["transactionHash"]).hex())
    assert view.call is not None and view.call.function == "deposit"
    assert sorted(e.event for e in view.events) == ["Deposited", "Transfer"]
    assert view.internal_calls == [] and "neither debug_traceTransaction nor trace_transaction" in (
        view.trace_note or ""
    )
    a = address_view(ex, account.address)
    assert a.history == [] and "no ots_* methods" in (a.history_note or "")
    assert a.escrow == 2 * UNIT and "Deposited" in [e.event for e in a.events]
    assert ex.rpc.ots_api_level() is None
    assert ExplorerRpc(market.client.w3).ots_api_level() == 8  # Anvil's Otterscan namespace


def test_event_scan_is_incremental_and_survives_a_revert(market):
    ex = Explorer(market.client)
    before = ex.market_logs()
    account = market.new_funded_account(5 * UNIT)  # one DLIS Transfer
    snap = market.snapshot()
    market.market().deposit(account, 2 * UNIT)  # Approval, then Deposited + Transfer
    grown = ex.market_logs()
    assert grown[: len(before)] == before
    assert [e.event for e in grown[len(before) :]] == ["Transfer", "Approval", "Deposited", "Transfer"]
    market.revert(snap)
    assert [e.event for e in ex.market_logs()[len(before) :]] == ["Transfer"]


def _row(status: str) -> JobRow:
    return JobRow(id="0x" + "11" * 32, model="m", status=status, prompt_tokens=3, completion_tokens=5,
                  latency_ms=500.0, ttft_ms=100.0, cost=7)  # fmt: skip


def test_job_metrics_count_each_job_once():
    m = BrokerMetrics()
    m.observe_job(_row("running"))
    m.observe_job(_row("completed"))
    m.observe_job(_row("completed"))
    m.observe_job(_row("settled"))
    text = generate_latest(m.registry).decode()
    assert 'dlis_broker_jobs_total{model="m",status="completed"} 1.0' in text
    assert 'status="settled"' not in text  # a settled job is still one job in jobs_total ...
    assert 'dlis_broker_settlements_total{model="m",result="settled"} 1.0' in text  # ... and one settlement
    assert 'dlis_broker_tokens_total{kind="completion",model="m"} 5.0' in text
    assert 'dlis_broker_job_latency_seconds_count{model="m"} 1.0' in text
    assert 'dlis_broker_decode_tokens_per_second_sum{model="m"} 10.0' in text  # 4 tokens in 0.4 s
    fresh = BrokerMetrics()  # a job first seen already settled counts as completed too
    fresh.observe_job(_row("settled"))
    assert 'dlis_broker_jobs_total{model="m",status="completed"} 1.0' in generate_latest(fresh.registry).decode()
