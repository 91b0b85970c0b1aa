"""Benchmark: checking a last stage's zero-knowledge proof on chain vs in the oracle, side by side.

For each head size (hidden x vocab of a tiny random Llama's final norm + LM head) and answer length
it sets up the circuit, proves one honest call, and then checks the same proof, receipt and claim
two ways on a fresh local market (Anvil started here, contracts deployed as `brownie run deploy`):

- **off chain** (the baseline): ``oracle.zk_verify.verify_stage_proof``, what the broker and the
  oracle run today (signatures, instances, halo2 in this process, the tokens);
- **on chain**: ``StageProofRegistry.recordProof`` (the same bindings, halo2 through EZKL's reusable
  verifier contract): its wall time as an ``eth_call`` and its gas, split into the verifier's own
  ``verifyProof`` and the calldata (proof, instances, the circuit's VKA).

It also reports the one-time costs: rendering and compiling the verifier, deploying it, and
registering each circuit. Ratios printed: on-chain/off-chain time, and recordProof gas over the
gas of settling a 3-stage job alone (``settleJob``, measured by ``bench/gas_report.py``; the figure
is read from its JSON when present). JSON goes to ``--out``.

    .venv/bin/python bench/zk_onchain.py --heads 8x16,16x32 --tokens 1,2,4
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from machine_info import machine_info  # type: ignore[import-not-found]  (bench/ is on sys.path)

from dlis_market.chain.devnet import local_market
from dlis_market.chain.job_market import Receipt, SignedReceipt, sign_receipt
from dlis_market.chain.stage_proofs import (
    CircuitRegistration,
    compile_verifier,
    deploy_verifier,
    evm_calldata,
    render_verifier,
)
from dlis_market.inference.zk_stage import FinalHead, prepare_circuit, prove_stage
from dlis_market.oracle.zk_verify import StageVerifyingKey, input_commitment, verify_stage_proof
from dlis_market.protocol.zk_claims import sign_stage_proof
from dlis_market.types import model_id, name_hash

ROOT = Path(__file__).resolve().parents[1]
CALLDATA_GAS_PER_NONZERO, CALLDATA_GAS_PER_ZERO = 16, 4


def head(hidden: int, vocab: int) -> FinalHead:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(hidden * 1000 + vocab)
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=vocab, max_position_embeddings=64,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.5)
        model.model.norm.weight.uniform_(0.5, 1.5)
    return FinalHead.of(model)


def calldata_gas(data: bytes) -> int:
    zeros = data.count(0)
    return zeros * CALLDATA_GAS_PER_ZERO + (len(data) - zeros) * CALLDATA_GAS_PER_NONZERO


def settle_job_gas() -> int | None:
    path = ROOT / "bench" / "results" / "gas_report.json"
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    value = report.get("gas", {}).get("settle_solo_1_job")
    return int(value) if value else None


def measure(
    market: Any, verifier: str, node: Any, hidden: int, vocab: int, tokens: int, cache: Path, repeats: int
) -> dict:
    h = head(hidden, vocab)
    name = f"zk-bench-{hidden}x{vocab}-{tokens}"  # a 30-layer model per circuit: receipts bill layers [29, 30)
    fn = market.registry().contract.functions.publishModel(name_hash(name), "QmBench", b"\x02" * 32, 30)
    market.client.transact(market.deployer, fn)
    model = bytes.fromhex(model_id(name, market.deployer.address)[2:])
    x = torch.randn(1, tokens, hidden, generator=torch.Generator().manual_seed(tokens))
    began = time.perf_counter()
    circuit = prepare_circuit(h, x, cache, progress=False)
    setup_s = time.perf_counter() - began
    proved = prove_stage(circuit, x, progress=False)
    with torch.no_grad():
        ids = [int(t) for t in h(x).argmax(-1).flatten()]
    key = StageVerifyingKey(circuit.settings_path, circuit.vk_path, circuit.srs_path)
    began = time.perf_counter()
    rendered = render_verifier(circuit.vk_path, circuit.settings_path, circuit.srs_path, cache / f"v-{circuit.key}")
    vka_s = time.perf_counter() - began
    registry = market.stage_proofs()
    tolerance = key.output_tolerance
    reg = registry.register_circuit(
        market.oracle, CircuitRegistration(key.vk_hash, verifier, rendered.vka, model, vocab, tolerance)
    )
    domain = market.market().domain()
    output = np.asarray(ids, dtype="<i8").tobytes()
    receipt = Receipt(b"\x07" * 32, model, 29, 30, tokens, hashlib.sha256(output).digest(), 10**15)
    signed = SignedReceipt(receipt, sign_receipt(node.key, domain, receipt))
    claim = sign_stage_proof(node.key, domain, receipt, proved.proof, key.vk_hash)
    commitment = input_commitment(x.numpy(), key.input_scale)

    off: list[float] = []
    for _ in range(repeats):
        began = time.perf_counter()
        verify_stage_proof(proof=proved.proof, claim_signature=claim, signed_receipt=signed, node=node.address,
                           domain=domain, key=key, expected_input_commitment=commitment, output=output)  # fmt: skip
        off.append(time.perf_counter() - began)

    proof, instances = evm_calldata(proved.proof)
    r = receipt
    fn = registry.contract.functions.recordProof(
        (r.job_id, r.model_id, r.start, r.end, r.tokens, r.output_hash, r.amount), signed.signature.signature,
        key.vk_hash, proof, instances, rendered.vka, claim, ids,
    )  # fmt: skip
    on: list[float] = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn.call({"from": market.broker.address})
        on.append(time.perf_counter() - began)
    tx = registry.record(market.broker, signed, key.vk_hash, proof, instances, rendered.vka, claim, ids)
    assert registry.proof_of(domain, signed, node.address) is not None
    data = bytes.fromhex(fn.build_transaction({"from": market.broker.address, "gas": 30_000_000})["data"][2:])
    vka_bytes = b"".join(rendered.vka)
    verifier_fn = market.client.w3.eth.contract(address=verifier, abi=VERIFY_ABI).functions.verifyProof(
        proof, instances, rendered.vka
    )
    verify_gas = int(verifier_fn.estimate_gas({"from": market.broker.address}))
    return {
        "hidden": hidden, "vocab": vocab, "tokens": tokens, "logrows": circuit.logrows,
        "setup_s": setup_s, "prove_s": proved.prove_s, "proof_json_bytes": len(proved.proof),
        "proof_bytes": len(proof), "instances": len(instances), "vka_words": len(rendered.vka),
        "vka_render_s": vka_s, "register_gas": int(reg["gasUsed"]),
        "offchain_verify_s": statistics.median(off), "onchain_call_s": statistics.median(on),
        "record_gas": int(tx["gasUsed"]), "verify_proof_gas_estimate": verify_gas,
        "record_calldata_bytes": len(data), "record_calldata_gas": calldata_gas(data),
        "vka_calldata_gas": calldata_gas(vka_bytes),
    }  # fmt: skip


VERIFY_ABI = [{
    "type": "function", "name": "verifyProof", "stateMutability": "nonpayable",
    "inputs": [{"name": "proof", "type": "bytes"}, {"name": "instances", "type": "uint256[]"},
               {"name": "vka", "type": "bytes32[]"}],
    "outputs": [{"name": "success", "type": "bool"}],
}]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", default="8x16,16x32", help="hidden x vocab of each head")
    parser.add_argument("--tokens", default="1,2,4", help="answer lengths (rows proven per call)")
    parser.add_argument("--repeats", type=int, default=5, help="timed checks per side")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "zk_onchain.json")
    args = parser.parse_args()
    load = list(os.getloadavg())
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="zk-onchain-") as tmp, local_market(Path(tmp) / "home") as market:
        cache = Path(tmp) / "zk"
        h0 = head(8, 16)
        x0 = torch.randn(1, 1, 8)
        first = prepare_circuit(h0, x0, cache, progress=False)
        began = time.perf_counter()
        rendered = render_verifier(first.vk_path, first.settings_path, first.srs_path, cache / "verifier")
        render_s = time.perf_counter() - began
        began = time.perf_counter()
        compiled = compile_verifier(rendered.sol)
        compile_s = time.perf_counter() - began
        deployed = deploy_verifier(market.client, market.deployer, compiled)
        verifier = deployed["contractAddress"]
        print(
            f"verifier: rendered {render_s:.1f} s, compiled {compile_s:.1f} s, {compiled.runtime_size} bytes of code, "
            f"deployed for {deployed['gasUsed']:,} gas (once for every circuit)"
        )
        settle = settle_job_gas()
        node = market.enroll_node(market.new_funded_account(2000 * 10**18))  # a routable last-stage node
        for spec in args.heads.split(","):
            hidden, vocab = (int(d) for d in spec.split("x"))
            for tokens in (int(t) for t in args.tokens.split(",")):
                row = measure(market, verifier, node, hidden, vocab, tokens, cache, args.repeats)
                row["record_over_settle_job"] = row["record_gas"] / settle if settle else None
                rows.append(row)
                ratio = row["onchain_call_s"] / row["offchain_verify_s"]
                print(
                    f"head {hidden}x{vocab} {tokens} tok 2^{row['logrows']}: prove {row['prove_s']:5.2f} s | "
                    f"off chain {row['offchain_verify_s'] * 1e3:6.1f} ms | "
                    f"on chain {row['onchain_call_s'] * 1e3:6.1f} ms ({ratio:4.2f}x) | "
                    f"recordProof {row['record_gas']:,} gas (verifyProof ~{row['verify_proof_gas_estimate']:,}, "
                    f"VKA calldata {row['vka_calldata_gas']:,}, {row['vka_words']} words) | "
                    f"register {row['register_gas']:,} gas"
                    + (f" | {row['record_over_settle_job']:.1f}x settleJob" if settle else "")
                )
    report = {
        "machine": machine_info(), "load_average_before": load, "ezkl": "23.0.5",
        "verifier": {"render_s": render_s, "compile_s": compile_s, "runtime_bytes": compiled.runtime_size,
                     "deploy_gas": int(deployed["gasUsed"])},
        "settle_job_gas": settle, "runs": rows,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
