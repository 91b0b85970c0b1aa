"""What a worker announces on the DHT, and reading the announcements of a model back.

Key ``dlis/spans/<model name>``, subkey = the worker's peer id, value = :class:`SpanRecord` as a
plain dict, with an expiration time (TTL) the worker refreshes periodically. On clean shutdown
the worker stores an ``online=False`` record with a later expiration, which overrides its last
announcement; readers skip such records, malformed ones and expired ones.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import hivemind
from hivemind.utils import get_dht_time
from pydantic import ValidationError

from dlis_market.types import LayerRange, WireModel

log = logging.getLogger(__name__)


class SpanRecord(WireModel):
    """One worker's announcement of the layers it serves."""

    model: str
    start: int
    end: int
    peer_id: str
    node_address: str
    throughput: float  # tokens/s through the whole range, measured by the profiler
    free_slots: int  # sessions it can still open
    queue_length: int
    price_per_token: int  # token units per token processed
    attestation_hash: str
    online: bool = True
    announced_at: float = 0.0

    @property
    def layers(self) -> LayerRange:
        return LayerRange(start=self.start, end=self.end)


def spans_key(model: str) -> str:
    return f"dlis/spans/{model}"


def announce(dht: hivemind.DHT, record: SpanRecord, ttl_s: float) -> bool:
    record = record.model_copy(update={"announced_at": time.time()})
    return bool(dht.store(spans_key(record.model), record.model_dump(), get_dht_time() + ttl_s, subkey=record.peer_id))


def withdraw(dht: hivemind.DHT, record: SpanRecord, ttl_s: float) -> bool:
    """Override the last announcement with an offline marker (expiring a little later than it)."""
    offline = record.model_copy(update={"online": False, "free_slots": 0, "announced_at": time.time()})
    return bool(
        dht.store(spans_key(record.model), offline.model_dump(), get_dht_time() + ttl_s + 1, subkey=record.peer_id)
    )


def parse_records(model: str, raw: Any) -> list[SpanRecord]:
    """Records of ``model`` from a DHT answer; drops malformed, offline and mismatched ones."""
    if raw is None or not isinstance(raw.value, dict):
        return []
    out = []
    for subkey, item in raw.value.items():
        try:
            record = SpanRecord.model_validate(item.value)
            LayerRange(start=record.start, end=record.end)
        except (ValidationError, ValueError, AttributeError) as exc:
            log.info("ignoring a malformed span record under %s: %s", subkey, exc)
            continue
        if record.online and record.model == model and record.peer_id == subkey:
            out.append(record)
    return sorted(out, key=lambda r: (r.start, r.peer_id))


def fetch_spans(dht: hivemind.DHT, model: str) -> list[SpanRecord]:
    return parse_records(model, dht.get(spans_key(model), latest=True))
