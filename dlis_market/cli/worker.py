"""`dlis node start`: run a worker that serves a layer range of a model on the P2P swarm.

Mounted by the main CLI with :func:`register`; also runnable alone as
``python -m dlis_market.cli.worker start ...`` (what the tests and the benchmark do). Once its
DHT listens it prints one ``DLIS_NODE_JOINED {json}`` line (peer id, multiaddrs, node address: a
bootstrap for other peers), once it serves one ``DLIS_NODE_READY {json}`` line (the same plus
range, attestation hash) on stdout; SIGTERM/SIGINT withdraw its DHT announcement and stop it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

import typer

from dlis_market.cli.context import handle_errors, password_for, state, transfer_progress
from dlis_market.errors import ConfigError
from dlis_market.settings import Settings
from dlis_market.types import ZERO_ADDRESS, LayerRange


def _merge(settings: Settings, section: str, updates: dict[str, Any]) -> Settings:
    clean = {k: v for k, v in updates.items() if v is not None}
    part = getattr(settings, section).model_copy(update=clean)
    return settings.model_copy(update={section: type(part).model_validate(part.model_dump())})


def with_deployment(settings: Settings) -> Settings:
    """Fill the node's contract addresses that no flag or setting gave (still the zero address)
    from this chain's deployment manifest (HOME/deployments/<chain id>.json), like every other
    command reads them; says which it took. Without a manifest they stay as given."""
    from dlis_market.chain.deployment import deployment_path, read_deployment

    path = deployment_path(settings.deployments_dir, settings.node.chain_id)
    if not path.exists():
        return settings
    dep = read_deployment(settings.deployments_dir, settings.node.chain_id)
    fields = {
        "market_address": "JobMarket",
        "registry_address": "NodeRegistry",
        "reputation_address": "ReputationOracle",
    }
    taken = {
        field: dep.address_of(name)
        for field, name in fields.items()
        if getattr(settings.node, field).lower() == ZERO_ADDRESS and name in dep.contracts
    }
    for field, address in taken.items():
        typer.echo(f"{fields[field]} {address} (from {path})", err=True)
    return _merge(settings, "node", taken) if taken else settings


BYZANTINE_WARNING = (
    "WARNING: --byzantine: TEST ONLY: this worker corrupts its outputs and will be slashed. "
    "Never run it with real stake."
)


def _check_telemetry(settings: Settings) -> None:
    from web3 import Web3

    node = settings.node
    if not Web3.is_address(node.reputation_address):
        raise ConfigError(f"--reputation {node.reputation_address!r} is not an address (the ReputationOracle's)")
    if node.oracle_url is not None and not node.oracle_url.startswith(("http://", "https://")):
        raise ConfigError(f"--oracle-url {node.oracle_url!r} must be an http(s) URL, e.g. http://127.0.0.1:8090")
    if not node.telemetry_interval_s > 0:
        raise ConfigError(f"--telemetry-interval-s must be positive, not {node.telemetry_interval_s}")


def start(
    ctx: typer.Context,
    shards: Annotated[Path | None, typer.Option(help="Local shard folder (made by `dlis model shard`).")] = None,
    manifest_cid: Annotated[str | None, typer.Option(help="Fetch the shards by this manifest CID.")] = None,
    manifest_sha256: Annotated[str | None, typer.Option(help="Refuse a manifest without this sha256.")] = None,
    provider: Annotated[
        list[str] | None,
        typer.Option(
            help="IPFS provider (repeatable): gateway URL http://HOST:PORT (`dlis ipfs id` prints it) or swarm "
            "multiaddr .../p2p/ID; never a Kubo RPC URL."
        ),
    ] = None,
    layers: Annotated[str | None, typer.Option(help="Layer range START:END (end excluded).")] = None,
    auto: Annotated[bool, typer.Option("--auto", help="Serve the range the swarm serves least.")] = False,
    initial_peer: Annotated[list[str] | None, typer.Option(help="DHT peer multiaddr (repeatable).")] = None,
    host: Annotated[str | None, typer.Option(help="Listen address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="libp2p TCP port (0: any free one).")] = None,
    price: Annotated[int | None, typer.Option(help="Price per token in token units.")] = None,
    chain_id: Annotated[int | None, typer.Option(help="Chain id of the EIP-712 domains.")] = None,
    market: Annotated[str | None, typer.Option(help="JobMarket address (receipt domain).")] = None,
    registry: Annotated[str | None, typer.Option(help="NodeRegistry address (attestation domain).")] = None,
    publisher: Annotated[
        str | None,
        typer.Option(
            help="Account whose published model this worker serves (model ids are namespaced by publisher). "
            "Default: the one account that published this manifest on chain."
        ),
    ] = None,
    identity_dir: Annotated[Path | None, typer.Option(help="libp2p key + profile folder (default HOME/node).")] = None,
    node_key: Annotated[str, typer.Option(help="Signing key name in HOME/keystore (made on first start).")] = "node",
    password_file: Annotated[Path | None, typer.Option(help="File holding the node key password.")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads for this stage.")] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(help="Serve Prometheus /metrics on this port of --host (0: any free port)."),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(help="auto, cpu or cuda: where the stage's weights, KV cache and activations live (default cpu)."),
    ] = None,
    max_sessions: Annotated[int | None, typer.Option(help="Open sessions at most.")] = None,
    session_idle_s: Annotated[float | None, typer.Option(help="Close sessions idle this long.")] = None,
    announce_ttl_s: Annotated[float | None, typer.Option(help="TTL of the DHT announcement.")] = None,
    reprofile: Annotated[bool, typer.Option("--reprofile", help="Measure the hardware profile again.")] = False,
    oracle_url: Annotated[
        str | None, typer.Option(help="POST signed telemetry to this oracle (e.g. http://127.0.0.1:8090).")
    ] = None,
    reputation: Annotated[
        str | None, typer.Option(help="ReputationOracle address (telemetry domain); unset: no telemetry.")
    ] = None,
    telemetry_interval_s: Annotated[
        float | None, typer.Option(help="Seconds between telemetry reports (match the oracle's heartbeat).")
    ] = None,
    byzantine: Annotated[
        bool, typer.Option("--byzantine", hidden=True, help="TEST ONLY: corrupt every output (gets slashed).")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log at DEBUG level (default: log.level, INFO).")
    ] = False,
) -> None:
    """Serve a layer range of a model: fetch/verify shards, profile, attest, announce, serve."""
    from dlis_market.inference.stage import resolve_device
    from dlis_market.logs import configure_logging
    from dlis_market.node.server import WorkerConfig, serve_forever
    from dlis_market.storage.fetch import ExpectedManifest
    from dlis_market.storage.shard_store import fetch_shards
    from dlis_market.types import Cid

    with handle_errors():
        settings = state(ctx).settings
        configure_logging(settings.log, verbose=verbose)
        resolve_device(device or settings.node.device)  # unknown, or cuda without one: say so before anything
        settings = _merge(
            settings,
            "node",
            {
                "initial_peers": list(initial_peer) if initial_peer else None,
                "host": host,
                "port": port,
                "price_per_token": price,
                "chain_id": chain_id,
                "market_address": market,
                "registry_address": registry,
                "session_idle_s": session_idle_s,
                "announce_ttl_s": announce_ttl_s,
                "oracle_url": oracle_url,
                "reputation_address": reputation,
                "telemetry_interval_s": telemetry_interval_s,
                "byzantine": 1.0 if byzantine else None,
                "device": device,
                "metrics_port": metrics_port,
            },
        )
        settings = _merge(settings, "chain", {"model_publisher": publisher})
        settings = with_deployment(settings)
        _check_telemetry(settings)
        if byzantine:
            typer.echo(BYZANTINE_WARNING, err=True)
        settings = _merge(settings, "inference", {"threads": threads, "max_sessions": max_sessions})
        if (layers is None) == (not auto):
            raise ConfigError("give exactly one of --layers START:END or --auto")
        if (shards is None) == (manifest_cid is None):
            raise ConfigError("give exactly one of --shards DIR or --manifest-cid CID")
        try:
            layer_range = LayerRange.parse(layers) if layers else None
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        folder = identity_dir or settings.home / "node"
        password = password_file.read_text().strip() if password_file else None
        password = password_for("node", password or settings.chain.keystore_password)
        if manifest_cid is not None:  # fetched and verified (index, manifest, every file's sha256)
            expected = ExpectedManifest(manifest_sha256.lower(), Cid(manifest_cid)) if manifest_sha256 else None
            out_dir = settings.models_dir / manifest_cid
            # with --layers only the shards overlapping that range (plus config and tokenizer) are
            # fetched; --auto picks its range from the swarm after loading, so it needs them all
            with transfer_progress() as bar:
                task = bar.add_task(f"fetching {manifest_cid[:16]}...", total=None)
                asyncio.run(
                    fetch_shards(
                        settings,
                        manifest_cid,
                        out_dir,
                        providers=provider or (),
                        expected=expected,
                        layers=layer_range,
                        progress=lambda done, total: bar.update(task, completed=done, total=total),
                    )
                )
            shards = out_dir
        assert shards is not None  # one of the two was given, checked above
        config = WorkerConfig(
            shards, folder, password, settings, layer_range, reprofile, node_key, settings.node.device
        )
        asyncio.run(serve_forever(config))


def register(app: typer.Typer) -> None:
    """Add ``start`` to ``app`` (the main CLI mounts it as ``dlis node start``)."""
    app.command("start")(start)


app = typer.Typer(help="Run a worker node.", no_args_is_help=True, pretty_exceptions_enable=False)
register(app)


@app.callback()
def _main() -> None:
    """Worker node commands."""


if __name__ == "__main__":
    app()
