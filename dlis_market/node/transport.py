"""hivemind DHT + libp2p streams, loopback only, and a pool of persistent channels per peer.

Every worker and driver runs one hivemind DHT (its own p2pd daemon) and a replica of its P2P
instance for streams, so DHT records and streams share one peer id. The daemon is started with
Noise only (no TLS), no relay (client or service), no auto relay, no AutoNAT, no NAT port mapping,
no IPFS bootstrap, listening on ``/ip4/127.0.0.1/tcp/0``: nothing leaves loopback unless the user
passes other addresses. Opening a libp2p stream costs ~7 ms on loopback against ~0.7 ms for a
message on an open one, so each peer pair keeps one stream per direction for all sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P, PeerID

from dlis_market.node.errors import PeerUnreachableError
from dlis_market.node.protocol import PROTOCOL_NAME, Channel, Handler

log = logging.getLogger(__name__)

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def p2p_options(host_maddrs: Sequence[str] = (LOOPBACK,)) -> dict[str, Any]:
    """Keyword arguments for hivemind.DHT / P2P.create that keep the daemon private."""
    return {
        "host_maddrs": list(host_maddrs),
        "tls": False,  # Noise stays on (p2pd default); TLS would only add a second handshake option
        "use_relay": False,
        "use_auto_relay": False,
        "auto_nat": False,
        "nat_port_map": False,
        "use_ipfs": False,
        "check_if_identity_free": False,  # would start a second daemon to probe the swarm
    }


def start_dht(
    initial_peers: Sequence[str],
    *,
    client_mode: bool,
    identity_path: str | None = None,
    host_maddrs: Sequence[str] = (LOOPBACK,),
    validator: RSASignatureValidator | None = None,
) -> hivemind.DHT:
    """A DHT node that runs hivemind's owner-signature validator on every record it stores or
    receives (``node/dht_records.py``); ``validator`` carries the key a worker signs its own with."""
    kwargs = p2p_options(host_maddrs)
    if identity_path is not None:
        kwargs["identity_path"] = identity_path
    return hivemind.DHT(
        initial_peers=list(initial_peers) or None,
        start=True,
        client_mode=client_mode,
        record_validators=[validator or RSASignatureValidator()],
        **kwargs,
    )


class ChannelPool:
    """Outgoing channels by peer id (one persistent stream each) plus the incoming handler."""

    def __init__(self, p2p: P2P, on_message: Handler, max_bytes: int) -> None:
        self.p2p = p2p
        self.peer_id = p2p.peer_id.to_base58()
        self._on_message = on_message
        self.max_bytes = max_bytes
        self._out: dict[str, Channel] = {}
        self._opening: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.dead_peer_callbacks: list[Any] = []
        # called with a peer id when the last incoming stream from that peer ends (it closed or died)
        self.gone_peer_callbacks: list[Callable[[str], None]] = []
        self._incoming: dict[str, int] = {}

    async def serve(self) -> None:
        """Accept incoming streams of the dlis protocol."""

        async def handle(info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peer = info.peer_id.to_base58()
            channel = Channel(peer, reader, writer, self._on_message, self.max_bytes)
            self._incoming[peer] = self._incoming.get(peer, 0) + 1
            try:
                await channel.run()
            finally:
                left = self._incoming.pop(peer, 1) - 1
                if left > 0:
                    self._incoming[peer] = left
                else:
                    for callback in self.gone_peer_callbacks:
                        callback(peer)

        await self.p2p.add_binary_stream_handler(PROTOCOL_NAME, handle)

    def _spawn(self, channel: Channel) -> None:
        task = asyncio.create_task(channel.run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _closed(self, channel: Channel) -> None:
        if self._out.get(channel.peer) is channel:
            del self._out[channel.peer]
            for callback in self.dead_peer_callbacks:
                callback(channel.peer)

    async def get(self, peer: str, timeout_s: float = 10.0) -> Channel:
        channel = self._out.get(peer)
        if channel is not None and not channel.closed:
            return channel
        lock = self._opening.setdefault(peer, asyncio.Lock())
        async with lock:
            channel = self._out.get(peer)
            if channel is not None and not channel.closed:
                return channel
            try:
                pid = PeerID.from_base58(peer)
                _, reader, writer = await asyncio.wait_for(
                    self.p2p.call_binary_stream_handler(pid, PROTOCOL_NAME), timeout_s
                )
            except (TimeoutError, ConnectionError, OSError, ValueError) as exc:
                raise PeerUnreachableError(f"cannot open a stream to {peer}: {exc!r}", peer) from exc
            except Exception as exc:  # p2pd reports dial failures as its own ControlFailure type
                raise PeerUnreachableError(f"cannot open a stream to {peer}: {exc!r}", peer) from exc
            channel = Channel(peer, reader, writer, self._on_message, self.max_bytes, on_closed=self._closed)
            self._out[peer] = channel
            self._spawn(channel)
            return channel

    async def send(self, peer: str, op: str, body: dict[str, Any]) -> None:
        channel = await self.get(peer)
        await channel.send(op, body)

    async def request(self, peer: str, op: str, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        channel = await self.get(peer, timeout_s)
        return await channel.request(op, body, timeout_s)

    async def close(self) -> None:
        for channel in list(self._out.values()):
            channel.close()
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
