"""Benchmark: k-way head (tensor) parallelism vs a k-stage pipeline vs one process, SmolLM2-135M.

All three in this run, greedy decode of the same prompt in fp32, each group as k processes on
127.0.0.1 talking over gloo (torch.distributed), one torch thread each:

- one process: every layer in one process (the baseline);
- k-way TP (:mod:`dlis_market.inference.tensor_parallel`): every process holds 1/k of every layer
  and the group all-reduces twice per layer per token;
- k-way TP with secure aggregation (``tp_secure``): the same, each member's partial sums masked
  (fixed point mod 2^60 plus pairwise ChaCha20 masks) so no member sees another's;
- k-stage pipeline: process r holds layers [r L/k, (r+1) L/k) whole and sends the hidden state to
  the next (what the market's workers do, here over gloo instead of libp2p).

Prints decode tokens/s and the ratio to one process, the bytes each process sends per token, and
checks that all three produce the same tokens. Writes JSON.

    .venv/bin/python bench/tensor_parallel.py --k 3 --new-tokens 16 --out bench/results/tensor_parallel.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from machine_info import write_result  # type: ignore[import-not-found]  (bench/ is on sys.path)

PROMPT = "The history of the printing press begins"


def _load(model_dir: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _worker(rank: int, mode: str, k: int, port: int, model_dir: str, ids: list[int], new: int, out: Any) -> None:
    import torch.distributed as dist

    from dlis_market.inference.tensor_parallel import GlooGroup, TensorParallelMember

    torch.set_num_threads(1)
    model = _load(model_dir)
    group = GlooGroup(rank, k, port)
    layers = list(model.model.layers)
    n_layers = len(layers)
    member = None
    if mode in ("tp", "tp_secure"):
        member = TensorParallelMember(layers, model.config, k, rank, group, secure_aggregation=mode == "tp_secure")
    else:
        from transformers import DynamicCache

        mine = range(rank * n_layers // k, (rank + 1) * n_layers // k)
        cache = DynamicCache()
        rotary = model.model.rotary_emb
    tokens: list[int] = []
    sent = 0
    nxt = torch.tensor(ids).unsqueeze(0)
    pos = 0
    t_first = t0 = time.perf_counter()
    with torch.no_grad():
        for step in range(new + 1):
            if step == 1:
                t_first = time.perf_counter()
            if member is not None:
                hidden = member.forward(model.model.embed_tokens(nxt))
            else:
                n = nxt.shape[1]
                if rank == 0:
                    hidden = model.model.embed_tokens(nxt)
                else:
                    hidden = torch.empty(1, n, model.config.hidden_size)
                    dist.recv(hidden, src=rank - 1)
                position_ids = torch.arange(pos, pos + n).unsqueeze(0)
                pe = rotary(hidden, position_ids=position_ids)
                for i in mine:
                    hidden = layers[i](hidden, position_embeddings=pe, cache=cache, position_ids=position_ids)
                pos += n
                if rank < k - 1:
                    dist.send(hidden.contiguous(), dst=rank + 1)
                    sent += hidden.numel() * 4
            last = torch.zeros(1, dtype=torch.long)
            if rank == k - 1 or (member is not None and rank == 0):
                last[0] = int(model.lm_head(model.model.norm(hidden[:, -1:])).argmax(-1))
            dist.broadcast(last, src=0 if member is not None else k - 1)
            tokens.append(int(last[0]))
            nxt = last.view(1, 1)
    took = time.perf_counter() - t_first
    if member is not None:
        sent = member.bytes_reduced  # the partial sums this member put into all-reduces
    if rank == 0:
        out.put({"tokens": tokens, "decode_tok_s": new / took, "ttft_s": t_first - t0, "bytes_sent_per_token": 0})
    out.put({"rank": rank, "bytes_sent": sent})
    group.close()


def run(mode: str, k: int, model_dir: str, ids: list[int], new: int) -> dict[str, Any]:
    from dlis_market.chain.anvil import free_port

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, mode, k, port, model_dir, ids, new, q)) for r in range(k)]
    for p in procs:
        p.start()
    got = [q.get(timeout=900) for _ in range(k + 1)]
    for p in procs:
        p.join(timeout=60)
    head = next(g for g in got if "tokens" in g)
    per_rank = [g["bytes_sent"] for g in got if "rank" in g]
    head["bytes_sent_per_token_per_process"] = max(per_rank) / (len(ids) + new)
    return head


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("bench/results/tensor_parallel.json"))
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from dlis_market.inference.importer import import_model
    from dlis_market.settings import Settings

    settings = Settings.load()
    model_dir = str(args.model_dir or import_model("smollm2-135m", settings.models_dir, settings.home / "cache"))
    ids = AutoTokenizer.from_pretrained(model_dir)(PROMPT)["input_ids"]
    result: dict[str, Any] = {"bench": "tensor_parallel", "model": "smollm2-135m", "k": args.k,
                              "new_tokens": args.new_tokens, "prompt_tokens": len(ids)}  # fmt: skip
    one = run("pipeline", 1, model_dir, ids, args.new_tokens)
    for mode, k in (("one_process", 1), ("tp", args.k), ("tp_secure", args.k), ("pipeline", args.k)):
        r = one if mode == "one_process" else run(mode, k, model_dir, ids, args.new_tokens)
        r["vs_one_process"] = r["decode_tok_s"] / one["decode_tok_s"]
        r["same_tokens_as_one_process"] = r["tokens"] == one["tokens"]
        result[mode] = r
        print(f"{mode:12s} k={k}: {r['decode_tok_s']:.2f} tok/s ({r['vs_one_process']:.2f}x one process), "
              f"{r['bytes_sent_per_token_per_process'] / 1024:.1f} KiB sent per token per process, "
              f"same tokens: {r['same_tokens_as_one_process']}")  # fmt: skip
    result["tp_secure_vs_tp"] = result["tp_secure"]["decode_tok_s"] / result["tp"]["decode_tok_s"]
    print(f"secure aggregation costs TP {1 - result['tp_secure_vs_tp']:.0%} of its decode rate")
    write_result(result, args.out)


if __name__ == "__main__":
    main()
