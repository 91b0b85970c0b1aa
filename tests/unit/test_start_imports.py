"""What a process imports before it serves, which every start pays (and a broker restart, a
worker restart after a crash, every test that starts one):

- a broker loads no model stack: transformers' modeling code and the stage runtime are ~3 s of
  imports on 2 cores, and a broker needs them only for a private job's first stage or a head
  proof, so they load there (broker start imports: 7.3 s -> 4.7 s);
- neither a broker nor a worker imports bitsandbytes (~1 s) until an int8 / nf4 shard is loaded;
- the `dlis` command line mounts every command group without the storage, chain or model stacks:
  each command imports what it uses when it runs, so a short command (a faucet, a status, a stake)
  does not pay aiohttp and the Kubo binding on top of its own (`dlis_market.cli.main`: 0.55 s ->
  0.39 s).

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
CLI_HEAVY = ("aiohttp", "web3", "sqlalchemy", "torch", "hivemind", "fastapi", "dlis_market.storage.client")


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


def test_the_command_line_mounts_its_groups_without_the_service_stacks() -> None:
    code = (
        "import json, sys\nimport dlis_market.cli.main\n"
        f"print(json.dumps([m for m in {list(CLI_HEAVY)!r} if m in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
