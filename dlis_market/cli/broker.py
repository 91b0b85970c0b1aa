"""`dlis broker ...`: run the broker API; issue API keys for OpenAI-style clients."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from dlis_market.cli.context import (
    U256,
    BrokerUrlOpt,
    JsonOpt,
    broker_url_of,
    call_broker,
    console,
    emit,
    handle_errors,
    parse_amount,
    read_password_file,
    state,
    unlock,
    utc,
)
from dlis_market.settings import NodeSettings, Settings

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

    from dlis_market.broker.catalog import ModelCatalog, ServedModel
    from dlis_market.broker.metrics import BrokerMetrics
    from dlis_market.broker.observations import JobObserver
    from dlis_market.broker.planning import StandingLookup
    from dlis_market.broker.spot_checks import SpotChecker
    from dlis_market.broker.zk_onchain import ProofRecorder
    from dlis_market.chain.client import ChainClient
    from dlis_market.node.driver import PipelineDriver

app = typer.Typer(help="Run the broker (FastAPI on 127.0.0.1) and manage its API keys.", no_args_is_help=True)


def node_settings_for_chain(settings: Settings, client: ChainClient) -> NodeSettings:
    """Node/driver settings with the deployed contracts filled in (receipts and attestations)."""
    dep = client.deployment
    return settings.node.model_copy(
        update={
            "chain_id": client.chain_id,
            "market_address": dep.address_of("JobMarket"),
            "registry_address": dep.address_of("NodeRegistry"),
        }
    )


def model_shape(served: ServedModel) -> tuple[str, int]:
    """(shard dtype, hidden size): what a spot check needs to cut hidden states into tokens."""
    cfg = served.manifest.config
    return served.manifest.dtype, int(cfg.get("hidden_size") or cfg.get("n_embd") or 0)


def oracle_reporting(
    settings: Settings,
    client: ChainClient,
    driver: PipelineDriver,
    broker: LocalAccount,
    catalog: ModelCatalog,
    metrics: BrokerMetrics,
    standing: StandingLookup,
) -> tuple[SpotChecker | None, JobObserver | None]:
    """What the broker reports to the oracle (when ``broker.oracle_url`` is set), through one
    persisted outbox: spot-check evidence (when the fraction is above 0) and, for every job, the
    runner-signed observation of each stage that reputation is scored on."""
    from dlis_market.broker.observations import JobObserver, OracleObservationSink
    from dlis_market.broker.spot_checks import OracleSink, SpotChecker
    from dlis_market.protocol.outbox import Outbox
    from dlis_market.protocol.spot_checks import SpotCheckSampler
    from dlis_market.protocol.telemetry import oracle_domain

    b = settings.broker
    if not b.oracle_url:
        if b.spot_check_fraction > 0:
            console.print("spot checks off: no broker.oracle_url to send their evidence to", style="yellow")
        return None, None
    # messages wait in a persisted outbox while the oracle is down; the loop starts now so rows an
    # earlier run left go out (called inside the broker's event loop)
    outbox = Outbox.from_settings(settings.broker_outbox_url, settings.outbox)
    domain = oracle_domain(client.chain_id, client.deployment.address_of("ReputationOracle"))
    observer = JobObserver(
        bytes(broker.key), domain, OracleObservationSink(b.oracle_url, outbox, settings.outbox.timeout_s)
    )
    if b.spot_check_fraction <= 0 and b.fingerprint_check_fraction <= 0:
        outbox.start()
        return None, observer
    sink = OracleSink(b.oracle_url, outbox, settings.outbox.timeout_s)
    sink.start()
    secret = SpotChecker.secret(settings.home)
    checker = SpotChecker(
        driver,
        SpotCheckSampler(b.spot_check_fraction, secret),
        bytes(broker.key),
        domain,
        sink,
        lambda model: model_shape(catalog.get(model)),
        eligible=lambda node: standing(node).routable,
        fingerprints=SpotCheckSampler(b.fingerprint_check_fraction, SpotChecker.fingerprint_secret(secret)),
    )
    checker.on_result = lambda r: metrics.spot_checks.labels(r.outcome.split(":")[0]).inc()
    console.print(
        f"spot-checking {b.spot_check_fraction:.1%} of stage calls by re-execution and "
        f"{b.fingerprint_check_fraction:.1%} more from their fingerprints; evidence to {b.oracle_url}"
    )
    return checker, observer


def proof_recording(settings: Settings, client: ChainClient, broker: LocalAccount) -> ProofRecorder | None:
    """With ``zk.record_on_chain``, a recorder of verified head proofs on chain, its outbox loop
    started (called inside the broker's event loop; rows an earlier run left go out)."""
    if not settings.zk.record_on_chain:
        return None
    from dlis_market.broker.zk_onchain import ProofRecorder
    from dlis_market.protocol.outbox import Outbox, sqlite_url

    outbox = Outbox.from_settings(sqlite_url(settings.home / "broker" / "zk-records.db"), settings.outbox)
    recorder = ProofRecorder(client, broker, outbox, settings.zk_cache_dir)
    recorder.start()
    console.print("recording verified zk proofs on chain (StageProofRegistry; zk.record_on_chain)")
    return recorder


@app.command()
def start(
    ctx: typer.Context,
    model_dir: Annotated[
        list[Path], typer.Option("--model-dir", help="Shard folder (manifest + tokenizer) of a model to serve; repeat.")
    ],
    initial_peer: Annotated[
        list[str] | None, typer.Option(help="DHT multiaddr of a worker to join through (repeatable).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port on 127.0.0.1 (default broker.port, 8080).")] = None,
    account: Annotated[
        str | None, typer.Option(help="Broker account with BROKER_ROLE (default broker.account).")
    ] = None,
    password_file: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="Account password file.")
    ] = None,
) -> None:
    """Serve the job API and the OpenAI-compatible API, route jobs over workers, settle on chain.

    Stop it with Ctrl-C; jobs finished but not yet settled are settled on the next start.
    """
    import uvicorn

    from dlis_market.broker.app import create_app
    from dlis_market.broker.bootstrap import build_graph
    from dlis_market.broker.catalog import ModelCatalog
    from dlis_market.broker.p2p_backend import P2PBackend, RegisteredPeers
    from dlis_market.chain.client import ChainClient
    from dlis_market.chain.errors import PreflightError
    from dlis_market.chain.job_market import JobMarket
    from dlis_market.chain.node_registry import NodeRegistry
    from dlis_market.cli.model_adapter import adapter_root
    from dlis_market.lifetime import freeze_startup_heap, start_reaper
    from dlis_market.logs import configure_logging
    from dlis_market.protocol.adapters import adapter_model_name
    from dlis_market.storage.adapter_store import AdapterStore

    st = state(ctx)
    with handle_errors():
        settings = st.settings
        configure_logging(settings.log)
        client = ChainClient(settings)
        market = JobMarket(client)
        broker = unlock(st, account or settings.broker.account, read_password_file(password_file))
        role = market.contract.functions.BROKER_ROLE().call()
        if not market.contract.functions.hasRole(role, broker.address).call():
            raise PreflightError(
                f"{broker.address} lacks BROKER_ROLE on JobMarket {market.address}; use the deployment's broker "
                f"account ({client.deployment.broker}) or have the admin grant the role"
            )
        catalog = ModelCatalog.from_shard_dirs(model_dir, client.model_publisher(), registry=NodeRegistry(client))
        for adapter in AdapterStore(adapter_root(settings)).list():  # those published from here and registered
            catalog.find(adapter_model_name(adapter.base_model, adapter.name))
        graph = build_graph(settings, client, broker, catalog)
        node_settings = node_settings_for_chain(settings, client)
        peers = list(initial_peer or settings.node.initial_peers)

        async def serve() -> None:
            start_reaper()  # the DHT process and p2pd die with the broker, even on SIGKILL
            registered = RegisteredPeers(NodeRegistry(client), settings.broker.standing_cache_s)
            backend = await P2PBackend.connect(peers, node_settings, bytes(broker.key), registered)
            service = graph.service(backend)
            backend.checker, backend.observer = oracle_reporting(
                settings, client, backend.driver, broker, catalog, service.metrics, graph.standing
            )
            service.proof_recorder = proof_recording(settings, client, broker)
            server = uvicorn.Server(
                uvicorn.Config(
                    create_app(service), host=settings.broker.host, port=port or settings.broker.port, log_config=None
                )
            )
            freeze_startup_heap()
            await server.serve()

        console.print(f"broker {broker.address} serving {', '.join(catalog.models)} on {settings.broker.host}")
        asyncio.run(serve())


