"""`dlis model adapter publish|list`: LoRA adapters checked against their base, on IPFS, recorded.

``publish`` checks a PEFT LoRA folder against a base shard set (shapes, target modules, layer
indices), adds and pins its files on IPFS with the same Kubo session as `dlis model publish`,
records it in the local adapter store (``HOME/adapters``) and registers it in NodeRegistry as the
model ``"<base>:<name>"`` (:mod:`dlis_market.protocol.adapters`): jobs then name it like a model.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from dlis_market.cli.context import JsonOpt, console, emit, handle_errors, state
from dlis_market.protocol.adapters import SEPARATOR, adapter_model_name
from dlis_market.settings import Settings

app = typer.Typer(help="LoRA adapters served on the fly over a base model.", no_args_is_help=True)


def adapter_root(settings: Settings) -> Path:
    return settings.home / "adapters"


def check_adapter(adapter_dir: Path, base_dir: Path, name: str | None = None) -> Any:
    """The :class:`AdapterRecord` (no CIDs yet) of an adapter checked against the shard set in ``base_dir``."""
    from dlis_market.inference.adapters import ADAPTER_FILES, load_adapter
    from dlis_market.inference.manifest import MANIFEST_NAME, load_manifest, sha256_file
    from dlis_market.storage.adapter_store import AdapterFile, AdapterRecord

    manifest = load_manifest(base_dir)
    adapter = load_adapter(adapter_dir, manifest)
    spec = adapter.spec
    return AdapterRecord(
        adapter_id=adapter.sha256,
        name=name or adapter_dir.resolve().name,
        base_model=manifest.model_name,
        base_manifest_sha256=sha256_file(base_dir / MANIFEST_NAME),
        base_num_layers=manifest.num_layers,
        r=spec.r,
        lora_alpha=spec.alpha,
        target_modules=spec.target_modules if isinstance(spec.target_modules, str) else list(spec.target_modules),
        layers=adapter.layer_indices,
        files=[
            AdapterFile(path=n, size=(adapter_dir / n).stat().st_size, sha256=sha256_file(adapter_dir / n))
            for n in ADAPTER_FILES
        ],
    )


def _row(record: Any) -> dict[str, Any]:
    return {
        "adapter_id": record.adapter_id,
        "cid": record.cid,
        "name": record.name,
        "base_model": record.base_model,
        "base_manifest_sha256": record.base_manifest_sha256,
        "r": record.r,
        "lora_alpha": record.lora_alpha,
        "target_modules": record.target_modules,
        "layers": record.layers,
        "bytes": record.size,
    }


@app.command("publish")
def publish_cmd(
    ctx: typer.Context,
    adapter_dir: Annotated[Path, typer.Argument(help="PEFT LoRA folder (adapter_config.json + safetensors).")],
    base: Annotated[Path, typer.Option("--base", help="The base model's shard folder (made by `dlis model shard`).")],
    name: Annotated[str | None, typer.Option(help="Adapter name (default: the folder's name).")] = None,
    kubo_url: Annotated[str | None, typer.Option(help="Kubo RPC URL (env DLIS_STORAGE__KUBO_API_URL).")] = None,
    register: Annotated[
        bool,
        typer.Option(
            "--register/--no-register",
            help="Register it in NodeRegistry as model BASE:NAME from chain.publisher_account, so jobs can name it.",
        ),
    ] = True,
    as_json: JsonOpt = False,
) -> None:
    """Check the adapter against its base, add and pin it on IPFS, record it locally and register it on chain."""
    from dlis_market.storage.adapter_store import AdapterStore, publish_adapter
    from dlis_market.storage.session import kubo_session

    settings = state(ctx).settings
    if kubo_url:
        settings = settings.model_copy(
            update={"storage": settings.storage.model_copy(update={"kubo_api_url": kubo_url})}
        )
    with handle_errors(as_json):
        if name is not None and SEPARATOR in name:
            raise typer.BadParameter(f"an adapter name cannot hold {SEPARATOR!r} (jobs name it BASE{SEPARATOR}NAME)")
        record = check_adapter(adapter_dir, base, name)

        async def run() -> Any:
            async with kubo_session(settings) as kubo:
                return await publish_adapter(kubo, adapter_dir, record)

        published = asyncio.run(run())
        path = AdapterStore(adapter_root(settings)).put(published)
        model = adapter_model_name(published.base_model, published.name)
        if register:
            from dlis_market.cli.model_chain import register_published
            from dlis_market.storage.publish import ModelRegistration
            from dlis_market.types import Cid

            reg = ModelRegistration(Cid(str(published.cid)), published.adapter_id, published.base_num_layers, model)
            register_published(settings, reg)
    out = {**_row(published), "record": str(path), "model": model, "registered_on_chain": register}

    def human(d: dict[str, Any]) -> None:
        console.print(f"{d['cid']}\nadapter {d['adapter_id']} ({d['bytes']} bytes) -> {path}")
        if d["registered_on_chain"]:
            console.print(f"registered on chain: jobs name it as model {model!r}")

    emit(out, as_json, human)


@app.command("list")
def list_cmd(
    ctx: typer.Context,
    base: Annotated[str | None, typer.Option("--base", help="Only adapters of this base model name.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Adapters published from this machine (the local adapter store)."""
    from dlis_market.storage.adapter_store import AdapterStore

    settings = state(ctx).settings
    with handle_errors(as_json):
        rows = [_row(r) for r in AdapterStore(adapter_root(settings)).list(base)]

    def human(data: list[dict[str, Any]]) -> None:
        table = Table("adapter id", "name", "base", "r", "targets", "layers", "bytes", "cid")
        for d in data:
            targets = d["target_modules"] if isinstance(d["target_modules"], str) else ",".join(d["target_modules"])
            layers = f"{d['layers'][0]}..{d['layers'][-1]}" if d["layers"] else "-"
            table.add_row(d["adapter_id"][:16], d["name"], d["base_model"], str(d["r"]), targets, layers,
                          str(d["bytes"]), d["cid"] or "-")  # fmt: skip
        console.print(table)

    emit(rows, as_json, human)
