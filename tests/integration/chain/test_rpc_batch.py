"""Batched static reads (chain/rpc_batch.py) against a real Anvil: the same answers as web3, typed
errors for a dead endpoint, a wrong-sized answer and a function that is not all static words."""

from __future__ import annotations

import pytest
from web3 import Web3

from dlis_market.chain.anvil import free_port
from dlis_market.chain.errors import ChainUnavailableError
from dlis_market.chain.rpc_batch import BatchPoster, StaticCalls
from dlis_market.errors import ChainError

UNIT = 10**18


def test_batch_answers_equal_web3_reads(market):
    jm = market.market()
    client = market.new_funded_account(10 * UNIT)
    jm.deposit(client, 3 * UNIT)
    calls = StaticCalls(jm.contract, ("escrowOf", "pendingWithdrawal", "nonceUsed"))
    poster = BatchPoster(market.client.w3, 10)
    broker = market.broker.address
    asks = [
        calls.request("escrowOf", client.address, broker),
        calls.request("pendingWithdrawal", client.address, broker),
        calls.request("nonceUsed", client.address, 7),
        ("eth_getBlockByNumber", ["latest", False]),
    ]
    escrow, withdrawal, used, block = poster.post(asks)
    assert calls.decode("escrowOf", escrow) == (jm.contract.functions.escrowOf(client.address, broker).call(),)
    assert calls.decode("escrowOf", escrow) == (3 * UNIT,)
    assert calls.decode("pendingWithdrawal", withdrawal) == (0, 0, 0)
    assert calls.decode("nonceUsed", used) == (0,)
    assert int(block["timestamp"], 16) == market.client.timestamp()
    # the kept-alive connection serves the next batch too
    assert calls.decode("escrowOf", poster.post([asks[0]])[0]) == (3 * UNIT,)


def test_refusals_are_typed(market):
    jm = market.market()
    with pytest.raises(ChainError, match="not all static words"):
        StaticCalls(jm.contract, ("settleBatchMerkle",))
    calls = StaticCalls(jm.contract, ("escrowOf",))
    with pytest.raises(ChainError, match="answered 31 bytes, not 32"):
        calls.decode("escrowOf", "0x" + "00" * 31)
    with pytest.raises(ChainError, match="not an address"):
        calls.request("escrowOf", "0x1234", market.broker.address)
    dead = BatchPoster(Web3(Web3.HTTPProvider(f"http://127.0.0.1:{free_port()}")), 2)
    with pytest.raises(ChainUnavailableError, match="did not answer a batch of 1 reads"):
        dead.post([calls.request("escrowOf", market.broker.address, market.broker.address)])
