"""Explorer decoding against transactions this test makes: every event type the market
contracts emit, calls with struct arguments, custom errors of reverted transactions, internal
calls from the tracers, and the address page's balances against the bindings."""

from __future__ import annotations

import secrets

from eth_account.signers.local import LocalAccount

from dlis_market.chain.job_market import (
    JobAuthorization,
    PaymentTicket,
    Receipt,
    SignedJob,
    SignedReceipt,
    rand_commitment,
    sign_authorization,
    sign_payment_ticket,
    sign_receipt,
    win_threshold,
)
from dlis_market.chain.node_registry import Capability, DeviceClass
from dlis_market.explorer.decoder import DecodedEvent
from dlis_market.explorer.views import Explorer, Span, address_view, block_view, coverage, tx_view
from dlis_market.types import model_id, name_hash

UNIT = 10**18
# Declared in the ABIs but never emitted by these contracts (no role-admin changes, no EIP-712
# domain changes after deployment).
NEVER_EMITTED = {
    ("JobMarket", "RoleAdminChanged"),
    ("StakingManager", "RoleAdminChanged"),
    ("ReputationOracle", "RoleAdminChanged"),
    ("JobMarket", "EIP712DomainChanged"),
    ("DLISToken", "EIP712DomainChanged"),
    ("NodeRegistry", "EIP712DomainChanged"),
    ("StageProofRegistry", "RoleAdminChanged"),
}
# Emitted only with a real halo2 verifier and proof: decoded by the explorer in
# tests/integration/chain/test_stage_proofs_onchain.py.
DECODED_ELSEWHERE = {("StageProofRegistry", "CircuitRegistered"), ("StageProofRegistry", "StageProven")}


def _events(ex: Explorer, receipt) -> list[DecodedEvent]:
    view = tx_view(ex, "0x" + bytes(receipt["transactionHash"]).hex())
    assert view.undecoded_logs == 0
    return view.events


def _one(events: list[DecodedEvent], contract: str, name: str) -> DecodedEvent:
    found = [e for e in events if e.contract == contract and e.event == name]
    assert len(found) == 1, (contract, name, [(e.contract, e.event) for e in events])
    return found[0]


def _settle(market, client: LocalAccount, nodes: list[LocalAccount], model: bytes, spans, nonce: int):
    jm = market.market()
    auth = JobAuthorization(client.address, market.broker.address, model, UNIT, nonce, market.client.timestamp() + 600)
    receipts = []
    for (s, e), node in zip(spans, nodes, strict=True):
        r = Receipt(auth.job_id, model, s, e, 12, secrets.token_bytes(32), (e - s) * 10**15)
        receipts.append(SignedReceipt(r, sign_receipt(node.key, jm.domain(), r)))
    job = SignedJob(auth, sign_authorization(client.key, jm.domain(), auth), receipts)
    batch = secrets.token_bytes(32)
    return auth, batch, jm.settle_batch(market.broker, batch, [job])


