"""`dlis ipfs ...`: the embedded IPFS (Kubo) node.

The storage modules (aiohttp, the daemon's ctypes binding) load when a command here runs, so that
every other `dlis` command starts without them."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from dlis_market.errors import StorageError
from dlis_market.logs import configure_logging
from dlis_market.settings import Settings

if TYPE_CHECKING:
    from dlis_market.storage.client import NodeInfo
    from dlis_market.storage.daemon import DaemonInfo

app = typer.Typer(help="Run and inspect the embedded IPFS node.", no_args_is_help=True)

err = Console(stderr=True, soft_wrap=True)


def cli_settings(ctx: typer.Context) -> Settings:
    """The process settings the root callback built, or fresh ones from the environment."""
    obj = ctx.find_root().obj
    settings = getattr(obj, "settings", None)
    return settings if isinstance(settings, Settings) else Settings.load()


@app.command()
def daemon(
    ctx: typer.Context,
    repo: Annotated[Path | None, typer.Option(help="IPFS repo folder (default: HOME/ipfs).")] = None,
    api_port: Annotated[int | None, typer.Option(help="RPC API port on 127.0.0.1 (0: any).")] = None,
    swarm_port: Annotated[int | None, typer.Option(help="Swarm port on 127.0.0.1 (0: any).")] = None,
    gateway_port: Annotated[
        int | None, typer.Option(help="Read-only trustless gateway port on 127.0.0.1 (0: any).")
    ] = None,
) -> None:
    """Run the embedded IPFS node (private swarm, loopback only) until Ctrl-C or SIGTERM."""
    from dlis_market.storage.daemon import DaemonConfig, run_daemon

    configure_logging(cli_settings(ctx).log)
    config = DaemonConfig.from_settings(cli_settings(ctx))
    config = dataclasses.replace(
        config,
        repo=repo or config.repo,
        api_port=config.api_port if api_port is None else api_port,
        swarm_port=config.swarm_port if swarm_port is None else swarm_port,
        gateway_port=config.gateway_port if gateway_port is None else gateway_port,
    )

    def ready(info: DaemonInfo) -> None:
        err.print(f"IPFS daemon ready (repo {config.repo}, logs {config.logs})")
        err.print(f"  RPC API: {info.api_url}   (admin: stays on this machine, never give it out)")
        err.print(f"  gateway: {info.gateway_url}   (read-only, trustless, NoFetch: give this to fetchers)")
        for addr in info.multiaddrs:
            err.print(f"  swarm:   {addr}")

    try:
        run_daemon(config, ready)
    except StorageError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None


@app.command("id")
def node_id(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show the peer id, swarm multiaddrs and gateway URL of the IPFS node in use: the running
    `dlis ipfs daemon` of this home, or the Kubo at DLIS_STORAGE__KUBO_API_URL (gateway unknown:
    null). With neither, it says so (it starts none). A provider advertises the gateway URL."""
    from dlis_market.storage.daemon import DaemonConfig, running_daemon
    from dlis_market.storage.session import kubo_session

    settings = cli_settings(ctx)

    async def run() -> tuple[NodeInfo, str | None]:
        async with kubo_session(settings, start=False) as kubo:  # the node in use, never a new one
            ident = await kubo.id()
        gateway = None
        if not settings.storage.kubo_api_url:
            info = await asyncio.to_thread(running_daemon, DaemonConfig.from_settings(settings).repo)
            gateway = info.gateway_url if info is not None and info.gateway_url else None
        return ident, gateway

    try:
        out, gateway = asyncio.run(run())
    except StorageError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    if as_json:
        doc = {"id": out.peer_id, "addresses": list(out.addresses), "gateway": gateway, "agent": out.agent_version}
        typer.echo(json.dumps(doc))
    else:
        typer.echo("\n".join([out.peer_id, *out.addresses, *([f"gateway {gateway}"] if gateway else [])]))
