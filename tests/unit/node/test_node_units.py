"""In-process units of the node package: framing, routing, batching, records, receipts, attestation, identity."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
from eth_account import Account

from dlis_market.chain.job_market import SignedReceipt, market_domain
from dlis_market.chain.typed_data import CompactSignature
from dlis_market.errors import NodeError
from dlis_market.inference.messages import StageInput
from dlis_market.node import attestation, dht_records, identity, receipts
from dlis_market.node.errors import AttestationError, IdentityError, NoRouteError, ProtocolError, ReceiptError
from dlis_market.node.profiler import HardwareProfile
from dlis_market.node.protocol import Channel, OpenBody, pack_frame, parse_body, unpack_frame
from dlis_market.node.routing import choose_range, plan_route
from dlis_market.node.sessions import QueuedStep, plan_batches
from dlis_market.protocol.pricing import route_bound
from dlis_market.protocol.spans import SpanRecord, missing_layers
from dlis_market.types import LayerRange

ZERO = "0x0000000000000000000000000000000000000000"


def span(peer: str, start: int, end: int, throughput: float = 10.0, **kw: Any) -> SpanRecord:
    fields: dict[str, Any] = {
        "model": "m",
        "start": start,
        "end": end,
        "peer_id": peer,
        "node_address": ZERO,
        "throughput": throughput,
        "free_slots": 4,
        "queue_length": 0,
        "price_per_token": 2,
        "attestation_hash": "0x",
    }
    fields.update(kw)
    return SpanRecord(**fields)


# ---------------------------------------------------------------------- protocol


def test_frames_round_trip_and_refuse_bad_versions_and_ops() -> None:
    frame = pack_frame("open", {"x": 1}, rid=3)
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    assert unpack_frame(frame[4:]) == ("open", 3, {"x": 1})
    with pytest.raises(ProtocolError, match="version"):
        unpack_frame(msgpack.packb({"v": 99, "op": "open", "rid": 0, "body": {}}))
    with pytest.raises(ProtocolError, match="bad op"):
        unpack_frame(msgpack.packb({"v": 1, "op": "rm -rf", "rid": 0, "body": {}}))
    with pytest.raises(ProtocolError, match="msgpack"):
        unpack_frame(b"\xc1")
    with pytest.raises(ProtocolError, match="limit"):
        pack_frame("step", {"input": b"x" * 100}, max_bytes=50)
    with pytest.raises(ProtocolError, match="OpenBody"):
        parse_body(OpenBody, {"session_id": 5})


def test_channel_refuses_an_oversized_frame_before_reading_it() -> None:
    async def run() -> list[bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data((10**9).to_bytes(4, "big"))
        sent: list[bytes] = []

        class Writer:
            def write(self, data: bytes) -> None:
                sent.append(data)

            async def drain(self) -> None:
                return None

            def close(self) -> None:
                return None

        async def on_message(*_: Any) -> None:
            raise AssertionError("no message should reach the handler")

        channel = Channel("peer", reader, Writer(), on_message, max_bytes=1024)  # type: ignore[arg-type]
        await asyncio.wait_for(channel.run(), 5)
        assert channel.closed
        return sent

    sent = asyncio.run(run())
    assert len(sent) == 1 and unpack_frame(sent[0][4:])[0] == "error"


def test_a_reply_to_a_peer_that_went_away_ends_its_stream_quietly() -> None:
    """A peer closes its stream while the handler answers it (e.g. a close for a session its
    going away already dropped): the reply cannot be sent, and that ends this stream like any
    other end of stream, not with an error out of the stream handler (on the code before, the
    PeerUnreachableError escaped and hivemind logged it as an unhandled exception)."""

    async def run() -> Channel:
        reader = asyncio.StreamReader()
        reader.feed_data(pack_frame("close", {"session_id": "s"}, rid=7))
        reader.feed_eof()

        class GoneWriter:
            def write(self, data: bytes) -> None:
                return None

            async def drain(self) -> None:
                raise ConnectionResetError("Connection lost")

            def close(self) -> None:
                return None

        async def on_message(channel: Channel, op: str, rid: int, body: dict[str, Any]) -> None:
            await channel.send("error", {"message": "session 's' is not open on this node"}, rid)

        channel = Channel("peer", reader, GoneWriter(), on_message, max_bytes=1024)  # type: ignore[arg-type]
        await asyncio.wait_for(channel.run(), 5)
        return channel

    assert asyncio.run(run()).closed


# ---------------------------------------------------------------------- routing


def test_route_prefers_throughput_and_skips_banned_and_full_peers() -> None:
    spans = [span("a", 0, 2), span("b", 2, 4, 5.0), span("b2", 2, 4, 50.0), span("c", 4, 6), span("x", 0, 6, 1.0)]
    route = plan_route(spans, 0, 6)
    assert [h.peer_id for h in route] == ["a", "b2", "c"]
    assert [h.peer_id for h in plan_route(spans, 0, 6, banned={"b2"})] == ["a", "b", "c"]
    full = [*spans[:2], span("b2", 2, 4, 50.0, free_slots=0), spans[3]]
    assert [h.peer_id for h in plan_route(full, 0, 6)] == ["a", "b", "c"]
    assert route_bound((h.price_per_token for h in route), 10, 0).cost == 3 * 2 * 10


def test_no_route_names_the_missing_layers() -> None:
    spans = [span("a", 0, 2), span("b", 2, 4), span("c", 4, 6)]
    with pytest.raises(NoRouteError, match=r"layers \[2, 4\)") as info:
        plan_route(spans, 0, 6, banned={"b"})
    assert info.value.missing == [(2, 4)]
    assert missing_layers(spans, 0, 8) == [(6, 8)]
    with pytest.raises(NoRouteError, match="no chain"):
        plan_route([span("a", 0, 3), span("b", 2, 6)], 0, 6)


def test_missing_layers_agrees_with_a_layer_by_layer_count() -> None:
    """The one gap finder (driver's no-route message, broker's coverage check) against brute force."""
    import random

    rng = random.Random(7)
    for _ in range(300):
        starts = rng.sample(range(12), rng.randint(0, 5))
        spans = [span(f"p{i}", a, a + rng.randint(1, 5)) for i, a in enumerate(starts)]
        start, end = sorted(rng.sample(range(14), 2))
        covered = {layer for s in spans for layer in range(s.start, s.end)}
        gaps: list[tuple[int, int]] = []
        for layer in range(start, end):
            if layer in covered:
                continue
            if gaps and gaps[-1][1] == layer:
                gaps[-1] = (gaps[-1][0], layer + 1)
            else:
                gaps.append((layer, layer + 1))
        assert missing_layers(spans, start, end) == gaps, (spans, start, end)


def test_auto_range_picks_the_least_served_candidate() -> None:
    candidates = [LayerRange(start=0, end=2), LayerRange(start=2, end=4), LayerRange(start=4, end=6)]
    spans = [span("a", 0, 2, 10), span("b", 2, 4, 30), span("c", 4, 6, 5)]
    assert choose_range(spans, candidates) == candidates[2]
    assert choose_range([], candidates) == candidates[0]


# ---------------------------------------------------------------------- DHT records


def test_records_drop_malformed_offline_and_misfiled_entries(tmp_path: Path) -> None:
    """Only entries stored under the peer's own owner subkey and signed by the named node key count."""
    from hivemind.p2p import P2P, PeerID

    from dlis_market.protocol.spans import sign_span

    @dataclasses.dataclass
    class V:
        value: Any

    def libp2p_key(name: str) -> bytes:
        P2P.generate_identity(str(tmp_path / name))
        return (tmp_path / name).read_bytes()

    domain = attestation.registry_domain(31337, ZERO)
    node = Account.create()
    keys = {name: libp2p_key(name) for name in ("p1", "p3", "p5", "p6", "p7")}
    peers = {name: PeerID.from_identity(k).to_base58() for name, k in keys.items()}
    subs = {name: dht_records.owned_subkey(peers[name], dht_records.owner_validator(k)) for name, k in keys.items()}
    now = time.time()

    def signed(name: str, key: Any = node.key, **kw: Any) -> dict[str, Any]:
        fields = {"node_address": node.address, "attestation_hash": "0x" + "11" * 32, "announced_at": now,
                  "expires_at": now + 30, **kw}  # fmt: skip
        return sign_span(key, domain, span(peers[name], 0, 2, **fields)).model_dump()

    good = V(signed("p1"))
    forger = dht_records.owner_validator(libp2p_key("forger"))
    raw = V(
        {
            subs["p1"]: good,
            peers["p1"]: V(signed("p1", price_per_token=0)),  # bare peer id: anyone could have stored it
            peers["p1"].encode() + forger.local_public_key: V(signed("p1", price_per_token=0)),  # forger's owner key
            subs["p3"]: V(signed("p3", online=False)),
            subs["p5"]: V(span(peers["p5"], 0, 2).model_dump()),  # unsigned
            subs["p6"]: V(signed("p6", key=Account.create().key)),  # signed by another key
            subs["p7"]: V(signed("p7", announced_at=now - 60, expires_at=now - 30)),  # expired
            b"junk": V({"model": "m"}),
        }
    )
    assert dht_records.parse_records("m", raw, domain) == [SpanRecord.model_validate(good.value["record"])]
    assert dht_records.parse_records("other", raw, domain) == []
    assert dht_records.parse_records("m", None, domain) == []