def test_every_market_event_decodes(market):
    ex = Explorer(market.client)
    seen: set[tuple[str, str]] = set()

    def record(receipt) -> list[DecodedEvent]:
        evs = _events(ex, receipt)
        seen.update((e.contract, e.event) for e in evs)
        return evs

    token, staking, registry, oracle, jm = (
        market.token(),
        market.staking(),
        market.registry(),
        market.reputation(),
        market.market(),
    )
    op = market.new_funded_account(0)
    # ERC-20
    ev = _one(
        record(token.client.transact(market.deployer, token.contract.functions.transfer(op.address, 1000 * UNIT))),
        "DLISToken",
        "Transfer",
    )
    assert ev.args == {"from": market.deployer.address, "to": op.address, "value": 1000 * UNIT}
    ev = _one(record(token.approve(op, staking.address, 500 * UNIT)), "DLISToken", "Approval")
    assert ev.args == {"owner": op.address, "spender": staking.address, "value": 500 * UNIT}
    # StakingManager
    ev = _one(record(staking.stake(op, 300 * UNIT)), "StakingManager", "Staked")
    assert ev.args == {"operator": op.address, "amount": 300 * UNIT, "activeStake": 300 * UNIT}
    ev = _one(record(staking.request_unstake(op, 50 * UNIT)), "StakingManager", "UnstakeRequested")
    assert ev.args["amount"] == 50 * UNIT and ev.args["unbondingTotal"] == 50 * UNIT
    assert ev.args["releaseTime"] == staking.info(op.address).release_time
    market.increase_time(3601)
    ev = _one(record(staking.withdraw(op)), "StakingManager", "Withdrawn")
    assert ev.args == {"operator": op.address, "amount": 50 * UNIT}
    reporter = market.new_funded_account(0)
    evidence = secrets.token_bytes(32)
    ev = _one(
        record(staking.slash(market.oracle, op.address, 20 * UNIT, evidence, reporter.address)),
        "StakingManager",
        "Slashed",
    )
    assert ev.args["operator"] == op.address and ev.args["evidenceHash"] == "0x" + evidence.hex()
    assert ev.args["reporter"] == reporter.address and ev.args["amount"] == 20 * UNIT
    assert ev.args["reporterShare"] + ev.args["treasuryShare"] == 20 * UNIT
    evs = record(staking.claim(reporter))
    assert _one(evs, "StakingManager", "Claimed").args == {
        "account": reporter.address,
        "amount": ev.args["reporterShare"],
    }
    assert _one(evs, "DLISToken", "Transfer").args["to"] == reporter.address
    sf = staking.contract.functions
    ev = _one(
        record(market.client.transact(market.deployer, sf.setMinStake(100 * UNIT + 1))),
        "StakingManager",
        "MinStakeChanged",
    )
    assert ev.args == {"previous": 100 * UNIT, "current": 100 * UNIT + 1}
    market.client.transact(market.deployer, sf.setMinStake(100 * UNIT))
    ev = _one(
        record(market.client.transact(market.deployer, sf.setSlashSplit(2500, market.deployer.address))),
        "StakingManager",
        "SlashSplitChanged",
    )
    assert ev.args == {"reporterShareBps": 2500, "treasury": market.deployer.address}
    role = sf.SLASHER_ROLE().call()
    ev = _one(
        record(market.client.transact(market.deployer, sf.grantRole(role, reporter.address))),
        "StakingManager",
        "RoleGranted",
    )
    assert ev.args["account"] == reporter.address and ev.args["role"] == "0x" + bytes(role).hex()
    _one(
        record(market.client.transact(market.deployer, sf.revokeRole(role, reporter.address))),
        "StakingManager",
        "RoleRevoked",
    )
    for c in ("JobMarket", "ReputationOracle", "StageProofRegistry"):  # their grants come from the deployment
        f = market.client.contract(c).functions
        some = f.DEFAULT_ADMIN_ROLE().call()
        _one(record(market.client.transact(market.deployer, f.grantRole(some, reporter.address))), c, "RoleGranted")
        _one(record(market.client.transact(market.deployer, f.revokeRole(some, reporter.address))), c, "RoleRevoked")

    # NodeRegistry
    nodes = [market.enroll_node(op, peer_id=f"12D3KooWpeer{i}") for i in range(2)]
    reg_events = [e for e in ex.market_logs() if e.event == "NodeRegistered"]
    seen.update(("NodeRegistry", "NodeRegistered") for _ in reg_events)
    assert {e.args["node"] for e in reg_events} >= {n.address for n in nodes}
    assert {e.args["peerId"] for e in reg_events} >= {"12D3KooWpeer0", "12D3KooWpeer1"}
    cap = Capability(4096, 50, 100, DeviceClass.SERVER)
    ev = _one(
        record(registry.update(op, nodes[0].address, "/ip4/127.0.0.1/tcp/4100", cap, b"\x07" * 32)),
        "NodeRegistry",
        "NodeUpdated",
    )
    assert ev.args == {
        "node": nodes[0].address,
        "endpoint": "/ip4/127.0.0.1/tcp/4100",
        "attestationHash": "0x" + "07" * 32,
    }
    ev = _one(
        record(
            registry.client.transact(
                market.deployer,
                registry.contract.functions.publishModel(
                    name_hash("explorer-test-model"), "QmManifest", b"\x02" * 32, 4
                ),
            )
        ),
        "NodeRegistry",
        "ModelPublished",
    )
    model = bytes.fromhex(model_id("explorer-test-model", market.deployer.address)[2:])
    assert ev.args == {
        "modelId": "0x" + model.hex(),
        "publisher": market.deployer.address,
        "nameHash": "0x" + name_hash("explorer-test-model").hex(),
        "version": 1,
        "manifestCid": "QmManifest",
        "manifestSha256": "0x" + "02" * 32,
        "numLayers": 4,
    }
    # ReputationOracle
    evs = record(oracle.post_epoch(market.oracle, 1, [n.address for n in nodes], [9000, 7500], b"\x03" * 32))
    assert _one(evs, "ReputationOracle", "EpochPosted").args == {
        "epoch": 1,
        "telemetryRoot": "0x" + "03" * 32,
        "nodeCount": 2,
    }
    reps = [e.args for e in evs if e.event == "ReputationUpdated"]
    assert reps == [
        {"node": nodes[0].address, "epoch": 1, "scoreBps": 9000},
        {"node": nodes[1].address, "epoch": 1, "scoreBps": 7500},
    ]

    # JobMarket
    client = market.new_funded_account(50 * UNIT)
    evs = record(jm.deposit(client, 20 * UNIT))
    assert _one(evs, "JobMarket", "Deposited").args == {
        "client": client.address,
        "broker": market.broker.address,
        "from": client.address,
        "amount": 20 * UNIT,
        "escrow": 20 * UNIT,
    }
    ev = _one(record(jm.request_withdrawal(client, 5 * UNIT)), "JobMarket", "WithdrawalRequested")
    assert ev.args["client"] == client.address and ev.args["amount"] == 5 * UNIT
    assert ev.args["broker"] == market.broker.address
    market.increase_time(3601)
    ev = _one(record(jm.withdraw(client)), "JobMarket", "Withdrawn")
    assert ev.args == {"client": client.address, "broker": market.broker.address, "amount": 5 * UNIT}
    spender = market.new_funded_account(0)
    ev = _one(record(jm.set_spender(client, spender.address, 3 * UNIT, 2**40)), "JobMarket", "SpenderSet")
    assert ev.args == {"client": client.address, "spender": spender.address, "cap": 3 * UNIT, "expiry": 2**40}
    if any(i.get("name") == "cancelNonce" for i in jm.contract.abi):  # only in contract versions that have it
        cancel = market.client.transact(client, jm.contract.functions.cancelNonce(99))
        ev = _one(record(cancel), "JobMarket", "NonceCancelled")
        assert ev.args == {"client": client.address, "nonce": 99}
    auth, batch, receipt = _settle(market, client, nodes, model, [(0, 2), (2, 4)], 7)
    evs = record(receipt)
    settled = _one(evs, "JobMarket", "JobSettled")
    assert settled.args["jobId"] == "0x" + auth.job_id.hex() and settled.args["client"] == client.address
    credited = [e.args for e in evs if e.event == "PaymentCredited"]
    assert [(c["node"], c["payee"], c["amount"], c["batchId"]) for c in credited] == [
        (n.address, op.address, 2 * 10**15, "0x" + batch.hex()) for n in nodes
    ]
    b = _one(evs, "JobMarket", "BatchSettled").args
    assert b["batchId"] == "0x" + batch.hex() and b["broker"] == market.broker.address and b["jobs"] == 1
    assert b["paid"] == 4 * 10**15 and b["fees"] == settled.args["fee"]
    # the settlement call decodes with its struct arguments
    view = tx_view(ex, "0x" + bytes(receipt["transactionHash"]).hex())
    assert view.call is not None and view.call.function == "settleBatch"
    job = view.call.args["jobs"][0]
    assert job["client"] == client.address and [r["start"] for r in job["receipts"]] == [0, 2]
    # a probabilistic payment ticket that wins (p = 1) pays its face value to the node's operator
    rand = secrets.randbits(256)
    ticket = PaymentTicket(
        client.address, market.broker.address, nodes[0].address, 10**15, win_threshold(1.0),
        rand_commitment(rand), 1, market.client.timestamp() + 600,
    )  # fmt: skip
    sig = sign_payment_ticket(client.key, jm.domain(), ticket)
    ev = _one(record(jm.redeem_winning_ticket(op, ticket, sig, rand)), "JobMarket", "TicketRedeemed")
    assert ev.args["client"] == client.address and ev.args["recipient"] == nodes[0].address
    assert ev.args["operator"] == op.address and ev.args["faceValue"] == 10**15
    evs = record(jm.claim(op))
    assert _one(evs, "JobMarket", "Claimed").args == {"account": op.address, "amount": 5 * 10**15}
    assert _one(evs, "DLISToken", "Transfer").args == {"from": jm.address, "to": op.address, "value": 5 * 10**15}
    mf = jm.contract.functions
    ev = _one(
        record(market.client.transact(market.deployer, mf.setFee(300, market.deployer.address))),
        "JobMarket",
        "FeeChanged",
    )
    assert ev.args == {"feeBps": 300, "treasury": market.deployer.address}
    ev = _one(record(registry.deregister(op, nodes[1].address)), "NodeRegistry", "NodeDeregistered")
    assert ev.args == {"node": nodes[1].address, "operator": op.address}
    # a receipt of the deregistered node is forfeited at settlement
    auth, _, receipt = _settle(market, client, nodes, model, [(0, 2), (2, 4)], 8)
    ev = _one(record(receipt), "JobMarket", "ReceiptForfeited")
    assert ev.args == {"jobId": "0x" + auth.job_id.hex(), "node": nodes[1].address, "amount": 2 * 10**15}

    declared = {
        (name, item["name"])
        for name, info in market.client.deployment.contracts.items()
        for item in info.abi
        if item.get("type") == "event"
    }
    assert declared - NEVER_EMITTED - DECODED_ELSEWHERE - seen == set()
    # the event index sees the same events as the receipts did
    scanned = {(e.contract, e.event) for e in ex.market_logs()}
    assert seen <= scanned


