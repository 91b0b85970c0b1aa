"""`dlis model publish` and `dlis model fetch`: shard folders to and from IPFS.

Mounted on the model group by :func:`register`. The chain side is injected (this module does
not import ``dlis_market.chain``): ``on_published`` registers a published model in NodeRegistry;
``expected_manifest`` answers what the chain registered for a manifest CID; ``providers`` answers
provider multiaddrs known to the chain. Without them, publish only prints the CID and fetch
checks against ``--expect-sha256`` when given.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from dlis_market.cli.context import transfer_progress
from dlis_market.errors import DlisError
from dlis_market.settings import Settings
from dlis_market.types import Cid, LayerRange

if TYPE_CHECKING:  # the storage stack (aiohttp, the Kubo binding) loads when publish or fetch runs
    from dlis_market.storage.fetch import ExpectedManifest
    from dlis_market.storage.publish import ModelRegistration

PublishHook = Callable[[Settings, "ModelRegistration"], Awaitable[None] | None]
ExpectedLookup = Callable[[Settings, Cid], "ExpectedManifest | None"]
ProviderLookup = Callable[[Settings, Cid], list[str]]

err = Console(stderr=True, soft_wrap=True)


def _settings(ctx: typer.Context, kubo_url: str | None) -> Settings:
    settings = getattr(ctx.find_root().obj, "settings", None)
    if not isinstance(settings, Settings):
        settings = Settings.load()
    if kubo_url:
        storage = settings.storage.model_copy(update={"kubo_api_url": kubo_url})
        settings = settings.model_copy(update={"storage": storage})
    return settings


def register(
    app: typer.Typer,
    *,
    on_published: PublishHook | None = None,
    expected_manifest: ExpectedLookup | None = None,
    providers: ProviderLookup | None = None,
) -> None:
    """Add ``publish`` and ``fetch`` to the ``dlis model`` typer app."""

    @app.command()
    def publish(
        ctx: typer.Context,
        shard_dir: Annotated[Path, typer.Argument(help="Shard folder with manifest.json.")],
        as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
        kubo_url: Annotated[str | None, typer.Option(help="Kubo RPC URL (env DLIS_STORAGE__KUBO_API_URL).")] = None,
        part_size_mb: Annotated[
            int | None, typer.Option(help="Part size in MiB (default: storage.part_size_mb, 32).")
        ] = None,
        register_model: Annotated[
            bool, typer.Option("--register/--no-register", help="Register on chain when possible.")
        ] = True,
    ) -> None:
        """Add and pin every shard and the manifest; print the manifest CID."""
        from dlis_market.storage.publish import publish_model
        from dlis_market.storage.session import kubo_session

        settings = _settings(ctx, kubo_url)
        part_size = (part_size_mb or settings.storage.part_size_mb) << 20
        hook = on_published if register_model else None

        async def run() -> dict[str, object]:
            with transfer_progress() as bar:
                task = bar.add_task("publish", total=None)
                async with kubo_session(settings) as kubo:
                    result = await publish_model(
                        kubo,
                        shard_dir,
                        part_size=part_size,
                        progress=lambda done, total: bar.update(task, completed=done, total=total),
                    )
            registered = False
            if hook is not None:
                outcome = hook(settings, result.registration())
                if outcome is not None:
                    await outcome
                registered = True
            return {
                "manifest_cid": result.manifest_cid,
                "manifest_sha256": result.manifest_sha256,
                "manifest_file_cid": result.manifest_file_cid,
                "num_layers": result.num_layers,
                "files": len(result.publication.files),
                "bytes": result.total_bytes,
                "registered": registered,
            }

        try:
            out = asyncio.run(run())
        except DlisError as exc:
            err.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1) from None
        if as_json:
            typer.echo(json.dumps(out))
            return
        typer.echo(out["manifest_cid"])
        err.print(f"manifest sha256 {out['manifest_sha256']}, {out['files']} files, {out['bytes']} bytes pinned")
        if not out["registered"]:
            err.print("not registered on chain (no chain registration configured, or --no-register)")

    @app.command()
    def fetch(
        ctx: typer.Context,
        cid: Annotated[str, typer.Argument(help="Manifest CID printed by `dlis model publish`.")],
        out: Annotated[Path, typer.Option("--out", help="Folder to write the shards into.")],
        provider: Annotated[
            list[str] | None,
            typer.Option(
                "--provider",
                help="IPFS provider (repeatable): its gateway URL http://HOST:PORT (`dlis ipfs id` on the provider "
                "prints it; parts are read from every gateway in parallel, each block checked against its CID) or "
                "its swarm multiaddr .../p2p/ID (bitswap through this node). Never a Kubo RPC URL: refused.",
            ),
        ] = None,
        expect_sha256: Annotated[str | None, typer.Option(help="Refuse unless the manifest has this sha256.")] = None,
        kubo_url: Annotated[str | None, typer.Option(help="Kubo RPC URL (env DLIS_STORAGE__KUBO_API_URL).")] = None,
        timeout: Annotated[float | None, typer.Option(help="Seconds to wait for each part.")] = None,
        no_cache: Annotated[bool, typer.Option("--no-cache", help="Do not use the local cache.")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
        layers: Annotated[
            str | None,
            typer.Option(
                "--layers", help="Only the shards for layers START:END (end excluded), plus config and tokenizer."
            ),
        ] = None,
    ) -> None:
        """Fetch a published model, verify every sha256, write it to --out."""
        from dlis_market.storage.fetch import ExpectedManifest, fetch_model
        from dlis_market.storage.session import kubo_session
        from dlis_market.storage.shard_store import cache_dir

        try:
            layer_range = LayerRange.parse(layers) if layers is not None else None
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--layers") from None
        settings = _settings(ctx, kubo_url)
        addrs = list(provider or []) + list(settings.storage.peers)
        if providers is not None:
            addrs += providers(settings, Cid(cid))
        expected = expected_manifest(settings, Cid(cid)) if expected_manifest is not None else None
        if expect_sha256:
            if expected is not None and expected.sha256 != expect_sha256.lower():
                err.print(f"[red]error:[/red] --expect-sha256 differs from the chain's {expected.sha256}")
                raise typer.Exit(1)
            expected = ExpectedManifest(sha256=expect_sha256.lower(), cid=Cid(cid))

        async def run() -> dict[str, object]:
            with transfer_progress() as bar:
                task = bar.add_task("fetch", total=None)
                async with kubo_session(settings) as kubo:
                    result = await fetch_model(
                        kubo,
                        cid,
                        out,
                        providers=list(dict.fromkeys(addrs)),
                        expected=expected,
                        cache_dir=None if no_cache else cache_dir(settings),
                        part_timeout_s=timeout or settings.storage.fetch_timeout_s,
                        progress=lambda done, total: bar.update(task, completed=done, total=total),
                        layers=layer_range,
                    )
            return {
                "out_dir": str(result.out_dir),
                "layers": [result.layers.start, result.layers.end] if result.layers else None,
                "manifest_path": str(result.manifest_path),
                "manifest_sha256": result.manifest_sha256,
                "files": len(result.files),
                "downloaded_bytes": result.downloaded_bytes,
                "reused_bytes": result.reused_bytes,
                "verified_against_chain": expected is not None,
            }

        try:
            result = asyncio.run(run())
        except DlisError as exc:
            err.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1) from None
        if as_json:
            typer.echo(json.dumps(result))
        else:
            sha = result["manifest_sha256"]
            typer.echo(f"{result['out_dir']}: {result['files']} files verified (manifest sha256 {sha})")
