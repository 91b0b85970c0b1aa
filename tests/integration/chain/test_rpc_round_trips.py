"""Every contract read and transaction of the broker, the settler, the oracle and the workers goes
through `connect_web3`. web3's validation middleware asks the node for its chain id before each
eth_call, eth_estimateGas and eth_sendTransaction; the connection keeps the answer, so a read is
one round trip, not two."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from dlis_market.chain.anvil import AnvilProcess, free_port
from dlis_market.chain.client import connect_web3

SINK = "0x000000000000000000000000000000000000dEaD"


def test_reads_and_transactions_do_not_ask_the_chain_id_each_time() -> None:
    anvil = AnvilProcess(port=free_port()).start()
    try:
        w3 = connect_web3(anvil.rpc_url)
        sent: Counter[str] = Counter()
        manager = w3.provider._request_session_manager  # type: ignore[attr-defined]
        post = manager.make_post_request

        def counting(uri: str, data: bytes, **kwargs: Any) -> Any:
            sent[json.loads(data)["method"]] += 1
            return post(uri, data, **kwargs)

        manager.make_post_request = counting
        sender = w3.eth.accounts[0]
        for _ in range(5):
            assert w3.eth.call({"to": SINK, "data": "0x"}) == b""
        assert w3.eth.estimate_gas({"from": sender, "to": SINK, "value": 1}) == 21000
        receipt = w3.eth.wait_for_transaction_receipt(w3.eth.send_transaction({"from": sender, "to": SINK, "value": 1}))
        assert receipt["status"] == 1
        assert sent["eth_call"] == 5
        assert sent["eth_chainId"] <= 1, dict(sent)  # 16 on a connection that asks before each call
        assert w3.eth.chain_id == 31337
    finally:
        anvil.stop()
