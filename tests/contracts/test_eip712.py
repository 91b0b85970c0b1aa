"""EIP-712: the Python type strings and domains match the contracts, and signatures made in Python
(``typed_data.sign_typed`` through the bindings' helpers) verify on chain; forged ones are refused."""

from types import SimpleNamespace

import pytest
from conftest import (
    MODEL_ID,
    MODEL_LAYERS,
    NODES,
    UNIT,
    batch_id,
    chain_id,
    future,
    key_of,
    make_job,
    registration,
    registry_domain,
    reverts,
    settle,
    two_stage,
)
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import keccak

from dlis_market.chain import typed_data
from dlis_market.chain.job_market import (
    Receipt,
    authorization_signer,
    market_domain,
    receipt_signer,
    sign_receipt,
)
from dlis_market.chain.node_registry import NodeRegistry as PyNodeRegistry
from dlis_market.chain.typed_data import CompactSignature, Domain, job_id, sign_typed

pytestmark = pytest.mark.usefixtures("live")


@pytest.fixture(autouse=True)
def isolation(fn_isolation):
    pass


def _hex(b: bytes) -> str:
    return "0x" + bytes(b).hex()


def _domain_separator(d: Domain) -> bytes:
    # hash of the EIP712Domain struct as eth_account computes it for the signed message
    msg = encode_typed_data(
        full_message={
            "types": {
                "EIP712Domain": [
                    {"name": "name", "type": "string"},
                    {"name": "version", "type": "string"},
                    {"name": "chainId", "type": "uint256"},
                    {"name": "verifyingContract", "type": "address"},
                ],
                "Empty": [],
            },
            "primaryType": "Empty",
            "domain": d.as_dict(),
            "message": {},
        }
    )
    return bytes(msg.header)


def _py_registry(registry) -> PyNodeRegistry:
    """The Python binding's signing logic without a live ChainClient (it only needs chain id + address)."""
    r = object.__new__(PyNodeRegistry)
    r.client = SimpleNamespace(chain_id=chain_id())
    r.address = registry.address
    return r


# ----------------------------------------------------------------------------- type hashes, domains


def test_type_strings_are_canonical():
    assert (
        typed_data.type_string("NodeBinding")
        == "NodeBinding(address operator,address node,string peerId,uint256 deadline)"
    )
    assert typed_data.type_string("JobAuthorization") == (
        "JobAuthorization(address client,address broker,bytes32 modelId,uint256 maxCost,uint256 nonce,uint256 deadline)"
    )
    assert typed_data.type_string("Receipt") == (
        "Receipt(bytes32 jobId,bytes32 modelId,uint32 start,uint32 end,uint32 tokens,bytes32 outputHash,uint256 amount)"
    )


def test_typehashes_match_python(registry, market):
    assert registry.NODE_BINDING_TYPEHASH() == _hex(keccak(text=typed_data.type_string("NodeBinding")))
    assert market.JOB_AUTHORIZATION_TYPEHASH() == _hex(keccak(text=typed_data.type_string("JobAuthorization")))
    assert market.RECEIPT_TYPEHASH() == _hex(keccak(text=typed_data.type_string("Receipt")))
    for primary in ("NodeBinding", "JobAuthorization", "Receipt"):
        assert typed_data.type_hash(primary) == keccak(text=typed_data.type_string(primary))


def test_domain_separators_match_python(registry, market):
    cid = chain_id()
    assert registry.domainSeparator() == _hex(_domain_separator(registry_domain(registry)))
    assert registry.domainSeparator() == _hex(_domain_separator(_py_registry(registry).domain()))
    assert market.domainSeparator() == _hex(_domain_separator(market_domain(cid, market.address)))
    # eip712Domain() (ERC-5267) reports the same name, version, chain and contract
    for contract, (name, version) in ((registry, typed_data.REGISTRY_DOMAIN), (market, typed_data.MARKET_DOMAIN)):
        d = contract.eip712Domain()
        assert (d[1], d[2], d[3], d[4]) == (name, version, cid, contract.address)


def test_job_id_matches(market, roles):
    for nonce in (0, 1, 2**255 + 3):
        assert market.jobIdOf(roles["client1"], nonce) == _hex(job_id(str(roles["client1"]), nonce))


# ----------------------------------------------------------------------------- NodeBinding


def test_python_binding_registers_node(registry, roles):
    op, node = roles["op1"], NODES[3]
    dl = future()
    sig = _py_registry(registry).sign_binding(node, str(op), "peer-py", dl)
    assert isinstance(sig, CompactSignature) and len(sig.signature) == 65
    tx = registry.registerNode(registration(node, "peer-py"), dl, sig.signature, {"from": op})
    assert tx.events["NodeRegistered"][0]["node"] == node.address
    assert registry.isRoutable(node.address)


