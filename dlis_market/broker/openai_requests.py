"""What an OpenAI client may send to the broker: the request models of /v1/chat/completions and
/v1/completions, with every parameter either taken or refused with a 400 (``_unsupported``), and
the limits that bound a request (choices, stop strings, logit bias).

The routes that run these requests are :mod:`dlis_market.broker.routes.openai`.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from dlis_market.broker.schemas import ChatMessage, Sampling

DEFAULT_MAX_TOKENS = 64
MAX_CHOICES = 16  # jobs one request may start (n x prompts): each is admitted, routed and paid
MAX_STOPS = 4  # as OpenAI
SEED_SPACE = 2**63


NEUTRAL: tuple[Any, ...] = (None, False, 0, {}, [], "none")


def _unsupported(why: str, neutral: tuple[Any, ...] = NEUTRAL) -> Callable[[Any], Any]:
    """A validator that refuses a parameter unless it has a value that asks for nothing."""

    def check(value: Any) -> Any:
        if value not in neutral:
            raise ValueError(why)
        return value

    return check


NO_TOOLS = (
    "is not supported: this broker's workers return plain text, no tool or function calls; leave it out "
    "(README, 'OpenAI compatibility')"
)
MAX_LOGIT_BIAS = 300  # entries, as OpenAI


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class OpenAIRequest(BaseModel):
    """What both completion routes take. Unknown parameters are refused (as OpenAI does), and known
    ones this broker cannot honour are refused by name: nothing is accepted and ignored."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=128)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float | None = Field(None, ge=0, le=2, description="default 1.0, as OpenAI; 0 is greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=SEED_SPACE)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256, description="a label of the end user; no effect on output")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    privacy: Literal["low", "high"] = Field(
        "low",
        description="dlis extension (the openai client sends it in extra_body): high keeps the prompt's embeddings "
        "from the workers, the first stage running on secret shares at two workers of different operators",
    )

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias has {len(value)} entries; at most {MAX_LOGIT_BIAS}")
        for key, bias in value.items():
            if not key.isdigit() or not -100 <= bias <= 100:
                raise ValueError(
                    f"logit_bias {key!r}: {bias} must map a token id (a decimal string) to a bias in [-100, 100]"
                )
        return value

    def bias(self) -> dict[int, float] | None:
        return {int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None

    def wanted_logprobs(self) -> int | None:
        """Log probabilities to return: None none, k the sampled token's and the k most likely."""
        return None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str] | None:
        stops = [value] if isinstance(value, str) else value
        if stops is None:
            return None
        if len(stops) > MAX_STOPS or any(not s or len(s) > 500 for s in stops):
            raise ValueError(f"give at most {MAX_STOPS} stop strings of 1 to 500 characters each")
        return stops

    @field_validator("stream_options")
    @classmethod
    def _stream_only(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed with stream: true")
        return value

    def limit(self) -> int:
        return self.max_tokens or DEFAULT_MAX_TOKENS

    def sampling(self, seed: int) -> Sampling:
        """Temperature 0 is greedy; otherwise sampling at the given (default 1.0) temperature.
        Penalties, bias and logprobs apply either way."""
        extra = {
            "presence_penalty": self.presence_penalty or 0.0, "frequency_penalty": self.frequency_penalty or 0.0,
            "logit_bias": self.bias(), "logprobs": self.wanted_logprobs(),
        }  # fmt: skip
        if self.temperature == 0:
            return Sampling(greedy=True, **extra)
        temperature = 1.0 if self.temperature is None else self.temperature
        return Sampling(greedy=False, temperature=temperature, top_p=self.top_p, seed=seed, **extra)

    def seeds(self, count: int) -> list[int]:
        """One seed per job: ``seed + i`` (as each choice of ``n`` is its own job); without a seed,
        a random one, so unseeded requests differ."""
        base = self.seed if self.seed is not None else secrets.randbelow(SEED_SPACE)
        return [(base + i) % SEED_SPACE for i in range(count)]


def _text_of(content: str | list[dict[str, Any]] | None) -> str:
    if content is None:
        raise ValueError("content is required (tool calls are not supported, so every message has text)")
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
            raise ValueError(
                f"content part of type {part.get('type')!r} is not supported: this broker serves text models, "
                "send parts of type 'text' ({'type': 'text', 'text': ...}) only"
            )
        texts.append(part["text"])
    return "\n".join(texts)  # as vLLM joins a message's text parts


class ChatMessageIn(BaseModel):
    """An OpenAI chat message: text or text parts; ``developer`` is the system role of newer
    models; ``name`` tells participants of one role apart (it prefixes the text, ``name: text``)."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    tool_call_id: str | None = Field(None, max_length=256, description="kept for the client; not rendered")
    # What clients echo back from an earlier assistant message; only the empty values are taken.
    tool_calls: list[Any] | None = None
    function_call: Any = None
    refusal: str | None = None
    audio: Any = None
    annotations: list[Any] | None = None

    _no_calls = field_validator("tool_calls", "function_call", "audio")(_unsupported(NO_TOOLS))

    @field_validator("content")
    @classmethod
    def _text(cls, value: str | list[dict[str, Any]] | None) -> str | list[dict[str, Any]] | None:
        if len(_text_of(value)) > 200_000:
            raise ValueError("content is over 200000 characters")
        return value

    def native(self) -> ChatMessage:
        text = _text_of(self.content)
        return ChatMessage(
            role="system" if self.role == "developer" else self.role,
            content=f"{self.name}: {text}" if self.name else text,
        )


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    store: bool | None = None
    metadata: dict[str, str] | None = None

    _no_tools = field_validator("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls")(
        _unsupported("this parameter " + NO_TOOLS)
    )
    _no_audio = field_validator("audio", "prediction", "web_search_options")(  # {} asks for these too
        _unsupported(
            "this parameter is not supported: this broker serves text-in, text-out models; leave it out", (None,)
        )
    )
    _no_reasoning = field_validator("reasoning_effort")(
        _unsupported("reasoning_effort is not supported: the served models have no reasoning mode; leave it out")
    )
    _no_store = field_validator("store", "metadata")(
        _unsupported("stored completions are not supported (the ledger keeps each job for settlement only)")
    )

    @field_validator("response_format")
    @classmethod
    def _text_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value != {"type": "text"}:
            raise ValueError(
                f"response_format {value.get('type')!r} is not supported: the workers cannot constrain "
                "decoding to JSON; leave it out or send {'type': 'text'}"
            )
        return value

    @field_validator("modalities")
    @classmethod
    def _text_only(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and value != ["text"]:
            raise ValueError("only the 'text' modality is served; send ['text'] or leave it out")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _with_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true; send both or leave top_logprobs out")
        return value

    def wanted_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS


class CompletionRequest(OpenAIRequest):
    prompt: Any
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)
    suffix: str | None = None

    _no_suffix = field_validator("suffix")(
        _unsupported("suffix (insertion) is not supported: the served models only continue a prompt; leave it out")
    )

    @field_validator("prompt")
    @classmethod
    def _texts(cls, value: Any) -> list[str]:
        prompts = [value] if isinstance(value, str) else value
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(
                "prompt must be a string or a non-empty list of strings; token-id prompts are not supported, "
                "send the text"
            )
        if any(not p or len(p) > 200_000 for p in prompts):
            raise ValueError("each prompt must have 1 to 200000 characters")
        return prompts

    @field_validator("logprobs")
    @classmethod
    def _no_echo(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("echo"):
            raise ValueError(
                "logprobs with echo is not supported: it needs the prompt's log probabilities, which the workers "
                "do not compute; leave out echo (or logprobs)"
            )
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value != info.data.get("n", 1):
            raise ValueError(
                "best_of other than n is not supported: the broker does not rank choices server-side; ask for n "
                "choices with logprobs and pick on the client, or leave it out"
            )
        return value

    def prompts(self) -> list[str]:
        return list(self.prompt)

    def wanted_logprobs(self) -> int | None:
        return self.logprobs
