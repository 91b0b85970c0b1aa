"""Dashboard and block-explorer pages of the broker (server-rendered HTML, Jinja2 autoescape)
and the JSON the pages' charts read.

Pages: ``/`` network (topology per model with layer coverage, nodes, recent routes), ``/jobs`` and
``/jobs/{id}``, ``/explorer`` (latest blocks and market events), ``/explorer/tx/{hash}``,
``/explorer/address/{addr}``, ``/explorer/block/{n}``. Chain reads go through
:mod:`dlis_market.explorer` in a worker thread (web3 calls block).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from markupsafe import Markup

from dlis_market.broker.deps import ServiceDep
from dlis_market.broker.routes.jobs import AuthHeader, ReadHeader, ReadQuery, client_reads, job_public
from dlis_market.broker.service import BrokerService
from dlis_market.chain.dlis_token import fmt_units
from dlis_market.explorer.decoder import DecodedEvent
from dlis_market.explorer.rpc import ExplorerError
from dlis_market.explorer.views import (
    Explorer,
    NodeView,
    Span,
    address_view,
    block_view,
    coverage,
    earnings_per_node,
    latest_blocks,
    node_views,
    reputation_per_epoch,
    tx_view,
)

WEB = Path(__file__).resolve().parent.parent / "web"
TX_HASH = re.compile(r"^0x[0-9a-fA-F]{64}$")
ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")

router = APIRouter(tags=["dashboard"], include_in_schema=False)


# ---------------------------------------------------------------------------- template helpers


def _short(value: Any, keep: int = 6) -> str:
    s = str(value)
    return s if len(s) <= 2 * keep + 3 else f"{s[: keep + 2]}…{s[-keep:]}"


def _ts(value: float | int | None) -> str:
    if not value:
        return "—"
    return dt.datetime.fromtimestamp(float(value), tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _is_address(value: Any) -> bool:
    return isinstance(value, str) and bool(ADDRESS.match(value))


def _is_hash(value: Any) -> bool:
    return isinstance(value, str) and bool(TX_HASH.match(value))


# Event arguments that are token amounts (JobMarket, StakingManager): shown in DLIS, raw units on hover.
AMOUNT_ARGS = frozenset(
    {"amount", "escrow", "cost", "fee", "paid", "fees", "cap", "activeStake", "unbondingTotal", "previous", "current",
     "faceValue", "reward", "slashed", "reporterReward"}
)  # fmt: skip
JOBS_PER_PAGE = 50
EVENTS_PER_PAGE = 60


def _units(value: Any) -> Markup:
    """A token amount in DLIS; its exact integer units on hover (``title``)."""
    units = int(value or 0)
    return Markup('<span class="amount" title="{} units (1 DLIS = 10^18)">{}</span>').format(units, fmt_units(units))


def _page_of(items: list[Any], page: int, per_page: int) -> tuple[list[Any], dict[str, int | None]]:
    """One page (0 = newest) of a newest-first list, and the neighbours' page numbers."""
    start = page * per_page
    return items[start : start + per_page], {
        "page": page,
        "newer": page - 1 if page > 0 else None,
        "older": page + 1 if len(items) > start + per_page else None,
    }


templates = Jinja2Templates(directory=str(WEB / "templates"))
templates.env.filters.update(
    units=_units,
    wei=lambda v: Markup('<span class="amount" title="{} wei">{}</span>').format(int(v or 0), fmt_units(int(v or 0))),
    short=_short, ts=_ts, ms=lambda v: f"{v:.1f}",
)  # fmt: skip
templates.env.tests.update(address=_is_address, hash32=_is_hash, amount_arg=lambda k: k in AMOUNT_ARGS)


# ---------------------------------------------------------------------------- shared state


@dataclass
class Liveness:
    """Which nodes announced offers at each poll of the network page: last heartbeat and uptime."""

    first_poll: float = field(default_factory=time.time)
    polls: int = 0
    seen: dict[str, int] = field(default_factory=dict)  # node -> polls present
    last: dict[str, float] = field(default_factory=dict)  # node -> last time present

    def record(self, present: set[str], now: float) -> None:
        self.polls += 1
        for node in present:
            self.seen[node] = self.seen.get(node, 0) + 1
            self.last[node] = now

    def uptime(self, node: str) -> float | None:
        return self.seen.get(node, 0) / self.polls if self.polls else None


def get_explorer(request: Request, service: ServiceDep) -> Explorer:
    ex: Explorer | None = getattr(request.app.state, "explorer", None)
    if ex is None:
        ex = Explorer(service.market.client)
        request.app.state.explorer = ex
    return ex


def _liveness(request: Request) -> Liveness:
    live: Liveness | None = getattr(request.app.state, "liveness", None)
    if live is None:
        live = request.app.state.liveness = Liveness()
    return live


ExplorerDep = Annotated[Explorer, Depends(get_explorer)]


