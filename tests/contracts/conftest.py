"""Fixtures and helpers of the brownie contract suite (run with `brownie test tests/contracts -o addopts=""`).

pyproject's addopts disables brownie's pytest plugin for the plain Python run, so this folder is
only collected by `brownie test`; under plain `pytest` (no brownie project loaded) it is skipped.

Deployment mirrors ``dlis_market.chain.deploy.deploy_market`` (same constructors, roles and role
grants) with small stakes and short delays. Every module starts from a fresh chain snapshot
(``module_isolation``) and every test is reverted to the state after the module fixtures
(``fn_isolation``), so no test depends on another's chain state.
"""

from __future__ import annotations

import contextlib
import gc
import re
from dataclasses import dataclass
from typing import Any

import pytest
from eth_account import Account
from eth_utils import keccak

try:  # only importable when brownie has loaded the project (i.e. under `brownie test`)
    from brownie import DLISToken, JobMarket, NodeRegistry, ReputationOracle, StakingManager, chain, web3
    from brownie import accounts as _accounts
    from brownie.exceptions import VirtualMachineError

    BROWNIE = True
except ImportError:  # plain `pytest`: leave this folder to `brownie test`
    BROWNIE = False
    collect_ignore_glob = ["test_*.py"]

from dlis_market.chain.accounts import dev_accounts
from dlis_market.chain.job_market import (
    BatchReceipt,
    JobAuthorization,
    MerkleJob,
    Receipt,
    SignedBatchReceipt,
    SignedJob,
    SignedReceipt,
    batch_receipts,
    market_domain,
    merkle_batch_args,
    sign_authorization,
    sign_batch_receipt,
    sign_receipt,
)
from dlis_market.chain.typed_data import REGISTRY_DOMAIN, CompactSignature, Domain, job_id, sign_typed

MNEMONIC = "test test test test test test test test test test test junk"


def dev_keys() -> list[bytes]:
    """The private keys of Anvil's (= brownie's ``accounts``) dev accounts, in order."""
    return [a.key for a in dev_accounts(MNEMONIC)]


UNIT = 10**18
INITIAL_SUPPLY = 1_000_000_000 * UNIT
MIN_STAKE = 100 * UNIT
UNBONDING = 3_600
REPORTER_SHARE_BPS = 5_000
FEE_BPS = 250
WITHDRAW_DELAY = 600
WITHDRAW_WINDOW = 900
MAX_AUTH_LIFETIME = 300  # < WITHDRAW_DELAY
MAX_FEE_BPS = 2_000

# Model ids are namespaced by publisher: keccak256(abi.encode(publisher, keccak256(name))). The
# deployer (Anvil's dev account 0) publishes the models of these tests.
DEPLOYER = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"


def model_id_of(publisher: str, name_hash: bytes) -> bytes:
    return bytes(keccak(b"\x00" * 12 + bytes.fromhex(publisher[2:]) + name_hash))


MODEL_NAME_HASH = keccak(text="smollm2-135m")
MODEL_ID = model_id_of(DEPLOYER, MODEL_NAME_HASH)
MODEL_LAYERS = 30
OTHER_NAME_HASH = keccak(text="tiny-4l")
OTHER_MODEL_ID = model_id_of(DEPLOYER, OTHER_NAME_HASH)
OTHER_MODEL_LAYERS = 4
MANIFEST_SHA = keccak(text="manifest")
ZERO = "0x0000000000000000000000000000000000000000"
BYTES32_ZERO = b"\x00" * 32


def node_account(i: int):
    """A deterministic node signing key (never funded: node keys only sign)."""
    return Account.from_key(keccak(text=f"dlis-test-node-{i}"))


NODES = [node_account(i) for i in range(4)]


def pytest_configure(config):
    if config.pluginmanager.is_blocked("pytest-brownie") and _under_brownie_cli():
        raise pytest.UsageError(
            "brownie's pytest plugin is disabled by pyproject's addopts (-p no:pytest-brownie); "
            'run the contract suite as: brownie test tests/contracts -o addopts=""'
        )
    # brownie's own isolation fixtures call rpc.snapshot/revert, which warn on every test
    # (when the rpc wrappers are still in place, see _fast_chain_revert)
    config.addinivalue_line("filterwarnings", "ignore::FutureWarning")
    config.addinivalue_line("filterwarnings", "ignore::pytest.PytestAssertRewriteWarning")
    _own_port()


