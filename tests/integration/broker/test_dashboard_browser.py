"""The dashboard in headless Chromium after a paid, settled job on the local network: the pages
show the job, its route, its settlement transaction and node balances equal to the chain's.
A full-page screenshot of every page is written to tests/browser/artifacts/."""

from __future__ import annotations

import re
import secrets
import time

import httpx
import pytest

from dlis_market.broker.app import create_app
from dlis_market.broker.auth import sign_job_read
from dlis_market.chain.dlis_token import fmt_units
from dlis_market.chain.job_market import JobAuthorization, sign_authorization
from dlis_market.types import model_id
from tests.integration.conftest import DEV_PUBLISHER

UNIT = 10**18
MODEL = "smollm2-135m"


def _authorization(market, client) -> dict:
    jm = market.market()
    auth = JobAuthorization(
        client.address, market.broker.address, bytes.fromhex(model_id(MODEL, DEV_PUBLISHER)[2:]), UNIT,
        secrets.randbits(64),
        market.client.timestamp() + 1200,
    )  # fmt: skip
    sig = sign_authorization(client.key, jm.domain(), auth)
    return {"client": client.address, "nonce": str(auth.nonce), "max_cost": str(UNIT),
            "deadline": auth.deadline, "signature": sig.hex()}  # fmt: skip


@pytest.fixture()
def settled_job(broker_env, live_server):
    """A paid job run over HTTP against the live broker, settled on chain, with an epoch of
    reputation posted for the three nodes."""
    market, service, backend, ops, nodes, client = broker_env
    app = create_app(service, settle_in_background=False)  # serves the dashboard and /metrics
    srv = live_server(app)
    market.reputation().post_epoch(market.oracle, 1, [n.address for n in nodes], [9500, 8000, 7000], b"\x05" * 32)
    market.market().deposit(client, 10 * UNIT)
    body = {"model": MODEL, "prompt": "The capital of France is <b>?</b>", "max_tokens": 8,
            "authorization": _authorization(market, client)}  # fmt: skip
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        res = http.post("/v1/jobs", json=body)
        assert res.status_code == 201, res.text
        job_id = res.json()["id"]
        assert len(service.settler.settle_once().settled_batches) == 1
        job = http.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "settled"
        metrics = http.get("/metrics").text
    return market, ops, nodes, client, srv, job, metrics


def _shot(page, artifacts, name: str) -> None:
    path = artifacts / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")