def _page(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, name, context, status_code=status_code)


def _not_found(request: Request, what: str) -> HTMLResponse:
    return _page(request, "error.html", status_code=404, title="Not found", detail=what)


# ---------------------------------------------------------------------------- network


async def _network(service: BrokerService, ex: Explorer, live: Liveness) -> dict[str, Any]:
    nodes: list[NodeView] = await asyncio.to_thread(node_views, ex)
    now = time.time()
    models = []
    present: set[str] = set()
    throughput: dict[str, float] = {}
    for served in service.catalog.models.values():
        offers = await service.backend.offers(served.name)
        spans = [Span(o.start, o.end, o.node_address, o.peer_id, o.throughput) for o in offers]
        present.update(o.node_address for o in offers)
        for o in offers:
            throughput[o.node_address] = throughput.get(o.node_address, 0.0) + o.throughput
        models.append(
            {"name": served.name, "model_id": served.model_id, "coverage": coverage(served.num_layers, spans)}
        )
    live.record(present, now)
    jobs = await asyncio.to_thread(service.ledger.recent_jobs, 10)
    routes = [{"id": j.id, "status": j.status, "route": json.loads(j.route_json) if j.route_json else []} for j in jobs]
    return {
        "models": models,
        "nodes": nodes,
        "throughput": throughput,
        "uptime": {n.node: live.uptime(n.node) for n in nodes},
        "heartbeat": {n.node: live.last.get(n.node) for n in nodes},
        "routes": routes,
        "epochs": await asyncio.to_thread(_epochs, ex, service.settings.oracle.epoch_s, now),
    }


def _epochs(ex: Explorer, epoch_s: float, now: float) -> dict[str, Any]:
    """The last reputation epoch on chain and when the next one closes. Epoch ``k`` covers
    ``[k * epoch_s, (k + 1) * epoch_s)`` of unix time and is posted once it has closed."""
    posted = [ev for ev in ex.market_logs() if ev.event == "EpochPosted"]
    last = max(posted, key=lambda ev: int(ev.args["epoch"]), default=None)
    current = int(now // epoch_s)
    return {
        "epoch_s": epoch_s,
        "last": None if last is None else int(last.args["epoch"]),
        "last_block": None if last is None else last.block,
        "next": current,
        "next_closes_at": (current + 1) * epoch_s,
    }


@router.get("/", response_class=HTMLResponse)
async def network_page(request: Request, service: ServiceDep, ex: ExplorerDep) -> HTMLResponse:
    data = await _network(service, ex, _liveness(request))
    return _page(request, "network.html", title="Network", **data)


@router.get("/api/dashboard/network")
async def network_json(request: Request, service: ServiceDep, ex: ExplorerDep) -> dict[str, Any]:
    data = await _network(service, ex, _liveness(request))
    return {
        "models": [
            {
                "name": m["name"],
                "num_layers": m["coverage"].num_layers,
                "gaps": m["coverage"].gaps,
                "spans": [[s.__dict__ for s in row] for row in m["coverage"].rows],
            }
            for m in data["models"]
        ],
        "nodes": [{**n.__dict__, "stake": str(n.stake)} for n in data["nodes"]],
        "routes": data["routes"],
    }


# ---------------------------------------------------------------------------- jobs


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request, service: ServiceDep, page: Annotated[int, Query(ge=0, le=10_000)] = 0) -> HTMLResponse:
    # sync: the threadpool runs it. One row past the page says whether an older page exists.
    rows = service.ledger.recent_jobs((page + 1) * JOBS_PER_PAGE + 1)
    shown, pager = _page_of(rows, page, JOBS_PER_PAGE)
    jobs = [job_public(service.ledger, r, content=False) for r in shown]
    return _page(request, "jobs.html", title="Jobs", jobs=jobs, pager=pager)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
async def job_page(
    request: Request, job_id: str, service: ServiceDep, ex: ExplorerDep, x_dlis_job_read: ReadHeader = None,
    read: ReadQuery = None, authorization: AuthHeader = None,
) -> HTMLResponse:  # fmt: skip
    """A job's story; its request and answer only for its client (see routes/jobs.py)."""
    row = await asyncio.to_thread(service.ledger.get_job, job_id)
    if row is None:
        return _not_found(request, f"no job {job_id} in this broker's ledger")
    content = await client_reads(service, row, x_dlis_job_read or read, authorization)
    job = await asyncio.to_thread(job_public, service.ledger, row, content=content)
    settlement = None
    job_error: str | None = None
    if job.settlement.tx_hash:
        try:
            settlement = await asyncio.to_thread(tx_view, ex, job.settlement.tx_hash)
        except ExplorerError as exc:  # the page still shows the ledger's side of the story
            job_error = str(exc)
    mine: list[DecodedEvent] = []
    if settlement is not None:
        for ev in settlement.events:
            if ev.event == "JobSettled" and str(ev.args.get("jobId")).lower() != job.id.lower():
                continue  # another job of the same batch
            mine.append(ev)
    return _page(
        request, "job.html", title=f"Job {_short(job.id)}", job=job, settlement=settlement, events=mine,
        settlement_error=job_error,
        request_json=None if job.request is None else json.dumps(job.request, sort_keys=True),
    )  # fmt: skip


