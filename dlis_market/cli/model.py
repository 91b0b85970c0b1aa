"""`dlis model ...`: import, list, plan, shard, generate (inference) and publish/fetch (storage)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, cast

import typer
from rich.console import Console
from rich.table import Table

from dlis_market.cli import model_adapter
from dlis_market.cli.context import working
from dlis_market.errors import DlisError
from dlis_market.settings import Settings

app = typer.Typer(help="Import, partition, run, publish and fetch models.", no_args_is_help=True)
app.add_typer(model_adapter.app, name="adapter")
console = Console()
err_console = Console(stderr=True)


def _settings(ctx: typer.Context) -> Settings:
    state = ctx.find_root().obj
    settings = getattr(state, "settings", None)
    return settings if isinstance(settings, Settings) else Settings.load()


def _fail(exc: DlisError) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {exc}")
    return typer.Exit(code=1)


@app.command("import")
def import_cmd(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="Known model name (see `dlis model list`), HF folder or .gguf file.")],
    name: Annotated[str | None, typer.Option(help="Local name (default: the source's name).")] = None,
) -> None:
    """Make a local Hugging Face model folder under <home>/models."""
    settings = _settings(ctx)
    try:
        with working("importing torch and transformers") as step:
            from dlis_market.inference.importer import import_model

            step(f"importing {source}")
            path = import_model(source, settings.models_dir, settings.home / "cache", name=name)
    except DlisError as exc:
        raise _fail(exc) from exc
    console.print(f"imported [bold]{source}[/bold] -> {path}")


@app.command("list")
def list_cmd(
    ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False
) -> None:
    """Show local models and known models that can be imported (no torch import: fast)."""
    from dlis_market.inference.importer import list_models

    settings = _settings(ctx)
    rows = list_models(settings.models_dir)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("name", "status", "model type", "path / description")
    for row in rows:
        table.add_row(row["name"], row["status"], row["model_type"], row["path"])
    console.print(table)


@app.command("plan")
def plan_cmd(
    model_dir: Annotated[Path, typer.Argument(help="HF model folder.")],
    devices: Annotated[Path, typer.Option(help="JSON list of {name, memory_bytes, flops, bandwidth}.")],
    dtype: Annotated[str, typer.Option(help="fp32, bf16, int8 or nf4.")] = "fp32",
    kv_tokens: Annotated[int, typer.Option(help="KV cache tokens each stage must hold.")] = 2048,
    out: Annotated[Path | None, typer.Option(help="Write the plan as JSON (usable with `shard --plan`).")] = None,
) -> None:
    """Split the model's layers over devices: fit memory, balance stage times."""
    from transformers import AutoConfig

    from dlis_market.inference.planner import DeviceProfile, model_profile, plan_partition

    try:
        profiles = [DeviceProfile.model_validate(d) for d in json.loads(devices.read_text())]
        plan = plan_partition(model_profile(AutoConfig.from_pretrained(model_dir), dtype), profiles, kv_tokens)
    except DlisError as exc:
        raise _fail(exc) from exc
    table = Table("device", "layers", "ms/token", "memory MiB")
    for name, r, t, m in zip(
        plan.devices, plan.ranges, plan.stage_seconds_per_token, plan.stage_memory_bytes, strict=True
    ):
        table.add_row(name, str(r), f"{t * 1e3:.3f}", f"{m / 2**20:.1f}")
    console.print(table)
    if out is not None:
        out.write_text(plan.model_dump_json(indent=2) + "\n")


def _ranges_from_plan(path: Path) -> list[Any]:
    from dlis_market.types import LayerRange

    data = json.loads(path.read_text())
    raw = data["ranges"] if isinstance(data, dict) else data
    return [LayerRange(start=r[0], end=r[1]) if isinstance(r, list) else LayerRange(**r) for r in raw]


