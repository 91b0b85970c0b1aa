"""Chain data is user data: a node registered with markup in its peer id and endpoint shows up
escaped on the explorer pages (Jinja2 autoescape), never as live HTML."""

from __future__ import annotations

from types import SimpleNamespace

from fastapi import FastAPI
from fastapi.testclient import TestClient

from dlis_market.broker.routes import dashboard

EVIL = "<script>alert(1)</script>"


def test_markup_from_chain_is_escaped(market):
    op = market.new_funded_account(1000 * 10**18)
    node = market.enroll_node(op, peer_id="12D3KooW" + EVIL, endpoint="/ip4/127.0.0.1/tcp/1/" + EVIL)
    app = FastAPI()
    app.state.service = SimpleNamespace(market=market.market())  # explorer pages read only the chain
    app.include_router(dashboard.router)
    with TestClient(app) as http:
        for path in ("/explorer", f"/explorer/address/{op.address}", f"/explorer/address/{node.address}"):
            res = http.get(path)
            assert res.status_code == 200, res.text
            assert EVIL not in res.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in res.text
        res = http.get("/explorer/search", params={"q": EVIL}, follow_redirects=False)
        assert res.status_code == 404 and EVIL not in res.text
        assert http.get("/explorer/block/999999").status_code == 404
        assert http.get("/explorer/address/0x1234").status_code == 404