# ---------------------------------------------------------------------------- explorer


@router.get("/explorer", response_class=HTMLResponse)
async def explorer_page(
    request: Request, ex: ExplorerDep, page: Annotated[int, Query(ge=0, le=100_000)] = 0
) -> HTMLResponse:
    def read() -> tuple[Any, list[DecodedEvent], int | None]:
        return latest_blocks(ex, 10), list(reversed(ex.market_logs())), ex.rpc.ots_api_level()

    blocks, events, ots = await asyncio.to_thread(read)
    shown, pager = _page_of(events, page, EVENTS_PER_PAGE)
    return _page(
        request, "explorer.html", title="Explorer", blocks=blocks, events=shown, ots=ots, contracts=ex.deployment,
        pager=pager, total_events=len(events),
    )  # fmt: skip


@router.get("/explorer/search")
async def explorer_search(request: Request, service: ServiceDep, q: str = "") -> Response:
    q = q.strip()
    if TX_HASH.match(q):  # a job id and a transaction hash look alike: the ledger decides
        if await asyncio.to_thread(service.ledger.get_job, q.lower()) is not None:
            return RedirectResponse(f"/jobs/{q.lower()}", status_code=303)
        return RedirectResponse(f"/explorer/tx/{q}", status_code=303)
    if ADDRESS.match(q):
        return RedirectResponse(f"/explorer/address/{q}", status_code=303)
    if q.isdigit():
        return RedirectResponse(f"/explorer/block/{int(q)}", status_code=303)
    return _not_found(request, f"{q!r} is not a job id, block number, transaction hash or address")


@router.get("/explorer/tx/{tx_hash}", response_class=HTMLResponse)
async def tx_page(request: Request, tx_hash: str, ex: ExplorerDep) -> HTMLResponse:
    if not TX_HASH.match(tx_hash):
        return _not_found(request, "a transaction hash is 0x followed by 64 hex digits")
    try:
        tx = await asyncio.to_thread(tx_view, ex, tx_hash)
    except ExplorerError as exc:
        return _not_found(request, str(exc))
    return _page(request, "tx.html", title=f"Transaction {_short(tx.hash)}", tx=tx)


@router.get("/explorer/address/{address}", response_class=HTMLResponse)
async def address_page(request: Request, address: str, ex: ExplorerDep) -> HTMLResponse:
    try:
        view = await asyncio.to_thread(address_view, ex, address)
    except ExplorerError as exc:
        return _not_found(request, str(exc))
    return _page(request, "address.html", title=f"Address {_short(view.address)}", a=view)


@router.get("/explorer/block/{number}", response_class=HTMLResponse)
async def block_page(request: Request, number: int, ex: ExplorerDep) -> HTMLResponse:
    try:
        blk = await asyncio.to_thread(block_view, ex, number)
    except ExplorerError as exc:
        return _not_found(request, str(exc))
    return _page(request, "block.html", title=f"Block {blk.number}", block=blk)


# ---------------------------------------------------------------------------- charts


@router.get("/api/dashboard/charts")
async def charts_json(service: ServiceDep, ex: ExplorerDep) -> dict[str, Any]:
    """Series for the pages' charts: per-job latency, TTFT and decode speed over time (ledger),
    earnings per node (PaymentCredited) and reputation per epoch (ReputationUpdated)."""
    jobs = await asyncio.to_thread(
        lambda: [job_public(service.ledger, r, content=False) for r in service.ledger.recent_jobs(200)]
    )
    events = await asyncio.to_thread(ex.market_logs)
    done = sorted((j for j in jobs if j.latency_ms is not None), key=lambda j: j.created_at)
    return {
        "latency": [{"t": j.created_at, "latency_ms": j.latency_ms, "ttft_ms": j.ttft_ms} for j in done],
        "throughput": [{"t": j.created_at, "tokens_per_s": j.tokens_per_s} for j in done if j.tokens_per_s],
        "earnings": [{"node": n, "units": str(v), "dlis": v / 10**18} for n, v in earnings_per_node(events).items()],
        "reputation": {n: [{"epoch": e, "bps": s} for e, s in pts] for n, pts in reputation_per_epoch(events).items()},
    }


@router.get("/static/dashboard/{name}")
async def static_file(request: Request, name: str) -> Response:
    if name not in ("charts.js", "style.css"):
        return _not_found(request, f"no static file {name}")
    return FileResponse(WEB / "static" / name)