# ---------------------------------------------------------------------- batching


def test_batches_merge_sessions_and_refuse_bad_ones_alone() -> None:
    def step(sid: str, pos: int, n: int = 1) -> QueuedStep:
        return QueuedStep(StageInput((sid,), (pos,), 0, token_ids=torch.ones(1, n, dtype=torch.long)), "r", "s")

    def check(inp: StageInput) -> None:
        if "bad" in inp.session_ids:
            raise NodeError("session 'bad' is not open")

    queued = [step("s1", 4), step("s2", 7), step("bad", 0), step("s3", 0, 5), step("s1", 5)]
    batches, refused, deferred = plan_batches(queued, check, max_sessions=8)
    assert sorted(len(b.steps) for b in batches) == [1, 2]
    merged = next(b for b in batches if len(b.steps) == 2).merged()
    assert merged.session_ids == ("s1", "s2") and merged.positions == (4, 7)
    assert [r[0].inp.session_ids for r in refused] == [("bad",)]
    assert [d.inp.session_ids for d in deferred] == [("s1",)]


# ---------------------------------------------------------------------- receipts


def test_receipts_verify_and_forgeries_are_detected() -> None:
    node = Account.create()
    domain = market_domain(31337, "0x00000000000000000000000000000000000000aa")
    ledger = receipts.ReceiptLedger(secrets.token_bytes(32), secrets.token_bytes(32), 0, 2, price_per_token=3)
    ledger.record(5, b"hidden-states")
    ledger.record(1, b"more")
    signed = receipts.sign(ledger, bytes(node.key), domain)
    assert signed.receipt.tokens == 6 and signed.receipt.amount == 18
    back = receipts.from_wire(receipts.to_wire(signed))
    receipts.verify_receipt(domain, back, node.address)

    altered = SignedReceipt(dataclasses.replace(back.receipt, amount=10**18), back.signature)
    with pytest.raises(ReceiptError, match="forged or altered"):
        receipts.verify_receipt(domain, altered, node.address)
    other = receipts.sign(ledger, bytes(Account.create().key), domain)
    with pytest.raises(ReceiptError, match="not by the stage's node key"):
        receipts.verify_receipt(domain, other, node.address)
    wrong_domain = market_domain(1, "0x00000000000000000000000000000000000000aa")
    with pytest.raises(ReceiptError):
        receipts.verify_receipt(wrong_domain, signed, node.address)
    junk = SignedReceipt(back.receipt, CompactSignature.from_bytes(b"\x01" * 65))
    with pytest.raises(ReceiptError):
        receipts.verify_receipt(domain, junk, node.address)
    with pytest.raises(ReceiptError, match="malformed"):
        receipts.from_wire({"job_id": b"short"})


