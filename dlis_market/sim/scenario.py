"""A simulated network as a file: model, peers, clients and market rules, plus what-if changes.

A scenario is YAML or JSON (``dlis_market/sim/scenarios/demo.yaml`` is ``make demo``'s four
workers). Market rules left out of the file come from the settings (``DLIS_*``): minimum stake,
slash amount, protocol fee, reporter share, spot-check fraction, settlement batching, failovers,
reputation epoch and heartbeat; so the simulation runs the parameters a deployment would.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dlis_market.settings import Settings
from dlis_market.sim.errors import ScenarioError
from dlis_market.sim.profiles import BATCH_DECODE_COST, BATCH_PREFILL_COST, DEVICES, PREFILL_RATIO, DeviceProfile
from dlis_market.types import LayerRange

UNIT = 10**18
SCENARIOS_DIR = Path(__file__).parent / "scenarios"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelSpec(_Model):
    """The served model; defaults are SmolLM2-135M in bf16 (its config.json)."""

    name: str = "smollm2-135m"
    num_layers: int = Field(default=30, ge=1)
    activation_bytes_per_token: int = Field(default=576 * 2, ge=0)  # hidden 576, bf16
    kv_bytes_per_token_layer: int = Field(default=2 * 3 * 64 * 2, ge=0)  # K and V, 3 KV heads x 64, bf16


class PeerGroup(_Model):
    """``count`` peers of one device class serving ``layers`` (``[start, end)``)."""

    device: str
    layers: LayerRange
    count: int = Field(default=1, ge=0)
    price_per_token: int | None = Field(default=None, ge=0)  # for the whole span; default: the device's
    stake: int | None = Field(default=None, ge=0)  # default: the minimum stake
    byzantine: float = Field(default=0.0, ge=0, le=1)  # fraction of sessions whose outputs it corrupts
    # This group's own figures over its device class's, e.g. {compute_ms_per_layer: 1.52} as one
    # real worker measured itself (bench/sim_calibration.py writes such groups).
    profile: dict[str, float | int] = Field(default_factory=dict)
    # the machine it runs on (a key of the scenario's ``hosts``): peers on one host share its cores
    host: str | None = None

    @field_validator("layers", mode="before")
    @classmethod
    def _range_text(cls, value: Any) -> Any:
        return LayerRange.parse(value) if isinstance(value, str) else value

    def device_profile(self, devices: dict[str, DeviceProfile]) -> DeviceProfile:
        """The device class's profile with this group's own figures applied."""
        base = devices[self.device]
        if not self.profile:
            return base
        return DeviceProfile.model_validate({**base.model_dump(), **self.profile})


class Population(_Model):
    """``count`` peers drawn at random: class by ``mix`` weight, span among the class's layouts."""

    count: int = Field(ge=0)
    mix: dict[str, float]
    byzantine_share: float = Field(default=0.0, ge=0, le=1)  # of peers that cheat
    byzantine_rate: float = Field(default=1.0, ge=0, le=1)  # fraction of their sessions they corrupt


class ClientClass(_Model):
    """Clients sending jobs with one policy: a Poisson process of ``rate_per_s`` (open loop), or
    ``concurrency`` users each sending the next job as soon as the previous one finished (closed
    loop, as a benchmark drives a broker). ``jobs`` caps how many this class sends in all."""

    name: str = "clients"
    rate_per_s: float | None = Field(default=None, gt=0)
    concurrency: int | None = Field(default=None, ge=1)
    jobs: int | None = Field(default=None, ge=1)
    prompt_tokens: int = Field(default=32, ge=1)
    max_new_tokens: int = Field(default=32, ge=0)
    max_latency_ms_per_token: float | None = Field(default=None, gt=0)
    max_cost: int | None = Field(default=None, ge=0)
    privacy: Literal["low", "high"] = "low"
    min_reputation_bps: int = Field(default=0, ge=0, le=10_000)

    @model_validator(mode="after")
    def _one_arrival_process(self) -> ClientClass:
        if (self.rate_per_s is None) == (self.concurrency is None):
            raise ValueError(f"client class {self.name!r}: give exactly one of rate_per_s (open loop) or concurrency")
        return self


