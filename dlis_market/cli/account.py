"""`dlis account ...`: encrypted keystore accounts (operators, clients, node keys)."""

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
    password_for,
    read_password_file,
    show_address,
    state,
)

if TYPE_CHECKING:
    from dlis_market.chain.accounts import Keystore, KeystoreEntry
    from dlis_market.chain.client import ChainClient

app = typer.Typer(help="Create, import, list and inspect encrypted accounts.", no_args_is_help=True)


def _store_key(
    ctx: typer.Context,
    name: str,
    password_file: Path | None,
    as_json: bool,
    store: Callable[[Keystore, str, int], KeystoreEntry],
    said: str,
) -> None:
    """``new`` and ``import``: the new account's password (asked twice), then ``store`` writes the
    key under it (keystore, password, scrypt N); ``said`` is the report, formatted with its fields."""
    from dlis_market.chain.accounts import Keystore

    st = state(ctx)
    with handle_errors(as_json):
        pw = password_for(name, read_password_file(password_file) or st.settings.chain.keystore_password, confirm=True)
        entry = store(Keystore(st.settings.keystore_dir), pw, st.settings.chain.keystore_scrypt_n)
        emit(
            {"name": entry.name, "address": entry.address, "path": str(entry.path)},
            as_json,
            lambda d: console.print(said.format(**d)),
        )


@app.command()
def new(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Account name, e.g. operator1.")],
    password_file: PasswordFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a new secp256k1 key, encrypted (scrypt) in $DLIS_HOME/keystore/NAME.json."""
    said = "created {name}: {address} ({path})"
    _store_key(ctx, name, password_file, as_json, lambda ks, pw, n: ks.create(name, pw, n), said)


@app.command("import")
def import_(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Account name.")],
    private_key_file: Annotated[
        Path, typer.Option(help="File holding the hex private key.", exists=True, dir_okay=False)
    ],
    password_file: PasswordFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Import an existing private key into an encrypted keystore."""

    def store(ks: Keystore, pw: str, n: int) -> KeystoreEntry:
        return ks.import_key(name, private_key_file.read_text().strip(), pw, n)

    _store_key(ctx, name, password_file, as_json, store, "imported {name}: {address}")


@app.command("list")
def list_(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List keystore accounts."""
    from dlis_market.chain.accounts import Keystore

    st = state(ctx)
    entries = [{"name": e.name, "address": e.address} for e in Keystore(st.settings.keystore_dir).list()]

    def human(rows: list[dict[str, str]]) -> None:
        if not rows:
            console.print(f"no accounts in {st.settings.keystore_dir}; create one with `dlis account new NAME`")
        for r in rows:
            console.print(f"{r['name']:20s} {r['address']}")

    emit(entries, as_json, human)


@app.command()
def balance(
    ctx: typer.Context,
    who: Annotated[str, typer.Argument(help="Account name or address.")],
    as_json: JsonOpt = False,
) -> None:
    """ETH, DLIS, stake, escrow and claimable earnings of an account."""
    from web3 import Web3

    from dlis_market.chain.dlis_token import DLISToken, fmt_units
    from dlis_market.chain.job_market import JobMarket
    from dlis_market.chain.staking_manager import StakingManager

    def read(client: ChainClient, address: str) -> Shown:
        stake = StakingManager(client).info(address)
        market = JobMarket(client)
        data: dict[str, Any] = {
            "address": address,
            "eth_wei": U256(client.w3.eth.get_balance(Web3.to_checksum_address(address))),
            "dlis": U256(DLISToken(client).balance_of(address)),
            "stake_active": U256(stake.active),
            "stake_unbonding": U256(stake.unbonding),
            "escrow": U256(market.escrow_of(address)),  # held for the deployment's broker
            "escrow_broker": market.broker_or_default(None),
            "claimable": U256(market.claimable_of(address)),
        }

        def human(d: dict[str, Any]) -> None:
            console.print(f"{d['address']}")
            console.print(f"  ETH        {Web3.from_wei(d['eth_wei'], 'ether')}")
            for key in ("dlis", "stake_active", "stake_unbonding", "escrow", "claimable"):
                console.print(f"  {key:10s} {fmt_units(d[key])} DLIS")

        return data, human

    show_address(ctx, who, as_json, read)