def _own_port() -> None:
    """Give the test chain a free port before brownie connects (it launches Anvil on the
    development network's port, but attaches to whatever already listens there, e.g. a demo's
    Anvil on 8545), and the history flags that keep its old states off the disk.
    DLIS_BROWNIE_PORT pins the port. Changes only this process's brownie settings."""
    import os

    from brownie._config import CONFIG

    from dlis_market.chain.anvil import HISTORY_FLAGS, free_port

    for network in ("development",):
        net = CONFIG.networks.get(network, {})
        settings = net.get("cmd_settings")
        if isinstance(settings, dict):
            settings["port"] = int(os.environ.get("DLIS_BROWNIE_PORT") or free_port())
        # brownie has no setting for Anvil's history flags; its launcher splits `cmd` on spaces
        if net.get("cmd") == "anvil":
            net["cmd"] = " ".join(("anvil", *HISTORY_FLAGS))


@pytest.fixture(scope="session", autouse=True)
def _own_chain():
    """Never test against a chain this run did not start (brownie attaches to anything already
    listening on its port, e.g. a demo's Anvil)."""
    from brownie.network import rpc

    if rpc.is_active() and not rpc.is_child():
        pytest.exit(
            "brownie attached to a chain that was already running on its port instead of starting its own; "
            "unset DLIS_BROWNIE_PORT (a free port is picked) or point it at a free port",
            returncode=2,
        )


def _under_brownie_cli() -> bool:
    import os
    import sys

    return os.path.basename(sys.argv[0]) == "brownie" and "test" in sys.argv[1:2]


# ----------------------------------------------------------------------------- revert helper

_ERRORS: dict[bytes, tuple[str, list[str]]] = {}


def _error_table() -> dict[bytes, tuple[str, list[str]]]:
    """4-byte selector -> (error name, argument types) over every compiled contract's ABI
    (the project's contracts and the OpenZeppelin errors they include)."""
    if not _ERRORS:
        from brownie import project

        for container in project.get_loaded_projects()[0]:
            for item in container.abi:
                if item.get("type") == "error":
                    types = [_abi_type(i) for i in item["inputs"]]
                    _ERRORS[keccak(text=f"{item['name']}({','.join(types)})")[:4]] = (item["name"], types)
    return _ERRORS


def _abi_type(inp: dict[str, Any]) -> str:
    t = inp["type"]
    if t.startswith("tuple"):
        return "(" + ",".join(_abi_type(c) for c in inp["components"]) + ")" + t[5:]
    return t


def selector(signature: str) -> bytes:
    return keccak(text=signature)[:4]


def _decoded(exc: Exception) -> tuple[str, str]:
    """(error name, arguments as brownie prints them) of a brownie revert.

    Brownie 1.22 decodes errors whose selector is in its error table (filled from the project's
    ABIs) as ``"Name: arg, arg"``, with ``str()`` of each eth_abi value. Errors it cannot decode
    come back as ``"Unknown typed error: 0x<selector><args>"``; those are decoded here from the
    compiled ABIs into the same form, so assertions do not depend on brownie's table.
    """
    msg = getattr(exc, "revert_msg", None) or ""
    m = re.search(r"typed error: 0x([0-9a-fA-F]*)", msg)
    if m:
        data = bytes.fromhex(m.group(1))
        entry = _error_table().get(data[:4])
        if entry is None:
            return "0x" + data[:4].hex(), ""
        from eth_abi import decode

        name, types = entry
        return name, ", ".join(str(v) for v in decode(types, data[4:]))
    if ":" in msg:
        name, args = msg.split(":", 1)
        return name.strip(), args.strip()
    return msg.strip(), ""


def error_name(exc: Exception) -> str:
    """The custom error name of a brownie revert."""
    return _decoded(exc)[0]


def error_args(exc: Exception) -> str:
    """The decoded arguments: ``str()`` of each eth_abi value, joined by ", "."""
    return _decoded(exc)[1]


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, (bytes, bytearray)):
        return str(bytes(v))
    if hasattr(v, "address"):
        return str(v.address).lower()
    s = str(v)
    return s.lower() if s.startswith("0x") else s


