"""The Python bindings against the real contracts on Anvil: typed data, preflights, reverts."""

from __future__ import annotations

import secrets

import pytest
from eth_account import Account
from eth_utils import keccak

from dlis_market.chain import typed_data
from dlis_market.chain.errors import ContractRevertError, PreflightError
from dlis_market.chain.job_market import (
    JobAuthorization,
    Receipt,
    SignedJob,
    SignedReceipt,
    sign_authorization,
    sign_receipt,
)
from dlis_market.chain.node_registry import Capability, DeviceClass
from dlis_market.types import model_id
from tests.integration.conftest import DEV_PUBLISHER

UNIT = 10**18
MODEL = bytes.fromhex(model_id("smollm2-135m", DEV_PUBLISHER)[2:])


def test_typehashes_match_solidity(market):
    jm = market.market().contract.functions
    assert bytes(jm.JOB_AUTHORIZATION_TYPEHASH().call()) == typed_data.type_hash("JobAuthorization")
    assert bytes(jm.RECEIPT_TYPEHASH().call()) == typed_data.type_hash("Receipt")
    reg = market.registry().contract.functions
    assert bytes(reg.NODE_BINDING_TYPEHASH().call()) == typed_data.type_hash("NodeBinding")


def test_domain_separator_matches(market):
    jm = market.market()
    d = jm.domain()
    expected = keccak(
        keccak(text="EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")
        + keccak(text=d.name)
        + keccak(text=d.version)
        + d.chain_id.to_bytes(32, "big")
        + bytes(12)
        + bytes.fromhex(d.verifying_contract[2:])
    )
    assert bytes(jm.contract.functions.domainSeparator().call()) == expected


def test_revert_becomes_typed_error_with_args(market):
    op = market.new_funded_account(500 * UNIT)
    staking = market.staking()
    staking.stake(op, 200 * UNIT)
    with pytest.raises(ContractRevertError) as err:
        # bypass the preflight to hit the contract's own check
        market.client.transact(op, staking.contract.functions.requestUnstake(300 * UNIT))
    assert err.value.error == "StakingManagerInsufficientStake"
    assert err.value.error_args == {"requested": 300 * UNIT, "available": 200 * UNIT}
    assert "request at most your active stake" in str(err.value)


def test_stake_unbond_withdraw_respects_period(market):
    op = market.new_funded_account(500 * UNIT)
    staking, token = market.staking(), market.token()
    staking.stake(op, 300 * UNIT)
    staking.request_unstake(op, 100 * UNIT)
    info = staking.info(op.address)
    assert (info.active, info.unbonding) == (200 * UNIT, 100 * UNIT)
    nonce = market.client.w3.eth.get_transaction_count(op.address)
    with pytest.raises(PreflightError, match="s left"):
        staking.withdraw(op)
    assert market.client.w3.eth.get_transaction_count(op.address) == nonce  # nothing was sent
    market.increase_time(3601)
    before = token.balance_of(op.address)
    staking.withdraw(op)
    assert token.balance_of(op.address) == before + 100 * UNIT
    assert staking.info(op.address).unbonding == 0


def test_register_requires_stake_and_valid_binding(market):
    op = market.new_funded_account(500 * UNIT)
    registry = market.registry()
    node = Account.create()
    deadline = market.client.timestamp() + 600
    cap = Capability(4096, 50, 100, DeviceClass.PHONE)
    binding = registry.sign_binding(node, op.address, "12D3KooWnode", deadline)
    with pytest.raises(PreflightError, match="minimum is 100"):
        registry.register(op, node.address, "12D3KooWnode", "/ip4/127.0.0.1/tcp/1", cap, bytes(32), binding, deadline)
    market.staking().stake(op, 100 * UNIT)
    impostor = Account.create()
    forged = registry.sign_binding(impostor, op.address, "12D3KooWnode", deadline)
    with pytest.raises(ContractRevertError) as err:
        registry.register(op, node.address, "12D3KooWnode", "/ip4/127.0.0.1/tcp/1", cap, bytes(32), forged, deadline)
    assert err.value.error == "NodeRegistryInvalidBinding"
    assert registry.get(node.address) is None
    registry.register(op, node.address, "12D3KooWnode", "/ip4/127.0.0.1/tcp/1", cap, bytes(32), binding, deadline)
    rec = registry.get(node.address)
    assert rec is not None and rec.routable and rec.operator == op.address
    assert rec.capability == cap


