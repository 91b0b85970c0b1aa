"""LoRA adapters as the market names them: a model version of its own on chain, over a base model.

An adapter is registered in NodeRegistry like any model version (``dlis model adapter publish``):
under the name ``"<base>:<adapter>"``, with the CID of its IPFS index as manifest CID, its id
(sha256 over its canonical files, :func:`dlis_market.inference.adapters.adapter_sha256`) as
manifest sha256 and the base's layer count. A job names it like a model (``model`` in the
OpenAI API: ``"smollm2-135m:pirate"``); the broker routes it over the base model's spans (any
worker of the base serves any adapter, fetched on first use) and authorizes and settles the job
under the adapter's model id, so the authorization and every stage's receipt name the adapter.
Sessions carry an :class:`AdapterRef`; a worker checks it against the chain before fetching.
"""

from __future__ import annotations

from pydantic import Field

from dlis_market.types import WireModel

SEPARATOR = ":"


def split_model(name: str) -> tuple[str, str | None]:
    """``"base:adapter"`` -> ``("base", "adapter")``; a plain model name -> ``(name, None)``."""
    base, sep, adapter = name.partition(SEPARATOR)
    return (base, adapter) if sep and adapter else (name, None)


def adapter_model_name(base: str, adapter: str) -> str:
    return f"{base}{SEPARATOR}{adapter}"


class AdapterRef(WireModel):
    """The adapter a session applies: what a worker fetches (``cid``), checks the files against
    (``adapter_id``) and signs receipts for (``model_id``, the adapter's NodeRegistry model id)."""

    name: str = Field(min_length=3, max_length=200)  # "<base>:<adapter>"
    model_id: bytes = Field(min_length=32, max_length=32)
    cid: str = Field(min_length=1, max_length=100)
    adapter_id: str = Field(pattern=r"^[0-9a-f]{64}$")
