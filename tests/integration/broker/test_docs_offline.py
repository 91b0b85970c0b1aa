"""/docs and /redoc render with no outside network (new-user issue): FastAPI's defaults load Swagger
UI, ReDoc and fonts from public CDNs, which leaves the pages blank here and breaks the network
rule. Headless Chromium loads each page from the live broker and records every request it makes."""

from __future__ import annotations

from urllib.parse import urlparse

from dlis_market.broker.app import create_app


def test_docs_and_redoc_render_from_the_broker_alone(broker_env, live_server, chromium, artifacts) -> None:
    market, service, backend, ops, nodes, client = broker_env
    srv = live_server(create_app(service, settle_in_background=False))
    page = chromium.new_page()
    asked: dict[str, str] = {}  # url -> "" when it went out, else the browser's reason for stopping it
    page.on("request", lambda req: asked.setdefault(req.url, ""))
    page.on("requestfailed", lambda req: asked.update({req.url: req.failure or "failed"}))
    try:
        page.goto(srv.url + "/docs")
        page.wait_for_selector(".opblock", timeout=30_000)  # Swagger UI drew the operations
        assert page.locator(".opblock").count() >= 5
        page.screenshot(path=str(artifacts / "docs.png"), full_page=False)

        page.goto(srv.url + "/redoc")
        page.wait_for_selector("[role=menuitem]", timeout=30_000)  # ReDoc drew its menu
        page.screenshot(path=str(artifacts / "redoc.png"), full_page=False)
    finally:
        page.close()
    elsewhere = {u: why for u, why in asked.items() if urlparse(u.removeprefix("blob:")).hostname != "127.0.0.1"}
    # the pages' Content-Security-Policy stops what the builds still reference elsewhere (ReDoc's
    # sidebar logo) inside the browser, before any connection: nothing may have gone out
    assert all(why == "csp" for why in elsewhere.values()), elsewhere