@contextlib.contextmanager
def reverts(name: str, *args: Any):
    """Assert the block reverts with custom error ``name`` (and, when given, these leading arguments)."""
    assert name in {n for n, _ in _error_table().values()}, f"{name} is not an error of any compiled contract"
    try:
        yield
    except VirtualMachineError as exc:
        got = error_name(exc)
        assert got == name, f"expected revert {name}, got {exc.revert_msg!r}"
        if args:
            want = ", ".join(_fmt(a) for a in args)
            got_args = error_args(exc)
            # leading arguments may be given alone (e.g. a timestamp-dependent last one left out)
            ok = got_args == want or got_args.startswith(want + ", ")
            assert ok, f"{name}: args {exc.revert_msg!r} do not start with {want!r}"
    else:
        raise AssertionError(f"expected revert {name}, but the call succeeded")


def event_args(tx, name: str, index: int = 0) -> dict[str, Any]:
    assert name in tx.events, f"{name} not emitted; events: {list(tx.events.keys())}"
    return dict(tx.events[name][index])


# ----------------------------------------------------------------------------- fast reads


def read_many(calls: list[tuple[Any, str, tuple]]) -> list[Any]:
    """Many view calls in one JSON-RPC batch: [(contract, function name, args)] -> decoded results.

    A brownie ContractCall costs ~12 ms; a batch of 50 raw eth_calls costs ~7 ms in all, which
    keeps the stateful invariants (checked after every step) cheap.
    """
    from eth_abi import decode

    requests = []
    outputs = []
    for contract, fn, args in calls:
        method = getattr(contract, fn)
        requests.append(("eth_call", [{"to": contract.address, "data": method.encode_input(*args)}, "latest"]))
        outputs.append([_abi_type(o) for o in method.abi["outputs"]])
    results = web3.provider.make_batch_request(requests)
    decoded = []
    for res, types in zip(results, outputs, strict=True):
        assert "error" not in res, res
        values = decode(types, bytes.fromhex(res["result"][2:]))
        decoded.append(values[0] if len(values) == 1 else tuple(values))
    return decoded


# ----------------------------------------------------------------------------- state machine