class Overheads(_Model):
    """Fixed costs of a job around the stages' compute and links, as the broker runs it. Zero (the
    default) leaves them out; ``bench/sim_calibration.py`` measures them on ``make demo``'s network.

    A job: ``admit_ms`` (request -> running: authorization, escrow, route, ledger write), then
    ``open_ms`` (a session opened on every stage), then the prefill pass, which yields the first
    token, then one decode pass per further token, then ``close_ms`` (sessions closed, receipts
    collected, the job recorded). Each pass costs every hop's compute and link, the last stage's
    link once more (its answer goes back to the broker), plus ``pass_ms`` (messaging and sampling
    beyond the stages' forward passes and the links' latency).
    """

    admit_ms: float = Field(default=0.0, ge=0)
    open_ms: float = Field(default=0.0, ge=0)
    close_ms: float = Field(default=0.0, ge=0)
    pass_ms: float = Field(default=0.0, ge=0)


class Host(_Model):
    """A machine several peers run on (``make demo`` runs all its workers on one): while passes of
    its peers run at once they share ``cores`` with ``background_threads`` runnable threads of
    other programs, each pass at ``cores / (background + threads of the running passes)`` of its
    own speed when that is below 1 (processor sharing, the way the kernel shares CPU time). Where the
    kernel groups threads by session (Linux autogroup), the peers' processes started together are
    one group that gets a fair share of the machine beside the other sessions, whatever its thread
    count: then ``cores`` is that share (bench/sim_calibration.py measures it) and the background 0."""

    cores: float = Field(gt=0)
    background_threads: float = Field(default=0.0, ge=0)


class MarketRules(_Model):
    """Overrides of the deployment's settings; ``None`` keeps the settings' value."""

    min_stake: int | None = Field(default=None, ge=0)
    slash_amount: int | None = Field(default=None, gt=0)
    fee_bps: int | None = Field(default=None, ge=0, le=2000)
    reporter_share_bps: int | None = Field(default=None, ge=0, le=10_000)
    check_fraction: float | None = Field(default=None, ge=0, le=1)
    settle_interval_s: float | None = Field(default=None, gt=0)
    settle_max_batch: int | None = Field(default=None, ge=1)
    max_failovers: int | None = Field(default=None, ge=0)
    epoch_s: float | None = Field(default=None, gt=0)
    heartbeat_s: float | None = Field(default=None, gt=0)


class Market(_Model):
    """The rules in force, every field resolved."""

    min_stake: int
    slash_amount: int
    fee_bps: int
    reporter_share_bps: int
    check_fraction: float
    settle_interval_s: float
    settle_max_batch: int
    max_failovers: int
    epoch_s: float
    heartbeat_s: float

    @classmethod
    def of(cls, rules: MarketRules, settings: Settings) -> Market:
        base = {
            "min_stake": settings.chain.min_stake,
            "slash_amount": settings.oracle.slash_amount,
            "fee_bps": settings.chain.fee_bps,
            "reporter_share_bps": settings.chain.reporter_share_bps,
            "check_fraction": settings.broker.spot_check_fraction,
            "settle_interval_s": settings.broker.settle_interval_s,
            "settle_max_batch": settings.broker.settle_max_batch,
            "max_failovers": settings.node.max_failovers,
            "epoch_s": settings.oracle.epoch_s,
            "heartbeat_s": settings.oracle.heartbeat_interval_s,
        }
        base.update({k: v for k, v in rules.model_dump().items() if v is not None})
        return cls(**base)