def test_claim_shows_internal_token_transfer_and_balances_match(market):
    ex = Explorer(market.client)
    op = market.new_funded_account(1000 * UNIT)
    nodes = [market.enroll_node(op)]
    model = market.registry().publish_model(market.deployer, "one-stage", "QmX", b"\x01" * 32, 2)
    client = market.new_funded_account(10 * UNIT)
    market.market().deposit(client, 5 * UNIT)
    _settle(market, client, nodes, model, [(0, 2)], 1)
    receipt = market.market().claim(op)
    view = tx_view(ex, "0x" + bytes(receipt["transactionHash"]).hex())
    assert view.trace_method in ("debug_traceTransaction", "trace_transaction")
    inner = [c for c in view.internal_calls if c["depth"] == 1]
    assert inner and inner[0]["to_name"] == "DLISToken" and inner[0]["function"] == "transfer"

    for who in (op.address, client.address, nodes[0].address):
        a = address_view(ex, who)
        assert a.dlis == market.token().balance_of(who)
        assert a.eth == market.client.w3.eth.get_balance(who)
        assert a.active_stake == market.staking().info(who).active
        assert a.escrow == market.market().escrow_of(who)
        assert a.claimable_market == market.market().claimable_of(who)
    a = address_view(ex, op.address)
    assert [n.node for n in a.nodes] == [nodes[0].address]
    assert any(r.function == "claim" for r in a.history), "ots_searchTransactionsBefore lists the claim"
    assert address_view(ex, nodes[0].address).node_of == op.address
    blk = block_view(ex, int(receipt["blockNumber"]))
    assert [t.function for t in blk.txs] == ["claim"]


