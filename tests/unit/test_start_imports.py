"""What a process imports before it serves, which every start pays (and a broker restart, a
worker restart after a crash, every test that starts one):

- a broker loads no model stack: transformers' modeling code and the stage runtime are ~3 s of
  imports on 2 cores, and a broker needs them only for a private job's first stage or a head
  proof, so they load there (broker start imports: 7.3 s -> 4.7 s);
- neither a broker nor a worker imports bitsandbytes (~1 s) until an int8 / nf4 shard is loaded.

Measured in a fresh interpreter, as `dlis broker start` and `dlis node start` import."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("transformers.modeling_utils", "dlis_market.inference.stage", "bitsandbytes")
BROKER = (
    "dlis_market.cli.broker",
    "dlis_market.broker.app",
    "dlis_market.broker.bootstrap",
    "dlis_market.broker.catalog",
    "dlis_market.broker.p2p_backend",
    "dlis_market.broker.spot_checks",
    "dlis_market.broker.zk_proofs",
    "dlis_market.broker.zk_onchain",
)
WORKER = ("dlis_market.cli.worker", "dlis_market.node.server")


def test_a_broker_starts_without_the_model_stack_and_a_worker_without_bitsandbytes() -> None:
    """One fresh interpreter: the broker's modules first, then the worker's on top."""
    code = "import json, sys\n"
    for modules in (BROKER, WORKER):
        code += "".join(f"import {m}\n" for m in modules)
        code += f"print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    broker, worker = (set(json.loads(line)) for line in out.stdout.strip().splitlines()[-2:])
    assert broker == set()
    # int8 / nf4 shards still load and decode: tests/unit/inference/test_quant_accuracy.py
    assert worker == {"transformers.modeling_utils", "dlis_market.inference.stage"}
