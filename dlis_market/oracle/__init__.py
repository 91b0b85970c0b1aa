"""The reputation oracle: signed telemetry intake, differential-privacy aggregates, reputation,
dropout risk, spot-check verification and slashing, epoch posting. See ``README.md`` here.

Modules, pure ones first:

- :mod:`telemetry` — :class:`TelemetryIntake` (the wire format is :mod:`dlis_market.protocol.telemetry`);
- :mod:`merkle` — OpenZeppelin-compatible Merkle tree;  :mod:`epochs` — epoch leaves and proofs;
- :mod:`privacy` — Laplace mechanism, per-node budget accountant, published aggregates;
- :mod:`reputation` — ``score_reputation(history, weights)`` with documented weights;
- :mod:`dropout` — per-node dropout risk (the scheduler's ``failure_risk``);
- :mod:`verification` — spot-check sampling, output tolerances, evidence;
- :mod:`slashing` — verified evidence -> ``StakingManager.slash``;
- :mod:`store` — the oracle's state, one transactional database (SQLAlchemy);
- :mod:`service` — the epoch loop around all of the above; :mod:`server` — its HTTP API;
- :mod:`dht_relay` — submits the telemetry workers store on the DHT.

The senders' side (workers, brokers) is :mod:`dlis_market.protocol.oracle_client`.
"""
