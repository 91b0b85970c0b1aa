"""Where a stage runs: ``--device auto|cpu|cuda`` on stages, the local pipeline and the CLIs.

No GPU here: CPU runs must not change at all, ``cuda`` without CUDA is refused before anything
loads, and the device plumbing (weights, KV cache, activations) is followed on torch's ``meta``
device, which every tensor op accepts without computing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from typer.testing import CliRunner

from dlis_market.cli import model as model_cli
from dlis_market.cli import worker as worker_cli
from dlis_market.errors import ConfigError
from dlis_market.inference.device import DeviceUnavailableError, resolve_device
from dlis_market.inference.messages import StageInput
from dlis_market.inference.pipeline import LocalPipeline
from dlis_market.inference.shard_export import export_shards
from dlis_market.inference.stage import Stage
from dlis_market.settings import Settings

runner = CliRunner()
META = torch.device("meta")


@pytest.fixture(scope="module")
def shards(tiny_model_dir: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("device") / "shards"
    export_shards(tiny_model_dir("llama"), out, stages=3)
    return out


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine as torch sees it without a CUDA device (also where one is present)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _loaded(stage: Stage) -> list[torch.Tensor]:
    """The stage's own parameters and buffers (the pieces of the model it does not hold stay meta)."""
    return [t for t in [*stage.model.parameters(), *stage.model.buffers()] if not t.is_meta]


def test_cpu_is_the_default_and_bit_identical(shards: Path) -> None:
    assert Settings().node.device == "cpu"
    prompts = [[3, 14, 15, 92, 65], [9, 8, 7, 6, 5]]
    default = LocalPipeline.load(shards).generate_ids(prompts, 5, want_logits=True)
    cpu = LocalPipeline.load(shards, device="cpu").generate_ids(prompts, 5, want_logits=True)
    for a, b in zip(default, cpu, strict=True):
        assert a.token_ids == b.token_ids
        assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits, strict=True))
    first = Stage.load(shards, index=0, device="cpu")
    assert first.device == torch.device("cpu") and {t.device.type for t in _loaded(first)} == {"cpu"}


def test_auto_takes_cuda_only_where_torch_sees_it(shards: Path) -> None:
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want
    pipe = LocalPipeline.load(shards, device="auto")
    assert {s.device.type for s in pipe.stages} == {want}
    assert len(pipe.generate_ids([[1, 2, 3]], 3)[0].token_ids) == 3


def test_cuda_without_cuda_is_refused_before_loading(no_cuda: None, tmp_path: Path) -> None:
    # No shard folder at all: a refusal about the folder would mean it was read first.
    with pytest.raises(DeviceUnavailableError, match="--device cpu"):
        Stage.load(tmp_path / "nowhere", index=0, device="cuda")
    with pytest.raises(DeviceUnavailableError, match="--device cpu"):
        LocalPipeline.load(tmp_path / "nowhere", device="cuda")
    with pytest.raises(DeviceUnavailableError, match="auto, cpu, cuda"):
        resolve_device("tpu")
    assert resolve_device("auto") == torch.device("cpu")


def test_cli_device_options(no_cuda: None, shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DLIS_HOME", str(tmp_path / "home"))
    args = ["generate", str(shards), "--prompt", "x", "--max-tokens", "2", "--greedy", "--json"]
    refused = runner.invoke(model_cli.app, [*args, "--device", "cuda"])
    assert refused.exit_code == 1 and "--device cpu" in refused.output
    # The worker refuses before it unlocks a key, starts the DHT or reads the (absent) shards.
    refused = runner.invoke(
        worker_cli.app,
        ["start", "--shards", str(tmp_path / "nowhere"), "--layers", "0:1", "--device", "cuda"],
    )
    assert refused.exit_code == 1 and "--device cpu" in refused.output
    monkeypatch.setenv("DLIS_NODE__DEVICE", "cuda")  # the setting, not the flag: refused the same way
    refused = runner.invoke(worker_cli.app, ["start", "--shards", str(tmp_path / "nowhere"), "--layers", "0:1"])
    assert refused.exit_code == 1 and "--device cpu" in refused.output
    monkeypatch.setenv("DLIS_NODE__DEVICE", "tpu")
    with pytest.raises(ConfigError, match=r"DLIS_NODE__DEVICE.*'auto', 'cpu' or 'cuda'"):
        Settings.load()


def test_weights_cache_and_activations_live_on_the_stage_device(shards: Path) -> None:
    """A middle and a first stage on ``meta``: every loaded tensor, every cache slot and every
    activation is there, for inputs that arrive on the CPU (from the wire)."""
    assert len(_loaded(Stage.load(shards, index=1))) > 0  # real tensors on the CPU...
    middle = Stage.load(shards, index=1, device=META)
    assert middle.device == META and _loaded(middle) == []  # ...all on the device here
    middle.open_session("a", 16)
    hidden = torch.zeros(1, 4, middle.config.hidden_size)
    out = middle.forward(StageInput(("a",), (0,), 0, hidden=hidden), keep_on_device=True)
    assert out.hidden is not None and out.hidden.is_meta and out.hidden.shape == (1, 4, middle.config.hidden_size)
    out = middle.forward(StageInput(("a",), (4,), 1, hidden=hidden[:, :1]), keep_on_device=True)
    assert out.hidden is not None and out.hidden.is_meta
    cache = middle.sessions.get("a").cache
    assert all(layer.keys.is_meta and layer.values.is_meta for layer in cache.layers)
    assert middle.sessions.get("a").length == 5

    first = Stage.load(shards, index=0, device=META)
    for sid in ("a", "b"):
        first.open_session(sid, 16)
    out = first.forward(StageInput(("a", "b"), (0, 0), 0, token_ids=torch.tensor([[1, 2, 3], [4, 5, 6]])), True)
    assert out.hidden is not None and out.hidden.is_meta and out.hidden.shape[:2] == (2, 3)
    first.sessions.unbatch()  # the pass's rows, kept for its next pass together, back in each session
    assert all(first.sessions.get(s).cache.layers[0].keys.is_meta for s in ("a", "b"))


def test_tied_head_stays_one_tensor_on_the_device(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    out = tmp_path / "whole"  # the tiny Llama ties its head to the embeddings
    export_shards(tiny_model_dir("llama"), out, stages=1)
    stage = Stage.load(out, index=0, device=META)
    assert stage.model.get_output_embeddings().weight is stage.model.get_input_embeddings().weight
    assert stage.model.get_input_embeddings().weight.is_meta


@pytest.mark.parametrize("dtype", ["int8", "nf4"])
def test_quantized_weights_load_onto_the_device(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path, dtype: str
) -> None:
    out = tmp_path / dtype
    export_shards(tiny_model_dir("llama"), out, stages=3, dtype=dtype)  # type: ignore[arg-type]
    stage = Stage.load(out, index=1, device=META)
    quantized = [m for m in stage.model.modules() if isinstance(m, bnb.nn.Linear8bitLt | bnb.nn.Linear4bit)]
    assert quantized
    for module in quantized:
        weight = module.weight
        assert weight.is_meta
        if dtype == "int8":
            assert weight.SCB is not None and weight.SCB.is_meta  # type: ignore[union-attr]
        else:
            assert weight.quant_state.absmax.is_meta  # type: ignore[union-attr]
