"""Wire types that node, broker and oracle share, below all three. Signed messages are EIP-712
(spans and tickets typed in ``dlis_market.chain.typed_data``, telemetry in :mod:`.telemetry`); this
package signs and checks them, knows the chain only as the domain it signs under, and does not
import the peer-to-peer transport (hivemind, libp2p): a DHT reader is passed in.

- :mod:`.spans` — signed span announcements of the layers a worker serves;
- :mod:`.tickets` — session tickets a broker signs for one stage of a job;
- :mod:`.telemetry` — signed worker telemetry: models, EIP-712 signing, zstd, limits, DHT key;
- :mod:`.oracle_client` — the senders' side of the oracle's HTTP routes (telemetry, outbox rows);
- :mod:`.outbox` — the persisted outbox that retries deliveries and classifies the answers;
- :mod:`.routes` — a job's route: the one hop type broker, driver, receipts and spot checks share;
- :mod:`.pricing` — what a job may cost, one price function for broker, worker and JobMarket;
- :mod:`.outputs` — stage outputs compared across replicas: decoding, per-token measure, tolerances;
- :mod:`.fingerprints`, :mod:`.fingerprint_thresholds` — compact commitments to a stage's activations,
  checked with one prefill;
- :mod:`.spot_checks` — the spot-check sampler and the evidence/failure statements a runner signs;
- :mod:`.observations` — the broker's signed per-stage observations that reputation scores;
- :mod:`.errors` — errors of the above: bad signed messages, refused telemetry, a cut sampler secret.
"""
