"""The operator CLI against a real Anvil: accounts, staking, registration, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import base58
import pytest
from typer.testing import CliRunner

from dlis_market.chain.anvil import REPO_ROOT, port_open
from dlis_market.cli.main import app

UNIT = 10**18


def peer_id(seed: int) -> str:
    """A well-formed libp2p peer id: the identity multihash of an ed25519 public key (12D3KooW...)."""
    return base58.b58encode(bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20]) + bytes([seed]) * 32).decode()


PEER_A, PEER_B = peer_id(1), peer_id(2)


@pytest.fixture()
def dlis(market, tmp_path):
    runner = CliRunner()
    (tmp_path / "pw").write_text("correct horse battery staple\n")
    env = {
        "DLIS_HOME": str(market.settings.home),
        "DLIS_CHAIN__RPC_URL": market.settings.chain.rpc_url,
        "DLIS_CHAIN__KEYSTORE_SCRYPT_N": "1024",
    }

    def run(*args: str, ok: bool = True):
        result = runner.invoke(app, list(args), env=env)
        if ok:
            assert result.exit_code == 0, result.output
        return result

    run.pw = str(tmp_path / "pw")  # type: ignore[attr-defined]
    return run


def test_account_lifecycle(dlis, tmp_path):
    out = json.loads(dlis("account", "new", "alice", "--password-file", dlis.pw, "--json").stdout)
    assert out["address"].startswith("0x")
    listed = json.loads(dlis("account", "list", "--json").stdout)
    assert {"name": "alice", "address": out["address"]} in listed
    again = dlis("account", "new", "alice", "--password-file", dlis.pw, ok=False)
    assert again.exit_code == 1 and "already exists" in again.output
    (tmp_path / "bad").write_text("wrong\n")
    bad = dlis("node", "stake", "1", "-a", "alice", "--password-file", str(tmp_path / "bad"), ok=False)
    assert bad.exit_code == 1 and "wrong password" in bad.output


def test_stake_register_status_and_refusals(dlis, market):
    op = json.loads(dlis("account", "new", "op", "--password-file", dlis.pw, "--json").stdout)["address"]
    node = json.loads(dlis("account", "new", "node", "--password-file", dlis.pw, "--json").stdout)["address"]

    # no tokens yet: a clear refusal, exit 1, and no transaction sent
    refused = dlis("node", "stake", "150", "-a", "op", "--password-file", dlis.pw, ok=False)
    assert refused.exit_code == 1 and "holds 0 DLIS but 150 is needed" in refused.output
    assert market.client.w3.eth.get_transaction_count(op) == 0

    dlis("chain", "faucet", op, "500")
    reg_args = ["node", "register", "-a", "op", "--node-key", "node", "--peer-id", PEER_A,
                "--password-file", dlis.pw, "--node-password-file", dlis.pw]  # fmt: skip
    early = dlis(*reg_args, ok=False)
    assert early.exit_code == 1 and "minimum is 100" in early.output

    staked = json.loads(dlis("node", "stake", "150", "-a", "op", "--password-file", dlis.pw, "--json").stdout)
    assert staked["active"] == str(150 * UNIT) and staked["routable"]  # uint256 as a string
    reg = json.loads(dlis(*reg_args, "--device-class", "server", "--json").stdout)
    assert reg["node"] == node and reg["routable"]

    status = json.loads(dlis("node", "status", "op", "--json").stdout)
    assert status["stake_active"] == str(150 * UNIT)
    assert status["nodes"] == [
        {"node": node, "peer_id": PEER_A, "endpoint": "/ip4/127.0.0.1/tcp/0", "active": True, "routable": True}
    ]
    too_much = dlis("node", "unstake", "151", "-a", "op", "--password-file", dlis.pw, ok=False)
    assert too_much.exit_code == 1 and "active stake is 150" in too_much.output
    dlis("node", "unstake", "100", "-a", "op", "--password-file", dlis.pw)
    after = json.loads(dlis("node", "status", node, "--json").stdout)
    assert after["meets_minimum"] is False and after["nodes"][0]["routable"] is False
    early_withdraw = dlis("node", "withdraw", "-a", "op", "--password-file", dlis.pw, ok=False)
    assert "unbonds at" in early_withdraw.output


def test_register_checks_what_was_typed_before_any_transaction(dlis, market):
    """Malformed peer ids and endpoints, and an --update that would change the bound peer id, are
    refused before anything is sent; a new peer id takes deregister + register."""
    op = json.loads(dlis("account", "new", "op2", "--password-file", dlis.pw, "--json").stdout)["address"]
    json.loads(dlis("account", "new", "node2", "--password-file", dlis.pw, "--json").stdout)
    funded = json.loads(dlis("chain", "faucet", "op2", "500", "--json").stdout)  # a keystore name, not an address
    assert funded["to"] == op and funded["dlis"] == str(500 * UNIT)
    dlis("node", "stake", "150", "-a", "op2", "--password-file", dlis.pw)
    sent = market.client.w3.eth.get_transaction_count(op)
    base = ["node", "register", "-a", "op2", "--node-key", "node2", "--password-file", dlis.pw,
            "--node-password-file", dlis.pw]  # fmt: skip

    not_a_peer = dlis(*base, "--peer-id", "12D3KooWcli", ok=False)
    assert not_a_peer.exit_code == 1 and "peer id '12D3KooWcli'" in not_a_peer.output
    not_an_addr = dlis(*base, "--peer-id", PEER_A, "--endpoint", "localhost:4001", ok=False)
    assert not_an_addr.exit_code == 1 and "not a multiaddr" in not_an_addr.output
    assert market.client.w3.eth.get_transaction_count(op) == sent

    dlis(*base, "--peer-id", PEER_A)
    sent = market.client.w3.eth.get_transaction_count(op)
    change = dlis(*base, "--update", "--peer-id", PEER_B, ok=False)
    assert change.exit_code == 1 and f"registered with peer id {PEER_A}" in change.output
    assert "dlis node deregister" in change.output
    assert market.client.w3.eth.get_transaction_count(op) == sent
    dlis(*base, "--update", "--endpoint", "/ip4/127.0.0.1/tcp/4001")
    (entry,) = json.loads(dlis("node", "status", "op2", "--json").stdout)["nodes"]
    assert (entry["peer_id"], entry["endpoint"]) == (PEER_A, "/ip4/127.0.0.1/tcp/4001")

    dlis("node", "deregister", "-a", "op2", "--node", "node2", "--password-file", dlis.pw)
    dlis(*base, "--peer-id", PEER_B)
    (entry,) = json.loads(dlis("node", "status", "op2", "--json").stdout)["nodes"]
    assert entry["peer_id"] == PEER_B and entry["routable"]


def test_json_errors_are_json_on_stdout(dlis):
    result = dlis("node", "stake", "abc", "-a", "dev:4", "--json", ok=False)
    assert result.exit_code == 1
    error = json.loads(result.stdout)["error"]
    assert error["type"] == "PreflightError" and "not a number" in error["message"]


def test_bad_input_is_refused_clearly(dlis):
    bad_amount = dlis("node", "stake", "abc", "-a", "dev:4", ok=False)
    assert bad_amount.exit_code == 1 and "not a number" in bad_amount.output
    bad_addr = dlis("chain", "faucet", "0x1234", "5", ok=False)
    assert bad_addr.exit_code == 1 and "not an Ethereum address" in bad_addr.output
    unknown = dlis("account", "balance", "nobody", ok=False)
    assert unknown.exit_code == 1 and "neither an address nor an account" in unknown.output


def test_chain_status_json(dlis, market):
    data = json.loads(dlis("chain", "status", "--json").stdout)
    assert data["chain_id"] == 31337
    assert data["contracts"]["JobMarket"]["address"] == market.client.deployment.address_of("JobMarket")


def test_unreachable_chain_says_what_to_do(tmp_path):
    result = CliRunner().invoke(
        app, ["chain", "status"], env={"DLIS_HOME": str(tmp_path), "DLIS_CHAIN__RPC_URL": "http://127.0.0.1:9"}
    )
    assert result.exit_code == 1
    assert "no JSON-RPC answer at http://127.0.0.1:9" in result.output and "dlis chain up" in result.output


def test_chain_up_runs_brownie_deploy_and_persists_state(tmp_path):
    """`dlis chain up` = Anvil with --state + the real `brownie run deploy`; state survives a restart."""
    port = 28545
    if port_open("127.0.0.1", port):
        pytest.fail(f"port {port} is busy; stop what runs there (this test needs a fixed brownie network entry)")
    runner = CliRunner()
    env = {"DLIS_HOME": str(tmp_path), "DLIS_CHAIN__RPC_URL": f"http://127.0.0.1:{port}"}
    try:
        first = runner.invoke(app, ["chain", "up", "--port", str(port), "--json"], env=env)
        assert first.exit_code == 0, first.output
        data = json.loads(first.stdout)  # progress lines go to stderr under --json
        assert data["started_anvil"] and data["deployed"]
        assert (tmp_path / "deployments" / "31337.json").exists()
        deploy_log = (tmp_path / "logs" / "deploy.log").read_text()
        assert "deployment manifest" in deploy_log and "Traceback" not in deploy_log
        # `brownie console --network dlis-anvil-PORT` then m = run("dlis"): the same script, run here
        console = subprocess.run(
            [str(Path(sys.executable).parent / "brownie"), "run", "dlis", "--network", f"dlis-anvil-{port}"],
            capture_output=True, text=True, cwd=REPO_ROOT, timeout=120, env={**os.environ, **env},
        )  # fmt: skip
        names = "DLISToken, JobMarket, NodeRegistry, ReputationOracle, StageProofRegistry, StakingManager"
        assert names in console.stdout, console.stdout[-2000:] + console.stderr[-2000:]
        runner.invoke(app, ["chain", "faucet", "0x000000000000000000000000000000000000dEaD", "7"], env=env)

        assert runner.invoke(app, ["chain", "down", "--port", str(port)], env=env).exit_code == 0
        second = runner.invoke(app, ["chain", "up", "--port", str(port), "--json"], env=env)
        assert second.exit_code == 0, second.output
        again = json.loads(second.stdout)
        assert again["started_anvil"] and not again["deployed"]  # contracts came back from --state
        bal = runner.invoke(
            app, ["account", "balance", "0x000000000000000000000000000000000000dEaD", "--json"], env=env
        )
        assert json.loads(bal.stdout)["dlis"] == str(7 * UNIT)

        # A chain kept from an older checkout: its JobMarket's ABI is not this build's. `chain up`
        # deploys again instead of handing out contracts this build cannot talk to.
        path = tmp_path / "deployments" / "31337.json"
        stale = json.loads(path.read_text())
        stale["contracts"]["JobMarket"]["abi"] = stale["contracts"]["JobMarket"]["abi"][1:]
        path.write_text(json.dumps(stale))
        third = runner.invoke(app, ["chain", "up", "--port", str(port), "--json"], env=env)
        assert third.exit_code == 0, third.output
        assert "differ from the ones deployed here" in third.output
        assert json.loads(third.stdout)["deployed"]
    finally:
        runner.invoke(app, ["chain", "down", "--port", str(port)], env=env)
