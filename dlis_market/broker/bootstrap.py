"""The broker's object graph, wired in one place: `dlis broker start`, the tests and the benchmarks
build the same parts the same way, and differ only in the inference backend they hand in (the
P2P network, or a double that plays workers)."""

from __future__ import annotations

from dataclasses import dataclass

from eth_account.signers.local import LocalAccount
from fastapi import FastAPI

from dlis_market.broker.app import create_app
from dlis_market.broker.backend import BatchSigner, InferenceBackend, SignsBatches
from dlis_market.broker.catalog import ModelCatalog
from dlis_market.broker.job_types import Planner
from dlis_market.broker.ledger import Ledger, database_url
from dlis_market.broker.planning import CachedStanding, OracleRisk, chain_standing, make_planner
from dlis_market.broker.service import BrokerService
from dlis_market.chain.client import ChainClient
from dlis_market.chain.job_market import JobMarket
from dlis_market.chain.node_registry import NodeRegistry
from dlis_market.chain.reputation_oracle import ReputationOracle
from dlis_market.settings import Settings


@dataclass(frozen=True)
class BrokerGraph:
    """Everything a broker process needs but its backend."""

    settings: Settings
    client: ChainClient
    market: JobMarket
    broker: LocalAccount
    catalog: ModelCatalog
    ledger: Ledger
    standing: CachedStanding
    planner: Planner

    def service(self, backend: InferenceBackend, batch_signer: BatchSigner | None = None) -> BrokerService:
        """The service over ``backend``; it settles through the Merkle path with ``batch_signer``, by
        default the backend's own (:class:`SignsBatches`, asking with ``broker.batch_receipt_timeout_s``),
        and per receipt when there is none."""
        service = BrokerService(
            self.settings, self.ledger, self.market, self.broker, self.catalog, backend, self.planner, self.standing
        )
        if batch_signer is None and isinstance(backend, SignsBatches):
            batch_signer = backend.batch_signer(self.settings.broker.batch_receipt_timeout_s)
        service.settler.signer = batch_signer
        return service

    def app(self, backend: InferenceBackend, settle_in_background: bool = True) -> tuple[FastAPI, BrokerService]:
        service = self.service(backend)
        return create_app(service, settle_in_background=settle_in_background), service


def build_graph(
    settings: Settings,
    client: ChainClient,
    broker: LocalAccount,
    catalog: ModelCatalog,
    ledger: Ledger | None = None,
) -> BrokerGraph:
    """The broker's parts on ``client``'s chain: JobMarket, the ledger (``settings``' database
    unless one is given; on PostgreSQL several broker processes may share it, see .cluster), chain
    standing of nodes (cached ``broker.standing_cache_s``), the oracle's failure risk when
    ``broker.oracle_url`` is set, and the route planner over them."""
    b = settings.broker
    risk = OracleRisk(b.oracle_url, b.default_failure_risk) if b.oracle_url else None
    standing = CachedStanding(chain_standing(NodeRegistry(client), ReputationOracle(client)), b.standing_cache_s)
    return BrokerGraph(
        settings=settings,
        client=client,
        market=JobMarket(client),
        broker=broker,
        catalog=catalog,
        ledger=ledger or Ledger(database_url(settings), instance=b.instance_id),
        standing=standing,
        planner=make_planner(b, standing, risk),
    )
