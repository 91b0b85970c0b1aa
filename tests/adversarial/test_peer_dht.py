"""A peer forges the DHT announcement of an honest worker (price 0, offline, no slots).

Real worker processes announce on a real hivemind DHT; the forger is another DHT peer that stores
its records straight into the swarm: under the honest worker's exact subkey (copied from the
DHT), under the bare peer id, and under the peer id with its *own* owner key. The driver (the
broker's client side, with the broker's chain check that the node is registered under the
announced peer id) must still see the honest worker at its real price, route a job through it and
accept its receipts.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time

sys.path.insert(0, str(Path(__file__).parents[1] / "integration" / "node"))
from node_helpers import Swarm, _wait_ready, register_worker, tiny_shards, wait_for_spans  # type: ignore[import-not-found]

from dlis_market.broker.p2p_backend import RegisteredPeers
from dlis_market.chain.devnet import LocalMarket
from dlis_market.node.dht_records import spans_key
from dlis_market.node.driver import JobSpec, PipelineDriver
from dlis_market.node.transport import p2p_options
from dlis_market.settings import NodeSettings

MODEL = "tiny-forged"


def forged_record(honest: Any, now: float) -> dict[str, Any]:
    fields = honest.model_dump()
    fields.update(price_per_token=0, free_slots=0, online=False, throughput=1e9, announced_at=now + 5)
    if "expires_at" in fields:
        fields["expires_at"] = now + 60
    return fields


def wait_ready(w: Any) -> dict[str, Any]:
    return _wait_ready(w.proc, 240, w.log_path)  # type: ignore[no-any-return]


def test_forged_span_record_neither_displaces_nor_reprices_the_honest_worker(
    market: LocalMarket, tmp_path: Path
) -> None:
    shards = tiny_shards(tmp_path, [(0, 3), (3, 6)], name=MODEL)
    dep = market.client.deployment
    chain = ["--registry", dep.address_of("NodeRegistry"), "--market", dep.address_of("JobMarket")]
    chain += ["--chain-id", str(market.client.chain_id), "--publisher", market.deployer.address]
    settings = NodeSettings(
        chain_id=market.client.chain_id, registry_address=dep.address_of("NodeRegistry"),
        market_address=dep.address_of("JobMarket"), step_timeout_s=30.0, request_timeout_s=15.0,
    )  # fmt: skip
    with Swarm(tmp_path / "swarm", env={"DLIS_CHAIN__RPC_URL": market.settings.chain.rpc_url}) as swarm:
        victim = swarm.launch(shards, "0:3", "victim", *chain)
        other = swarm.launch(shards, "3:6", "other", *chain)
        for w in (victim, other):
            w.info = wait_ready(w)
            register_worker(market, w)
        forger_validator = RSASignatureValidator(hivemind.utils.crypto.RSAPrivateKey())
        forger = hivemind.DHT(
            initial_peers=swarm.initial_peers, start=True, client_mode=False,
            record_validators=[forger_validator], **p2p_options(),
        )  # fmt: skip

        async def run() -> None:
            checked = RegisteredPeers(market.registry())
            driver = await PipelineDriver.create(swarm.initial_peers, settings, bytes(market.broker.key), checked)
            try:
                spans = await wait_for_spans(driver, MODEL, 2)
                honest = next(s for s in spans if s.peer_id == victim.peer_id)
                price = honest.price_per_token
                assert price > 0

                # The attack: overwrite the victim's record under every subkey it could be read from.
                now = time.time()
                key = spans_key(MODEL)
                raw = forger.get(key, latest=True)
                subkeys = list(raw.value) if raw is not None else []
                fake = forged_record(honest, now)
                bad_sig = {"record": fake, "signature": secrets.token_bytes(65)}
                stored = []
                for i, sub in enumerate([*subkeys, victim.peer_id]):
                    value = fake if sub == victim.peer_id else bad_sig
                    stored.append(forger.store(key, value, get_dht_time() + 60 + i, subkey=sub))
                own = victim.peer_id.encode() + forger_validator.local_public_key  # signed with the forger's key
                stored.append(forger.store(key, bad_sig, get_dht_time() + 60, subkey=own))
                print("forger stores accepted:", stored)

                # The honest worker re-announces (every 2 s here); the driver must see that announcement,
                # at the signed price, and nothing the forger wrote.
                deadline = time.monotonic() + 30
                seen: list[Any] = []
                while time.monotonic() < deadline:
                    # bounded: on the old code the forged entries made every DHT read hang
                    spans = await asyncio.wait_for(driver.discover(MODEL), 20)
                    seen = [s for s in spans if s.peer_id == victim.peer_id]
                    if seen and seen[0].announced_at > now + 1:
                        break
                    await asyncio.sleep(0.5)
                assert len(seen) == 1, f"the honest worker vanished from the DHT after the forgery: {seen}"
                assert seen[0].online and seen[0].free_slots > 0 and seen[0].price_per_token == price, seen[0]
                assert seen[0].announced_at > now + 1, "the honest worker's re-announcement was not seen"

                tokens, receipts = await driver.generate(JobSpec(model=MODEL, prompt_ids=[1, 2, 3], max_new_tokens=4))
                assert len(tokens) == 4
                assert {r.peer_id for r in receipts} == {victim.peer_id, other.peer_id}, receipts
                victim_receipt = next(r for r in receipts if r.peer_id == victim.peer_id).signed.receipt
                assert victim_receipt.amount == price * victim_receipt.tokens > 0
            finally:
                await driver.close()

        try:
            asyncio.run(run())
        finally:
            forger.shutdown()


def test_a_peer_id_claimed_first_by_someone_else_does_not_block_its_holder(market: LocalMarket) -> None:
    """The attack on first-come peer ids: a squatter registers its own node under an honest
    worker's libp2p peer id before the worker does, so the worker's registration reverted
    (NodeRegistryPeerIdTaken) and it could not join the market under its identity. A peer-id claim
    on chain is now neither exclusive nor trusted alone: it is used only with the libp2p key's proof
    (the RSA-owned DHT subkey, checked above; the Noise-authenticated stream and the attestation it
    serves), so the squatter's claim is harmless and the holder registers as usual."""
    from eth_account import Account

    from dlis_market.chain.node_registry import Capability, DeviceClass

    victim_peer = f"Qm{secrets.token_hex(22)}"
    squatter_node = market.enroll_node(market.new_funded_account(1_000 * 10**18), peer_id=victim_peer)
    operator = market.new_funded_account(1_000 * 10**18)
    market.staking().stake(operator, market.staking().min_stake())
    honest_node = Account.from_key(secrets.token_bytes(32))
    registry = market.registry()
    deadline = market.client.timestamp() + 3600
    binding = registry.sign_binding(honest_node, operator.address, victim_peer, deadline)
    cap = Capability(8192, 100, 1000, DeviceClass.LAPTOP)
    registry.register(
        operator, honest_node.address, victim_peer, "/ip4/127.0.0.1/tcp/1", cap, b"\0" * 32, binding, deadline
    )
    honest = registry.get(honest_node.address)
    assert honest is not None and honest.active and honest.peer_id == victim_peer
    checked = RegisteredPeers(registry)
    assert checked(honest_node.address, victim_peer)  # the holder's announcements route
    assert registry.get(squatter_node.address).peer_id == victim_peer  # type: ignore[union-attr]