# ---------------------------------------------------------------------- attestation


def _report(node: Any, **kw: Any) -> attestation.AttestationReport:
    hw = HardwareProfile(
        gemm_flops=1e9, memory_bandwidth=1e9, free_memory=1 << 30, layer_latency_s=1e-3, threads=1,
        device="cpu", measured_at=time.time(),
    )  # fmt: skip
    fields: dict[str, Any] = {
        "peer_id": "QmPeer",
        "node_address": node.address,
        "code_hash": attestation.code_hash(),
        "model": "m",
        "start": 0,
        "end": 2,
        "shards": {"stage-0.safetensors": "ab" * 32},
        "hardware": hw,
        "timestamp": int(time.time()),
    }
    fields.update(kw)
    return attestation.AttestationReport(**fields)


def test_attestation_verifies_and_each_forged_field_is_named() -> None:
    node = Account.create()
    domain = attestation.registry_domain(31337, ZERO)
    signed = attestation.sign_report(bytes(node.key), domain, _report(node))
    expect = {"peer_id": "QmPeer", "code": attestation.code_hash(), "shards": {"stage-0.safetensors": "ab" * 32}}
    digest = attestation.verify_report(signed, domain, **expect)
    assert digest == signed.report.report_hash() and len(digest) == 32
    # Round trip through the wire form the worker answers with.
    assert attestation.parse_signed(signed.model_dump()) == signed

    def forged(**changes: Any) -> attestation.SignedAttestation:
        return signed.model_copy(update={"report": signed.report.model_copy(update=changes)})

    cases = {
        "signature": forged(code_hash="00" * 32),  # altered after signing
        "peer_id": attestation.sign_report(bytes(node.key), domain, _report(node, peer_id="QmOther")),
        "code_hash": attestation.sign_report(bytes(node.key), domain, _report(node, code_hash="11" * 32)),
        "shards": attestation.sign_report(bytes(node.key), domain, _report(node, shards={"x": "00"})),
        "timestamp": attestation.sign_report(bytes(node.key), domain, _report(node, timestamp=1)),
    }
    for field_name, bad in cases.items():
        with pytest.raises(AttestationError, match=f"invalid attestation: {field_name}"):
            attestation.verify_report(bad, domain, **expect)
    impostor = Account.create()
    stolen = attestation.SignedAttestation(
        report=_report(node), signature=attestation.sign_report(bytes(impostor.key), domain, _report(node)).signature
    )
    with pytest.raises(AttestationError, match="invalid attestation: signature"):
        attestation.verify_report(stolen, domain)
    with pytest.raises(AttestationError, match="invalid attestation: signature"):
        attestation.verify_report(signed, attestation.registry_domain(1, ZERO))
    with pytest.raises(AttestationError, match=r"invalid attestation: report"):
        attestation.parse_signed({"report": {"peer_id": 3}, "signature": b""})


