"""`dlis`: the command line of dlis_market.

Each command group lives in its own module (``chain.py``, ``account.py``, ``node.py``...) and
is mounted here. Global options map onto the one :class:`~dlis_market.settings.Settings` object.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dlis_market.cli import (
    account,
    broker,
    chain,
    ipfs,
    job,
    model,
    model_chain,
    model_store,
    node,
    oracle,
    sim,
    worker,
)
from dlis_market.cli.context import CliState

app = typer.Typer(
    name="dlis",
    help=(
        "Decentralized LLM inference marketplace.\n\n"
        "Typical first steps on one laptop:\n\n"
        "  dlis chain up            start a local Anvil chain and deploy the contracts\n\n"
        "  dlis account new op      create an encrypted operator account\n\n"
        "  dlis node stake 1000     stake DLIS as a node operator\n\n"
        "  dlis node register ...   bind a node key to your operator account\n\n"
        "Every option can also be set with a DLIS_* environment variable "
        "(nested with __, e.g. DLIS_CHAIN__RPC_URL)."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main(
    ctx: typer.Context,
    home: Annotated[
        Path | None, typer.Option(help="Data folder for keystores, models, deployments (env DLIS_HOME).")
    ] = None,
    rpc_url: Annotated[str | None, typer.Option(help="Chain JSON-RPC URL (env DLIS_CHAIN__RPC_URL).")] = None,
    log_format: Annotated[
        str | None,
        typer.Option(help="Logs of worker, broker, oracle, IPFS daemon: text or json lines (env DLIS_LOG__FORMAT)."),
    ] = None,
) -> None:
    overrides: dict[str, object] = {"home": home, "chain": {"rpc_url": rpc_url}}
    if log_format is not None:
        overrides["log"] = {"format": log_format}
    ctx.obj = CliState.from_overrides(overrides)


app.add_typer(chain.app, name="chain")
app.add_typer(account.app, name="account")
worker.register(node.app)
app.add_typer(node.app, name="node")
model_store.register(
    model.app, on_published=model_chain.register_published, expected_manifest=model_chain.expected_from_chain
)
app.add_typer(model.app, name="model")
app.add_typer(ipfs.app, name="ipfs")
app.add_typer(job.app, name="job")
app.add_typer(broker.app, name="broker")
app.add_typer(oracle.app, name="oracle")
app.add_typer(sim.app, name="sim")


if __name__ == "__main__":
    app()
