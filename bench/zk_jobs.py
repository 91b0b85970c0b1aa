"""Benchmark: what a proven job (``proof: zk``) costs its last stage and its broker, vs the plain head.

For a random Llama head of ``--head`` (hidden x vocabulary, the weights' spread of the test models)
and each token count of ``--tokens``, it runs exactly what a zk job runs: the worker's
:func:`~dlis_market.inference.zk_stage.head_circuit` (setup once per token count, then read from
the cache) and :func:`~dlis_market.inference.zk_stage.prove_stage` over the rows the tokens were
sampled from, and the broker's halo2 verification against the circuit it sets up itself. The
baseline is the plain torch forward of the same head over the same rows; ratios are printed.

    .venv/bin/python bench/zk_jobs.py --head 16x32 --tokens 3,8
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from eth_account import Account
from machine_info import write_result  # type: ignore[import-not-found]  (bench/ is on sys.path)
from transformers import LlamaConfig, LlamaForCausalLM

from dlis_market.chain.job_market import market_domain
from dlis_market.inference.zk_stage import FinalHead, head_circuit, prove_stage
from dlis_market.node.receipts import ReceiptLedger, sign
from dlis_market.oracle.zk_verify import StageVerifyingKey, input_commitment, verify_stage_proof
from dlis_market.protocol.zk_claims import sign_stage_proof

NODE_KEY = b"\x11" * 32
DOMAIN = market_domain(31337, "0x" + "ab" * 20)

ROOT = Path(__file__).resolve().parents[1]


def head_model(hidden: int, vocab: int) -> Any:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab)  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # the spread of tests/integration/node's tiny models
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.3)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--head", default="16x32", help="hidden x vocabulary")
    ap.add_argument("--tokens", default="3,8", help="token counts (rows proven per job)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "zk_jobs.json")
    args = ap.parse_args()
    hidden, vocab = (int(d) for d in args.head.split("x"))
    model = head_model(hidden, vocab)
    head = FinalHead.of(model)
    rows_out = []
    with tempfile.TemporaryDirectory(prefix="zk-jobs-") as tmp:
        for n in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(n, hidden, generator=torch.Generator().manual_seed(n)) * 3
            with torch.no_grad():
                t = time.perf_counter()
                for _ in range(100):
                    head(x)
                forward_s = (time.perf_counter() - t) / 100
            t = time.perf_counter()
            circuit = head_circuit(model, n, Path(tmp), None)
            setup_s = time.perf_counter() - t
            proof = prove_stage(circuit, x, progress=False)
            key = StageVerifyingKey(circuit.settings_path, circuit.vk_path, circuit.srs_path)
            # what the broker checks: an honest stage's receipt over the tokens its head picked
            with torch.no_grad():
                tokens = head(x).argmax(-1).to(torch.int64)
            ledger = ReceiptLedger(b"\x01" * 32, b"\x02" * 32, 1, 2, 10**12)
            ledger.record(n, tokens.numpy().astype("<i8").tobytes())
            signed = sign(ledger, NODE_KEY, DOMAIN)
            claim = sign_stage_proof(NODE_KEY, DOMAIN, signed.receipt, proof.proof, key.vk_hash)
            node = Account.from_key(NODE_KEY).address
            t = time.perf_counter()
            verify_stage_proof(
                proof=proof.proof, claim_signature=claim, signed_receipt=signed, node=node, domain=DOMAIN, key=key,
                expected_input_commitment=input_commitment(x.numpy(), key.input_scale),
                output=tokens.numpy().astype("<i8").tobytes(),
            )  # fmt: skip
            verify_s = time.perf_counter() - t
            row = {
                "tokens": n, "logrows": circuit.logrows, "forward_s": forward_s, "setup_s": setup_s,
                "witness_s": proof.witness_s, "prove_s": proof.prove_s, "verify_s": verify_s,
                "proof_bytes": len(proof.proof), "proving_key_bytes": circuit.pk_path.stat().st_size,
                "prove_over_forward": (proof.witness_s + proof.prove_s) / forward_s,
                "verify_over_forward": verify_s / forward_s,
            }  # fmt: skip
            rows_out.append(row)
            print(f"{n} tokens 2^{circuit.logrows}: forward {forward_s * 1e6:.0f} us | setup {setup_s:.2f} s | "
                  f"prove {proof.witness_s + proof.prove_s:.2f} s ({row['prove_over_forward']:.0f}x) | "
                  f"verify {verify_s * 1e3:.1f} ms ({row['verify_over_forward']:.0f}x) | proof {len(proof.proof)} B | "
                  f"proving key {row['proving_key_bytes'] >> 20} MiB", flush=True)  # fmt: skip
    write_result({"head": {"hidden": hidden, "vocab": vocab}, "rows": rows_out}, args.out)


if __name__ == "__main__":
    main()
