"""Head (tensor) parallelism: k workers serve one layer range together (Llama family).

Each member holds a 1/k slice of every layer in the range, split the way Megatron-LM splits a
transformer block, so a layer costs two all-reduces of one hidden row per token:

- attention by KV-head groups: member ``m`` keeps KV heads ``[m*KV/k, (m+1)*KV/k)`` and the query
  heads that read them (q/k/v column-parallel), computes attention for those heads with its own
  KV cache, and multiplies by its columns of o_proj (row-parallel): a partial sum of the output;
- MLP by columns: gate/up rows ``[m*I/k, (m+1)*I/k)`` (column-parallel), down_proj's matching
  columns (row-parallel): another partial sum.

The partial sums are added by an all-reduce between the members (:class:`GlooGroup`: gloo over
TCP on 127.0.0.1, one process per member; :class:`ThreadGroup`: members as threads of one
process, for tests). Gloo rather than the project's libp2p streams: an all-reduce runs twice per
layer per token (60 per token for SmolLM2's 30 layers), and gloo's ring all-reduce in C++ costs
tens of microseconds on loopback where a message through the p2p daemon costs milliseconds.
Gloo has no authentication: a group is formed only from workers the scheduler placed together
over a private link. It carries each member's partial sums in the clear unless the group adds
them with :class:`SecureAggregation` (``secure_aggregation=True``, 3 to 8 members): pairwise masks
that cancel in the sum, so a member (or anyone on the link) sees only uniformly random numbers
from the others and learns nothing beyond the sum, which every member needs anyway.

Norms, rotary embeddings and the residual stream are replicated: every member ends each layer
with the same full hidden state, so the range's output is taken from any member. One session at
a time per group (no continuous batching across sessions yet); a session's calls may carry
any number of tokens (prefill, chunked prefill, decode).
"""

from __future__ import annotations

import copy
import threading
from typing import Any, Protocol

import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from transformers import DynamicCache, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from dlis_market.inference.errors import SecretSharingError, TensorParallelError
from dlis_market.inference.secret_sharing import pair_key, pairwise_masks


class AllReduce(Protocol):
    def __call__(self, t: torch.Tensor) -> torch.Tensor: ...


def _ints(config: LlamaConfig) -> tuple[int, int, int]:
    """(query heads, KV heads, MLP width) of a Llama config."""
    kv = config.num_key_value_heads or config.num_attention_heads
    return int(config.num_attention_heads or 0), int(kv or 0), int(config.intermediate_size or 0)


def check_split(config: LlamaConfig, k: int) -> None:
    heads, kv, inter = _ints(config)
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise TensorParallelError(
            "head parallelism here supports Llama layers without biases (attention_bias, mlp_bias)"
        )
    if k < 1 or kv % k or heads % k or inter % k:
        raise TensorParallelError(
            f"{k}-way head parallelism needs k to divide the KV heads ({kv}), the query heads ({heads}) and "
            f"the MLP width ({inter}); choose k from {[d for d in range(1, kv + 1) if kv % d == 0 and inter % d == 0]}"
        )