def test_pages_show_job_route_settlement_and_balances(settled_job, chromium, artifacts):
    market, ops, nodes, client, srv, job, metrics = settled_job
    tx_hash = job["settlement"]["tx_hash"]
    jm, staking, token = market.market(), market.staking(), market.token()
    page = chromium.new_page(viewport={"width": 1400, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        # Network: every node with its on-chain stake and reputation, full coverage, the job's route
        page.goto(srv.url + "/")
        page.wait_for_selector(".chart[data-chart=earnings][data-drawn='1']")
        page.wait_for_selector(".chart[data-chart=reputation][data-drawn='1']")
        for op, node in zip(ops, nodes, strict=True):
            row = page.locator(f"tr.node[data-node='{node.address}']")
            assert row.locator("td.stake").get_attribute("data-units") == str(staking.info(op.address).active)
            assert row.locator("td.stake").inner_text() == fmt_units(staking.info(op.address).active)
            assert "%" in row.inner_text() and "epoch 1" in row.inner_text()
        assert "fully covered" in page.locator(".model[data-model='smollm2-135m'] h3").inner_text()
        assert page.locator("svg.coverage g.span").count() == 3 and page.locator("svg.coverage rect.gap").count() == 0
        hops = page.locator(f"table.routes tr[data-job='{job['id']}'] .hop")
        assert [hops.nth(i).get_attribute("data-start") for i in range(hops.count())] == ["0", "10", "20"]
        assert page.locator(".chart[data-chart=earnings] rect").count() == 3
        epochs = page.locator("p.epochs").inner_text()
        assert "epoch 1 is the latest on chain" in epochs and "Next: epoch" in epochs and "closes at" in epochs
        _shot(page, artifacts, "network")

        # The search box takes a job id (it looks like a transaction hash): it opens the job
        page.fill("form[action='/explorer/search'] input", job["id"])
        page.press("form[action='/explorer/search'] input", "Enter")
        page.wait_for_url(re.compile(r"/jobs/0x"))
        assert page.locator("#job-id").inner_text() == job["id"]

        # Jobs: the job with its route, latency and settlement transaction
        page.goto(srv.url + "/jobs")
        page.wait_for_selector(".chart[data-chart=latency][data-drawn='1']")
        row = page.locator(f"tr.job[data-job='{job['id']}']")
        assert row.locator(".status").inner_text() == "settled"
        assert row.locator("a.tx").inner_text() == tx_hash
        assert row.locator(".hop").count() == 3
        assert fmt_units(int(job["cost"])) in row.inner_text()
        _shot(page, artifacts, "jobs")

        # One job's story: route, receipts, settlement tx and its decoded events
        row.locator("a").first.click()
        page.wait_for_url(re.compile(r"/jobs/0x"))
        assert page.locator("#job-id").inner_text() == job["id"]
        assert page.locator("#settlement-tx").inner_text() == tx_hash
        assert page.locator("tr.receipt").count() == 3
        rows = page.locator("tr.event")
        events = [rows.nth(i).get_attribute("data-event") for i in range(rows.count())]
        # a job alone settles through settleJob: its JobSettled is the record (no BatchSettled)
        assert events.count("PaymentCredited") == 3 and events.count("JobSettled") == 1
        assert "BatchSettled" not in events
        # amounts in DLIS, the exact units on hover
        cost = page.locator("tr.event[data-event='JobSettled'] span.amount").first
        assert cost.inner_text() == fmt_units(int(job["cost"]))
        assert cost.get_attribute("title") == f"{job['cost']} units (1 DLIS = 10^18)"
        # The prompt is the client's: withheld from this (anonymous) visitor
        assert page.locator("#content-withheld").count() == 1 and page.locator("details pre").count() == 0
        assert "capital of France" not in page.inner_text("body")
        _shot(page, artifacts, "job")
        # ... and shown to the client, who opens the page with its signed JobRead permission
        read = sign_job_read(client.key, jm.domain(), job["id"], int(time.time()) + 300)
        page.goto(f"{srv.url}/jobs/{job['id']}?read={read}")
        assert "<b>?</b>" in (
            page.locator("details pre").text_content() or ""
        )  # the prompt is shown escaped, not as markup
        assert page.locator("details pre b").count() == 0
        page.goto(f"{srv.url}/jobs/{job['id']}")

        # Transaction page reached from the job's settlement link
        page.locator("#settlement-tx a").click()
        page.wait_for_url(re.compile(r"/explorer/tx/"))
        assert page.locator("#tx-hash").inner_text() == tx_hash
        assert "JobMarket.settleJob" in page.inner_text("body")
        assert "success" in page.inner_text("table.summary")
        _shot(page, artifacts, "tx")

        # Explorer index: the settlement among the latest blocks and market events
        page.goto(srv.url + "/explorer")
        assert page.locator(f"a[href='/explorer/tx/{tx_hash}']").count() >= 1
        assert page.locator("tr.event[data-event='JobSettled']").count() == 1
        assert page.locator("tr.event[data-event='EpochPosted']").count() == 1
        _shot(page, artifacts, "explorer")
        # paged: past the last page nothing is listed and the way back is offered
        page.goto(srv.url + "/jobs?page=1")
        assert "no jobs yet" in page.inner_text("table.jobs")
        assert page.locator("nav.pager a[rel=prev]").get_attribute("href") == "/jobs?page=0"
        assert page.locator("nav.pager a[rel=next]").count() == 0

        # Address pages: balances equal to what the bindings read
        for who, name in [(ops[0].address, "address-operator"), (client.address, "address-client")]:
            page.goto(srv.url + f"/explorer/address/{who}")
            assert page.locator("#address").inner_text() == who
            assert page.locator("td.dlis").get_attribute("data-units") == str(token.balance_of(who))
            assert page.locator("td.stake").get_attribute("data-units") == str(staking.info(who).active)
            assert page.locator("td.escrow").get_attribute("data-units") == str(jm.escrow_of(who))
            assert page.locator("td.claimable").get_attribute("data-units") == str(jm.claimable_of(who))
            assert page.locator("td.dlis").inner_text() == fmt_units(token.balance_of(who))
            _shot(page, artifacts, name)
        assert jm.claimable_of(ops[0].address) == int(job["receipts"][0]["amount"]) > 0

        # Block page of the settlement
        page.goto(srv.url + f"/explorer/block/{job['settlement']['block']}")
        assert tx_hash in page.inner_text("body") and "JobMarket.settleJob" in page.inner_text("body")
        _shot(page, artifacts, "block")

        page.goto(srv.url + "/explorer/tx/0x" + "ab" * 32)
        assert "no transaction" in page.inner_text("body")
    finally:
        page.close()
    assert not errors, errors
    assert f'dlis_broker_jobs_total{{model="{MODEL}",status="completed"}} 1.0' in metrics
    assert f'dlis_broker_settlements_total{{model="{MODEL}",result="settled"}} 1.0' in metrics
    assert 'dlis_broker_time_to_first_token_seconds_count{model="smollm2-135m"} 1.0' in metrics