class Scenario(_Model):
    name: str = "scenario"
    model: ModelSpec = Field(default_factory=ModelSpec)
    devices: dict[str, DeviceProfile] = Field(default_factory=dict)  # added to / replacing the built-in classes
    peers: tuple[PeerGroup, ...] = ()
    population: Population | None = None
    clients: tuple[ClientClass, ...]
    hours: float = Field(default=1.0, gt=0)
    market: MarketRules = Field(default_factory=MarketRules)
    # Scheduler inputs (as the broker sets them, broker/planning.py) and the sim's own knobs.
    prune_top_k: int = Field(default=8, ge=1)  # candidates kept per span, by objective and by price
    route_retry_s: float = Field(default=2.0, gt=0)  # a job with no route asks again after this
    job_timeout_s: float = Field(default=60.0, gt=0)  # ... and gives up after this
    decode_chunk_tokens: int = Field(default=16, ge=1)  # timing is re-evaluated every this many tokens
    risk_refresh_slots: int = Field(default=10, ge=1)  # dropout risk re-predicted this often
    prefill_ratio: float = Field(default=PREFILL_RATIO, gt=0)  # prefill per prompt token and layer / one decode step
    # each job runs at a speed drawn once for it (lognormal, mean 1, this coefficient of variation):
    # the job-to-job spread a shared machine's varying load gives (0: every job at the model's speed)
    job_speed_cv: float = Field(default=0.0, ge=0)
    # offers carry each peer's compute under its current load (False: the announced figure only,
    # as broker/planning.py builds offers from announced throughput today)
    offers_track_load: bool = True
    overheads: Overheads = Field(default_factory=Overheads)
    # How stage compute is timed. "chunked": each session's passes cost the stage's time under its
    # current load (the measured slowdown curve), re-read every decode_chunk_tokens: cheap, for
    # large networks. "batched": each peer runs one forward pass at a time over the steps queued
    # for it, as the worker does (node/server.py): steps of the same token count merge into one
    # pass of at most max_batch_sessions, after waiting up to batch_wait_ms (the first stage; later
    # ones at most node/sessions.py RELAY_WAIT_S) for the steps of the sessions it has prefilled and
    # that have steps to come (the settings' defaults); a pass costs batch_*_cost of one session's (the
    # real Stage's measured curves); the broker opens one job's sessions at a time; a spot check
    # re-runs the checked call on a replica, step by step; peers (and the broker's open and close
    # work, broker_host) on one host share its cores (hosts); job_speed_cv is the host's speed, redrawn every
    # speed_period_s, which every job running then shares. One event per token and stage.
    stage_model: Literal["chunked", "batched"] = "chunked"
    hosts: dict[str, Host] = Field(default_factory=dict)
    broker_host: str | None = None  # the host the broker's open and close work runs on
    batch_decode_cost: dict[int, float] = Field(default_factory=lambda: dict(BATCH_DECODE_COST))
    batch_prefill_cost: dict[int, float] = Field(default_factory=lambda: dict(BATCH_PREFILL_COST))
    batch_wait_ms: float = Field(default=4.0, ge=0)
    max_batch_sessions: int = Field(default=16, ge=1)
    speed_period_s: float = Field(default=1.0, gt=0)
    pass_cv: float = Field(default=0.0, ge=0)  # batched: each stage pass's own jitter (lognormal, mean 1)
    # batched: measured one-way message delays beyond their median (ms); each message adds one drawn
    # at random: the driver's step of each session to the first stage, and one message per pass from
    # a stage to the next and from the last back to the driver, so sessions the driver sends apart
    # reach the first stage a little apart, the way two real messages do (empty: every message takes
    # the link's latency)
    message_jitter_ms: list[float] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> Scenario:
        known = self.device_table()
        for curve in (self.batch_decode_cost, self.batch_prefill_cost):
            if curve.get(1) != 1.0 or any(k < 1 or v <= 0 for k, v in curve.items()):
                raise ValueError(f"a batch cost curve maps sessions >= 1 to costs > 0 with 1: 1.0, got {curve}")
        if any(x < 0 or not math.isfinite(x) for x in self.message_jitter_ms):
            raise ValueError(f"message_jitter_ms holds delays >= 0 ms, got {self.message_jitter_ms}")
        if self.broker_host is not None and self.broker_host not in self.hosts:
            raise ValueError(f"broker_host {self.broker_host!r} is not in hosts")
        for g in self.peers:
            if g.host is not None and g.host not in self.hosts:
                raise ValueError(f"peer group {g.device} {g.layers} runs on host {g.host!r}, not in hosts")
            if g.device not in known:
                raise ValueError(f"peer group uses device {g.device!r}; known: {', '.join(sorted(known))}")
            if g.layers.end > self.model.num_layers:
                raise ValueError(f"peer group {g.device} serves {g.layers} beyond {self.model.num_layers} layers")
            try:
                g.device_profile(known)
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
                raise ValueError(
                    f"peer group {g.device} {g.layers}: its profile figures are invalid: {problems}"
                ) from exc
        if self.population is not None:
            for name, weight in self.population.mix.items():
                if name not in known:
                    raise ValueError(f"population mix names device {name!r}; known: {', '.join(sorted(known))}")
                if weight < 0:
                    raise ValueError(f"population mix weight of {name} is {weight}; weights must be >= 0")
                if not known[name].layouts:
                    raise ValueError(f"device {name} has no layouts to draw spans from")
        return self

    def device_table(self) -> dict[str, DeviceProfile]:
        return {**DEVICES, **self.devices}


