"""`dlis chain ...`: a local Anvil chain with the market deployed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from dlis_market.cli.context import U256, JsonOpt, console, emit, err_console, handle_errors, resolve_address, state

if TYPE_CHECKING:
    from web3 import Web3

app = typer.Typer(help="Start, inspect and stop the local chain (Anvil on 127.0.0.1).", no_args_is_help=True)

PortOpt = Annotated[int, typer.Option(help="Anvil port on 127.0.0.1.")]


def _shape(abi: list[dict[str, Any]]) -> set[tuple[Any, ...]]:
    """What an ABI exposes (kinds, names, argument and result types), ignoring how it is written."""

    def types(items: list[dict[str, Any]] | None) -> tuple[str, ...]:
        return tuple(str(i.get("type")) + str(types(i.get("components"))) for i in items or [])

    return {(e.get("type"), e.get("name", e.get("type")), types(e.get("inputs")), types(e.get("outputs"))) for e in abi}


def _deployed(settings: Any, w3: Web3) -> bool:
    from web3 import Web3

    from dlis_market.chain.deploy import DEPLOYED_CONTRACTS, load_artifact
    from dlis_market.chain.deployment import read_deployment
    from dlis_market.chain.errors import DeploymentNotFoundError

    try:
        dep = read_deployment(settings.deployments_dir, int(w3.eth.chain_id))
    except DeploymentNotFoundError:
        return False
    if not all(len(w3.eth.get_code(Web3.to_checksum_address(c.address))) > 0 for c in dep.contracts.values()):
        return False
    missing = [name for name in DEPLOYED_CONTRACTS if name not in dep.contracts]
    if missing:  # deployed by an older checkout, before these contracts existed
        err_console.print(f"the deployment here lacks {', '.join(missing)}: deploying again")
        return False
    # A chain kept from an older checkout holds contracts this build no longer speaks to.
    changed = [name for name, c in dep.contracts.items() if _shape(c.abi) != _shape(load_artifact(name)["abi"])]
    if changed:
        err_console.print(f"the compiled {', '.join(changed)} differ from the ones deployed here: deploying again")
        return False
    return True


@app.command()
def up(
    ctx: typer.Context,
    port: PortOpt = 8545,
    redeploy: Annotated[bool, typer.Option(help="Deploy fresh contracts even if a deployment exists.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Start (or reuse) a local Anvil with persisted state and deploy the contracts if needed.

    Anvil keeps running in the background after this command; its state is saved in
    $DLIS_HOME/chain/ and restored by the next `dlis chain up`. Stop it with `dlis chain down`.
    """
    from dlis_market.chain.anvil import port_open, start_detached
    from dlis_market.chain.brownie_cli import run_deploy
    from dlis_market.chain.client import connect_web3

    st = state(ctx)
    with handle_errors(as_json):
        settings = st.settings.model_copy(
            update={"chain": st.settings.chain.model_copy(update={"rpc_url": f"http://127.0.0.1:{port}"})}
        )
        say = err_console.print if as_json else console.print  # --json keeps stdout for the JSON
        started = False
        if not port_open("127.0.0.1", port):
            say(f"starting anvil on 127.0.0.1:{port} (state in {settings.chain_dir})")
            start_detached(settings.chain_dir, port)
            started = True
        w3 = connect_web3(settings.chain.rpc_url)
        deployed = False
        if redeploy or not _deployed(settings, w3):
            say("deploying contracts with `brownie run deploy` ...")
            run_deploy(port, settings, settings.logs_dir / "deploy.log", say)
            deployed = True
        _print_status(settings, as_json, extra={"started_anvil": started, "deployed": deployed})


@app.command()
def status(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Show the chain, block height and the deployed contracts."""
    with handle_errors(as_json):
        _print_status(state(ctx).settings, as_json)


def _print_status(settings: Any, as_json: bool, extra: dict[str, Any] | None = None) -> None:
    from dlis_market.chain.client import connect_web3
    from dlis_market.chain.deployment import read_deployment

    w3 = connect_web3(settings.chain.rpc_url)
    chain_id = int(w3.eth.chain_id)
    dep = read_deployment(settings.deployments_dir, chain_id)
    data: dict[str, Any] = {
        "rpc_url": settings.chain.rpc_url,
        "chain_id": chain_id,
        "block": int(w3.eth.block_number),
        "contracts": {name: {"address": c.address, "block": c.block} for name, c in dep.contracts.items()},
        "broker": dep.broker,
        "oracle": dep.oracle,
        "treasury": dep.treasury,
        **(extra or {}),
    }

    def human(d: dict[str, Any]) -> None:
        console.print(f"chain {d['chain_id']} at {d['rpc_url']}, block {d['block']}")
        for name, c in d["contracts"].items():
            console.print(f"  {name:17s} {c['address']}  (deployed in block {c['block']})")
        console.print(f"  broker {d['broker']}  oracle {d['oracle']}  treasury {d['treasury']}")

    emit(data, as_json, human)


@app.command()
def down(ctx: typer.Context, port: PortOpt = 8545) -> None:
    """Stop the Anvil started by `dlis chain up` (its state is saved for the next start)."""
    from dlis_market.chain.anvil import stop_detached

    st = state(ctx)
    if stop_detached(st.settings.chain_dir, port):
        console.print(f"stopped anvil on port {port}")
    else:
        console.print(f"no anvil started by dlis on port {port}")


@app.command()
def faucet(
    ctx: typer.Context,
    address: Annotated[str, typer.Argument(help="Receiver: an address or a keystore account name.")],
    amount: Annotated[str, typer.Argument(help="DLIS to send, e.g. 2500 or 0.5.")],
    eth: Annotated[str, typer.Option(help="Also send this much ETH for gas.")] = "1",
    as_json: JsonOpt = False,
) -> None:
    """Dev chains only: send DLIS (and ETH for gas) from the deployer account."""
    from web3 import Web3

    from dlis_market.chain.accounts import dev_accounts
    from dlis_market.chain.client import ChainClient
    from dlis_market.chain.dlis_token import DLISToken, to_units
    from dlis_market.chain.errors import DevKeyRefusedError, PreflightError
    from dlis_market.settings import DEV_CHAIN_IDS

    st = state(ctx)
    with handle_errors(as_json):
        if address.startswith("0x") and not Web3.is_address(address):
            raise PreflightError(f"{address!r} is not an Ethereum address (0x + 40 hex digits)")
        receiver = resolve_address(st, address)
        try:
            units, wei = to_units(amount), Web3.to_wei(eth, "ether")
        except ValueError as exc:
            raise PreflightError(str(exc)) from exc
        client = ChainClient(st.settings)
        if client.chain_id not in DEV_CHAIN_IDS:
            raise DevKeyRefusedError(
                f"the faucet spends the public dev deployer key; chain {client.chain_id} is not a dev chain"
            )
        deployer = dev_accounts(st.settings.chain.dev_mnemonic)[0]
        if wei:
            client.transfer_eth(deployer, receiver, int(wei))
        DLISToken(client).transfer(deployer, receiver, units)
        emit(
            {"to": receiver, "dlis": U256(units), "eth_wei": U256(wei)},
            as_json,
            lambda d: console.print(f"sent {amount} DLIS and {eth} ETH to {receiver}"),
        )
