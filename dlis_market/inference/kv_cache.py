"""Per-session KV caches of one stage, their limits, eviction, and batching across sessions.

Each session owns a ``DynamicCache`` built from the stage config (so Gemma3 sliding layers get
sliding cache layers). Sessions at the same position are run in one forward pass by stacking
their caches along the batch dimension and splitting them back afterwards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import DynamicCache

from dlis_market.inference.errors import ContextLengthError, SessionError
from dlis_market.inference.sampling import SamplingParams


@dataclass
class Session:
    """One generation stream as seen by one stage."""

    session_id: str
    max_length: int
    cache: DynamicCache
    sampling: SamplingParams
    generator: torch.Generator
    length: int = 0
    last_used: float = field(default_factory=time.monotonic)


class SessionStore:
    """Open sessions of a stage, bounded in count and length."""

    def __init__(self, config: PretrainedConfig, max_sessions: int, max_session_tokens: int) -> None:
        self._config = config
        self.max_sessions = max_sessions
        self.max_session_tokens = max_session_tokens
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._sessions

    def open(self, session_id: str, max_length: int, sampling: SamplingParams | None = None) -> Session:
        if session_id in self._sessions:
            raise SessionError(f"session {session_id!r} is already open; close it first or use a new id")
        if len(self._sessions) >= self.max_sessions:
            raise SessionError(
                f"stage already holds {len(self._sessions)} sessions (limit {self.max_sessions}); close or "
                "evict idle ones, or raise inference.max_sessions"
            )
        limit = min(self.max_session_tokens, int(getattr(self._config, "max_position_embeddings", max_length)))
        if not 0 < max_length <= limit:
            raise ContextLengthError(
                f"session {session_id!r} asks for {max_length} tokens; this stage allows 1..{limit} "
                "(model context and inference.max_session_tokens); shorten the prompt or max_new_tokens"
            )
        params = sampling or SamplingParams()
        session = Session(session_id, max_length, DynamicCache(config=self._config), params, params.generator())
        self._sessions[session_id] = session
        return session

    def get(self, session_id: str) -> Session:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise SessionError(
                f"session {session_id!r} is not open on this stage (closed, evicted or never opened); "
                "open it again and replay its tokens"
            ) from None

    def close(self, session_id: str) -> bool:
        """Drop a session and its cache; False if it was not open."""
        return self._sessions.pop(session_id, None) is not None

    def evict_idle(self, max_idle_s: float, now: float | None = None) -> list[str]:
        """Close every session unused for more than ``max_idle_s`` seconds; returns their ids."""
        now = time.monotonic() if now is None else now
        stale = [sid for sid, s in self._sessions.items() if now - s.last_used > max_idle_s]
        for sid in stale:
            del self._sessions[sid]
        return stale

    def cache_bytes(self) -> int:
        total = 0
        for session in self._sessions.values():
            layers: list[Any] = list(session.cache.layers)
            for layer in layers:
                if layer.is_initialized and layer.keys is not None and layer.values is not None:
                    total += layer.keys.nbytes + layer.values.nbytes
        return total


def stack_caches(caches: list[DynamicCache], config: PretrainedConfig) -> DynamicCache:
    """One cache whose batch holds ``caches`` in order; all must be at the same length."""
    out = DynamicCache(config=config)
    for i, layer in enumerate(out.layers):
        sources: list[Any] = [c.layers[i] for c in caches]
        if not sources[0].is_initialized:
            continue
        target: Any = layer
        keys = torch.cat([s.keys for s in sources], dim=0)
        values = torch.cat([s.values for s in sources], dim=0)
        target.lazy_initialization(keys, values)
        target.keys, target.values = keys, values
        if hasattr(sources[0], "cumulative_length"):
            target.cumulative_length = sources[0].cumulative_length
    return out


def split_cache(batched: DynamicCache, caches: list[DynamicCache]) -> None:
    """Write row ``i`` of ``batched`` back into ``caches[i]``."""
    for i, layer in enumerate(batched.layers):
        source: Any = layer
        if not source.is_initialized:
            continue
        for row, cache in enumerate(caches):
            target: Any = cache.layers[i]
            if not target.is_initialized:
                target.lazy_initialization(source.keys, source.values)
            target.keys = source.keys[row : row + 1]
            target.values = source.values[row : row + 1]
            if hasattr(source, "cumulative_length"):
                target.cumulative_length = source.cumulative_length
