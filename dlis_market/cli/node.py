"""`dlis node ...`: what a node operator does on chain: stake, register, withdraw, claim."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dlis_market.cli.context import (
    U256,
    JsonOpt,
    PasswordFileOpt,
    Shown,
    console,
    emit,
    handle_errors,
    parse_amount,
    read_password_file,
    resolve_address,
    show_address,
    state,
    unlock,
    utc,
)

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

    from dlis_market.chain.client import ChainClient

app = typer.Typer(help="Stake, register and manage worker nodes as an operator.", no_args_is_help=True)

AccountOpt = Annotated[
    str, typer.Option("--account", "-a", help="Operator account: keystore name, or dev:N on a dev chain.")
]


def _tx(receipt: Any) -> str:
    return "0x" + bytes(receipt["transactionHash"]).hex()


# What ``send`` answers: the transaction's receipt, the fields to report, how to print them.
Sent = tuple[Any, dict[str, Any], Callable[[dict[str, Any]], None]]


def _operator_tx(
    ctx: typer.Context,
    account: str,
    password_file: Path | None,
    as_json: bool,
    send: Callable[[ChainClient, LocalAccount, int], Sent],
    amount: str | None = None,
) -> None:
    """One transaction of the operator: the typed DLIS ``amount`` checked first (before anything is
    unlocked), then ``send`` it as the unlocked account; the report carries the operator and tx."""
    from dlis_market.chain.client import ChainClient

    st = state(ctx)
    with handle_errors(as_json):
        units = parse_amount(amount) if amount is not None else 0
        op = unlock(st, account, read_password_file(password_file))
        receipt, data, human = send(ChainClient(st.settings), op, units)
        emit({"operator": op.address, **data, "tx": _tx(receipt)}, as_json, human)


@app.command()
def stake(
    ctx: typer.Context,
    amount: Annotated[str, typer.Argument(help="DLIS to stake, e.g. 1000.")],
    account: AccountOpt,
    password_file: PasswordFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Lock DLIS as stake (approves the StakingManager first if needed)."""
    _change_stake(ctx, amount, account, password_file, as_json, unbond=False)


