"""Benchmark: a zero-knowledge proof (EZKL 23, halo2/KZG) of a stage call vs the plain forward.

For each size of the final RMSNorm + LM head of a tiny random Llama (and, with ``--layer``, one
decoder layer on a few fresh positions) it measures, in a fresh child process per size (so peak
RSS is that size's own): the plain torch forward, circuit setup (export, calibrate, compile, SRS,
keys: once per stage), witness + proof, the oracle's verification (binding checks + halo2),
proof / proving key / verification key sizes and peak RSS. It prints prove/forward and
verify/forward ratios, then fits power laws over the measured heads (rows vs parameters, prove
time / proving key / RSS vs rows) and extrapolates to SmolLM2-135M (hidden 576, intermediate
1536, vocab 49152): a fit over sizes two to four orders of magnitude smaller, not a measurement.
On-chain verification (EZKL's verifier compiled by the project's solcjs) is measured by
``bench/zk_onchain.py``.

    .venv/bin/python bench/zk_stage.py --layer 8x16x2 --out bench/results/zk_stage.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from machine_info import machine_info  # type: ignore[import-not-found]  (bench/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = {"hidden": 576, "intermediate": 1536, "vocab": 49152, "heads": 9, "kv_heads": 3, "layers": 30}


def _model(hidden: int, vocab: int, intermediate: int, seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=vocab,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.5)
    return model


def _forward_s(module: torch.nn.Module, x: torch.Tensor, runs: int = 200) -> float:
    with torch.no_grad():
        for _ in range(10):
            module(x)
        times = []
        for _ in range(runs):
            began = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def _measure(kind: str, hidden: int, vocab: int, intermediate: int, tokens: int, cache: str) -> dict[str, Any]:
    """One size, in a child process: everything the worker and the oracle do for one call."""
    from eth_account import Account

    from dlis_market.chain.job_market import market_domain
    from dlis_market.inference.zk_stage import DecoderLayerCall, FinalHead, prepare_circuit, prove_stage
    from dlis_market.node.receipts import ReceiptLedger, sign
    from dlis_market.oracle.zk_verify import (
        StageVerifyingKey,
        input_commitment,
        proof_instances,
        sign_stage_proof,
        verify_stage_proof,
    )

    # one thread for the plain forward: two on oversubscribed cores stall at every OpenMP barrier
    # (a 259 us layer forward read 12 ms under load); the prover uses every core anyway
    torch.set_num_threads(1)
    model = _model(hidden, vocab, intermediate)
    if kind == "head":
        module: torch.nn.Module = FinalHead.of(model)
        params = hidden * vocab + hidden
    else:
        module = DecoderLayerCall(model, 0, tokens).eval()
        params = sum(p.numel() for p in model.model.layers[0].parameters())
    x = torch.randn(1, tokens, hidden, generator=torch.Generator().manual_seed(3))
    forward_s = _forward_s(module, x)
    began = time.perf_counter()
    circuit = prepare_circuit(module, x, Path(cache), progress=False)
    setup_s = time.perf_counter() - began
    proof = prove_stage(circuit, x, progress=False)
    with torch.no_grad():
        reference = module(x)
    node, domain = Account.from_key(b"\x11" * 32), market_domain(31337, "0x" + "ab" * 20)
    if kind == "head":
        output, dtype, tol = reference.argmax(-1).reshape(-1).numpy().astype("<i8").tobytes(), "int64", 0.25
    else:
        output, dtype, tol = reference.reshape(-1).numpy().astype("<f4").tobytes(), "float32", 0.25
    ledger = ReceiptLedger(job_id=b"\x07" * 32, model_id=b"\x42" * 32, start=0, end=1, price_per_token=1)
    ledger.record(tokens, output)
    signed = sign(ledger, node.key, domain)
    key = StageVerifyingKey(circuit.settings_path, circuit.vk_path, circuit.srs_path)
    claim = sign_stage_proof(node.key, domain, signed.receipt, proof.proof, key.vk_hash)
    began = time.perf_counter()
    verified = verify_stage_proof(
        proof=proof.proof,
        claim_signature=claim,
        signed_receipt=signed,
        node=node.address,
        domain=domain,
        key=key,
        expected_input_commitment=input_commitment(x.numpy(), key.input_scale),
        output=output,
        output_dtype=dtype,  # type: ignore[arg-type]
        tolerance=tol,
    )
    verify_s = time.perf_counter() - began
    settings = circuit.settings
    return {
        "kind": kind,
        "hidden": hidden,
        "vocab": vocab if kind == "head" else None,
        "intermediate": intermediate if kind == "layer" else None,
        "tokens": tokens,
        "params": params,
        "logrows": circuit.logrows,
        "num_rows": settings["num_rows"],
        "forward_s": forward_s,
        "setup_s": setup_s,
        "witness_s": proof.witness_s,
        "prove_s": proof.prove_s,
        "verify_s": verify_s,
        "halo2_verify_s": verified.verify_s,
        "proof_bytes": len(proof.proof),  # the proof JSON that travels (proof + instances, some twice)
        "halo2_proof_bytes": len(bytes.fromhex(json.loads(proof.proof)["hex_proof"][2:])),
        "instances": len(proof_instances(proof.proof)),
        "pk_bytes": circuit.pk_path.stat().st_size,
        "vk_bytes": circuit.vk_path.stat().st_size,
        "srs_bytes": circuit.srs_path.stat().st_size,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "max_abs_err": float(np.abs(verified.outputs - reference.numpy()).max()),
        "proof_dir": str(circuit.dir),
    }


def _child(args: tuple[Any, ...]) -> dict[str, Any]:
    return _measure(*args)


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """y = a * x^b by least squares on logs: (a, b)."""
    b, log_a = np.polyfit(np.log(xs), np.log(ys), 1)
    return float(np.exp(log_a)), float(b)


def extrapolate(heads: list[dict[str, Any]], layer: dict[str, Any] | None) -> dict[str, Any]:
    """SmolLM2-135M from fits over the measured heads (and the one measured layer): estimates.

    Rows: a power law in parameters (the heads' matmuls). Prove time: a power law in rows. Proving
    key and peak RSS: linear in the padded domain 2^logrows (keys are polynomials over it; the
    prover holds the key). A layer's rows are its matmuls (the heads' law, per token) plus its
    element-wise ops (norms, SiLU, softmax), scaled from the measured layer by activations per
    token, (hidden + intermediate)."""
    s = SMOLLM2
    head_dim = s["hidden"] // s["heads"]
    layer_params = (
        2 * s["hidden"] * s["hidden"] + 2 * s["hidden"] * head_dim * s["kv_heads"] + 3 * s["hidden"] * s["intermediate"]
    ) + 2 * s["hidden"]
    head_params = s["hidden"] * s["vocab"] + s["hidden"]
    rows_fit = _fit([h["params"] for h in heads], [h["num_rows"] for h in heads])
    time_fit = _fit([h["num_rows"] for h in heads], [h["prove_s"] for h in heads])
    domain = [2.0 ** h["logrows"] for h in heads]
    linear = {m: np.polyfit(domain, [h[m] for h in heads], 1).tolist() for m in ("pk_bytes", "peak_rss_mb")}

    def rows_of(params: float) -> float:
        return float(rows_fit[0] * params ** rows_fit[1])

    def at(rows: float) -> dict[str, float]:
        logrows = float(np.ceil(np.log2(rows)))
        return {"num_rows": rows, "logrows": logrows, "prove_s": float(time_fit[0] * rows ** time_fit[1])} | {
            m: float(b * 2.0**logrows + a) for m, (b, a) in linear.items()
        }

    out: dict[str, Any] = {
        "note": "fits over the measured sizes, extrapolated 2-4 orders of magnitude: an estimate, not a measurement",
        "fits": {"rows_vs_params": rows_fit, "prove_s_vs_rows": time_fit}
        | {f"{m}_vs_2^logrows": f for m, f in linear.items()},
        "smollm2_head": {"params": head_params} | at(rows_of(head_params)),
    }
    if layer is not None:
        t = layer["tokens"]
        elementwise = max(layer["num_rows"] - t * rows_of(layer["params"]), 0.0)
        ratio = (s["hidden"] + s["intermediate"]) / (layer["hidden"] + layer["intermediate"])
        out["smollm2_layer"] = {"params": layer_params, "tokens": t} | at(
            t * rows_of(layer_params) + elementwise * ratio
        )
        per_token = out["smollm2_layer"]["prove_s"] / t * s["layers"] + out["smollm2_head"]["prove_s"]
        out["smollm2_token_prove_s"] = per_token
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", default="16x64,32x128,64x256", help="hidden x vocab of each head to prove")
    parser.add_argument(
        "--layer", default="", help="hidden x intermediate x tokens of one decoder layer (e.g. 16x32x4)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "zk_stage.json")
    args = parser.parse_args()
    cache = Path(tempfile.mkdtemp(prefix="zk-bench-"))
    jobs = [
        ("head", int(h), int(v), 4 * int(h), 1, str(cache)) for h, v in (s.split("x") for s in args.heads.split(","))
    ]
    if args.layer:
        h, i, t = (int(d) for d in args.layer.split("x"))
        jobs.append(("layer", h, 32, i, t, str(cache)))
    rows: list[dict[str, Any]] = []
    ctx = mp.get_context("spawn")
    for job in jobs:
        load = list(os.getloadavg())
        with ctx.Pool(1) as pool:  # a fresh process per size: its peak RSS is that size's own
            row = pool.apply(_child, (job,))
        row["load_average_before"] = load
        rows.append(row)
        size = f"v={row['vocab']}" if row["vocab"] else f"i={row['intermediate']}"
        print(
            f"{row['kind']:5} h={row['hidden']:3} {size}"
            f" 2^{row['logrows']}: forward {row['forward_s'] * 1e6:7.1f} us | setup {row['setup_s']:6.2f} s |"
            f" prove {row['prove_s']:6.2f} s ({row['prove_s'] / row['forward_s']:9.0f}x forward) |"
            f" verify {row['verify_s'] * 1e3:6.1f} ms ({row['verify_s'] / row['forward_s']:6.0f}x) |"
            f" proof {row['proof_bytes'] / 1e3:5.1f} KB pk {row['pk_bytes'] / 1e6:6.1f} MB |"
            f" RSS {row['peak_rss_mb']:6.0f} MB | err {row['max_abs_err']:.3f} | load {load[0]:.2f}"
        )
    heads = [r for r in rows if r["kind"] == "head"]
    layer = next((r for r in rows if r["kind"] == "layer"), None)
    report: dict[str, Any] = {"machine": machine_info(), "ezkl": "23.0.5", "runs": rows}
    if len(heads) >= 2:
        report["extrapolation"] = extrapolate(heads, layer)
        head, layer_fit = report["extrapolation"]["smollm2_head"], report["extrapolation"].get("smollm2_layer")
        print(
            f"fit (NOT measured): SmolLM2 head 2^{head['logrows']:.0f} rows, prove {head['prove_s']:.0f} s,"
            f" pk {head['pk_bytes'] / 1e9:.1f} GB, RSS {head['peak_rss_mb'] / 1e3:.1f} GB"
        )
        if layer_fit is not None:
            per_token = report["extrapolation"]["smollm2_token_prove_s"]
            print(
                f"fit (NOT measured): SmolLM2 layer ({layer_fit['tokens']} tokens) 2^{layer_fit['logrows']:.0f} rows,"
                f" prove {layer_fit['prove_s']:.0f} s, pk {layer_fit['pk_bytes'] / 1e9:.1f} GB;"
                f" one token through 30 layers + head {per_token:.0f} s"
            )
    shutil.rmtree(cache, ignore_errors=True)  # proving keys: hundreds of MB per size
    report["load_average_after"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
