"""Who may open sessions on this worker: accounts holding BROKER_ROLE on the JobMarket.

A session ticket (``protocol/tickets.py``) names its signer; :class:`BrokerCheck` says whether
that signer is a broker: an address in ``node.trusted_brokers``, or one JobMarket's ``hasRole``
confirms on chain (both answers cached ``node.broker_cache_s``). A worker with no market address
and no trusted brokers (a dev swarm without a chain) accepts any signer; :attr:`open_mode` says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from web3 import Web3
from web3.exceptions import Web3Exception

from dlis_market.chain.client import connect_web3
from dlis_market.errors import ChainError
from dlis_market.protocol.errors import TicketError
from dlis_market.settings import Settings

_ABI: list[dict[str, Any]] = [
    {"type": "function", "name": "BROKER_ROLE", "stateMutability": "view", "inputs": [],
     "outputs": [{"name": "", "type": "bytes32"}]},
    {"type": "function", "name": "hasRole", "stateMutability": "view",
     "inputs": [{"name": "role", "type": "bytes32"}, {"name": "account", "type": "address"}],
     "outputs": [{"name": "", "type": "bool"}]},
]  # fmt: skip


class BrokerCheck:
    def __init__(
        self,
        settings: Settings,
        clock: Callable[[], float] = time.monotonic,
        lookup: Callable[[str], bool] | None = None,
    ) -> None:
        node = settings.node
        self.trusted = {a.lower() for a in node.trusted_brokers}
        self.market = node.market_address
        self.rpc_url = settings.chain.rpc_url
        self.ttl_s = node.broker_cache_s
        self.clock = clock
        self._lookup = lookup
        self._cache: dict[str, tuple[float, bool]] = {}
        self._role: bytes | None = None
        self._contract: Any = None

    @property
    def on_chain(self) -> bool:
        return int(self.market, 16) != 0

    @property
    def open_mode(self) -> bool:
        return not self.on_chain and not self.trusted

    def _has_role(self, account: str) -> bool:
        if self._lookup is not None:
            return self._lookup(account)
        if self._contract is None:
            w3 = connect_web3(self.rpc_url, 10.0)
            self._contract = w3.eth.contract(address=Web3.to_checksum_address(self.market), abi=_ABI)
            self._role = bytes(self._contract.functions.BROKER_ROLE().call())
        return bool(self._contract.functions.hasRole(self._role, Web3.to_checksum_address(account)).call())

    def is_broker(self, account: str) -> bool:
        """Blocking on a cache miss (one chain call): run it off the event loop."""
        key = account.lower()
        if key in self.trusted or self.open_mode:
            return True
        if not self.on_chain:
            return False
        hit = self._cache.get(key)
        now = self.clock()
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1]
        try:
            ok = self._has_role(account)
        except (ChainError, Web3Exception, ValueError, OSError) as exc:  # web3 and requests errors: chain unreachable
            raise TicketError(
                f"cannot check BROKER_ROLE of {account} on JobMarket {self.market} ({exc}); retry later"
            ) from exc
        self._cache[key] = (now, ok)
        return ok

    def cached(self, account: str) -> bool | None:
        """The answer without a chain call, when it is known."""
        key = account.lower()
        if key in self.trusted or self.open_mode:
            return True
        hit = self._cache.get(key)
        return hit[1] if hit is not None and self.clock() - hit[0] < self.ttl_s else None
