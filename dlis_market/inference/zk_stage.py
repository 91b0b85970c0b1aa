"""Zero-knowledge proofs of a stage call with EZKL (halo2, KZG on BN254): the worker's side.

The stage's sub-module (the final RMSNorm + LM head, or a decoder layer on fixed positions) is
exported to ONNX, quantized to fixed point (scale 2^7 by default), compiled to a halo2 circuit
and set up once per (module weights, input shape, circuit config): keys are cached under
``cache_dir/<circuit key>/`` so a worker pays setup once per stage. Proving one call then costs a
witness and a proof. The oracle verifies with :mod:`dlis_market.oracle.zk_verify`, which also
defines how a proof binds to the stage's receipt (input ``hashed``, output ``public``: see there).

Costs (2 shared cores, ``bench/zk_stage.py``, bench/results/zk_stage.json): a hidden 8 x vocab 16
head is 2^11 rows, ~1 s to set up, ~1.2 s to prove; each 4x in parameters doubles the rows (hidden
64 x vocab 256: 2^15 rows, 7-26 s to prove under load, 360 MB proving key); verifying is 15-100 ms.
The SRS made here with ``ezkl.gen_srs`` is for tests and benches only: in the market the oracle
(or a ceremony) makes the SRS and the keys and hands the worker the proving key (``srs_dir``),
since whoever knows the SRS's secret can forge proofs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import ezkl
import torch
from tqdm import tqdm

from dlis_market.inference.errors import ZkProveError, ZkSetupError


@dataclass(frozen=True)
class ZkCircuitConfig:
    """How the stage is quantized and laid out. Every field is part of the circuit key.

    Scale 7 (1/128 steps) and range checks in 4 legs of base 256 keep the circuit at the fewest
    rows measured: a 2^8 range table instead of EZKL's default 2^14 one brings a hidden-16 head
    from 2^15 to 2^13 rows (prove 2.8 s instead of 12 s); finer scales cost rows for precision."""

    scale: int = 7
    decomp_base: int = 256
    decomp_legs: int = 4
    input_visibility: str = "hashed"
    output_visibility: str = "public"
    max_logrows: int = 20
    lookup_safety_margin: int = 2


class FinalHead(torch.nn.Module):
    """The last stage's tail: final RMSNorm then the LM head, hidden states -> logits."""

    def __init__(self, norm: torch.nn.Module, lm_head: torch.nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head

    @classmethod
    def of(cls, model: Any) -> FinalHead:
        """The head of a Hugging Face causal LM (Llama family: ``model.norm`` + ``lm_head``)."""
        return cls(model.model.norm, model.lm_head).eval()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lm_head(self.norm(hidden))
        return out


class DecoderLayerCall(torch.nn.Module):
    """One decoder layer on ``tokens`` fresh positions (a prefill without cache): rotary tables and
    the causal mask are constants of the circuit, so the call's only input is the hidden states.
    Needs the model built with ``attn_implementation="eager"`` (plain ops ONNX can express).

    The mask's "minus infinity" is -30 (exp(-30) ~ 1e-13, zero at any EZKL scale): EZKL tabulates
    exp over the whole range its inputs reach, and HF's usual -1e4 needed a 2^18-row circuit for
    hidden 16 (SRS 139 s, > 4 GB in setup) where -30 needs 2^16."""

    MASKED = -30.0

    def __init__(self, model: Any, layer: int, tokens: int) -> None:
        super().__init__()
        self.layer = model.model.layers[layer]
        hidden = int(model.config.hidden_size)
        cos, sin = model.model.rotary_emb(torch.zeros(1, tokens, hidden), torch.arange(tokens)[None])
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)
        self.register_buffer("mask", torch.triu(torch.full((tokens, tokens), self.MASKED), 1)[None, None])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.layer(hidden, attention_mask=self.mask, position_embeddings=(self.cos, self.sin))
        return out[0] if isinstance(out, tuple) else out


def export_onnx(module: torch.nn.Module, sample: torch.Tensor, path: Path) -> None:
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # the TorchScript exporter (dynamo=False): the dynamo one needs onnxscript, which is not installed
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                module.eval(),
                (sample,),
                str(path),
                input_names=["input"],
                output_names=["output"],
                opset_version=18,  # the newest opset EZKL's ONNX runtime (tract) is tested against
                dynamo=False,
            )
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ZkSetupError(f"exporting the stage to ONNX failed ({exc}); the module must trace with plain ops") from exc


def _data_file(path: Path, x: torch.Tensor) -> None:
    path.write_text(json.dumps({"input_data": [x.detach().to(torch.float32).reshape(-1).tolist()]}))