def _pure_python_stateful():
    """brownie.test.stateful loaded from its .py source.

    eth-brownie 1.22.2 ships the module compiled with mypyc, and its compiled
    ``_BrownieStateMachine.__init__`` rejects the Python subclass it builds itself ("TypeError:
    brownie.test.stateful._BrownieStateMachine object expected; got ...BrownieStateMachine"), so
    brownie's ``state_machine`` fixture cannot run any machine. The .py source next to the .so is
    the same code, and works.
    """
    import importlib.util
    import pathlib

    import brownie.test

    path = pathlib.Path(brownie.test.__file__).with_name("stateful.py")
    spec = importlib.util.spec_from_file_location("_brownie_stateful_py", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def state_machine():
    """Overrides brownie's fixture of the same name with the working pure-Python implementation."""
    gc.freeze()
    yield _pure_python_stateful().state_machine


@pytest.fixture(scope="session", autouse=True)
def _fast_chain_revert():
    """Two brownie 1.22 costs that dominate a stateful run, removed for this session:

    * ``Rpc.snapshot/revert/sleep/mine`` are wrapped by ``brownie.network.rpc.internal``, which
      calls ``inspect.stack()`` (reads the source of every frame, ~0.1 s under pytest+hypothesis)
      only to warn when user code calls rpc directly. brownie snapshots after EVERY transaction,
      so this is paid per transaction; we call the wrapped functions directly.
    * every ``chain.revert()`` runs ``gc.collect()``; with ~170k live objects from the imports
      that costs ~0.4 s per revert. Freezing the objects that exist now makes it ~0.05 s.
    """
    from brownie.network.rpc import Rpc

    unwrapped = {}
    for name in ("snapshot", "revert", "sleep", "mine"):
        fn = Rpc.__dict__.get(name)
        inner = fn.__closure__[0].cell_contents if getattr(fn, "__closure__", None) else None
        if getattr(fn, "__name__", "") == "wrapped" and callable(inner):
            unwrapped[name] = fn
            setattr(Rpc, name, inner)
    gc.freeze()
    yield
    gc.unfreeze()
    for name, fn in unwrapped.items():
        setattr(Rpc, name, fn)


# ----------------------------------------------------------------------------- deployment


@pytest.fixture(scope="session")
def roles(accounts):
    return dict(
        deployer=accounts[0],
        treasury=accounts[1],
        broker=accounts[2],
        oracle=accounts[3],
        op1=accounts[4],
        op2=accounts[5],
        client1=accounts[6],
        client2=accounts[7],
        reporter=accounts[8],
        stranger=accounts[9],
    )


@pytest.fixture(scope="session", autouse=True)
def _check_dev_keys(accounts):
    # the Python signing keys must be the keys of brownie's (Anvil's) accounts
    assert [Account.from_key(k).address for k in dev_keys()] == [a.address for a in accounts]


def key_of(account) -> bytes:
    return dev_keys()[[a.address for a in _accounts].index(account.address)]


@dataclass
class Market:
    token: Any
    staking: Any
    registry: Any
    oracle: Any
    market: Any


@pytest.fixture(scope="module")
def deployed(module_isolation, roles) -> Market:
    """The five contracts with the roles of ``deploy_market``; all tokens with the deployer."""
    d = {"from": roles["deployer"]}
    token = DLISToken.deploy(roles["deployer"], INITIAL_SUPPLY, d)
    staking = StakingManager.deploy(
        token, roles["deployer"], roles["treasury"], MIN_STAKE, UNBONDING, REPORTER_SHARE_BPS, d
    )
    registry = NodeRegistry.deploy(staking, d)
    oracle = ReputationOracle.deploy(roles["deployer"], d)
    market = JobMarket.deploy(
        token,
        registry,
        roles["deployer"],
        roles["treasury"],
        FEE_BPS,
        WITHDRAW_DELAY,
        WITHDRAW_WINDOW,
        MAX_AUTH_LIFETIME,
        d,
    )
    staking.grantRole(staking.SLASHER_ROLE(), roles["oracle"], d)
    oracle.grantRole(oracle.ORACLE_ROLE(), roles["oracle"], d)
    market.grantRole(market.BROKER_ROLE(), roles["broker"], d)
    for who in ("op1", "op2", "client1", "client2", "reporter", "stranger"):
        token.transfer(roles[who], 1_000_000 * UNIT, d)
    return Market(token, staking, registry, oracle, market)


@pytest.fixture(scope="module")
def token(deployed):
    return deployed.token


@pytest.fixture(scope="module")
def staking(deployed):
    return deployed.staking


@pytest.fixture(scope="module")
def registry(deployed):
    return deployed.registry


@pytest.fixture(scope="module")
def oracle(deployed):
    return deployed.oracle


@pytest.fixture(scope="module")
def market(deployed):
    return deployed.market


# ----------------------------------------------------------------------------- time

_CHAIN_ID: list[int] = []


def chain_id() -> int:
    """The dev chain's id (one RPC round trip, then cached)."""
    if not _CHAIN_ID:
        _CHAIN_ID.append(int(web3.eth.chain_id))
    return _CHAIN_ID[0]


def block_time() -> int:
    """Timestamp of the latest block: the next transaction's block.timestamp is at least this."""
    return int(web3.eth.get_block("latest").timestamp)


def future(seconds: int = 3_600) -> int:
    """A deadline ``seconds`` after both the latest block and brownie's clock."""
    return max(block_time(), chain.time()) + seconds


def past() -> int:
    """A deadline already expired for the next transaction."""
    return block_time() - 1


# ----------------------------------------------------------------------------- actions


def registry_domain(registry) -> Domain:
    return Domain(REGISTRY_DOMAIN[0], REGISTRY_DOMAIN[1], chain_id(), registry.address)


def sign_binding(registry, node_acct, operator, peer_id: str, deadline: int) -> CompactSignature:
    message = {"operator": str(operator), "node": node_acct.address, "peerId": peer_id, "deadline": deadline}
    return sign_typed(node_acct.key, registry_domain(registry), "NodeBinding", message)


def capability(i: int = 0) -> tuple[int, int, int, int]:
    return (16_384 + i, 1_000 + i, 1_000, 3)


def registration(node_acct, peer_id: str, endpoint: str = "/ip4/127.0.0.1/tcp/4001", att: bytes | None = None):
    return (node_acct.address, peer_id, endpoint, capability(), att or keccak(text=peer_id))


def stake(token, staking, operator, amount: int):
    token.approve(staking, amount, {"from": operator})
    return staking.stake(amount, {"from": operator})


def register(
    registry, operator, node_acct, peer_id: str, deadline: int | None = None, endpoint: str = "/ip4/1.2.3.4/tcp/1"
):
    deadline = deadline if deadline is not None else future()
    sig = sign_binding(registry, node_acct, operator, peer_id, deadline)
    return registry.registerNode(
        registration(node_acct, peer_id, endpoint), deadline, sig.signature, {"from": operator}
    )


def deposit(token, market, client, broker, amount: int):
    """Approve and deposit ``amount`` into ``client``'s escrow held for ``broker``."""
    token.approve(market, amount, {"from": client})
    return market.deposit(broker, amount, {"from": client})


def permit_signature(token, owner, spender, value: int, deadline: int) -> tuple[int, bytes, bytes]:
    """An EIP-2612 permit signed with ``owner``'s dev key: (v, r, s)."""
    from eth_account.messages import encode_typed_data

    data = {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"},
            ],
            "Permit": [
                {"name": "owner", "type": "address"},
                {"name": "spender", "type": "address"},
                {"name": "value", "type": "uint256"},
                {"name": "nonce", "type": "uint256"},
                {"name": "deadline", "type": "uint256"},
            ],
        },
        "primaryType": "Permit",
        "domain": {
            "name": "DLIS Token",
            "version": "1",
            "chainId": chain_id(),
            "verifyingContract": token.address,
        },
        "message": {
            "owner": str(owner),
            "spender": str(spender),
            "value": value,
            "nonce": token.nonces(owner),
            "deadline": deadline,
        },
    }
    signed = Account.sign_message(encode_typed_data(full_message=data), key_of(owner))
    return signed.v, signed.r.to_bytes(32, "big"), signed.s.to_bytes(32, "big")