def test_slash_below_minimum_makes_node_unroutable(market):
    op = market.new_funded_account(500 * UNIT)
    node = market.enroll_node(op, stake=150 * UNIT)
    registry, staking = market.registry(), market.staking()
    assert registry.get(node.address).routable
    reporter = Account.create().address
    staking.slash(market.oracle, op.address, 60 * UNIT, keccak(text="evidence-1"), reporter)
    assert staking.info(op.address).active == 90 * UNIT
    assert not registry.get(node.address).routable
    assert staking.claimable(reporter) == 30 * UNIT  # 50 % reporter share by default


def _three_stage_job(market, client, nodes, nonce, amount=UNIT // 100, max_cost=UNIT):
    jm = market.market()
    dom = jm.domain()
    auth = JobAuthorization(
        client.address, market.broker.address, MODEL, max_cost, nonce, market.client.timestamp() + 600
    )
    receipts = []
    for (start, end), node in zip([(0, 10), (10, 20), (20, 30)], nodes, strict=True):
        r = Receipt(auth.job_id, MODEL, start, end, 16, secrets.token_bytes(32), amount)
        receipts.append(SignedReceipt(r, sign_receipt(node.key, dom, r)))
    return SignedJob(auth, sign_authorization(client.key, dom, auth), receipts)


@pytest.fixture()
def priced_market(market):
    ops = [market.new_funded_account(1000 * UNIT) for _ in range(3)]
    nodes = [market.enroll_node(o) for o in ops]
    market.registry().publish_model(market.deployer, "smollm2-135m", "QmManifest", b"\x11" * 32, 30)
    client = market.new_funded_account(100 * UNIT)
    market.market().deposit(client, 10 * UNIT)
    return market, ops, nodes, client


def test_settlement_moves_exact_amounts_and_never_twice(priced_market):
    market, ops, nodes, client = priced_market
    jm = market.market()
    fee_bps = jm.fee_bps()
    jobs = [_three_stage_job(market, client, nodes, nonce) for nonce in (1, 2)]
    cost = sum(j.cost() for j in jobs)
    fee = sum(j.cost() * fee_bps // 10_000 for j in jobs)
    escrow0 = jm.escrow_of(client.address)
    treasury0 = jm.claimable_of(market.deployment_treasury())
    jm.settle_batch(market.broker, b"\x01" * 32, jobs)
    assert jm.escrow_of(client.address) == escrow0 - cost - fee
    for op in ops:
        assert jm.claimable_of(op.address) == 2 * (UNIT // 100)
    assert jm.claimable_of(market.deployment_treasury()) == treasury0 + fee
    assert jm.nonce_used(client.address, 1) and jm.batch_settled(market.broker.address, b"\x01" * 32)

    with pytest.raises(ContractRevertError) as err:
        jm.settle_batch(market.broker, b"\x02" * 32, jobs[:1])
    assert err.value.error == "JobMarketJobAlreadySettled"
    assert jm.escrow_of(client.address) == escrow0 - cost - fee

    token = market.token()
    before = token.balance_of(ops[0].address)
    jm.claim(ops[0])
    assert token.balance_of(ops[0].address) == before + 2 * (UNIT // 100)
    with pytest.raises(PreflightError, match="nothing to claim"):
        jm.claim(ops[0])


def test_forged_signatures_are_refused(priced_market):
    market, _, nodes, client = priced_market
    jm = market.market()
    outsider = Account.create()
    forged_node = _three_stage_job(market, client, [nodes[0], outsider, nodes[2]], nonce=7)
    with pytest.raises(ContractRevertError) as err:
        jm.settle_batch(market.broker, b"\x03" * 32, [forged_node])
    assert err.value.error == "JobMarketNodeNotRoutable"
    assert err.value.error_args["receiptIndex"] == 1

    good = _three_stage_job(market, client, nodes, nonce=8)
    not_client = SignedJob(
        good.authorization, sign_authorization(outsider.key, jm.domain(), good.authorization), good.receipts
    )
    with pytest.raises(ContractRevertError) as err:
        jm.settle_batch(market.broker, b"\x04" * 32, [not_client])
    assert err.value.error == "JobMarketInvalidClientSignature"
    assert not jm.nonce_used(client.address, 8)


def test_insufficient_escrow_is_a_preflight_error(priced_market):
    market, _, nodes, client = priced_market
    jm = market.market()
    big = _three_stage_job(market, client, nodes, nonce=9, amount=5 * UNIT, max_cost=100 * UNIT)
    with pytest.raises(PreflightError, match="escrow"):
        jm.settle_batch(market.broker, b"\x05" * 32, [big])


def test_standing_spender_authorization_is_capped_and_expires(priced_market):
    market, _ops, nodes, client = priced_market
    jm = market.market()
    spender = Account.create()
    cap = 4 * (UNIT // 100) * 103 // 100  # room for a bit more than one 3-stage job (3 x 0.01 + fee)
    jm.set_spender(client, spender.address, cap, market.client.timestamp() + 3600)
    assert jm.spender_of(client.address, spender.address)[0] == cap

    def by_spender(nonce):
        job = _three_stage_job(market, client, nodes, nonce)
        return SignedJob(
            job.authorization, sign_authorization(spender.key, jm.domain(), job.authorization), job.receipts
        )

    jm.settle_batch(market.broker, b"\x10" * 32, [by_spender(40)])
    spent = 3 * (UNIT // 100) + jm.fee_for(3 * (UNIT // 100))
    assert jm.spender_of(client.address, spender.address)[0] == cap - spent
    with pytest.raises(ContractRevertError) as err:
        jm.settle_batch(market.broker, b"\x11" * 32, [by_spender(41)])
    assert err.value.error == "JobMarketSpenderCapExceeded"

    jm.set_spender(client, spender.address, 10 * UNIT, market.client.timestamp() + 60)
    market.increase_time(120)
    with pytest.raises(ContractRevertError) as err:
        jm.settle_batch(market.broker, b"\x12" * 32, [by_spender(42)])
    assert err.value.error == "JobMarketSpenderExpired"
    assert not jm.nonce_used(client.address, 42)


def test_withdrawal_window_and_authorization_lifetime(priced_market):
    market, _ops, nodes, client = priced_market
    jm = market.market()
    assert (jm.withdraw_window(), jm.max_authorization_lifetime()) == (3600, 1800)  # tests/integration/conftest.py
    assert jm.pending_withdrawal(client.address) == (0, 0, 0)
    receipt = jm.request_withdrawal(client, UNIT)
    ready = market.client.w3.eth.get_block(receipt["blockNumber"])["timestamp"] + 3600
    assert jm.pending_withdrawal(client.address) == (UNIT, ready, ready + 3600)
    market.increase_time(3600 + 3600 + 10)
    with pytest.raises(ContractRevertError) as err:
        jm.withdraw(client)
    assert err.value.error == "JobMarketWithdrawalExpired" and "request the withdrawal again" in str(err.value)
    job = _three_stage_job(market, client, nodes, nonce=50)
    far = JobAuthorization(**{**job.authorization.__dict__, "deadline": market.client.timestamp() + 1800 + 120})
    long_job = SignedJob(far, sign_authorization(client.key, jm.domain(), far), job.receipts)
    with pytest.raises(ContractRevertError) as err:
        jm.settle_batch(market.broker, b"\x20" * 32, [long_job])
    assert err.value.error == "JobMarketAuthorizationTooLong" and err.value.error_args["deadline"] == far.deadline


def test_set_spender_is_compare_and_set_and_revoke_clears(priced_market):
    market, _ops, _nodes, client = priced_market
    jm = market.market()
    spender = Account.create().address
    jm.set_spender(client, spender, 5 * UNIT, market.client.timestamp() + 3600)
    with pytest.raises(ContractRevertError) as err:  # the caller's view of the remaining cap is stale
        jm.set_spender(client, spender, UNIT, market.client.timestamp() + 3600, expected_remaining=4 * UNIT)
    assert err.value.error == "JobMarketSpenderChanged" and err.value.error_args["remaining"] == 5 * UNIT
    jm.set_spender(client, spender, UNIT, market.client.timestamp() + 3600)
    assert jm.spender_of(client.address, spender)[0] == UNIT
    jm.revoke_spender(client, spender)
    assert jm.spender_of(client.address, spender) == (0, 0)