def test_forged_binding_is_refused(registry, market, roles):
    op, node = roles["op1"], NODES[3]
    dl = future()
    good = _py_registry(registry).sign_binding(node, str(op), "peer-py", dl)
    # one bit of s flipped
    bad = bytearray(good.signature)
    bad[40] ^= 1
    with reverts("NodeRegistryInvalidBinding"):
        registry.registerNode(registration(node, "peer-py"), dl, bytes(bad), {"from": op})
    # the right message signed under another domain (the market's) or another chain id
    msg = {"operator": str(op), "node": node.address, "peerId": "peer-py", "deadline": dl}
    for domain in (
        Domain("DLIS NodeRegistry", "1", chain_id(), market.address),
        Domain("DLIS NodeRegistry", "1", 1, registry.address),
        Domain("DLIS NodeRegistry", "2", chain_id(), registry.address),
    ):
        sig = sign_typed(node.key, domain, "NodeBinding", msg)
        with reverts("NodeRegistryInvalidBinding"):
            registry.registerNode(registration(node, "peer-py"), dl, sig.signature, {"from": op})
    # a high-s (malleable) twin of a valid signature is refused by OpenZeppelin's ECDSA
    n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    r, s, v = good.signature[:32], int.from_bytes(good.signature[32:64], "big"), good.signature[64]
    twin = r + (n - s).to_bytes(32, "big") + bytes([55 - v])
    with reverts("NodeRegistryInvalidBinding", "0x0000000000000000000000000000000000000000", node.address):
        registry.registerNode(registration(node, "peer-py"), dl, twin, {"from": op})


# ----------------------------------------------------------------------------- JobAuthorization, Receipt


def test_python_signatures_settle_for_both_v_parities(market, roles):
    """EIP-2098 packs v into the top bit of vs: settle jobs whose signatures have v = 27 and v = 28."""
    c1, broker = roles["client1"], roles["broker"]
    seen: dict[int, object] = {}
    nonce = 0
    while len(seen) < 2 and nonce < 64:
        job = two_stage(market, c1, broker, nonce)
        seen.setdefault(job.signature.signature[64], job)
        nonce += 1
    assert set(seen) == {27, 28}
    jobs = list(seen.values())
    domain = market_domain(chain_id(), market.address)
    for job in jobs:
        assert authorization_signer(domain, job.authorization, job.signature.signature) == c1
        for rc, node in zip(job.receipts, NODES[:2], strict=True):
            assert receipt_signer(domain, rc.receipt, rc.signature.signature) == node.address
    tx = settle(market, broker, "parity", jobs)
    assert tx.events["BatchSettled"][0]["jobs"] == 2


def test_forged_authorization_is_refused(market, roles):
    c1, broker = roles["client1"], roles["broker"]
    job = two_stage(market, c1, broker, 1)
    t = list(job.as_tuple())
    vs = bytearray(t[6])
    vs[0] ^= 0x80  # flip the packed v bit: recovers another address
    t[6] = bytes(vs)
    with reverts("JobMarketInvalidClientSignature", 0, c1):
        market.settleBatch(batch_id("x"), [tuple(t)], {"from": broker})
    # signed with the client's key for another verifying contract
    wrong_domain = Domain("DLIS JobMarket", "1", chain_id(), "0x" + "11" * 20)
    sig = sign_typed(key_of(c1), wrong_domain, "JobAuthorization", job.authorization.message())
    t = list(job.as_tuple())
    t[5], t[6] = sig.r, sig.vs
    with reverts("JobMarketInvalidClientSignature", 0, c1):
        market.settleBatch(batch_id("x"), [tuple(t)], {"from": broker})


def test_receipt_signed_by_unregistered_key_is_refused(market, roles):
    c1, broker = roles["client1"], roles["broker"]
    intruder = Account.from_key(keccak(text="intruder"))
    job = make_job(market, c1, broker, 1, [(NODES[0], 0, 12, UNIT), (intruder, 12, MODEL_LAYERS, UNIT)])
    with reverts("JobMarketNodeNotRoutable", 0, 1, intruder.address):
        settle(market, broker, "x", [job])


def test_receipt_for_another_model_is_refused(market, roles):
    """A receipt signed for model X cannot be submitted under model Y's authorization."""
    c1, broker = roles["client1"], roles["broker"]
    job = two_stage(market, c1, broker, 1)
    domain = market_domain(chain_id(), market.address)
    rc = Receipt(job.authorization.job_id, keccak(text="other"), 0, 12, 64, b"\x00" * 32, UNIT)
    sig = sign_receipt(NODES[0].key, domain, rc)
    t = list(job.as_tuple())
    receipts = list(t[7])
    receipts[0] = (0, 12, 64, UNIT, b"\x00" * 32, sig.r, sig.vs)
    t[7] = receipts
    with reverts("JobMarketNodeNotRoutable", 0, 0):
        market.settleBatch(batch_id("x"), [tuple(t)], {"from": broker})
    assert keccak(text="other") != MODEL_ID
