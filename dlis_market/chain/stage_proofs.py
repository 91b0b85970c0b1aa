"""Stage proofs on chain: EZKL's halo2 verifier built with the project's compiler, and the binding of
contracts/StageProofRegistry.sol.

The registry records a node's proof of a last-stage call once the chain itself has checked it (the
signatures, the halo2 proof through EZKL's verifier, the billed tokens against the proven logits;
see the contract's NatSpec). EZKL's *reusable* verifier is one contract for every circuit: a
circuit is a verification key artifact (VKA, 7-11 KB of words for a small head) registered with
it. A verifier with the key built in, EZKL's other choice, passed EIP-170's 24 KiB code limit at
a 2-token head (31.9 KB), while the reusable one is 10.9 KB for any circuit.

1. :func:`render_verifier` has EZKL write the verifier and a key's VKA. EZKL then compiles the
   verifier for an ABI and, when it finds no solc 0.8.20 where svm (the Solidity version manager)
   keeps compilers, downloads one from binaries.soliditylang.org. So it runs in a child process
   whose home holds an svm slot for 0.8.20 that is the project's solcjs (0.8.30, the compiler of
   every contract here, through ``scripts/toolchain/solc-shim.js``): EZKL's compile succeeds
   offline and nothing is fetched. The slot is checked before EZKL starts.
2. :func:`compile_verifier` compiles that source with the same solcjs through py-solc-x (what
   brownie uses), optimizer on, 1 run (the code stays well under the 24 KiB limit).
3. :func:`deploy_verifier` deploys it once; :meth:`StageProofRegistry.register_circuit` registers
   each circuit under its key's hash with its VKA (CIRCUIT_ADMIN_ROLE, the oracle's).

EZKL calls its reusable verifier experimental; the registry checks each VKA against the digest
registered for the key, so a VKA swapped in calldata is refused before the verifier runs.

Costs measured by ``bench/zk_onchain.py`` are in the README's "Verification and privacy" table.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from eth_abi import decode as abi_decode
from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.types import TxParams, TxReceipt

from dlis_market.chain.client import ChainClient
from dlis_market.chain.errors import DeploymentNotFoundError
from dlis_market.chain.market_messages import SignedReceipt
from dlis_market.chain.typed_data import Domain, typed_digest
from dlis_market.errors import ChainError

REPO_ROOT = Path(__file__).resolve().parents[2]
# The version EZKL 23 asks svm for (``SHANGHAI_SOLC`` in its eth.rs) and the Solidity it renders
# (``pragma solidity ^0.8.0``): any 0.8 compiler builds it.
EZKL_SVM_VERSION = "0.8.20"
VERIFIER_CONTRACT = "Halo2VerifierReusable"
EIP170_MAX_CODE = 24_576


class VerifierBuildError(ChainError):
    """EZKL could not render, or solcjs could not compile, a stage circuit's verifier."""


def solcjs_version() -> str:
    """The npm solc the project pins (package.json; ``make setup`` installs it)."""
    pkg = REPO_ROOT / "node_modules" / "solc" / "package.json"
    if not pkg.exists():
        raise VerifierBuildError(f"{pkg} is missing: run `make setup` (npm ci) to install the Solidity compiler")
    return str(json.loads(pkg.read_text())["version"])