def test_reverted_transaction_shows_custom_error(market):
    ex = Explorer(market.client)
    nobody = market.new_funded_account(0)
    fn = market.staking().contract.functions.claim()
    tx = fn.build_transaction(
        {
            "from": nobody.address,
            "gas": 200_000,
            "nonce": market.client.w3.eth.get_transaction_count(nobody.address),
            "chainId": market.client.chain_id,
        }
    )
    signed = nobody.sign_transaction(tx)
    h = market.client.w3.eth.send_raw_transaction(signed.raw_transaction)
    rec = market.client.w3.eth.wait_for_transaction_receipt(h)
    assert rec["status"] == 0
    view = tx_view(ex, "0x" + bytes(h).hex())
    assert view.status == 0 and view.call is not None and view.call.function == "claim"
    assert view.error is not None and view.error.error == "StakingManagerNothingToClaim"
    assert view.error.args == {"account": nobody.address}


def test_coverage_marks_gaps_and_stacks_replicas():
    cov = coverage(30, [Span(0, 10, "a"), Span(0, 10, "b"), Span(10, 20, "c"), Span(25, 30, "d")])
    assert cov.gaps == [(20, 25)] and not cov.complete
    assert [[s.node for s in row] for row in cov.rows] == [["a", "c", "d"], ["b"]]
    assert cov.replicas[0] == 2 and cov.replicas[15] == 1 and cov.replicas[22] == 0
    assert coverage(2, [Span(0, 2, "x")]).complete