# ---------------------------------------------------------------------- identity


def test_identity_is_created_once_encrypted_and_reloaded(tmp_path: Path) -> None:
    first = identity.load_or_create(tmp_path, "pw", scrypt_n=2**10)
    again = identity.load_or_create(tmp_path, "pw", scrypt_n=2**10)
    assert (first.address, first.peer_id) == (again.address, again.peer_id)
    assert first.peer_id.startswith("Qm")
    blob = (tmp_path / identity.P2P_KEY_FILE).read_bytes()
    assert first.p2p_key not in blob
    with first.key_file() as path:
        assert Path(path).read_bytes() == first.p2p_key
        assert Path(path).stat().st_mode & 0o077 == 0
    assert not Path(path).exists()
    with pytest.raises(IdentityError, match="wrong password"):
        identity.load_or_create(tmp_path, "wrong", scrypt_n=2**10)
    with pytest.raises(IdentityError, match="empty password"):
        identity.load_or_create(tmp_path / "new", "", scrypt_n=2**10)


def test_driver_takes_a_sessions_answers_only_from_its_own_stages() -> None:
    from types import SimpleNamespace

    from dlis_market.node.driver import PipelineDriver
    from dlis_market.settings import NodeSettings

    async def run() -> None:
        pool = SimpleNamespace(peer_id="driver", dead_peer_callbacks=[])
        driver = PipelineDriver(dht=None, pool=pool, settings=NodeSettings())  # type: ignore[arg-type]
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        driver._waiters["s1"] = (fut, frozenset({"stage-a", "stage-b"}))
        driver._resolve("s1", value=7, sender="intruder")  # another job's stage, or anyone
        driver._resolve("s1", error=NodeError("made up"), sender="intruder")
        assert not fut.done()
        driver._resolve("s1", value=42, sender="stage-b")
        assert fut.result() == 42

    asyncio.run(run())
