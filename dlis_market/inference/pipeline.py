"""All stages of a shard set in one process: prefill, batched decode, timings.

This is the reference driver for the stage API (a network worker wraps the same ``Stage``): each
step builds one :class:`StageInput` for the sessions at that step and hands every stage's output
to the next stage; the last stage returns sampled token ids. Hidden states pass from stage to
stage on the stages' device (``load(..., device="cuda")``); token ids and logits come back on the
CPU.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dlis_market.inference.adapters import load_adapter
from dlis_market.inference.errors import ContextLengthError, SessionError, ShardError
from dlis_market.inference.manifest import load_manifest
from dlis_market.inference.messages import StageInput, StageOutput
from dlis_market.inference.sampling import SamplingParams
from dlis_market.inference.stage import Stage, resolve_device
from dlis_market.settings import InferenceSettings


@dataclass
class Generation:
    """One session's result: generated ids, optional per-step logits, timings."""

    session_id: str
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    ttft_s: float = 0.0
    total_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        decode_s = self.total_s - self.ttft_s
        return (len(self.token_ids) - 1) / decode_s if len(self.token_ids) > 1 and decode_s > 0 else 0.0


class LocalPipeline:
    """Runs every stage of a model in this process, in order."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        if not stages or not stages[0].is_first or not stages[-1].is_last:
            raise ShardError("a pipeline needs stages from the first (embeddings) to the last (head), in order")
        for a, b in itertools.pairwise(stages):
            if a.layers.end != b.layers.start:
                raise ShardError(f"stage {a.layers} is followed by {b.layers}; the ranges must be contiguous")
        self.stages = list(stages)
        self.config = stages[0].config

    @classmethod
    def load(
        cls, shard_dir: Path, settings: InferenceSettings | None = None, device: str | torch.device = "cpu"
    ) -> LocalPipeline:
        """Every stage of ``shard_dir`` on ``device`` (``auto``, ``cpu``, ``cuda``; checked before loading)."""
        target = resolve_device(device)
        manifest = load_manifest(shard_dir)
        return cls(
            [Stage.load(shard_dir, index=i, settings=settings, device=target) for i in range(len(manifest.stages))]
        )

    def attach_adapter(self, adapter_dir: Path, expected_sha256: str | None = None) -> str:
        """Check a PEFT LoRA adapter against this model and attach it to every stage (each keeps its
        own layers' tensors); returns its id for ``generate_ids(..., adapters=)``."""
        adapter = load_adapter(adapter_dir, self.stages[0].manifest, expected_sha256=expected_sha256)
        for stage in self.stages:
            stage.adapters.attach(adapter)
        return adapter.sha256

    def step(self, inp: StageInput) -> StageOutput:
        """Send one input through every stage; returns the last stage's output."""
        out: StageOutput | None = None
        for stage in self.stages:
            out = stage.forward(inp, keep_on_device=True)
            if out.hidden is not None:
                inp = StageInput(
                    out.session_ids, out.positions, inp.step, hidden=out.hidden, want_logits=inp.want_logits
                )
        if out is None:
            raise ShardError("pipeline has no stages")
        return out

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: SamplingParams | None = None,
        stop_token_ids: Sequence[int] = (),
        want_logits: bool = False,
        adapters: Sequence[str | None] | None = None,
    ) -> list[Generation]:
        """Generate for several prompts at once; same-length sessions share forward passes.

        ``adapters`` names, per prompt, an attached adapter id or None (the base model)."""
        context = int(getattr(self.config, "max_position_embeddings", 0)) or None
        for p in prompts:
            if not p:
                raise ContextLengthError("a prompt is empty; give at least one token")
            if context is not None and len(p) + max_new_tokens > context:
                raise ContextLengthError(
                    f"prompt of {len(p)} tokens + {max_new_tokens} new tokens exceeds the model context of "
                    f"{context}; shorten the prompt or lower --max-new-tokens"
                )
        if adapters is not None and len(adapters) != len(prompts):
            raise SessionError(f"{len(adapters)} adapters for {len(prompts)} prompts; give one (or None) per prompt")
        gens = [Generation(f"local-{uuid.uuid4().hex[:12]}", list(p)) for p in prompts]
        opened: list[tuple[Stage, str]] = []
        try:
            for i, g in enumerate(gens):
                for stage in self.stages:
                    adapter = adapters[i] if adapters is not None else None
                    stage.open_session(g.session_id, len(g.prompt_ids) + max_new_tokens, sampling, adapter)
                    opened.append((stage, g.session_id))
            self._run(gens, max_new_tokens, set(stop_token_ids), want_logits)
        finally:
            for stage, sid in opened:
                stage.close_session(sid)
        return gens

    def _run(self, gens: list[Generation], max_new_tokens: int, stops: set[int], want_logits: bool) -> None:
        start = time.perf_counter()
        by_length: dict[int, list[Generation]] = {}
        for g in gens:
            by_length.setdefault(len(g.prompt_ids), []).append(g)
        for group in by_length.values():
            ids = torch.tensor([g.prompt_ids for g in group], dtype=torch.long)
            out = self.step(
                StageInput(tuple(g.session_id for g in group), (0,) * len(group), 0, ids, None, want_logits)
            )
            self._collect(group, out, start, want_logits)
        active = [g for g in gens if max_new_tokens > 1 and g.token_ids[-1] not in stops]
        for step in range(1, max_new_tokens):
            if not active:
                break
            ids = torch.tensor([[g.token_ids[-1]] for g in active], dtype=torch.long)
            positions = tuple(len(g.prompt_ids) + len(g.token_ids) - 1 for g in active)
            out = self.step(StageInput(tuple(g.session_id for g in active), positions, step, ids, None, want_logits))
            self._collect(active, out, start, want_logits)
            active = [g for g in active if len(g.token_ids) < max_new_tokens and g.token_ids[-1] not in stops]

    @staticmethod
    def _collect(group: list[Generation], out: StageOutput, start: float, want_logits: bool) -> None:
        if out.token_ids is None:
            raise ShardError("the last stage returned no token ids")
        now = time.perf_counter() - start
        for i, g in enumerate(group):
            g.token_ids.append(int(out.token_ids[i]))
            if want_logits and out.logits is not None:
                g.logits.append(out.logits[i].clone())
            if len(g.token_ids) == 1:
                g.ttft_s = now
            g.total_s = now