def load_scenario(path: Path) -> Scenario:
    """Read a scenario from YAML or JSON; a bare name is looked up in the shipped scenarios."""
    if not path.exists() and not path.suffix and (SCENARIOS_DIR / f"{path}.yaml").is_file():
        path = SCENARIOS_DIR / f"{path}.yaml"
    try:
        text = path.read_text()
    except OSError as exc:
        shipped = ", ".join(sorted(p.stem for p in SCENARIOS_DIR.glob("*.yaml")))
        raise ScenarioError(f"cannot read scenario {path}: {exc.strerror}; give a file or one of: {shipped}") from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ScenarioError(f"scenario {path} does not parse: {exc}") from exc
    if not isinstance(data, dict):
        raise ScenarioError(f"scenario {path} must hold a mapping at the top, got {type(data).__name__}")
    return parse_scenario(data, str(path))


def parse_scenario(data: dict[str, Any], where: str = "scenario") -> Scenario:
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors())
        raise ScenarioError(f"{where} is invalid: {problems}") from exc


CHANGES = {
    "add-peers": "N: N more peers, copies of the scenario's peer groups in turn (first group first)",
    "remove-device": "CLASS: drop every peer of this device class",
    "check-fraction": "P: spot-check this fraction of stage calls (0..1)",
    "slash": "DLIS: slash this many DLIS per proven mismatch",
    "stake": "DLIS: every peer stakes this many DLIS",
    "min-stake": "DLIS: the minimum stake to be routable",
    "rate": "X: multiply every client's arrival rate by X",
    "byzantine": "R: every peer corrupts this fraction of its sessions",
}


def apply_change(scenario: Scenario, change: str) -> Scenario:
    """``scenario`` with one what-if applied, e.g. ``add-peers=2`` (see :data:`CHANGES`)."""
    key, sep, value = change.partition("=")
    if not sep or key not in CHANGES:
        listed = "; ".join(f"{k}={v}" for k, v in CHANGES.items())
        raise ScenarioError(f"unknown change {change!r}; use one of: {listed}")
    data = scenario.model_dump(mode="json")
    try:
        if key == "add-peers":
            n = int(value)
            if n < 0 or not scenario.peers:
                raise ScenarioError(f"add-peers={value}: needs N >= 0 and a scenario with peer groups")
            groups = data["peers"]
            for i in range(n):
                groups.append({**groups[i % len(scenario.peers)], "count": 1})
        elif key == "remove-device":
            if value not in scenario.device_table():
                raise ScenarioError(f"remove-device={value}: no such device class")
            data["peers"] = [g for g in data["peers"] if g["device"] != value]
            if data["population"]:
                data["population"]["mix"].pop(value, None)
        elif key == "check-fraction":
            data["market"]["check_fraction"] = float(value)
        elif key in ("slash", "min-stake"):
            field = "slash_amount" if key == "slash" else "min_stake"
            data["market"][field] = round(float(value) * UNIT)
        elif key == "stake":
            for g in data["peers"]:
                g["stake"] = round(float(value) * UNIT)
        elif key == "rate":
            for c in data["clients"]:
                if c["rate_per_s"] is not None:  # closed-loop classes send as fast as they are served
                    c["rate_per_s"] = c["rate_per_s"] * float(value)
        elif key == "byzantine":
            for g in data["peers"]:
                g["byzantine"] = float(value)
            if data["population"]:
                data["population"]["byzantine_share"] = 1.0
                data["population"]["byzantine_rate"] = float(value)
    except ValueError as exc:
        raise ScenarioError(f"change {change!r}: {value!r} is not a number ({CHANGES[key]})") from exc
    return parse_scenario(data, f"scenario after {change}")
