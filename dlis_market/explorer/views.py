"""Page models of the explorer and the network view, built from the chain.

:class:`Explorer` bundles the JSON-RPC client, the decoder and the contract bindings of one
deployment; the ``*_view`` functions turn what it reads into plain dataclasses for templates
and JSON. :func:`coverage` is pure: layer coverage of a model from the spans workers announce.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from eth_utils import is_address, to_checksum_address

from dlis_market.chain.client import ChainClient
from dlis_market.chain.dlis_token import DLISToken
from dlis_market.chain.job_market import JobMarket
from dlis_market.chain.node_registry import NodeRecord, NodeRegistry
from dlis_market.chain.reputation_oracle import ReputationOracle
from dlis_market.chain.staking_manager import StakingManager
from dlis_market.explorer.decoder import DecodedCall, DecodedError, DecodedEvent, MarketDecoder
from dlis_market.explorer.rpc import ExplorerError, ExplorerRpc, MethodUnavailableError, RpcError


class NotFoundError(ExplorerError):
    """No such block, transaction or address."""


class Explorer:
    """Everything the pages read from one chain and deployment."""

    def __init__(self, client: ChainClient):
        self.client = client
        self.deployment = client.deployment
        self.rpc = ExplorerRpc(client.w3)
        self.decoder = MarketDecoder(client.deployment)
        self.token = DLISToken(client)
        self.staking = StakingManager(client)
        self.registry = NodeRegistry(client)
        self.reputation = ReputationOracle(client)
        self.market = JobMarket(client)
        self._events: list[DecodedEvent] = []
        self._scanned_to: tuple[int, str] | None = None  # (block number, block hash) of the last scan
        self._scan_lock = threading.Lock()

    def market_logs(self) -> list[DecodedEvent]:
        """Every decodable event of the market contracts since deployment, oldest first.

        Scanned incrementally: only blocks after the last scan are fetched. If the block the
        last scan ended on changed hash or vanished (reorg, or ``evm_revert`` on a dev chain),
        everything is rescanned."""
        with self._scan_lock:  # pages read from worker threads; one scan at a time
            return self._scan()

    def _scan(self) -> list[DecodedEvent]:
        tip = self.rpc.block_number()
        if self._scanned_to is not None:
            blk = self.rpc.block(self._scanned_to[0], full=False) if self._scanned_to[0] <= tip else None
            if blk is None or blk["hash"] != self._scanned_to[1]:
                self._scanned_to, self._events = None, []
        start = self.deployment.first_block if self._scanned_to is None else self._scanned_to[0] + 1
        if start <= tip:
            addresses = [c.address for c in self.deployment.contracts.values()]
            for log in self.rpc.logs(addresses, start, tip):
                ev = self.decoder.decode_log(log)
                if ev is not None:
                    self._events.append(ev)
            end = self.rpc.block(tip, full=False)
            self._scanned_to = (tip, end["hash"]) if end is not None else None
        return list(self._events)


# ---------------------------------------------------------------------------- coverage (pure)


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    node: str
    peer_id: str = ""
    throughput: float | None = None


@dataclass(frozen=True)
class Coverage:
    num_layers: int
    rows: list[list[Span]]  # replicas stacked: each row holds non-overlapping spans
    gaps: list[tuple[int, int]]  # [start, end) ranges nobody serves
    replicas: list[int]  # per layer, how many spans cover it

    @property
    def complete(self) -> bool:
        return not self.gaps


def coverage(num_layers: int, spans: list[Span]) -> Coverage:
    """Stack spans into rows (first row with room, by start) and find the uncovered layers."""
    rows: list[list[Span]] = []
    for span in sorted(spans, key=lambda s: (s.start, s.end)):
        for row in rows:
            if row[-1].end <= span.start:
                row.append(span)
                break
        else:
            rows.append([span])
    replicas = [0] * num_layers
    for span in spans:
        for layer in range(max(span.start, 0), min(span.end, num_layers)):
            replicas[layer] += 1
    gaps: list[tuple[int, int]] = []
    for layer, n in enumerate(replicas):
        if n == 0:
            if gaps and gaps[-1][1] == layer:
                gaps[-1] = (gaps[-1][0], layer + 1)
            else:
                gaps.append((layer, layer + 1))
    return Coverage(num_layers, rows, gaps, replicas)


# ---------------------------------------------------------------------------- network


@dataclass(frozen=True)
class NodeView:
    node: str
    operator: str
    peer_id: str
    endpoint: str
    active: bool
    routable: bool
    stake: int
    reputation_bps: int | None
    reputation_epoch: int | None
    registered_at: int
    device_class: str


def node_views(ex: Explorer) -> list[NodeView]:
    return [_node_view(ex, rec) for rec in ex.registry.all_nodes()]


def _node_view(ex: Explorer, rec: NodeRecord) -> NodeView:
    score, epoch = ex.reputation.latest(rec.node)
    return NodeView(
        node=rec.node,
        operator=rec.operator,
        peer_id=rec.peer_id,
        endpoint=rec.endpoint,
        active=rec.active,
        routable=rec.routable,
        stake=ex.staking.info(rec.operator).active,
        reputation_bps=score if epoch else None,
        reputation_epoch=epoch or None,
        registered_at=rec.registered_at,
        device_class=rec.capability.device_class.name.lower(),
    )


# ---------------------------------------------------------------------------- blocks and txs


@dataclass(frozen=True)
class TxRow:
    hash: str
    block: int
    sender: str
    to: str | None
    to_name: str | None
    function: str | None
    value: int
    status: int | None = None


@dataclass(frozen=True)
class BlockView:
    number: int
    hash: str
    parent_hash: str
    timestamp: int
    gas_used: int
    gas_limit: int
    miner: str
    txs: list[TxRow]


def _tx_row(ex: Explorer, tx: dict[str, Any], status: int | None = None) -> TxRow:
    call = ex.decoder.decode_call(tx.get("to"), tx.get("input"))
    to = tx.get("to")
    return TxRow(
        hash=tx["hash"],
        block=int(tx["blockNumber"], 16) if tx.get("blockNumber") else -1,
        sender=to_checksum_address(tx["from"]),
        to=to_checksum_address(to) if to else None,
        to_name=ex.decoder.contract_name(to),
        function=call.function if call else None,
        value=int(tx.get("value") or "0x0", 16),
        status=status,
    )


def block_view(ex: Explorer, number: int) -> BlockView:
    blk = ex.rpc.block(number, full=True)
    if blk is None:
        raise NotFoundError(f"block {number} does not exist (chain tip is {ex.rpc.block_number()})")
    return BlockView(
        number=int(blk["number"], 16),
        hash=blk["hash"],
        parent_hash=blk["parentHash"],
        timestamp=int(blk["timestamp"], 16),
        gas_used=int(blk["gasUsed"], 16),
        gas_limit=int(blk["gasLimit"], 16),
        miner=to_checksum_address(blk["miner"]),
        txs=[_tx_row(ex, tx) for tx in blk.get("transactions", [])],
    )


def latest_blocks(ex: Explorer, count: int = 10) -> list[BlockView]:
    tip = ex.rpc.block_number()
    return [block_view(ex, n) for n in range(tip, max(tip - count, -1), -1)]


@dataclass(frozen=True)
class TxView:
    hash: str
    block: int | None
    sender: str
    to: str | None
    to_name: str | None
    value: int
    nonce: int
    gas_used: int | None
    status: int | None
    input: str
    call: DecodedCall | None
    events: list[DecodedEvent]
    undecoded_logs: int
    internal_calls: list[dict[str, Any]]
    trace_method: str | None
    trace_note: str | None
    error: DecodedError | None
    error_raw: str | None
    created: str | None  # contract created by the transaction


def tx_view(ex: Explorer, tx_hash: str) -> TxView:
    tx = ex.rpc.transaction(tx_hash)
    if tx is None:
        raise NotFoundError(f"no transaction {tx_hash} on this chain")
    receipt = ex.rpc.receipt(tx_hash) or {}
    events: list[DecodedEvent] = []
    undecoded = 0
    for log in receipt.get("logs", []):
        ev = ex.decoder.decode_log(log)
        if ev is None:
            undecoded += 1
        else:
            events.append(ev)
    trace_method: str | None = None
    trace_note: str | None = None
    calls: list[dict[str, Any]] = []
    try:
        trace_method, calls = ex.rpc.internal_calls(tx_hash)
        for c in calls:
            decoded = ex.decoder.decode_call(c.get("to"), c.get("input"))
            c["to_name"] = ex.decoder.contract_name(c.get("to"))
            c["function"] = decoded.function if decoded else None
    except MethodUnavailableError:
        trace_note = "this node offers neither debug_traceTransaction nor trace_transaction"
    except RpcError as exc:
        trace_note = f"tracing failed: {exc.message}"
    status = int(receipt["status"], 16) if receipt.get("status") else None
    error = None
    error_raw = None
    if status == 0:
        try:
            error_raw = ex.rpc.transaction_error(tx_hash)
            error = ex.decoder.decode_error(error_raw)
        except MethodUnavailableError:
            error_raw = None  # no ots_getTransactionError: the page says the revert reason is unknown
    created = receipt.get("contractAddress")
    return TxView(
        hash=tx["hash"],
        block=int(tx["blockNumber"], 16) if tx.get("blockNumber") else None,
        sender=to_checksum_address(tx["from"]),
        to=to_checksum_address(tx["to"]) if tx.get("to") else None,
        to_name=ex.decoder.contract_name(tx.get("to")),
        value=int(tx.get("value") or "0x0", 16),
        nonce=int(tx["nonce"], 16),
        gas_used=int(receipt["gasUsed"], 16) if receipt.get("gasUsed") else None,
        status=status,
        input=tx.get("input") or "0x",
        call=ex.decoder.decode_call(tx.get("to"), tx.get("input")),
        events=events,
        undecoded_logs=undecoded,
        internal_calls=calls,
        trace_method=trace_method,
        trace_note=trace_note,
        error=error,
        error_raw=error_raw,
        created=to_checksum_address(created) if created else None,
    )


# ---------------------------------------------------------------------------- addresses


@dataclass(frozen=True)
class AddressView:
    address: str
    contract_name: str | None
    is_contract: bool
    eth: int
    dlis: int
    active_stake: int
    unbonding: int
    unbonding_release: int
    escrow: int
    pending_withdrawal: int
    claimable_market: int
    claimable_staking: int
    nodes: list[NodeView]  # nodes it operates, or itself when it is a node key
    node_of: str | None  # operator, when the address is a node key
    history: list[TxRow]
    history_note: str | None
    events: list[DecodedEvent] = field(default_factory=list)

    @property
    def claimable(self) -> int:
        return self.claimable_market + self.claimable_staking


def address_view(ex: Explorer, address: str, history: int = 25) -> AddressView:
    if not is_address(address):
        raise NotFoundError(f"{address!r} is not an address (0x + 40 hex digits)")
    addr = to_checksum_address(address)
    stake = ex.staking.info(addr)
    pending, _, _ = ex.market.pending_withdrawal(addr)
    nodes = [_node_view(ex, r) for r in (ex.registry.get(n) for n in ex.registry.nodes_of(addr)) if r is not None]
    own = ex.registry.get(addr)
    if own is not None:
        nodes.append(_node_view(ex, own))
    rows: list[TxRow] = []
    note = None
    if ex.rpc.ots_api_level() is None:
        note = "this node has no ots_* methods: address history is unavailable (events are listed below)"
    else:
        for tx in ex.rpc.address_history(addr, history):
            rec = tx.get("receipt") or {}
            rows.append(_tx_row(ex, tx, int(rec["status"], 16) if rec.get("status") else None))
    low = addr.lower()
    events = [ev for ev in ex.market_logs() if ev.address.lower() == low or _mentions(ev, low)]
    return AddressView(
        address=addr,
        contract_name=ex.decoder.contract_name(addr),
        is_contract=ex.rpc.code(addr) not in ("0x", "0x0", ""),
        eth=ex.rpc.balance(addr),
        dlis=ex.token.balance_of(addr),
        active_stake=stake.active,
        unbonding=stake.unbonding,
        unbonding_release=stake.release_time,
        escrow=ex.market.escrow_of(addr),
        pending_withdrawal=pending,
        claimable_market=ex.market.claimable_of(addr),
        claimable_staking=ex.staking.claimable(addr),
        nodes=nodes,
        node_of=own.operator if own is not None else None,
        history=rows,
        history_note=note,
        events=list(reversed(events))[:100],
    )


def _mentions(ev: DecodedEvent, low: str) -> bool:
    return any(isinstance(v, str) and v.lower() == low for v in ev.args.values())


# ---------------------------------------------------------------------------- charts


def earnings_per_node(events: list[DecodedEvent]) -> dict[str, int]:
    """Token units credited per node by ``PaymentCredited`` events."""
    out: dict[str, int] = defaultdict(int)
    for ev in events:
        if ev.contract == "JobMarket" and ev.event == "PaymentCredited":
            out[str(ev.args["node"])] += int(ev.args["amount"])
    return dict(out)


def reputation_per_epoch(events: list[DecodedEvent]) -> dict[str, list[tuple[int, int]]]:
    """``(epoch, scoreBps)`` per node from ``ReputationUpdated`` events, by epoch."""
    out: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for ev in events:
        if ev.contract == "ReputationOracle" and ev.event == "ReputationUpdated":
            out[str(ev.args["node"])].append((int(ev.args["epoch"]), int(ev.args["scoreBps"])))
    return {k: sorted(v) for k, v in out.items()}