def member_config(config: LlamaConfig, k: int) -> LlamaConfig:
    heads, kv, inter = _ints(config)
    sliced = copy.deepcopy(config)
    sliced.head_dim = int(getattr(config, "head_dim", None) or int(config.hidden_size or 0) // heads)
    sliced.num_attention_heads = heads // k
    sliced.num_key_value_heads = kv // k
    sliced.intermediate_size = inter // k
    return sliced


def slice_layer(layer: Any, config: LlamaConfig, k: int, rank: int, index: int) -> Any:
    """Member ``rank``'s 1/k of one decoder layer (a LlamaDecoderLayer), as one of the sliced shape."""
    cfg = member_config(config, k)
    hd, (heads, kv, inter) = int(cfg.head_dim or 0), _ints(cfg)
    q_rows = slice(rank * heads * hd, (rank + 1) * heads * hd)
    kv_rows = slice(rank * kv * hd, (rank + 1) * kv * hd)
    mlp_rows = slice(rank * inter, (rank + 1) * inter)
    out = LlamaDecoderLayer(cfg, index)
    src, dst = layer.self_attn, out.self_attn
    with torch.no_grad():
        dst.q_proj.weight.copy_(src.q_proj.weight[q_rows])
        dst.k_proj.weight.copy_(src.k_proj.weight[kv_rows])
        dst.v_proj.weight.copy_(src.v_proj.weight[kv_rows])
        dst.o_proj.weight.copy_(src.o_proj.weight[:, q_rows])
        out.mlp.gate_proj.weight.copy_(layer.mlp.gate_proj.weight[mlp_rows])
        out.mlp.up_proj.weight.copy_(layer.mlp.up_proj.weight[mlp_rows])
        out.mlp.down_proj.weight.copy_(layer.mlp.down_proj.weight[:, mlp_rows])
        out.input_layernorm.weight.copy_(layer.input_layernorm.weight)
        out.post_attention_layernorm.weight.copy_(layer.post_attention_layernorm.weight)
    return out.to(layer.self_attn.q_proj.weight.dtype).eval()


def causal_mask(n: int, past: int, dtype: torch.dtype) -> torch.Tensor | None:
    """The additive mask of ``n`` new tokens after ``past`` cached ones: token i sees keys
    ``[0, past + i]``. None for one token (it sees everything cached)."""
    if n == 1:
        return None
    blocked = torch.ones(n, past + n, dtype=torch.bool).triu(past + 1)
    return torch.zeros(n, past + n, dtype=dtype).masked_fill(blocked, torch.finfo(dtype).min)[None, None]


# Masked partial sums are added as integers below 2^MASK_BITS: k of them sum below 2^63 (int64, what
# gloo adds) for k <= 8, and the result is taken mod 2^MASK_BITS.
MASK_BITS = 60
MAX_SECURE_MEMBERS = 8


class SecureAggregation:
    """An all-reduce that hides each member's partial sum from everyone but the sum's readers.

    Members agree on a pairwise secret with every other member (X25519, public keys passed through
    the group itself once, on the first call). For each all-reduce a member encodes its partial
    in fixed point (``frac_bits`` fraction bits) mod 2^60 and adds its mask: the sum, for every
    other member ``j``, of a ChaCha20 stream keyed by their secret and the call's number, added
    when ``j`` ranks above it and subtracted when below (:func:`secret_sharing.pairwise_masks`).
    The masks of all members cancel, so the group's sum is the sum of the partials, to within
    ``k * 2**-(frac_bits + 1)`` per element.

    What each party learns: a member's contribution is uniform mod 2^60 to anyone who lacks one of
    its pairwise secrets, so the others (and the link) learn only the sum; ``k - 1`` members that
    pool their secrets learn the last one's partial (the sum minus theirs). So a group needs at
    least 3 members: with 2, each knows the sum and its own partial, hence the other's. The sum
    itself is the layer's output, which every member needs and which, like any hidden state, can
    be inverted toward the prompt: the masks hide each member's part, not the activations. They
    hide it from curious members, not from an active one: the key exchange is not signed here (a
    member that rewrites others' public keys in the exchange can unmask them), and a member can
    add anything to the sum. Costs 8 bytes per element on the link instead of 4 (fp32)."""

    def __init__(self, inner: AllReduce, rank: int, k: int, frac_bits: int = 24):
        if not 3 <= k <= MAX_SECURE_MEMBERS:
            raise TensorParallelError(
                f"secure aggregation needs 3 to {MAX_SECURE_MEMBERS} members, got {k}: with 2 each member learns "
                "the other's partial from the sum and its own, and over 8 the masked sums overflow int64"
            )
        self.inner, self.rank, self.k, self.frac_bits = inner, rank, k, frac_bits
        self.calls = 0
        self._secrets: dict[int, bytes] | None = None

    def _agree(self) -> dict[int, bytes]:
        """Pairwise secrets with every other member: each puts its public key in its row of a
        [k, 32] table of zeros; the group's sum is every member's key."""
        key = X25519PrivateKey.generate()
        table = torch.zeros(self.k, 32, dtype=torch.int64)
        table[self.rank] = torch.tensor(list(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)))
        keys = self.inner(table)
        secrets: dict[int, bytes] = {}
        for other in range(self.k):
            if other == self.rank:
                continue
            row = keys[other].tolist()
            if any(not 0 <= b <= 255 for b in row):
                raise SecretSharingError(f"member {other}'s public key did not arrive intact in the exchange")
            secrets[other] = key.exchange(X25519PublicKey.from_public_bytes(bytes(row)))
        return secrets

    def masked(self, partial: torch.Tensor) -> torch.Tensor:
        """What this member hands to the group for ``partial``: its fixed-point encoding plus its
        mask, mod 2^60 (int64). Each call uses fresh masks."""
        if self._secrets is None:
            self._secrets = self._agree()
        modulus = 1 << MASK_BITS
        scaled = partial.double() * 2.0**self.frac_bits
        limit = 2.0 ** (MASK_BITS - 1) / self.k
        peak = float(scaled.abs().max()) if scaled.numel() else 0.0
        if peak >= limit:
            raise SecretSharingError(
                f"a partial sum of magnitude {peak / 2.0**self.frac_bits:.3g} does not fit {MASK_BITS}-bit secure "
                f"aggregation at {self.frac_bits} fraction bits for {self.k} members: use fewer fraction bits"
            )
        label = b"tp-allreduce" + self.calls.to_bytes(8, "big")
        self.calls += 1
        keys = {j: pair_key(secret, self.rank, j, label) for j, secret in self._secrets.items()}
        mask = pairwise_masks(self.rank, self.k, partial.numel(), keys).reshape(partial.shape)
        return torch.remainder(torch.round(scaled).to(torch.int64) + mask, modulus)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """The group's sum of every member's ``t`` (this member's partial)."""
        modulus = 1 << MASK_BITS
        total = torch.remainder(self.inner(self.masked(t)), modulus)
        signed = torch.where(total >= modulus // 2, total - modulus, total)
        return (signed.double() / 2.0**self.frac_bits).to(t.dtype)


class TensorParallelMember:
    """One member of a k-way group serving ``layers`` of a Llama model: its slices, its share of the
    KV cache, and the all-reduce that joins it to the others (wrapped in :class:`SecureAggregation`
    when ``secure_aggregation``)."""

    def __init__(
        self, layers: list[Any], config: LlamaConfig, k: int, rank: int, all_reduce: AllReduce,
        secure_aggregation: bool = False,
    ) -> None:  # fmt: skip
        check_split(config, k)
        if not 0 <= rank < k:
            raise TensorParallelError(f"rank {rank} is not in a group of {k}")
        if secure_aggregation:
            all_reduce = SecureAggregation(all_reduce, rank, k)
        self.k, self.rank, self.all_reduce = k, rank, all_reduce
        self.bytes_per_element = 8 if secure_aggregation else None
        self.config = member_config(config, k)
        self.layers = [slice_layer(layer, config, k, rank, i) for i, layer in enumerate(layers)]
        self.rotary = LlamaRotaryEmbedding(config=config)
        self.cache = DynamicCache()
        self.position = 0
        self.bytes_reduced = 0  # what this member's all-reduces carried (its partial sums)

    def reset(self) -> None:
        self.cache = DynamicCache()
        self.position = 0

    @torch.no_grad()
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` ``[1, tokens, hidden]`` at the next positions of the session -> the range's output."""
        n = hidden.shape[1]
        position_ids = torch.arange(self.position, self.position + n).unsqueeze(0)
        pos = self.rotary(hidden, position_ids=position_ids)
        mask = causal_mask(n, self.position, hidden.dtype)
        for layer in self.layers:
            residual = hidden
            attn, _ = layer.self_attn(
                hidden_states=layer.input_layernorm(hidden), position_embeddings=pos, attention_mask=mask,
                cache=self.cache, position_ids=position_ids,
            )  # fmt: skip
            hidden = residual + self._reduce(attn)
            residual = hidden
            hidden = residual + self._reduce(layer.mlp(layer.post_attention_layernorm(hidden)))
        self.position += n
        return hidden

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        self.bytes_reduced += partial.numel() * (self.bytes_per_element or partial.element_size())
        return self.all_reduce(partial)


class ThreadGroup:
    """An all-reduce for k members running as threads of one process (sums in rank order)."""

    def __init__(self, k: int):
        self.k = k
        self._barrier = threading.Barrier(k)
        self._parts: list[torch.Tensor | None] = [None] * k
        self._sum: torch.Tensor | None = None

    def member(self, rank: int) -> AllReduce:
        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            self._parts[rank] = t
            if self._barrier.wait() == 0:
                total = self._parts[0]
                assert total is not None
                for p in self._parts[1:]:
                    assert p is not None
                    total = total + p
                self._sum = total
            self._barrier.wait()
            out = self._sum
            assert out is not None
            self._barrier.wait()  # nobody overwrites a part before everyone read the sum
            return out.clone()

        return all_reduce

    def abort(self) -> None:
        self._barrier.abort()


def run_threads(members: list[TensorParallelMember], group: ThreadGroup, hidden: torch.Tensor) -> list[torch.Tensor]:
    """Every member's forward on the same input, concurrently (they meet in the all-reduces)."""
    outs: list[Any] = [None] * len(members)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            outs[i] = members[i].forward(hidden)
        except BaseException as exc:  # re-raised below; breaking the barrier stops the others too
            errors.append(exc)
            group.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(members))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return outs


class GlooGroup:
    """torch.distributed's gloo all-reduce between k processes on 127.0.0.1."""

    def __init__(self, rank: int, k: int, port: int, timeout_s: float = 60.0):
        import datetime
        import os

        import torch.distributed as dist

        iface = os.environ.get("GLOO_SOCKET_IFNAME", "lo")
        if iface != "lo":
            raise TensorParallelError(
                f"GLOO_SOCKET_IFNAME={iface}: a head-parallel group talks over loopback only; unset it"
            )
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo reads it to pick its interface: loopback only
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=k,
            timeout=datetime.timedelta(seconds=timeout_s),
        )  # fmt: skip
        self._dist = dist

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        out = t.contiguous().clone()
        self._dist.all_reduce(out)
        return out

    def close(self) -> None:
        self._dist.destroy_process_group()
