"""Request and response bodies of the broker API (the ``*Create`` / ``*Public`` split).

Token amounts are uint256 on chain, so they travel as decimal strings (integers are accepted on
input too); addresses are checksummed on the way in.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, field_validator, model_validator
from web3 import Web3

from dlis_market.broker.ledger_schema import BatchStatus, JobStatus


def _to_uint(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("amount must be an integer number of token units, not a boolean")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and value.strip().isdigit():
        n = int(value.strip())
    else:
        raise ValueError("amount must be an integer number of token units (decimal string or integer)")
    if n < 0 or n >= 2**256:
        raise ValueError("amount must fit uint256")
    return n


Uint = Annotated[int, BeforeValidator(_to_uint), PlainSerializer(lambda v: str(v), return_type=str)]


def _address(value: Any) -> str:
    if not isinstance(value, str) or not Web3.is_address(value):
        raise ValueError("must be an Ethereum address (0x + 40 hex digits)")
    return str(Web3.to_checksum_address(value))


Address = Annotated[str, BeforeValidator(_address)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Sampling(_In):
    greedy: bool = True
    temperature: float = Field(1.0, gt=0, le=5)
    top_k: int | None = Field(None, ge=1, le=100_000)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    # OpenAI's penalties over the generated tokens and logit bias, applied by the last stage
    # (``inference.sampling``); greedy choice sees them too.
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[int, float] | None = Field(None, max_length=300, description="token id -> bias in [-100, 100]")
    logprobs: int | None = Field(
        None, ge=0, le=20, description="Return each token's log probability and this many most likely tokens'."
    )

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[int, float] | None) -> dict[int, float] | None:
        for token, bias in (value or {}).items():
            if token < 0 or not -100 <= bias <= 100:
                raise ValueError(f"logit_bias {token}: {bias} needs a token id >= 0 and a bias in [-100, 100]")
        return value


class Policy(_In):
    privacy: Literal["low", "high"] = Field(
        "low",
        description="high: attested nodes only, and the first stage runs on secret shares at two workers of different "
        "operators (the broker embeds the prompt; no worker sees the embeddings or that stage's activations).",
    )
    max_latency_ms: float | None = Field(None, gt=0, description="Upper bound on estimated latency per token.")
    max_cost: Uint | None = Field(None, description="Upper bound on the job's cost in token units.")


class Authorization(_In):
    """The client's EIP-712 JobAuthorization (see JobMarket.sol) and its signature."""

    client: Address
    nonce: Uint
    max_cost: Uint
    deadline: int = Field(ge=0, lt=2**63)
    signature: str = Field(pattern=r"^0x[0-9a-fA-F]{130}$", description="65-byte signature, 0x-hex")


class ChatMessage(_In):
    role: Literal["system", "user", "assistant", "tool"]  # "tool": a tool's result, as the chat template renders it
    content: str = Field(max_length=200_000)


class JobCreate(_In):
    model: str = Field(min_length=1, max_length=128)
    prompt: str | None = Field(None, min_length=1, max_length=200_000)
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=256)
    max_tokens: int = Field(32, ge=1, le=4096)
    sampling: Sampling = Field(default_factory=Sampling)
    policy: Policy = Field(default_factory=Policy)
    authorization: Authorization
    stream: bool = False
    # "zk": the last stage proves its head's step to the tokens (halo2); the job completes only with
    # a proof that verifies. For small fp32 Llama models only (zk.max_head_params).
    proof: Literal["zk"] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> JobCreate:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        return self


class QuoteRequest(_In):
    model: str = Field(min_length=1, max_length=128)
    prompt: str | None = Field(None, min_length=1, max_length=200_000)
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=256)
    max_tokens: int = Field(32, ge=1, le=4096)
    policy: Policy = Field(default_factory=Policy)

    @model_validator(mode="after")
    def _one_input(self) -> QuoteRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        return self


class HopPublic(BaseModel):
    node: str
    peer_id: str
    start: int
    end: int


class Quote(BaseModel):
    model: str
    model_id: str
    prompt_tokens: int
    max_tokens: int
    route: list[HopPublic]
    fallback: bool
    cost: Uint
    fee: Uint
    max_total: Uint
    estimated_latency_ms: float
    broker: str
    chain_id: int
    job_market: str
    max_authorization_lifetime_s: int = Field(
        description="Sign a deadline at most this many seconds ahead of chain time (JobMarket refuses later ones)."
    )


class ReceiptPublic(BaseModel):
    stage: int
    node: str
    start: int
    end: int
    tokens: int
    output_hash: str
    amount: Uint
    signature: str


class SettlementPublic(BaseModel):
    batch_id: str | None
    status: BatchStatus | None
    tx_hash: str | None
    block: int | None


class JobPublic(BaseModel):
    id: str
    status: JobStatus
    model: str
    client: str
    nonce: Uint
    route: list[HopPublic] | None
    fallback: bool
    content_withheld: bool = Field(
        description="True when the request and answer are left out: only the job's client reads them."
    )
    request: dict[str, Any] | None = Field(description="The job's request (prompt or messages, sampling, policy).")
    answer: str | None
    prompt_tokens: int
    completion_tokens: int
    cost: Uint | None
    fee: Uint | None
    max_cost: Uint
    ttft_ms: float | None
    latency_ms: float | None
    tokens_per_s: float | None
    receipts: list[ReceiptPublic]
    settlement: SettlementPublic
    error: str | None
    created_at: float


class ApiKeyCreate(_In):
    """A client's EIP-712 ``ApiKeyRequest`` (chain/typed_data.py, JobMarket domain) and its signature."""

    client: Address
    broker: Address = Field(description="The broker asked (GET /v1/network `broker`): binds the request to it.")
    cap: Uint = Field(description="Most token units the key may spend in all; authorize exactly this on chain.")
    expires_at: int = Field(ge=0, lt=2**64, description="Unix seconds; authorize exactly this expiry on chain.")
    nonce: Uint
    deadline: int = Field(ge=0, lt=2**64, description="Unix seconds (chain time) the request must arrive by.")
    signature: str = Field(pattern=r"^0x[0-9a-fA-F]{130}$", description="65-byte signature, 0x-hex")


class ApiKeyPublic(BaseModel):
    api_key: str = Field(description="The secret, shown once: the broker keeps only its sha256.")
    client: str
    spender: str = Field(description="Authorize it: JobMarket.setSpender(spender, 0, cap, expires_at) from `client`.")
    cap: Uint
    expires_at: int
    job_market: str


class ApiKeyTerms(BaseModel):
    broker: str
    chain_id: int
    job_market: str = Field(description="The EIP-712 verifying contract of an ApiKeyRequest.")
    max_request_ttl_s: int = Field(description="A request's deadline may be at most this far ahead of chain time.")
    max_cap: Uint