def _svm_home(folder: Path) -> Path:
    """A home whose svm slot for EZKL's solc version is the project's solcjs (see the module doc)."""
    node = shutil.which("node")
    if node is None:
        raise VerifierBuildError("node is not on PATH; the Solidity compiler (npm solc) runs on it: run `make setup`")
    shim = REPO_ROOT / "scripts" / "toolchain" / "solc-shim.js"
    home = folder / "home"
    # svm keeps compilers under ~/.svm when that folder exists, else under the XDG data folder
    for root in (home / ".svm", home / ".local" / "share" / "svm"):
        slot = root / EZKL_SVM_VERSION / f"solc-{EZKL_SVM_VERSION}"
        slot.parent.mkdir(parents=True, exist_ok=True)
        slot.write_text(f'#!/bin/sh\nexec "{node}" "{shim}" "$@"\n')
        slot.chmod(0o755)
    probe = subprocess.run(
        [str(home / ".svm" / EZKL_SVM_VERSION / f"solc-{EZKL_SVM_VERSION}"), "--version"],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    if probe.returncode != 0 or "Version:" not in probe.stdout:
        raise VerifierBuildError(
            f"the solcjs shim did not answer --version ({probe.stderr.strip() or probe.stdout.strip()}); run "
            "`make setup` so node_modules/solc exists. EZKL is not started without it: it would download a solc"
        )
    return home


_RENDER = """
import asyncio, os, sys, ezkl
vk, settings, sol, abi, vka, srs = sys.argv[1:7]
async def main():
    made = await ezkl.create_evm_verifier(vk, settings, sol, abi, srs, True)
    return made and await ezkl.create_evm_vka(vk, settings, vka, srs, 18)
ok = asyncio.run(main())
sys.stdout.flush(); sys.stderr.flush()
# skip the interpreter's teardown: EZKL's async runtime threads crashed it (SIGSEGV) in ~1 of 5 runs
os._exit(0 if ok else 1)
"""


@dataclass(frozen=True)
class RenderedVerifier:
    """EZKL's reusable verifier source (the same for every circuit) and one key's VKA words."""

    sol: Path
    vka: list[bytes]


def read_vka(path: Path) -> list[bytes]:
    """EZKL's VKA file: a little-endian u64 word count, then that many 32-byte words."""
    raw = path.read_bytes()
    count = int.from_bytes(raw[:8], "little") if len(raw) >= 8 else -1
    if count <= 0 or len(raw) != 8 + 32 * count:
        raise VerifierBuildError(f"{path} is not an EZKL VKA file ({len(raw)} bytes, header count {count})")
    return [raw[8 + 32 * i : 8 + 32 * (i + 1)] for i in range(count)]


def render_verifier(vk_path: Path, settings_path: Path, srs_path: Path, out_dir: Path) -> RenderedVerifier:
    """EZKL's reusable Solidity verifier (``out_dir/Verifier.sol``) and the key's VKA."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sol, vka = out_dir / "Verifier.sol", out_dir / "vka.bin"
    with tempfile.TemporaryDirectory(prefix="dlis-ezkl-svm-") as tmp:
        home = _svm_home(Path(tmp))
        env = {k: v for k, v in os.environ.items() if k not in ("XDG_DATA_HOME", "SVM_HOME")}
        env.update(HOME=str(home), XDG_DATA_HOME=str(home / ".local" / "share"))
        args = [str(vk_path), str(settings_path), str(sol), str(out_dir / "Verifier.abi.json"), str(vka), str(srs_path)]
        done = subprocess.run(
            [sys.executable, "-c", _RENDER, *args], env=env, capture_output=True, text=True, check=False, timeout=600
        )
    if done.returncode != 0 or not sol.exists() or not vka.exists():
        raise VerifierBuildError(
            f"EZKL could not render the verifier for {vk_path} (exit {done.returncode}): "
            f"{(done.stderr or done.stdout).strip()[-500:]}"
        )
    return RenderedVerifier(sol, read_vka(vka))


@dataclass(frozen=True)
class CompiledVerifier:
    abi: list[dict[str, Any]]
    bytecode: bytes
    runtime_size: int  # bytes of deployed code; EIP-170 caps it at 24,576


def compile_verifier(sol: Path) -> CompiledVerifier:
    """Compile EZKL's verifier with the project's solcjs (py-solc-x over the shim brownie uses)."""
    import solcx  # brownie's compiler driver; imported here, only verifier builds need it

    version = solcjs_version()
    source = {"language": "Solidity", "sources": {sol.name: {"content": sol.read_text()}}, "settings": {
        "optimizer": {"enabled": True, "runs": 1},
        "outputSelection": {"*": {"*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"]}},
    }}  # fmt: skip
    try:
        out = solcx.compile_standard(source, solc_version=version)
    except (solcx.exceptions.SolcError, solcx.exceptions.SolcNotInstalled) as exc:
        raise VerifierBuildError(
            f"solcjs {version} could not compile {sol}: {exc}; run `make setup` (it installs the solc shim)"
        ) from exc
    built = out["contracts"][sol.name].get(VERIFIER_CONTRACT)
    if built is None:
        raise VerifierBuildError(f"{sol} has no contract {VERIFIER_CONTRACT}; was it rendered by EZKL 23?")
    runtime = bytes.fromhex(built["evm"]["deployedBytecode"]["object"])
    if len(runtime) > EIP170_MAX_CODE:
        raise VerifierBuildError(
            f"the verifier's code is {len(runtime)} bytes, over EIP-170's {EIP170_MAX_CODE}: prove a smaller "
            "circuit (fewer columns), since chains refuse to deploy it"
        )
    return CompiledVerifier(built["abi"], bytes.fromhex(built["evm"]["bytecode"]["object"]), len(runtime))


def deploy_verifier(client: ChainClient, account: LocalAccount, verifier: CompiledVerifier) -> TxReceipt:
    """Deploy a compiled verifier from ``account``; the receipt's ``contractAddress`` is where."""
    factory = client.w3.eth.contract(abi=verifier.abi, bytecode=verifier.bytecode)
    tx = dict(factory.constructor().build_transaction({"from": account.address, "gas": 0}))
    tx.pop("gas", None)
    tx["nonce"] = 0  # set by send_raw, under the account's send lock
    tx["chainId"] = client.chain_id
    tx["gas"] = int(client.w3.eth.estimate_gas(cast(TxParams, tx)) * 1.1)
    return client.send_raw(account, tx, f"deploy {VERIFIER_CONTRACT}")


def evm_calldata(proof_json: bytes) -> tuple[bytes, list[int]]:
    """The proof bytes and public instances (uint256) a verifier's ``verifyProof`` takes, from
    EZKL's proof JSON, encoded by EZKL itself."""
    import ezkl

    with tempfile.TemporaryDirectory(prefix="dlis-zk-calldata-") as tmp:
        path = Path(tmp) / "proof.json"
        path.write_bytes(proof_json)
        try:
            raw = bytes(ezkl.encode_evm_calldata(str(path), str(Path(tmp) / "calldata.bin"), None))
        except RuntimeError as exc:
            raise VerifierBuildError(f"EZKL could not encode the proof as EVM calldata: {exc}") from exc
    proof, instances = abi_decode(["bytes", "uint256[]"], raw[4:])
    return bytes(proof), [int(i) for i in instances]


@dataclass(frozen=True)
class CircuitRegistration:
    """What registers a head circuit: its key's hash, the verifier, the key's VKA words, the
    model whose last stage's head it is, the logits row width and the tolerance (fixed point)."""

    vk_hash: bytes
    verifier: str
    vka: list[bytes]
    model_id: bytes
    vocab: int
    tolerance: int


@dataclass(frozen=True)
class RegisteredCircuit:
    verifier: str
    vocab: int
    tolerance: int
    vka_digest: bytes
    model_id: bytes
    registrar: str


@dataclass(frozen=True)
class ProofRecord:
    node: str
    block: int
    vk_hash: bytes
    instances_hash: bytes
    input_commitment: int


class StageProofRegistry:
    """Binding of contracts/StageProofRegistry.sol."""

    def __init__(self, client: ChainClient):
        if "StageProofRegistry" not in client.deployment.contracts:
            raise DeploymentNotFoundError(
                f"the deployment of chain {client.chain_id} predates StageProofRegistry; redeploy "
                "(`brownie run deploy`, or `dlis chain up --redeploy` on a local chain) to record proofs on chain"
            )
        self.client = client
        self.contract = client.contract("StageProofRegistry")
        self.address = self.contract.address

    def register_circuit(self, admin: LocalAccount, circuit: CircuitRegistration) -> TxReceipt:
        c = circuit
        fn = self.contract.functions.registerCircuit(
            c.vk_hash, Web3.to_checksum_address(c.verifier), c.vka, c.model_id, c.vocab, c.tolerance
        )
        return self.client.transact(admin, fn)

    def circuit_of(self, vk_hash: bytes) -> RegisteredCircuit | None:
        """The circuit registered under ``vk_hash``, or None."""
        verifier, vocab, tolerance, vka_digest, model_id, registrar = self.client.call(
            self.contract.functions.circuitOf(vk_hash)
        )
        if int(verifier, 16) == 0:
            return None
        return RegisteredCircuit(
            str(verifier), int(vocab), int(tolerance), bytes(vka_digest), bytes(model_id), str(registrar)
        )

    def record_proof(
        self,
        sender: LocalAccount,
        signed: SignedReceipt,
        vk_hash: bytes,
        proof_json: bytes,
        vka: list[bytes],
        claim_signature: bytes,
        token_ids: list[int],
    ) -> TxReceipt:
        """Have the chain check and record ``proof_json`` (EZKL's proof JSON) as the proof of the
        call ``signed`` bills; a refusal raises the contract's typed error and records nothing."""
        proof, instances = evm_calldata(proof_json)
        return self.record(sender, signed, vk_hash, proof, instances, vka, claim_signature, token_ids)

    def record(
        self,
        sender: LocalAccount,
        signed: SignedReceipt,
        vk_hash: bytes,
        proof: bytes,
        instances: list[int],
        vka: list[bytes],
        claim_signature: bytes,
        token_ids: list[int],
    ) -> TxReceipt:
        """:meth:`record_proof` with the verifier's calldata already split (:func:`evm_calldata`)."""
        r = signed.receipt
        receipt = (r.job_id, r.model_id, r.start, r.end, r.tokens, r.output_hash, r.amount)
        fn = self.contract.functions.recordProof(
            receipt, signed.signature.signature, vk_hash, proof, instances, vka, claim_signature, token_ids
        )
        return self.client.transact(sender, fn)

    def proof_of(self, domain: Domain, signed: SignedReceipt, node: str) -> ProofRecord | None:
        """What ``node`` recorded for the receipt, or None."""
        digest = typed_digest(domain, "Receipt", signed.receipt.message())
        recorded, block, vk_hash, inst, commitment = self.client.call(
            self.contract.functions.proofOf(digest, Web3.to_checksum_address(node))
        )
        if int(recorded, 16) == 0:
            return None
        return ProofRecord(str(recorded), int(block), bytes(vk_hash), bytes(inst), int(commitment))
