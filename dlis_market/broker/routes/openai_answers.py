"""How an OpenAI-style answer is shaped: each choice's live state, token texts and raw bytes,
log probabilities in chat and completions shapes, usage and the system fingerprint.

The routes that fill these are :mod:`dlis_market.broker.routes.openai`; log probabilities are
those of the model's raw distribution, as that module's docstring says.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dlis_market.broker.catalog import ServedModel
from dlis_market.broker.detokenize import StopMatcher
from dlis_market.inference.manifest import MANIFEST_NAME, sha256_file


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, char -> byte (the inverse of its ``bytes_to_unicode``)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class TokenTexts:
    """Token ids as OpenAI's logprob entries show them: the token's text and its raw bytes (a
    byte-level BPE token that is part of a character has its own bytes; its text then holds the
    replacement character, as OpenAI's)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.byte_level = backend is not None and type(backend.decoder).__name__ == "ByteLevel"
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def of(self, token: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token)
        if hit is None:
            raw: bytes | None = None
            if self.byte_level:
                piece = str(self.tok.convert_ids_to_tokens(token))
                table = _byte_decoder()
                raw = bytes(table[c] for c in piece) if all(c in table for c in piece) else None
            text = raw.decode("utf-8", errors="replace") if raw is not None else str(self.tok.decode([token]))
            hit = self._cache[token] = (text, list(raw if raw is not None else text.encode()))
        return hit


@dataclass(frozen=True)
class TokenLogprobs:
    """One generated token's log probabilities as the job's token event carried them, and where
    its text starts in the choice's text (completions' ``text_offset``)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]
    offset: int


@dataclass
class Choice:
    """One choice of the answer: its job and what was read of it so far."""

    index: int
    job_id: str
    echo: str = ""  # the prompt, for completions with ``echo``
    matcher: StopMatcher = field(default_factory=StopMatcher)
    text: str = ""  # streamed so far
    answer: str = ""  # the whole text, once the job ended
    finish: str | None = None
    error: str | None = None
    row: Any = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # every token's, when asked
    pending: list[TokenLogprobs] = field(default_factory=list)  # not yet sent with a chunk
    read: int = 0  # characters of the job's text read so far (before stop strings are cut)

    def take(self) -> list[TokenLogprobs]:
        out, self.pending = self.pending, []
        return out


def finish_reason(row: Any, eos: tuple[int, ...], limit: int) -> str:
    ids = json.loads(row.token_ids_json or "[]")
    return "stop" if (ids and ids[-1] in eos) or len(ids) < limit else "length"


def usage_of(choices: list[Choice]) -> dict[str, int]:
    """Tokens of every job of the answer (each was run and is paid): what the client is charged for."""
    prompt = sum(c.row.prompt_tokens for c in choices if c.row is not None)
    completion = sum(c.row.completion_tokens for c in choices if c.row is not None)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@functools.lru_cache(maxsize=64)
def _fingerprint(manifest: Path, mtime_ns: int) -> str:
    """The served weights, as OpenAI's ``system_fingerprint``: changes when the shards do."""
    return "fp_" + sha256_file(manifest)[:12]


def system_fingerprint(served: ServedModel) -> str:
    path = served.shard_dir / MANIFEST_NAME
    return _fingerprint(path, path.stat().st_mtime_ns)


@dataclass(frozen=True)
class Answer:
    """What the response of a request is made of, whatever its kind."""

    kind: Literal["chat", "text"]
    model: str
    fingerprint: str
    created: int
    limit: int
    eos: tuple[int, ...]
    texts: TokenTexts | None = None  # set when the request asked for log probabilities

    def logprobs(self, entries: list[TokenLogprobs]) -> dict[str, Any] | None:
        """OpenAI's ``logprobs`` object of a choice (or a chunk) for these tokens; None when not asked."""
        texts = self.texts
        if texts is None:
            return None
        if self.kind == "chat":

            def one(token: int, logprob: float) -> dict[str, Any]:
                text, raw = texts.of(token)
                return {"token": text, "logprob": logprob, "bytes": raw}

            content = [{**one(e.token, e.logprob), "top_logprobs": [one(t, v) for t, v in e.top]} for e in entries]
            return {"content": content, "refusal": None}
        # completions: the top tokens and the sampled one (as vLLM), text -> log probability
        tops = []
        for e in entries:
            top = {texts.of(t)[0]: v for t, v in e.top}
            top.setdefault(texts.of(e.token)[0], e.logprob)
            tops.append(top)
        return {
            "tokens": [texts.of(e.token)[0] for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": tops,
            "text_offset": [e.offset for e in entries],
        }

    @property
    def object(self) -> str:
        return "chat.completion" if self.kind == "chat" else "text_completion"

    def id_of(self, job_id: str) -> str:
        return ("chatcmpl-" if self.kind == "chat" else "cmpl-") + job_id[2:26]

    def head(self, choices: list[Choice]) -> dict[str, Any]:
        return {"id": self.id_of(choices[0].job_id), "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}  # fmt: skip
