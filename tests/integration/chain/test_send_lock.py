"""Two threads of one process sending from one account (the broker's settler and its proof
recorder) never take the same nonce: ChainClient reads the nonce and sends under a per-account lock.
The nonce read is slowed here so that, without the lock, both threads would read the same one."""

from __future__ import annotations

import threading
import time

UNIT = 10**18


def test_threads_sending_from_one_account_take_distinct_nonces(market, monkeypatch) -> None:
    eth = market.client.w3.eth
    count = eth.get_transaction_count

    def slow_count(*args, **kwargs):
        n = count(*args, **kwargs)
        time.sleep(0.05)  # another thread reads the same pending count meanwhile, unless locked out
        return n

    monkeypatch.setattr(eth, "get_transaction_count", slow_count)
    token = market.token()
    payees = [market.new_funded_account(0).address for _ in range(2)]
    errors: list[BaseException] = []

    def send(to: str) -> None:
        try:
            for _ in range(4):
                token.transfer(market.deployer, to, UNIT)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(p,)) for p in payees]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [token.balance_of(p) for p in payees] == [4 * UNIT, 4 * UNIT]
