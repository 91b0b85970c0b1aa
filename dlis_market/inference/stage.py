"""A pipeline stage: the layers ``[start, end)`` of one model, loaded from its own shard only.

Loading verifies the manifest and the shard's size + sha256 first, then builds the model on the
meta device (buffers such as rotary frequencies are real) and assigns only this shard's tensors;
layers outside the range are dropped, so resident memory scales with the range. Nothing is kept
if any check fails.

**Device.** ``device`` (``auto``, ``cpu``, ``cuda``; :func:`.device.resolve_device`) holds the weights, the
KV caches and the activations: the stage's tensors move there once the checks above pass
(bitsandbytes int8 / nf4 weights are made there directly, so their CUDA kernels run on them),
and inputs from the wire are moved there on arrival. Outputs come back to the CPU, where they
leave the stage (a worker sends them and hashes their bytes for its receipts, the same bytes as a
CPU stage's for the same values); ``forward(..., keep_on_device=True)`` keeps hidden states on
the device for the next stage of a :class:`~dlis_market.inference.pipeline.LocalPipeline`.
Sampling runs on the CPU, so a seed gives the same tokens for the same logits on any device.

Loading, sessions and the batched forward share the stage's model, caches and adapter hooks, so
they are one class; choosing and moving to the device (:mod:`.device`), the family specifics, KV
cache, sampling and adapters live elsewhere.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import DynamicCache

from dlis_market.inference.adapter_serving import StageAdapters
from dlis_market.inference.device import move_to, resolve_device
from dlis_market.inference.errors import (
    ContextLengthError,
    ManifestError,
    SessionError,
    StageMismatchError,
)
from dlis_market.inference.families import Family, family_for
from dlis_market.inference.kv_cache import (
    RAGGED_SDPA,
    Session,
    SessionStore,
    can_pad,
    padding_mask,
    stabilise_rows,
)
from dlis_market.inference.manifest import Manifest, StageEntry, config_from_manifest, load_manifest
from dlis_market.inference.messages import StageInput, StageOutput
from dlis_market.inference.quantization import compute_dtype, install_quantized, is_quantized_param
from dlis_market.inference.sampling import SamplingParams, TokenLogprob, sample_with_logprob
from dlis_market.inference.shard_reader import read_shard
from dlis_market.settings import InferenceSettings
from dlis_market.types import LayerRange


@dataclass(frozen=True)
class SampledOutput(StageOutput):
    """The last stage's output: the sampled tokens and, per session, the chosen token's log
    probabilities when its ``SamplingParams.logprobs`` asked for them (None otherwise)."""

    logprobs: tuple[TokenLogprob | None, ...] = ()


class Stage:
    """Runs one layer range with per-session KV caches; the last stage samples tokens.

    For sessions with presence/frequency penalties the last stage keeps the tokens it sampled for
    them (their history), as the penalties count the tokens generated so far. Replaying a
    session on a new stage (failover, spot check) feeds the same steps, so that stage samples,
    and counts, the same tokens.
    """

    def __init__(
        self,
        manifest: Manifest,
        entry: StageEntry,
        family: Family,
        config: PretrainedConfig,
        model: nn.Module,
        settings: InferenceSettings,
        device: torch.device | None = None,
    ) -> None:
        self.manifest = manifest
        self.entry = entry
        self.layers: LayerRange = entry.layers
        self.family = family
        self.config = config
        self.stage_config = family.stage_config(config, entry.layers)
        self.model = model
        self.device = device or torch.device("cpu")  # weights, KV caches and activations
        self.dtype = compute_dtype(manifest.dtype)
        self.is_first = entry.has_embeddings
        self.is_last = entry.has_head
        self.sessions = SessionStore(self.stage_config, settings.max_sessions, settings.max_session_tokens)
        self.keep_batches = settings.keep_batches
        # Continuous batching: sessions at different positions share one pass, their caches
        # left-padded to the longest. Only for plain full-attention caches; a stage with sliding
        # layers (Gemma3) groups sessions by position instead (see kv_cache).
        self.mixes_positions = can_pad(self.stage_config)
        # session id -> (its Session, the tokens sampled for it): only sessions with penalties
        self._history: dict[str, tuple[Session, list[int]]] = {}
        # LoRA adapters served on the fly (hooks on this stage's Linears); sessions name one at open
        self.adapters = StageAdapters(model, family, manifest, entry.layers, self.device, self.dtype)

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        shard_dir: Path,
        layers: LayerRange | None = None,
        index: int | None = None,
        settings: InferenceSettings | None = None,
        device: str | torch.device = "cpu",
    ) -> Stage:
        """Load the stage for ``layers`` (or stage ``index``) from a folder made by ``dlis model shard``
        onto ``device`` (see :func:`resolve_device`; checked before anything is read)."""
        target = resolve_device(device)
        manifest = load_manifest(shard_dir)
        if layers is not None:
            entry = manifest.stage_for(layers)
        elif index is not None and 0 <= index < len(manifest.stages):
            entry = manifest.stages[index]
        else:
            raise StageMismatchError(
                f"stage index {index} is out of range: {shard_dir} has {len(manifest.stages)} stages"
            )
        config = config_from_manifest(manifest)
        family = family_for(config)
        if family.name != manifest.architecture or family.num_layers(config) != manifest.num_layers:
            raise ManifestError(
                f"{shard_dir}/manifest.json says {manifest.architecture} with {manifest.num_layers} layers "
                f"but its "
                f"config is {family.name} with {family.num_layers(config)}; re-export the shards"
            )
        tensors = read_shard(shard_dir, entry.file, entry.compression)
        if sorted(tensors) != entry.tensor_names:
            raise StageMismatchError(
                f"{shard_dir / entry.file.path} does not hold the tensors the manifest lists for stage "
                f"{entry.index} {entry.layers}; re-export the shards"
            )
        for name in tensors:
            layer = family.layer_of(name)
            if layer is not None and not entry.layers.start <= layer < entry.layers.end:
                raise StageMismatchError(
                    f"{shard_dir / entry.file.path} holds {name} (layer {layer}) outside {entry.layers}; "
                    "it is another stage's shard, re-export the shards"
                )
        model = cls._build(manifest, entry, family, config, tensors, target)
        return cls(manifest, entry, family, config, model, settings or InferenceSettings(), target)

    @staticmethod
    def _build(
        manifest: Manifest,
        entry: StageEntry,
        family: Family,
        config: PretrainedConfig,
        tensors: dict[str, torch.Tensor],
        device: torch.device,
    ) -> nn.Module:
        with init_empty_weights(include_buffers=False):
            model = family.model_class()(config)
        if manifest.quantization:
            install_quantized(model, family.layers_path, tensors, manifest.quantization, device)
        model.load_state_dict(tensors, assign=True, strict=False)
        if model.config._attn_implementation == "sdpa":  # padded batches attend row by row (kv_cache)
            model.set_attn_implementation(RAGGED_SDPA)
        # After the install: bitsandbytes modules choose their fast CPU kernels in eval mode only.
        model.eval()
        if entry.has_head and manifest.tie_word_embeddings and family.head_weight not in tensors:
            head = model.get_submodule(family.head_weight.rsplit(".", 1)[0])
            head.weight = model.get_submodule(family.embed_weight.rsplit(".", 1)[0]).weight
        family.keep_layers(model, entry.layers)
        prefixes = [family.layers_path + "."]
        if entry.has_embeddings:
            prefixes += family.first_stage_prefixes
        if entry.has_head:
            prefixes += family.last_stage_prefixes
        missing = [
            n
            for n, p in model.named_parameters(remove_duplicate=False)
            if n.startswith(tuple(prefixes)) and p.is_meta and not is_quantized_param(p)  # those: on the device
        ]
        if missing:
            raise StageMismatchError(
                f"shard {entry.file.path} lacks {len(missing)} tensors its stage needs (e.g. {missing[0]}); "
                "re-export the shards"
            )
        move_to(model, device)
        # in bf16 a session's rows give the same numbers alone as batched with others
        # (kv_cache.RowStableLinear, where the device's kernels need it: probed there, so after
        # the move, at the thread count set before loading); fp32 keeps the summation-order bound
        stabilise_rows(model, family.layers_path + ".")
        return model

    def resident_bytes(self) -> int:
        """Bytes of real (non-meta) parameters and buffers this stage holds."""
        seen: set[int] = set()
        total = 0
        for t in [*self.model.parameters(), *self.model.buffers()]:
            if t.is_meta or id(t) in seen:
                continue
            seen.add(id(t))
            total += t.numel() * t.element_size()
        return total

    # ------------------------------------------------------------------ sessions

    def check_sampling(self, sampling: SamplingParams) -> None:
        """SessionError for sampling this stage cannot apply: a logit_bias token outside the vocabulary."""
        if sampling.logit_bias:
            top = max(t for t, _ in sampling.logit_bias)
            vocab = int(self.config.vocab_size)
            if top >= vocab:
                raise SessionError(
                    f"logit_bias names token {top}, outside the vocabulary of {vocab} tokens of "
                    f"{self.manifest.model_name}; use ids of this model's tokenizer"
                )

    def open_session(
        self, session_id: str, max_length: int, sampling: SamplingParams | None = None, adapter: str | None = None
    ) -> None:
        """Open a session; ``adapter`` (an id attached with ``self.adapters.attach``) applies to its rows."""
        if sampling is not None:
            self.check_sampling(sampling)
        if adapter is not None:
            self.adapters.require(session_id, adapter)
        session = self.sessions.open(session_id, max_length, sampling)
        if adapter is not None:
            self.adapters.bind(session, session_id, adapter)

    def close_session(self, session_id: str) -> bool:
        self._history.pop(session_id, None)
        self.adapters.unbind(session_id)
        return self.sessions.close(session_id)

    def _history_of(self, session: Session) -> list[int] | None:
        """The tokens sampled so far for a session with penalties (None: it has none)."""
        if not session.sampling.penalises:
            return None
        if len(self._history) > len(self.sessions):  # sessions closed by the store (idle, failed)
            self._history = {k: v for k, v in self._history.items() if k in self.sessions}
        kept = self._history.get(session.session_id)
        if kept is None or kept[0] is not session:  # a new session under a reused id starts over
            kept = (session, [])
            self._history[session.session_id] = kept
        return kept[1]

    # ------------------------------------------------------------------ forward

    def check_input(self, inp: StageInput) -> list[Session]:
        """The sessions ``inp`` names, or a refusal of an input this stage cannot run (wrong kind
        of data, shapes, unknown or misplaced sessions); changes nothing (the worker checks a step
        with it before queueing it)."""
        data = inp.token_ids if self.is_first else inp.hidden
        if data is None:
            want = "token_ids" if self.is_first else "hidden states"
            raise StageMismatchError(f"stage {self.layers} needs {want} in its input; check the pipeline order")
        if data.shape[0] != len(inp.session_ids) or len(inp.positions) != len(inp.session_ids):
            raise SessionError(f"input has batch {data.shape[0]} for {len(inp.session_ids)} sessions")
        if not self.is_first and (data.ndim != 3 or data.shape[2] != self.config.hidden_size):
            raise StageMismatchError(
                f"hidden states of shape {tuple(data.shape)} do not fit stage {self.layers} "
                f"(hidden size {self.config.hidden_size}); the previous stage serves another model"
            )
        if self.is_first and data.numel() and (int(data.min()) < 0 or int(data.max()) >= self.config.vocab_size):
            raise StageMismatchError(
                f"token ids must be in [0, {self.config.vocab_size}), got {int(data.min())}..{int(data.max())}; "
                "use this model's tokenizer"
            )
        sessions = [self.sessions.get(sid) for sid in inp.session_ids]
        for session, pos in zip(sessions, inp.positions, strict=True):
            if session.length != pos:
                raise SessionError(
                    f"session {session.session_id!r} is at position {session.length} on stage {self.layers} "
                    f"but the input starts at {pos}; replay the session from position {session.length}"
                )
            if pos + inp.num_tokens > session.max_length:
                raise ContextLengthError(
                    f"session {session.session_id!r} would reach {pos + inp.num_tokens} tokens, over its "
                    f"limit of {session.max_length}; open it with a larger max_length or stop generating"
                )
        return sessions

    @torch.inference_mode()
    def forward(self, inp: StageInput, keep_on_device: bool = False) -> StageOutput:
        """Run one step for a batch of sessions, in one forward pass even at different positions.

        Stages whose caches cannot be padded (:attr:`mixes_positions` False) run one pass per
        position. Either way each session's output is its own: padded cache slots are masked out.
        The input may be on any device; outputs are on the CPU, or hidden states stay on
        :attr:`device` with ``keep_on_device`` (for a next stage in this process).
        """
        sessions = self.check_input(inp)
        data = inp.token_ids if self.is_first else inp.hidden
        if data is None:  # check_input raised already; this narrows the type
            raise StageMismatchError(f"stage {self.layers} got an input without data")
        data = data.to(self.device)
        groups: dict[int, list[int]] = {}
        for row, pos in enumerate(inp.positions):
            groups.setdefault(0 if self.mixes_positions else pos, []).append(row)
        out_rows: dict[int, torch.Tensor] = {}
        try:
            for rows in groups.values():
                group = [sessions[r] for r in rows]
                cache, lengths, order = self.sessions.batch_cache(group)
                rows = [rows[i] for i in order]  # the cache's row order
                group = [group[i] for i in order]
                with self.adapters.rows([(s, s.session_id) for s in group]):
                    result = self._run_group(data[rows], [inp.positions[r] for r in rows], cache, lengths)
                if len(group) > 1:
                    self.sessions.keep_batch(group, cache, [n + inp.num_tokens for n in lengths])
                    if not self.keep_batches:
                        self.sessions.unbatch()
                for i, r in enumerate(rows):
                    out_rows[r] = result[i : i + 1]
        except Exception:
            # A failure mid-forward may leave caches half-updated: drop those sessions so that
            # nothing continues from a corrupt state (the caller replays them).
            for session in sessions:
                self.sessions.close(session.session_id)
            raise
        now = time.monotonic()
        for session in sessions:
            session.length += inp.num_tokens
            session.last_used = now
        hidden = torch.cat([out_rows[r] for r in range(len(sessions))], dim=0)
        if not self.is_last:
            hidden = hidden if keep_on_device else hidden.cpu()
            return StageOutput(inp.session_ids, inp.positions, inp.step, hidden=hidden)
        logits = hidden.float().cpu()  # sampled on the CPU, with each session's CPU generator
        tokens: list[int] = []
        logprobs: list[TokenLogprob | None] = []
        for i, s in enumerate(sessions):
            history = self._history_of(s)
            token, logprob = sample_with_logprob(logits[i], s.sampling, s.generator, history or ())
            if history is not None:
                history.append(token)
            tokens.append(token)
            logprobs.append(logprob)
        return SampledOutput(
            inp.session_ids,
            inp.positions,
            inp.step,
            token_ids=torch.tensor(tokens, dtype=torch.int64),
            logits=logits if inp.want_logits else None,
            logprobs=tuple(logprobs) if any(lp is not None for lp in logprobs) else (),
        )

    def _run_group(
        self, data: torch.Tensor, positions: list[int], cache: DynamicCache, lengths: list[int]
    ) -> torch.Tensor:
        """One forward pass continuing ``cache`` (:meth:`SessionStore.batch_cache`), whose row ``i``
        holds ``lengths[i]`` tokens (== ``positions[i]``, checked) at its end."""
        length = data.shape[1]
        offsets = torch.arange(length, dtype=torch.long, device=self.device).unsqueeze(0)
        position_ids = torch.tensor(positions, dtype=torch.long, device=self.device).unsqueeze(1) + offsets  # rotary
        mask = padding_mask(lengths, length, self.device)  # None unless the rows' caches differ in length
        hidden = self.family.embed(self.model, data, position_ids) if self.is_first else data.to(self.dtype)
        hidden = self.family.run_layers(self.model, hidden, position_ids, cache, self.stage_config, mask)
        if self.is_last:
            return self.family.head(self.model, hidden)[:, -1, :]
        return hidden
