"""Units of what a worker and a driver trust from peers: tickets, bills, bans, per-opener transcripts."""

from __future__ import annotations

import secrets
import time
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from eth_account import Account

from dlis_market.chain.job_market import market_domain
from dlis_market.inference.messages import StageInput
from dlis_market.node import receipts
from dlis_market.node.brokers import BrokerCheck
from dlis_market.node.driver import PipelineDriver
from dlis_market.node.errors import ReceiptError
from dlis_market.node.receipts import check_bill
from dlis_market.node.transcripts import Transcript, TranscriptStore
from dlis_market.protocol.errors import TicketError
from dlis_market.protocol.routes import RouteHop
from dlis_market.protocol.tickets import SessionTicket, check_ticket, parse_ticket, sign_ticket
from dlis_market.settings import NodeSettings, Settings

ZERO = "0x0000000000000000000000000000000000000000"
DOMAIN = market_domain(31337, "0x" + "42" * 20)


def test_a_stage_receipt_cannot_bill_more_than_the_driver_sent_at_the_routed_price() -> None:
    """A real signed receipt from a stage's ledger: honest, inflated tokens, inflated price."""
    node = Account.create()
    hop = RouteHop("stage", node.address, 0, 2, 3)
    job = secrets.token_bytes(32)

    def receipt(tokens: int, price: int) -> Any:
        ledger = receipts.ReceiptLedger(job, b"\x01" * 32, 0, 2, price)
        ledger.record(tokens, b"out")
        signed = receipts.sign(ledger, bytes(node.key), DOMAIN)
        receipts.verify_receipt(DOMAIN, signed, node.address)  # genuinely signed by the stage
        return signed.receipt

    honest = receipt(9, 3)
    check_bill(hop, honest.tokens, honest.amount, sent_tokens=9)
    inflated = receipt(10_000, 3)
    with pytest.raises(ReceiptError, match="bills 10000 tokens but the session sent 9"):
        check_bill(hop, inflated.tokens, inflated.amount, sent_tokens=9)
    pricey = receipt(9, 4)
    with pytest.raises(ReceiptError, match="over 9 tokens x its routed price 3"):
        check_bill(hop, pricey.tokens, pricey.amount, sent_tokens=9)


def _driver(**overrides: Any) -> PipelineDriver:
    pool = SimpleNamespace(peer_id="driver", dead_peer_callbacks=[])
    return PipelineDriver(dht=None, pool=pool, settings=NodeSettings(**overrides))  # type: ignore[arg-type]


def _span(peer: str, started_at: float) -> Any:
    return SimpleNamespace(peer_id=peer, started_at=started_at)


def test_bans_back_off_reset_after_a_success_and_end_when_the_peer_restarts() -> None:
    driver = _driver(ban_base_s=10.0, ban_max_s=25.0)
    driver.saw([_span("p", 100.0)])
    assert driver.ban("p") == 10.0
    assert driver.ban("p") == 20.0
    assert driver.ban("p") == 25.0  # capped
    assert driver.banned() == {"p"}
    driver.succeeded("p")  # a success while still banned does not lift the ban
    assert driver.banned() == {"p"}
    driver.saw([_span("p", 100.0)])  # a re-announcement of the same run: still banned
    assert driver.banned() == {"p"}
    driver.saw([_span("p", 200.0)])  # a signed announcement of a restart: forgiven
    assert driver.banned() == set()
    assert driver.ban("p") == 10.0  # and its backoff starts over
    driver._bans["p"].until = time.monotonic() - 1  # the ban ran out ...
    driver.succeeded("p")  # ... and it served a session: the next fault is a first fault again
    assert driver.ban("p") == 10.0


def test_tickets_are_checked_field_by_field() -> None:
    broker = Account.create()
    job = secrets.token_bytes(32)
    ticket = SessionTicket(job_id=job, model="m", start=0, end=2, price_per_token=5, opener="A",
                           expires_at=time.time() + 60)  # fmt: skip
    signed = parse_ticket(sign_ticket(bytes(broker.key), DOMAIN, ticket).model_dump())
    fit: dict[str, Any] = {"job_id": job, "model": "m", "start": 0, "end": 2, "min_price": 5, "opener": "A"}
    assert check_ticket(DOMAIN, signed, **fit) == broker.address
    with pytest.raises(TicketError, match="no session ticket"):
        parse_ticket(None)
    with pytest.raises(TicketError, match="names opener A"):
        check_ticket(DOMAIN, signed, **{**fit, "opener": "B"})
    with pytest.raises(TicketError, match=r"not job .* \[2, 4\)"):
        check_ticket(DOMAIN, signed, **{**fit, "start": 2, "end": 4})
    with pytest.raises(TicketError, match="below this node's price 6"):
        check_ticket(DOMAIN, signed, **{**fit, "min_price": 6})
    with pytest.raises(TicketError, match="expired"):
        check_ticket(DOMAIN, signed, **fit, now=time.time() + 120)
    altered = signed.model_copy(update={"ticket": ticket.model_copy(update={"price_per_token": 500})})
    assert check_ticket(DOMAIN, altered, **fit) != broker.address  # recovers someone else: not a broker


def test_broker_check_caches_the_chain_answer_and_trusts_only_listed_or_role_holders() -> None:
    calls: list[str] = []
    now = [0.0]

    def lookup(account: str) -> bool:
        calls.append(account)
        return account == "0xBroker"

    settings = Settings().model_copy(update={"node": NodeSettings(market_address="0x" + "42" * 20, broker_cache_s=60)})
    check = BrokerCheck(settings, clock=lambda: now[0], lookup=lookup)
    assert not check.open_mode
    assert check.is_broker("0xBroker") and check.is_broker("0xBroker") and not check.is_broker("0xStranger")
    assert calls == ["0xBroker", "0xStranger"]
    now[0] = 61.0
    assert check.cached("0xBroker") is None and check.is_broker("0xBroker")
    assert len(calls) == 3
    dev = BrokerCheck(Settings().model_copy(update={"node": NodeSettings(market_address=ZERO)}))
    assert dev.open_mode and dev.is_broker("0xAnyone")


def test_one_openers_transcripts_never_push_out_anothers() -> None:
    now = [0.0]
    store = TranscriptStore(max_bytes=200, max_age_s=10, per_opener_bytes=100, clock=lambda: now[0])

    def make(sid: str, opener: str, n: int = 5) -> Transcript:  # 8 bytes per token id
        t = Transcript(sid, b"j" * 32, opener)
        t.record(StageInput((sid,), (0,), 0, token_ids=torch.zeros(1, n, dtype=torch.long)), 0)
        return t

    assert store.put(make("victim", "A"))
    for i in range(20):  # the flooder's own oldest go; the victim's stays
        assert store.put(make(f"f{i}", "B"))
    assert store.get("victim", "A").tokens == 5
    assert store.bytes_of("B") <= 100 and store.nbytes <= 200
    assert store.put(make("c1", "C")) and store.put(make("c2", "C"))
    assert not store.put(make("a2", "A", n=10))  # full of B's and C's: A's new one waits, nothing is evicted
    assert store.get("victim", "A").tokens == 5
    now[0] = 11.0
    assert "victim" not in store and len(store) == 0 and store.nbytes == 0
