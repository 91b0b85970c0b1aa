"""`dlis oracle ...`: run the reputation oracle, and print/check telemetry inclusion proofs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from dlis_market.cli.context import CliState, console, emit, handle_errors, read_password_file, state, unlock

app = typer.Typer(help="Run the reputation oracle and check its proofs.", no_args_is_help=True)

StateDirOpt = Annotated[
    Path | None, typer.Option(help="Where the oracle keeps its database oracle.db (env DLIS_ORACLE__STATE_DIR).")
]


def _with_oracle(st: CliState, **overrides: Any) -> Any:
    """The settings with the given oracle fields replaced (flags that were not given are None)."""
    from dlis_market.settings import Settings

    data = st.settings.model_dump()
    data["oracle"].update({k: v for k, v in overrides.items() if v is not None})
    return Settings.model_validate(data)


@app.command()
def start(
    ctx: typer.Context,
    account: Annotated[
        str | None,
        typer.Option("--account", "-a", help="Oracle account (ORACLE_ROLE + SLASHER_ROLE): keystore name or dev:N."),
    ] = None,
    password_file: Annotated[
        Path | None, typer.Option(help="Read the account password from this file.", exists=True, dir_okay=False)
    ] = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port (default 8090).")] = None,
    epoch_s: Annotated[float | None, typer.Option(help="Epoch length in seconds.")] = None,
    state_dir: StateDirOpt = None,
    initial_peer: Annotated[
        list[str] | None,
        typer.Option(help="DHT peer multiaddr (repeatable): also take the telemetry workers relay on the DHT."),
    ] = None,
) -> None:
    """Serve telemetry intake and spot-check evidence over HTTP; post reputation every epoch."""
    import asyncio
    import signal

    import uvicorn

    from dlis_market.chain.client import ChainClient
    from dlis_market.logs import configure_logging
    from dlis_market.oracle.server import create_app
    from dlis_market.oracle.service import OracleService

    st = state(ctx)
    configure_logging(st.settings.log)
    with handle_errors():
        settings = _with_oracle(
            st,
            account=account,
            host=host,
            port=port,
            epoch_s=epoch_s,
            state_dir=state_dir,
            dht_initial_peers=list(initial_peer) if initial_peer else None,
        )
        oracle_account = unlock(st, settings.oracle.account, read_password_file(password_file))
        service = OracleService(settings, ChainClient(settings), oracle_account)
        service.check_roles()
        peers = settings.oracle.dht_initial_peers
        console.print(
            f"oracle {oracle_account.address} on http://{settings.oracle.host}:{settings.oracle.port} "
            f"(epoch {settings.oracle.epoch_s:.0f} s, state {service.state_dir}"
            + (f", telemetry also from the DHT via {len(peers)} peers)" if peers else ")")
        )

        async def serve() -> None:
            server = uvicorn.Server(
                uvicorn.Config(
                    create_app(service), host=settings.oracle.host, port=settings.oracle.port, log_config=None
                )
            )
            stop = asyncio.Event()
            tasks = [asyncio.create_task(service.run(stop))]
            relay = None
            if peers:
                from dlis_market.lifetime import start_reaper
                from dlis_market.oracle.dht_relay import DhtTelemetryRelay  # hivemind: seconds to import

                start_reaper()  # the relay's DHT process and p2pd die with the oracle, even on SIGKILL
                relay = DhtTelemetryRelay(service, peers)
            try:
                if relay is not None:
                    await relay.start()  # fails early (before serving) when the peers are unreachable
                    tasks.append(asyncio.create_task(relay.run(stop)))
                for sig in (signal.SIGINT, signal.SIGTERM):
                    # uvicorn handles these while serving, then re-raises them with the handlers it
                    # found: a no-op here lets the cleanup below run (the relay's DHT stops), exit 0
                    signal.signal(sig, lambda *_: None)
                await server.serve()
            finally:
                stop.set()
                await asyncio.gather(*tasks)
                if relay is not None:
                    await relay.close()

        asyncio.run(serve())


@app.command()
def proof(
    ctx: typer.Context,
    node: Annotated[str, typer.Argument(help="Node address.")],
    epoch: Annotated[int, typer.Argument(help="Epoch number as posted on ReputationOracle.")],
    state_dir: StateDirOpt = None,
    offline: Annotated[bool, typer.Option(help="Do not check against the chain.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Print the Merkle inclusion proof of NODE's telemetry leaf in EPOCH and check it on chain."""
    from dlis_market.oracle.errors import ProofNotFoundError
    from dlis_market.oracle.store import OracleStore

    st = state(ctx)
    with handle_errors(as_json):
        settings = _with_oracle(st, state_dir=state_dir)
        store = OracleStore.open(settings)
        try:
            p = store.proof(node, epoch)
        finally:
            store.close()
        data: dict[str, Any] = {**p.model_dump(), "verifies_offline": p.verifies_offline()}
        if not offline:
            from dlis_market.chain.client import ChainClient
            from dlis_market.chain.reputation_oracle import ReputationOracle

            rep = ReputationOracle(ChainClient(settings))
            chain_root = "0x" + rep.telemetry_root(epoch).hex()
            data["chain_root"] = chain_root
            data["verifies_on_chain"] = rep.verify(epoch, bytes.fromhex(p.leaf_hash[2:]), p.proof_bytes())
            data["chain_score_bps"] = rep.at(p.node, epoch)
        emit(data, as_json, _print_proof)
        ok = data["verifies_offline"] and data.get("verifies_on_chain", True)
        if not ok:
            raise ProofNotFoundError(
                f"the stored proof of {p.node} for epoch {epoch} does not verify"
                + ("" if offline else f" against the posted root {data['chain_root']}")
                + "; the stored epoch does not match what was posted"
            )


def _print_proof(d: dict[str, Any]) -> None:
    leaf = d["leaf"]
    console.print(f"node {d['node']} epoch {d['epoch']}: score {leaf['score_bps']} bps from {leaf['reports']} reports")
    console.print(f"leaf  {d['leaf_hash']}  (telemetry digest {leaf['telemetry_digest']})")
    for i, sibling in enumerate(d["proof"]):
        console.print(f"proof[{i}] {sibling}")
    console.print(f"root  {d['root']}")
    if "verifies_on_chain" in d:
        mark = "[green]verifies[/green]" if d["verifies_on_chain"] else "[red]does NOT verify[/red]"
        console.print(
            f"on chain: root {d['chain_root']}, score {d['chain_score_bps']} bps; "
            f"ReputationOracle.verifyTelemetry {mark}"
        )
