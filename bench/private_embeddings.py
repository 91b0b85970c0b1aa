"""Benchmark: SmolLM2-135M's first projection (layer 0 q/k/v) on private inputs vs in the clear.

The client embeds the prompt and applies layer 0's input RMSNorm itself; the q/k/v projection
(576 -> 576 + 192 + 192) then runs three ways, in this process and this run:

- plaintext: ``x @ W.T`` in fp32 (the baseline: what a first stage does today, seeing ``x``);
- two-party additive sharing over Z/2^64 (:mod:`dlis_market.inference.secret_sharing`): two
  workers each multiply one share, the client adds; time includes encoding, sharing, both
  workers' int64 matmuls and reconstruction; bytes are the shares sent and returned;
- CKKS via TenSEAL (N = 8192, scale 2^40): the client encrypts ``x`` per token, one worker
  multiplies the ciphertext by the plaintext weights. Measured on k_proj (576 -> 192) for one
  token and scaled by 960 / 192 for q/k/v (the vector-matrix product's cost grows with the
  output width), which the JSON says.

Prints the time per token and its ratio to plaintext, the bytes per token and the max error
against fp32, and writes JSON.

    .venv/bin/python bench/private_embeddings.py --out bench/results/private_embeddings.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from machine_info import write_result  # type: ignore[import-not-found]  (bench/ is on sys.path)
from transformers import AutoModelForCausalLM, AutoTokenizer

from dlis_market.inference.importer import import_model
from dlis_market.inference.secret_sharing import FixedPoint, SharedLinear, private_linear
from dlis_market.settings import Settings

PROMPT = "Patient record: the blood test on 12 March showed elevated glucose and the doctor advised"


def _time(fn: Any, repeat: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def ckks_k_proj(x_row: torch.Tensor, w_k: torch.Tensor) -> dict[str, Any]:
    import tenseal as ts

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40, 60])
    ctx.global_scale = 2**40
    ctx.generate_galois_keys()
    t0 = time.perf_counter()
    enc = ts.ckks_vector(ctx, x_row.tolist())
    t1 = time.perf_counter()
    out = enc.mm(w_k.t().tolist())
    t2 = time.perf_counter()
    got = torch.tensor(out.decrypt())
    t3 = time.perf_counter()
    return {
        "encrypt_s": t1 - t0,
        "matmul_s": t2 - t1,
        "decrypt_s": t3 - t2,
        "bytes_in": len(enc.serialize()),
        "bytes_out": len(out.serialize()),
        "max_abs_err": float((got - x_row @ w_k.t()).abs().max()),
        "out_width": int(w_k.shape[0]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--no-ckks", action="store_true", help="skip the CKKS measurement (~10-60 s)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/private_embeddings.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = Settings.load()
    model_dir = args.model_dir or import_model("smollm2-135m", settings.models_dir, settings.home / "cache")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor(tok(PROMPT)["input_ids"])
    layer = model.model.layers[0]
    with torch.no_grad():
        x = layer.input_layernorm(model.model.embed_tokens(ids))  # what the client computes locally
    attn = layer.self_attn
    w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach()
    codec = FixedPoint()
    left, right = SharedLinear(w, codec), SharedLinear(w, codec)
    result: dict[str, Any] = {
        "bench": "private_embeddings", "model": "smollm2-135m", "projection": list(w.shape), "threads": args.threads,
    }  # fmt: skip
    with torch.no_grad():
        want = x @ w.t()
    for phase, rows in (("decode (1 token)", x[-1:]), (f"prefill ({len(ids)} tokens)", x)):
        plain_s = _time(lambda r=rows: r @ w.t(), args.repeat)
        shared_s = _time(lambda r=rows: private_linear(r, left, right), args.repeat)
        got = private_linear(rows, left, right)
        n = rows.shape[0]
        entry = {
            "tokens": n,
            "plaintext_ms_per_token": 1000 * plain_s / n,
            "shared_ms_per_token": 1000 * shared_s / n,
            "shared_vs_plaintext_time": shared_s / plain_s,
            # two shares of x out (one per worker), two shares of x @ W.T back, 8 bytes an element
            "shared_bytes_per_token": 2 * 8 * (w.shape[1] + w.shape[0]),
            "plaintext_bytes_per_token": 2 * w.shape[1],  # bf16 activations, as today
            "shared_max_abs_err": float((got - want[-n:]).abs().max()),
            "output_max_abs": float(want[-n:].abs().max()),
        }
        result[phase] = entry
        print(f"{phase}: plaintext {entry['plaintext_ms_per_token']:.3f} ms/token, shared "
              f"{entry['shared_ms_per_token']:.3f} ms/token ({entry['shared_vs_plaintext_time']:.1f}x), "
              f"{entry['shared_bytes_per_token']} B/token vs {entry['plaintext_bytes_per_token']}, "
              f"max error {entry['shared_max_abs_err']:.2e} (outputs up to {entry['output_max_abs']:.1f})")  # fmt: skip
    if not args.no_ckks:
        ck = ckks_k_proj(x[-1], attn.k_proj.weight.detach())
        scale = w.shape[0] / ck["out_width"]
        ck["qkv_s_per_token_scaled"] = ck["encrypt_s"] + ck["matmul_s"] * scale + ck["decrypt_s"] * scale
        ck["scaled_note"] = f"measured on k_proj ({ck['out_width']} outputs), matmul and decrypt scaled x{scale:.1f}"
        ck["qkv_vs_plaintext_time"] = ck["qkv_s_per_token_scaled"] * 1000 / result["decode (1 token)"][
            "plaintext_ms_per_token"]  # fmt: skip
        result["ckks"] = ck
        print(f"CKKS: k_proj one token {ck['matmul_s']:.1f} s, q/k/v ~{ck['qkv_s_per_token_scaled']:.0f} s/token "
              f"({ck['qkv_vs_plaintext_time']:.0f}x plaintext), {ck['bytes_in']} B in, {ck['bytes_out']} B out "
              f"(k_proj), max error {ck['max_abs_err']:.1e}")  # fmt: skip
    write_result(result, args.out)


if __name__ == "__main__":
    main()