@app.command("api-key")
def api_key(
    ctx: typer.Context,
    account: Annotated[str, typer.Option("--account", "-a", help="Client account that pays for the key's jobs.")],
    cap: Annotated[str, typer.Option(help="Most DLIS the key may spend in total (enforced on chain).")],
    days: Annotated[float, typer.Option(min=0.001, help="Days until the key expires (enforced on chain).")] = 30,
    broker_url: BrokerUrlOpt = None,
    password_file: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="Account password file.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Get an API key for OpenAI-style clients from a broker, from any machine.

    Signs an EIP-712 ApiKeyRequest with the client account, sends it to the broker
    (POST /v1/api-keys), then authorizes the key's spender on chain (JobMarket.setSpender) with
    the cap and expiry, which the chain enforces. The key is shown once.

    Example: dlis broker api-key -a alice --cap 10 --days 30 --broker-url http://127.0.0.1:8080"""
    import secrets

    from dlis_market.broker.apikeys import MAX_REQUEST_TTL_S, ApiKeyRequest, sign_api_key_request
    from dlis_market.chain.client import ChainClient
    from dlis_market.chain.job_market import JobMarket
    from dlis_market.errors import BrokerError

    st = state(ctx)
    with handle_errors(as_json):
        units = parse_amount(cap)
        url = broker_url_of(st, broker_url)
        client_acct = unlock(st, account, read_password_file(password_file))
        chain = ChainClient(st.settings)
        market = JobMarket(chain)
        terms = call_broker("GET", f"{url}/v1/api-keys/terms")
        if (terms["chain_id"], terms["job_market"]) != (chain.chain_id, market.address):
            raise BrokerError(
                f"the broker at {url} runs on chain {terms['chain_id']} with JobMarket {terms['job_market']}; "
                f"this machine's deployment says chain {chain.chain_id}, JobMarket {market.address}: point "
                "--broker-url and the chain settings (DLIS_HOME, DLIS_CHAIN__RPC_URL) at the same network"
            )
        now = chain.timestamp()
        req = ApiKeyRequest(
            client_acct.address, terms["broker"], units, now + int(days * 86400),
            secrets.randbits(64), now + MAX_REQUEST_TTL_S // 2,
        )  # fmt: skip
        sig = sign_api_key_request(client_acct.key, market.domain(), req)
        body = {
            "client": req.client, "broker": req.broker, "cap": str(req.cap), "expires_at": req.expires_at,
            "nonce": str(req.nonce), "deadline": req.deadline, "signature": "0x" + sig.hex(),
        }  # fmt: skip
        grant = call_broker("POST", f"{url}/v1/api-keys", json=body)
        market.set_spender(client_acct, grant["spender"], units, req.expires_at)
        emit(
            {
                "api_key": grant["api_key"],
                "client": grant["client"],
                "spender": grant["spender"],
                "cap": U256(units),
                "expires_at": req.expires_at,
                "broker": req.broker,
            },
            as_json,
            lambda d: console.print(
                f"API key (shown once): {d['api_key']}\nspends for {d['client']} up to {cap} DLIS "
                f"until {utc(d['expires_at'])} UTC at broker {d['broker']}"
            ),
        )