@app.command()
def unstake(
    ctx: typer.Context,
    amount: Annotated[str, typer.Argument(help="DLIS to move into unbonding.")],
    account: AccountOpt,
    password_file: PasswordFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start unbonding stake; withdraw it with `dlis node withdraw` after the unbonding period."""
    _change_stake(ctx, amount, account, password_file, as_json, unbond=True)


def _change_stake(
    ctx: typer.Context, amount: str, account: str, password_file: Path | None, as_json: bool, *, unbond: bool
) -> None:
    """``stake`` and ``unstake``: one StakingManager call for ``amount``, reported with the stake
    as it stands after it."""
    from dlis_market.chain.dlis_token import fmt_units
    from dlis_market.chain.staking_manager import StakingManager

    def send(client: ChainClient, op: LocalAccount, units: int) -> Sent:
        staking = StakingManager(client)
        receipt = (staking.request_unstake if unbond else staking.stake)(op, units)
        info = staking.info(op.address)
        if unbond:
            return (
                receipt,
                {"unbonding": U256(info.unbonding), "release_time": info.release_time},
                lambda d: console.print(f"unbonding {amount} DLIS; withdrawable after {utc(d['release_time'])} UTC"),
            )
        return (
            receipt,
            {"staked": U256(units), "active": U256(info.active), "routable": info.is_active},
            lambda d: console.print(
                f"staked {amount} DLIS; active stake {fmt_units(d['active'])} DLIS "
                f"(minimum {fmt_units(info.min_stake)}) tx {d['tx']}"
            ),
        )

    _operator_tx(ctx, account, password_file, as_json, send, amount)


@app.command()
def withdraw(
    ctx: typer.Context, account: AccountOpt, password_file: PasswordFileOpt = None, as_json: JsonOpt = False
) -> None:
    """Withdraw stake whose unbonding period has passed."""
    from dlis_market.chain.dlis_token import fmt_units
    from dlis_market.chain.staking_manager import StakingManager

    def send(client: ChainClient, op: LocalAccount, _: int) -> Sent:
        staking = StakingManager(client)
        amount = staking.info(op.address).unbonding
        return (
            staking.withdraw(op),
            {"withdrawn": U256(amount)},
            lambda d: console.print(f"withdrew {fmt_units(d['withdrawn'])} DLIS of stake, tx {d['tx']}"),
        )

    _operator_tx(ctx, account, password_file, as_json, send)


@app.command()
def register(
    ctx: typer.Context,
    account: AccountOpt,
    node_key: Annotated[str, typer.Option(help="The node's signing key: keystore name (or dev:N on a dev chain).")],
    peer_id: Annotated[
        str | None,
        typer.Option(
            help="The node's libp2p peer id (required to register; with --update it must be the registered one)."
        ),
    ] = None,
    endpoint: Annotated[str, typer.Option(help="Multiaddr where the node listens.")] = "/ip4/127.0.0.1/tcp/0",
    memory_mib: Annotated[int, typer.Option(help="Memory the node offers, MiB.")] = 4096,
    gflops: Annotated[int, typer.Option(help="Measured GEMM throughput, GFLOP/s.")] = 50,
    bandwidth_mbps: Annotated[int, typer.Option(help="Network bandwidth, Mbit/s.")] = 100,
    device_class: Annotated[str, typer.Option(help="phone|laptop|desktop|server|datacenter_gpu")] = "laptop",
    attestation_hash: Annotated[str, typer.Option(help="keccak256 of the node's attestation report (0x...).")] = "0x"
    + "00" * 32,
    update: Annotated[
        bool,
        typer.Option(
            help="Update endpoint/capability/attestation of a registered node. The peer id is bound at "
            "registration and cannot change: `dlis node deregister`, then register again for a new one."
        ),
    ] = False,
    password_file: PasswordFileOpt = None,
    node_password_file: PasswordFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a node key under your operator account (the node key signs an EIP-712 binding)."""
    from dlis_market.chain.client import ChainClient
    from dlis_market.chain.errors import PreflightError
    from dlis_market.chain.node_registry import BINDING_TTL_S, Capability, DeviceClass, NodeRegistry
    from dlis_market.node.identity import check_multiaddr, check_peer_id

    st = state(ctx)
    with handle_errors(as_json):
        # Everything a user typed is checked before any account is unlocked or transaction sent.
        if peer_id is None and not update:
            raise PreflightError("registering a node needs --peer-id (printed by `dlis node start`)")
        if peer_id is not None:
            peer_id = check_peer_id(peer_id)
        endpoint = check_multiaddr(endpoint)
        try:
            dclass = DeviceClass[device_class.upper()]
        except KeyError as exc:
            raise PreflightError(
                f"device class {device_class!r} unknown; use one of {', '.join(d.name.lower() for d in DeviceClass)}"
            ) from exc
        att = bytes.fromhex(attestation_hash.removeprefix("0x"))
        if len(att) != 32:
            raise PreflightError(f"attestation hash must be 32 bytes, got {len(att)}")
        op = unlock(st, account, read_password_file(password_file))
        node = unlock(st, node_key, read_password_file(node_password_file))
        client = ChainClient(st.settings)
        registry = NodeRegistry(client)
        cap = Capability(memory_mib, gflops, bandwidth_mbps, dclass)
        if update:
            registered = registry.get(node.address)
            if registered is None:
                raise PreflightError(f"node {node.address} is not registered; register it first (without --update)")
            if peer_id is not None and peer_id != registered.peer_id:
                raise PreflightError(
                    f"node {node.address} is registered with peer id {registered.peer_id}; --update cannot change "
                    f"it to {peer_id} (NodeRegistry binds the peer id, signed by the node key, at registration). "
                    "Drop --peer-id to update the rest, or `dlis node deregister` it and register it again"
                )
            receipt = registry.update(op, node.address, endpoint, cap, att)
        else:
            assert peer_id is not None
            deadline = client.timestamp() + BINDING_TTL_S
            binding = registry.sign_binding(node, op.address, peer_id, deadline)
            receipt = registry.register(op, node.address, peer_id, endpoint, cap, att, binding, deadline)
        rec = registry.get(node.address)
        assert rec is not None
        emit(
            {
                "node": node.address,
                "operator": op.address,
                "peer_id": rec.peer_id,
                "routable": rec.routable,
                "tx": _tx(receipt),
            },
            as_json,
            lambda d: console.print(
                f"node {d['node']} registered to {d['operator']} (routable: {d['routable']}), tx {d['tx']}"
            ),
        )


@app.command()
def deregister(
    ctx: typer.Context,
    account: AccountOpt,
    node: Annotated[str, typer.Option(help="The node: its address, or the keystore name of its key.")],
    password_file: PasswordFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Take a node out of routing (its record stays readable); register it again later, e.g. with a
    new peer id."""
    from dlis_market.chain.client import ChainClient
    from dlis_market.chain.errors import PreflightError
    from dlis_market.chain.node_registry import NodeRegistry

    st = state(ctx)
    with handle_errors(as_json):
        address = resolve_address(st, node)
        op = unlock(st, account, read_password_file(password_file))
        registry = NodeRegistry(ChainClient(st.settings))
        rec = registry.get(address)
        if rec is None or not rec.active:
            raise PreflightError(f"node {address} is not registered and active: nothing to deregister")
        if rec.operator.lower() != op.address.lower():
            raise PreflightError(f"node {address} is operated by {rec.operator}, not by {op.address}")
        receipt = registry.deregister(op, address)
        emit(
            {"node": address, "operator": op.address, "tx": _tx(receipt)},
            as_json,
            lambda d: console.print(f"node {d['node']} deregistered (no longer routed), tx {d['tx']}"),
        )


@app.command()
def status(
    ctx: typer.Context,
    who: Annotated[str, typer.Argument(help="Operator or node address, or a keystore account name.")],
    as_json: JsonOpt = False,
) -> None:
    """Stake, unbonding, nodes and their routability for an operator (or one node)."""
    from dlis_market.chain.dlis_token import fmt_units
    from dlis_market.chain.job_market import JobMarket
    from dlis_market.chain.node_registry import NodeRegistry

    def read(client: ChainClient, address: str) -> Shown:
        registry = NodeRegistry(client)
        node = registry.get(address)
        operator = node.operator if node else address
        info = registry.staking.info(operator)
        nodes = [registry.get(n) for n in registry.nodes_of(operator)]
        data = {
            "operator": operator,
            "stake_active": U256(info.active),
            "stake_unbonding": U256(info.unbonding),
            "unbonding_release_time": info.release_time,
            "min_stake": U256(info.min_stake),
            "meets_minimum": info.is_active,
            "claimable": U256(JobMarket(client).claimable_of(operator)),
            "nodes": [
                {
                    "node": n.node,
                    "peer_id": n.peer_id,
                    "endpoint": n.endpoint,
                    "active": n.active,
                    "routable": n.routable,
                }
                for n in nodes
                if n is not None
            ],
        }

        def human(d: dict[str, Any]) -> None:
            console.print(f"operator {d['operator']}")
            console.print(
                f"  stake {fmt_units(d['stake_active'])} DLIS active, {fmt_units(d['stake_unbonding'])} unbonding "
                f"(minimum {fmt_units(d['min_stake'])}: {'met' if d['meets_minimum'] else 'NOT met'})"
            )
            console.print(f"  claimable earnings {fmt_units(d['claimable'])} DLIS")
            for n in d["nodes"]:
                console.print(f"  node {n['node']} peer {n['peer_id']} routable={n['routable']}")

        return data, human

    show_address(ctx, who, as_json, read)


@app.command()
def claim(
    ctx: typer.Context, account: AccountOpt, password_file: PasswordFileOpt = None, as_json: JsonOpt = False
) -> None:
    """Pay out the earnings JobMarket credited to your operator account."""
    from dlis_market.chain.dlis_token import fmt_units
    from dlis_market.chain.job_market import JobMarket

    def send(client: ChainClient, op: LocalAccount, _: int) -> Sent:
        market = JobMarket(client)
        amount = market.claimable_of(op.address)
        return (
            market.claim(op),
            {"claimed": U256(amount)},
            lambda d: console.print(f"claimed {fmt_units(d['claimed'])} DLIS, tx {d['tx']}"),
        )

    _operator_tx(ctx, account, password_file, as_json, send)


@app.command()
def earnings(
    ctx: typer.Context,
    who: Annotated[str, typer.Argument(help="Operator address or keystore account name.")],
    as_json: JsonOpt = False,
) -> None:
    """What JobMarket paid an operator: credited per settlement batch, claimed, still claimable."""
    from dlis_market.chain.dlis_token import fmt_units
    from dlis_market.chain.job_market import JobMarket

    def read(client: ChainClient, operator: str) -> Shown:
        market = JobMarket(client)
        start = market.client.deployment.contracts["JobMarket"].block
        ev = market.contract.events
        credited = ev.PaymentCredited.get_logs(from_block=start, argument_filters={"payee": operator})
        claimed = ev.Claimed.get_logs(from_block=start, argument_filters={"account": operator})
        data = {
            "operator": operator,
            "credited": U256(sum(int(e["args"]["amount"]) for e in credited)),
            "claimed": U256(sum(int(e["args"]["amount"]) for e in claimed)),
            "claimable": U256(market.claimable_of(operator)),
            "credits": [
                {
                    "node": e["args"]["node"],
                    "batch_id": "0x" + bytes(e["args"]["batchId"]).hex(),
                    "amount": U256(e["args"]["amount"]),
                    "block": int(e["blockNumber"]),
                    "tx": "0x" + bytes(e["transactionHash"]).hex(),
                }
                for e in credited
            ],
        }

        def human(d: dict[str, Any]) -> None:
            console.print(
                f"operator {d['operator']}: earned {fmt_units(d['credited'])} DLIS, claimed {fmt_units(d['claimed'])}, "
                f"claimable {fmt_units(d['claimable'])} (`dlis node claim`)"
            )
            for c in d["credits"]:
                console.print(f"  block {c['block']}  node {c['node']}  +{fmt_units(c['amount'])} DLIS  tx {c['tx']}")

        return data, human

    show_address(ctx, who, as_json, read)