def make_job(
    market,
    client,
    broker,
    nonce: int,
    stages: list[tuple[Any, int, int, int]],
    *,
    model_id: bytes = MODEL_ID,
    max_cost: int | None = None,
    deadline: int | None = None,
    client_key: bytes | None = None,
) -> SignedJob:
    """A signed job: ``stages`` are (node signing account, start, end, amount)."""
    domain = market_domain(chain_id(), market.address)
    cost = sum(s[3] for s in stages)
    auth = JobAuthorization(
        client=str(client),
        broker=str(broker),
        model_id=model_id,
        max_cost=max_cost if max_cost is not None else cost + cost * MAX_FEE_BPS // 10_000,
        nonce=nonce,
        deadline=deadline if deadline is not None else future(MAX_AUTH_LIFETIME // 2),
    )
    jid = job_id(auth.client, nonce)
    receipts = []
    for node, start, end, amount in stages:
        rc = Receipt(jid, model_id, start, end, 64, keccak(text=f"out-{nonce}-{start}"), amount)
        receipts.append(SignedReceipt(rc, sign_receipt(node.key, domain, rc)))
    sig = sign_authorization(client_key or key_of(client), domain, auth)
    return SignedJob(auth, sig, tuple(receipts))


def two_stage(market, client, broker, nonce: int, a: int = 3 * UNIT, b: int = 2 * UNIT, **kw) -> SignedJob:
    """A job served by NODES[0] (layers [0,12)) and NODES[1] ([12,30))."""
    return make_job(market, client, broker, nonce, [(NODES[0], 0, 12, a), (NODES[1], 12, MODEL_LAYERS, b)], **kw)


def three_stage(market, client, broker, nonce: int, amounts: tuple[int, int, int], **kw) -> SignedJob:
    """NODES[0] (op1) [0,10), NODES[1] (op2) [10,20), NODES[2] (op2) [20,30), billing ``amounts``."""
    a, b, c = amounts
    stages = [(NODES[0], 0, 10, a), (NODES[1], 10, 20, b), (NODES[2], 20, MODEL_LAYERS, c)]
    return make_job(market, client, broker, nonce, stages, **kw)


def settlement_state(market, token, roles, nonces: int = 0) -> list:
    """Everything settlement may touch: both clients' escrow, the claimables of op1, op2, the
    treasury and the broker, the market's totals and balance; with ``nonces``, whether each
    client's nonces 0..nonces-1 are used."""
    r = roles
    calls = [(market, "escrowOf", (r[c].address, r["broker"].address)) for c in ("client1", "client2")]
    calls += [(market, "claimableOf", (r[a].address,)) for a in ("op1", "op2", "treasury", "broker")]
    calls += [(market, "totalEscrow", ()), (market, "totalClaimable", ()), (token, "balanceOf", (market.address,))]
    calls += [(market, "nonceUsed", (r[c].address, n)) for c in ("client1", "client2") for n in range(nonces)]
    return read_many(calls)


def solo(job: SignedJob | tuple) -> tuple:
    """``settleJob``'s argument for a job (or its ``settleBatch`` tuple, possibly tampered with):
    each stage as (packed start/end/tokens/amount, output hash, r, vs), the packing of
    ``JobMarket.SignedStage`` (bits 223-192 start, 191-160 end, 159-128 tokens, 127-0 amount)."""
    t = job.as_tuple() if isinstance(job, SignedJob) else job
    stages = [(s << 192 | e << 160 | tok << 128 | amt, out, r, vs) for s, e, tok, amt, out, r, vs in t[7]]
    return (*t[:7], stages)


def settle_solo(market, broker, job: SignedJob | tuple):
    """Settle one job alone through ``settleJob``."""
    return market.settleJob(solo(job), {"from": broker})


def batch_id(tag: str) -> bytes:
    return keccak(text=f"batch-{tag}")


def settle(market, broker, tag: str, jobs: list[SignedJob]):
    return market.settleBatch(batch_id(tag), [j.as_tuple() for j in jobs], {"from": broker})


@pytest.fixture(scope="module")
def live(deployed, roles):
    """A running market: op1 runs NODES[0], op2 runs NODES[1] and NODES[2] (staked, registered),
    the model is published, both clients hold 1,000 DLIS of escrow for roles["broker"]. NODES[3]
    is never registered."""
    t, s, r, m = deployed.token, deployed.staking, deployed.registry, deployed.market
    stake(t, s, roles["op1"], 2 * MIN_STAKE)
    stake(t, s, roles["op2"], 2 * MIN_STAKE)
    register(r, roles["op1"], NODES[0], "peer-0")
    register(r, roles["op2"], NODES[1], "peer-1")
    register(r, roles["op2"], NODES[2], "peer-2")
    assert roles["deployer"] == DEPLOYER
    r.publishModel(MODEL_NAME_HASH, "bafy-model", MANIFEST_SHA, MODEL_LAYERS, {"from": roles["deployer"]})
    r.publishModel(OTHER_NAME_HASH, "bafy-other", MANIFEST_SHA, OTHER_MODEL_LAYERS, {"from": roles["deployer"]})
    deposit(t, m, roles["client1"], roles["broker"], 1_000 * UNIT)
    deposit(t, m, roles["client2"], roles["broker"], 1_000 * UNIT)
    return deployed


# ----------------------------------------------------------------------------- Merkle settlement

NODE_KEYS = {n.address: n.key for n in NODES}


def merkle_jobs(market, jobs: list[SignedJob]) -> list[MerkleJob]:
    """The jobs for ``settleBatchMerkle``: each stage's node recovered from its receipt signature."""
    domain = market_domain(chain_id(), market.address)
    return [MerkleJob.from_signed(j, domain) for j in jobs]


def sign_batch(market, broker, bid: bytes, jobs: list[MerkleJob], keys=None) -> dict[str, SignedBatchReceipt]:
    """Every node of the batch signs its honest ``BatchReceipt`` (``keys``: node -> key, default NODES')."""
    domain = market_domain(chain_id(), market.address)
    keys = keys or NODE_KEYS
    return {
        n: SignedBatchReceipt(b, sign_batch_receipt(keys[n], domain, b))
        for n, b in batch_receipts(str(broker), bid, jobs).items()
    }


def resign(market, node_key: bytes, receipt: BatchReceipt) -> SignedBatchReceipt:
    """``receipt`` as signed by ``node_key`` (a node signing what it is shown, or a forger's key)."""
    return SignedBatchReceipt(receipt, sign_batch_receipt(node_key, market_domain(chain_id(), market.address), receipt))


def settle_merkle(market, broker, tag: str, jobs: list[SignedJob] | list[MerkleJob], signed=None):
    """Settle ``jobs`` through ``settleBatchMerkle`` under ``batch_id(tag)`` with honest batch
    receipts (or ``signed``: node -> SignedBatchReceipt)."""
    bid = batch_id(tag)
    mjobs = [j if isinstance(j, MerkleJob) else merkle_jobs(market, [j])[0] for j in jobs]
    signed = signed if signed is not None else sign_batch(market, broker, bid, mjobs)
    nodes, tuples = merkle_batch_args(mjobs, signed)
    return market.settleBatchMerkle(bid, nodes, tuples, {"from": broker})