@dataclass(frozen=True)
class ZkStageCircuit:
    """A set-up stage circuit: everything in ``dir``, named by ``key``."""

    key: str
    dir: Path
    srs_path: Path

    @property
    def settings_path(self) -> Path:
        return self.dir / "settings.json"

    @property
    def compiled_path(self) -> Path:
        return self.dir / "model.ezkl"

    @property
    def vk_path(self) -> Path:
        return self.dir / "vk.key"

    @property
    def pk_path(self) -> Path:
        return self.dir / "pk.key"

    @property
    def settings(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.settings_path.read_text())
        return loaded

    @property
    def input_shape(self) -> list[int]:
        return [int(d) for d in json.loads((self.dir / "stage.json").read_text())["input_shape"]]

    @property
    def logrows(self) -> int:
        return int(self.settings["run_args"]["logrows"])


def _step(bar: tqdm, name: str, fn: Callable[[], object]) -> None:
    bar.set_postfix_str(name)
    try:
        ok = fn()
    except (RuntimeError, OSError, ValueError) as exc:  # EZKL reports every failure as one of these
        raise ZkSetupError(f"EZKL step {name!r} failed: {exc}") from exc
    if ok is False:
        raise ZkSetupError(f"EZKL step {name!r} returned false; see its log above")
    bar.update(1)


def _srs(folder: Path, logrows: int, generate: bool) -> Path:
    """``folder/kzg<logrows>.srs``; made here with a fresh random secret when ``generate`` (tests,
    benches), otherwise it must be there (an SRS handed over by the oracle or a ceremony)."""
    path = folder / f"kzg{logrows}.srs"
    if path.exists():
        return path
    if not generate:
        raise ZkSetupError(
            f"no SRS for 2^{logrows} rows at {path}: put the one the verifier trusts there (from the oracle or a "
            "ceremony), or pass srs_dir=None to make one locally for a test"
        )
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    ezkl.gen_srs(str(tmp), logrows)
    os.replace(tmp, path)
    return path


# The public calibration input of a head circuit: a verifier must set up exactly the prover's
# circuit from the public weights, so the sample is fixed (not the call's activations). Normal
# rows of this spread, plus one row at +-HEAD_SAMPLE_PEAK, bound the range real hidden states of
# the small models proofs are offered for stay in (RMSNorm rescales them anyway).
HEAD_SAMPLE_STD = 4.0
HEAD_SAMPLE_PEAK = 24.0