@app.command("shard")
def shard_cmd(
    model_dir: Annotated[Path, typer.Argument(help="HF model folder (e.g. <home>/models/smollm2-135m).")],
    out: Annotated[Path, typer.Option(help="Empty folder for the shards and manifest.")],
    stages: Annotated[int | None, typer.Option(help="Split into N near-equal layer ranges.")] = None,
    plan: Annotated[Path | None, typer.Option(help="JSON plan with 'ranges' (from `dlis model plan`).")] = None,
    dtype: Annotated[str, typer.Option(help="fp32, bf16, int8 or nf4.")] = "fp32",
    compress: Annotated[bool, typer.Option(help="zstd-compress each shard.")] = False,
    name: Annotated[str | None, typer.Option(help="Model name in the manifest (default: folder name).")] = None,
) -> None:
    """Write one safetensors shard per layer range, plus manifest.json."""
    if (stages is None) == (plan is None):
        err_console.print("[red]error:[/red] give exactly one of --stages N or --plan FILE")
        raise typer.Exit(code=2)
    try:
        with working("importing torch and transformers") as step:
            from dlis_market.inference.manifest import ShardDtype
            from dlis_market.inference.shard_export import export_shards

            ranges = _ranges_from_plan(plan) if plan is not None else None
            manifest = export_shards(
                model_dir,
                out,
                ranges=ranges,
                stages=stages,
                dtype=cast(ShardDtype, dtype),
                compress=compress,
                name=name,
                progress=step,
            )
    except DlisError as exc:
        raise _fail(exc) from exc
    except (OSError, ValueError, KeyError) as exc:
        err_console.print(f"[red]error:[/red] {exc}; check the model folder and the plan file")
        raise typer.Exit(code=1) from exc
    for s in manifest.stages:
        console.print(f"stage {s.index} {s.layers}: {s.file.path} ({s.file.size / 2**20:.1f} MiB)")
    console.print(f"manifest: {out / 'manifest.json'} (model {manifest.model_name})")


@app.command("generate")
def generate_cmd(
    ctx: typer.Context,
    shard_dir: Annotated[Path, typer.Argument(help="Folder made by `dlis model shard`.")],
    prompt: Annotated[str, typer.Option(help="Prompt text.")],
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Tokens to generate at most.")] = 32,
    greedy: Annotated[bool, typer.Option("--greedy", help="Pick the most likely token each step.")] = False,
    temperature: Annotated[float, typer.Option()] = 0.8,
    top_k: Annotated[int, typer.Option()] = 50,
    top_p: Annotated[float, typer.Option()] = 0.95,
    seed: Annotated[int, typer.Option()] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print token ids and timings as JSON.")] = False,
    device: Annotated[
        str | None, typer.Option(help="auto, cpu or cuda (default: the node.device setting, cpu).")
    ] = None,
    adapter: Annotated[
        Path | None,
        typer.Option(help="A PEFT LoRA adapter folder for this model, applied on the fly (not merged).", exists=True),
    ] = None,
) -> None:
    """Run every stage in this process and print the generated text (with --adapter, as the
    base model plus that LoRA adapter)."""
    settings = _settings(ctx)
    try:
        with working("importing torch and transformers", quiet=as_json) as step:
            import torch
            from transformers import AutoTokenizer

            from dlis_market.inference.pipeline import LocalPipeline
            from dlis_market.inference.sampling import SamplingParams

            if settings.inference.threads:
                torch.set_num_threads(settings.inference.threads)
            step(f"loading the stages of {shard_dir}")
            pipe = LocalPipeline.load(shard_dir, settings.inference, device or settings.node.device)
            adapter_id = None if adapter is None else pipe.attach_adapter(adapter)
            tokenizer = AutoTokenizer.from_pretrained(shard_dir)
            ids = tokenizer(prompt)["input_ids"]
            params = SamplingParams(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
            stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
            step(f"generating up to {max_tokens} tokens ({len(ids)} prompt tokens, {len(pipe.stages)} stages)")
            gen = pipe.generate_ids([ids], max_tokens, params, stop_token_ids=stops, adapters=[adapter_id])[0]
    except DlisError as exc:
        raise _fail(exc) from exc
    text = tokenizer.decode(gen.token_ids, skip_special_tokens=True)
    if not as_json:
        console.print(text, markup=False, highlight=False)
        return
    result = {
        "text": text,
        "prompt_ids": gen.prompt_ids,
        "token_ids": gen.token_ids,
        "ttft_s": gen.ttft_s,
        "total_s": gen.total_s,
        "tokens_per_s": gen.tokens_per_s,
        "stages": [str(s.layers) for s in pipe.stages],
        "dtype": pipe.stages[0].manifest.dtype,
        "device": str(pipe.stages[0].device),
        "adapter": adapter_id,
    }
    typer.echo(json.dumps(result))