def head_sample(rows: int, hidden: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(rows, hidden, generator=gen) * HEAD_SAMPLE_STD
    sample[0, ::2], sample[0, 1::2] = HEAD_SAMPLE_PEAK, -HEAD_SAMPLE_PEAK
    return sample


def head_unsupported(manifest: Any, max_params: int) -> str | None:
    """Why jobs of this model cannot ask for a proof of the head (None: they can)."""
    cfg = manifest.config
    params = int(cfg.get("hidden_size", 0)) * int(cfg.get("vocab_size", 0))
    if manifest.model_type != "llama":
        return f"stage proofs cover the Llama head (RMSNorm + lm_head); {manifest.model_name} is {manifest.model_type}"
    if manifest.dtype != "fp32":
        return f"stage proofs are of fp32 heads; {manifest.model_name} is sharded in {manifest.dtype}"
    if params > max_params:
        return (
            f"{manifest.model_name}'s head has {params} weights, over zk.max_head_params = {max_params}: proving it "
            "would take far too long (a 32 x 96 head takes ~16 s)"
        )
    return None


def head_circuit(
    model: Any, rows: int, cache_dir: Path, srs_dir: Path | None, progress: bool = False
) -> ZkStageCircuit:
    """The circuit of ``model``'s final norm + LM head over ``rows`` rows, set up (or read from
    ``cache_dir``) exactly as every prover and verifier of these weights sets it up."""
    head = FinalHead.of(model)
    sample = head_sample(rows, int(model.config.hidden_size))
    return prepare_circuit(head, sample, cache_dir, progress=progress, srs_dir=srs_dir)


def _canonical(settings_path: Path) -> None:
    """Settings every party derives alike: EZKL writes its range checks in set order (which varies
    from run to run, and the circuit's layout and keys with it) and a timestamp. A verifier that
    sets the circuit up itself must get the prover's verification key bit for bit."""
    settings = json.loads(settings_path.read_text())
    for field in ("required_range_checks", "required_lookups"):
        if isinstance(settings.get(field), list):
            settings[field] = sorted(settings[field], key=json.dumps)
    settings["timestamp"] = 0
    settings_path.write_text(json.dumps(settings))


def prepare_circuit(
    module: torch.nn.Module,
    sample: torch.Tensor,
    cache_dir: Path,
    config: ZkCircuitConfig = ZkCircuitConfig(),
    progress: bool = True,
    srs_dir: Path | None = None,
) -> ZkStageCircuit:
    """Export, calibrate (on ``sample``: activations like the ones to prove), compile and set up
    ``module`` once; later calls with the same weights, input shape and config reuse the cache.
    Inputs far outside the sample's range may not fit the calibrated circuit (proving then fails).
    ``srs_dir``: where the trusted ``kzg<logrows>.srs`` files are; None makes them locally under
    ``cache_dir/srs`` (tests and benches only: see the module doc)."""
    cache_dir = Path(cache_dir)
    srs_folder, generate = (Path(srs_dir), False) if srs_dir is not None else (cache_dir / "srs", True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="zk-setup-", dir=cache_dir))
    try:
        onnx_path = work / "model.onnx"
        export_onnx(module, sample, onnx_path)
        what = {"config": asdict(config), "input_shape": list(sample.shape), "ezkl": version("ezkl")}
        ident = json.dumps({**what, "settings": "canonical"})  # see _canonical
        key = hashlib.sha256(onnx_path.read_bytes() + ident.encode()).hexdigest()[:24]
        final = cache_dir / key
        if (final / "pk.key").exists():
            cached = ZkStageCircuit(key, final, final / "unset.srs")
            # never a fresh SRS for existing keys: they only prove against the SRS they were made with
            return ZkStageCircuit(key, final, _srs(srs_folder, cached.logrows, generate=False))
        args: Any = ezkl.PyRunArgs()  # its stub declares no attributes
        args.input_visibility = config.input_visibility
        args.output_visibility = config.output_visibility
        args.param_visibility = "fixed"
        args.decomp_base = config.decomp_base
        args.decomp_legs = config.decomp_legs
        circuit = ZkStageCircuit(key, work, work / "unset.srs")
        (work / "stage.json").write_text(ident)
        data = work / "calibration.json"
        _data_file(data, sample)
        with tqdm(total=5, desc=f"zk setup {key[:8]}", disable=not progress, unit="step") as bar:
            _step(
                bar, "settings", lambda: ezkl.gen_settings(str(onnx_path), str(circuit.settings_path), py_run_args=args)
            )
            _step(
                bar,
                "calibrate",
                lambda: ezkl.calibrate_settings(
                    str(data),
                    str(onnx_path),
                    str(circuit.settings_path),
                    "resources",
                    lookup_safety_margin=config.lookup_safety_margin,
                    scales=[config.scale],
                    scale_rebase_multiplier=[1],
                    max_logrows=config.max_logrows,
                ),
            )
            _canonical(circuit.settings_path)
            _step(
                bar,
                "compile",
                lambda: ezkl.compile_circuit(str(onnx_path), str(circuit.compiled_path), str(circuit.settings_path)),
            )
            srs: list[Path] = []
            _step(bar, f"srs 2^{circuit.logrows}", lambda: srs.append(_srs(srs_folder, circuit.logrows, generate)))
            _step(
                bar,
                "setup",
                lambda: ezkl.setup(
                    str(circuit.compiled_path), str(circuit.vk_path), str(circuit.pk_path), str(srs[0]), None, False
                ),
            )
        try:
            os.replace(work, final)
        except OSError:  # another process set the same circuit up first: theirs is as good
            shutil.rmtree(work, ignore_errors=True)
        return ZkStageCircuit(key, final, srs[0])
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


@dataclass(frozen=True)
class StageProof:
    """What the worker sends: ``proof`` is EZKL's proof JSON (proof bytes and public instances)."""

    proof: bytes
    witness_s: float
    prove_s: float


def prove_stage(circuit: ZkStageCircuit, x: torch.Tensor, progress: bool = True) -> StageProof:
    """Prove ``circuit``'s module on input ``x`` (the shape it was set up with)."""
    if list(x.shape) != circuit.input_shape:
        raise ZkProveError(
            f"stage circuit {circuit.key} was set up for inputs of shape {circuit.input_shape}, got {list(x.shape)}: "
            "prove calls of the set-up shape (pad, or set up a circuit per shape)"
        )
    with tempfile.TemporaryDirectory(prefix="zk-prove-") as tmp:
        data, witness, proof = Path(tmp) / "input.json", Path(tmp) / "witness.json", Path(tmp) / "proof.json"
        _data_file(data, x)
        with tqdm(total=2, desc=f"zk prove {circuit.key[:8]}", disable=not progress, unit="step") as bar:
            began = time.perf_counter()
            try:
                bar.set_postfix_str("witness")
                ezkl.gen_witness(str(data), str(circuit.compiled_path), str(witness), None, None)
                bar.update(1)
                witness_s = time.perf_counter() - began
                bar.set_postfix_str(f"prove 2^{circuit.logrows} rows")
                began = time.perf_counter()
                ezkl.prove(
                    str(witness), str(circuit.compiled_path), str(circuit.pk_path), str(proof), str(circuit.srs_path)
                )
                bar.update(1)
            except (RuntimeError, OSError, ValueError) as exc:  # EZKL's errors for bad inputs and unsatisfied circuits
                raise ZkProveError(
                    f"proving stage circuit {circuit.key} on an input of shape {list(x.shape)} failed ({exc}); the "
                    "input must have the set-up shape and lie in the range the circuit was calibrated on: "
                    "re-run prepare_circuit with a representative sample"
                ) from exc
        return StageProof(proof.read_bytes(), witness_s, time.perf_counter() - began)
