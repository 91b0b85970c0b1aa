"""The LoRA adapters one stage serves, applied per session row by forward hooks.

Each targeted Linear of the stage gets one forward hook once an adapter targets it; a stage with
no adapter attached has no hooks and runs exactly as before. Per forward pass,
:meth:`StageAdapters.rows` says which adapter each row's session uses, and each hook adds
``scaling * B(A(x))`` to those rows:

- every row on one adapter: ``output + lora_B(lora_A(x)) * scaling``, PEFT's own expression;
- a mixed batch (several adapters, or some rows without one): one batched matmul pair for all
  rows, each row gathering its adapter's ``A`` and ``B`` from a per-module bank (slot 0 and the
  slots of adapters that skip this module are zeros, ranks padded with zeros, which add exact
  zeros), so the cost per module does not grow with the number of adapters in the batch.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional
from torch.utils.hooks import RemovableHandle

from dlis_market.inference.adapters import LoraAdapter
from dlis_market.inference.errors import AdapterMismatchError, AdapterNotAttachedError
from dlis_market.inference.families import Family
from dlis_market.inference.manifest import Manifest
from dlis_market.types import LayerRange

Lora = tuple[torch.Tensor, torch.Tensor]  # A [r, in], B [out, r] on the stage's device, in its dtype


@dataclass
class _Bank:
    """Every attached adapter's A and B of one module, by slot (0: none), ranks padded to the largest."""

    a: torch.Tensor  # [slots, r_max, in]
    b: torch.Tensor  # [slots, out, r_max]


@dataclass
class _Pass:
    """What the hooks apply during one forward pass."""

    adapters: frozenset[str]  # the adapters of this pass's rows
    single: str | None = None  # every row on this one adapter
    slots: torch.Tensor | None = None  # mixed: per row, its adapter's slot (0: none)
    scales: torch.Tensor | None = None  # mixed: per row, its adapter's scaling (0: none), [rows, 1, 1]


class StageAdapters:
    """Adapters attached to one stage (their tensors for the stage's layers only), the sessions
    bound to them, and the hooks that apply them."""

    def __init__(
        self,
        model: nn.Module,
        family: Family,
        manifest: Manifest,
        layers: LayerRange,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self._model = model
        self._family = family
        self._manifest = manifest
        self._layers = layers
        self._device = device
        self._dtype = dtype  # the stage's activations' dtype (bf16 for int8 / nf4 weights too)
        self._ranks: dict[str, dict[str, int]] = {}  # adapter id -> stage-local module -> its rank there
        self._scaling: dict[str, float] = {}  # adapter id -> alpha / r (or / sqrt(r): rsLoRA)
        self._slots: dict[str, int] = {}  # adapter id -> its slot in the banks (from 1)
        self._banks: dict[str, _Bank] = {}  # local module -> bank
        self._targets: dict[str, frozenset[str]] = {}  # local module -> adapters that change it
        self._hooks: dict[str, RemovableHandle] = {}
        self._bound: dict[str, tuple[weakref.ref[object], str]] = {}  # session id -> (its Session, adapter id)
        self._pass: _Pass | None = None  # set for one forward pass by rows()

    def __contains__(self, adapter_id: object) -> bool:
        return adapter_id in self._ranks

    @property
    def ids(self) -> list[str]:
        return sorted(self._ranks)

    def nbytes(self) -> int:
        """Bytes of the attached adapters' tensors on this stage (the banks: their only copy)."""
        return sum(bank.a.nbytes + bank.b.nbytes for bank in self._banks.values())

    def modules_of(self, adapter_id: str) -> list[str]:
        """The stage-local modules an attached adapter changes on this stage."""
        return sorted(self._ranks[adapter_id])

    # ------------------------------------------------------------------ attach / detach

    def attach(self, adapter: LoraAdapter) -> None:
        """Serve ``adapter`` for sessions bound to its id; its tensors of this stage's layers only."""
        if adapter.model_name != self._manifest.model_name:
            raise AdapterMismatchError(
                f"adapter {adapter.sha256[:12]} was checked against {adapter.model_name!r}, this stage serves "
                f"{self._manifest.model_name!r}; load it against this stage's manifest"
            )
        start, end = self._layers.start, self._layers.end
        if adapter.layers is not None and not (adapter.layers.start <= start and end <= adapter.layers.end):
            raise AdapterMismatchError(
                f"adapter {adapter.sha256[:12]} holds tensors of layers {adapter.layers}, this stage runs "
                f"{self._layers}; load it with layers={self._layers}"
            )
        weights: dict[str, Lora] = {}
        path = self._family.layers_path
        for module, layer in adapter.modules.items():
            if not start <= layer < end:
                continue
            local = f"{path}.{layer - start}{module[len(f'{path}.{layer}') :]}"
            target = self._model.get_submodule(local)
            a, b = adapter.tensors[module]
            if (target.in_features, target.out_features) != (a.shape[1], b.shape[0]):
                raise AdapterMismatchError(f"{module}: adapter shapes {a.shape}, {b.shape} do not fit {target}")
            weights[local] = (a.to(self._device, self._dtype), b.to(self._device, self._dtype))
        current = self._current()
        current[adapter.sha256] = weights
        self._scaling[adapter.sha256] = adapter.spec.scaling
        self._rebuild(current)

    def detach(self, adapter_id: str) -> bool:
        """Stop serving an adapter (its open sessions fail on their next step); False if not attached."""
        if adapter_id not in self._ranks:
            return False
        current = self._current()
        del current[adapter_id], self._scaling[adapter_id]
        self._rebuild(current)
        return True

    def _lora(self, adapter_id: str, local: str) -> Lora:
        """An attached adapter's A and B for one module: views into the bank, rank padding cut off."""
        bank, slot, r = self._banks[local], self._slots[adapter_id], self._ranks[adapter_id][local]
        return bank.a[slot, :r], bank.b[slot, :, :r]

    def _current(self) -> dict[str, dict[str, Lora]]:
        return {a: {m: self._lora(a, m) for m in ranks} for a, ranks in self._ranks.items()}

    def _rebuild(self, weights: dict[str, dict[str, Lora]]) -> None:
        """Slots, banks, targets and hooks for exactly the adapters in ``weights``."""
        self._ranks = {a: {m: lora[0].shape[0] for m, lora in w.items()} for a, w in weights.items()}
        self._slots = {a: i + 1 for i, a in enumerate(sorted(weights))}
        modules = sorted({m for w in weights.values() for m in w})
        self._targets = {m: frozenset(a for a, w in weights.items() if m in w) for m in modules}
        banks = {}
        for local in modules:
            loras = [(self._slots[a], weights[a][local]) for a in self._targets[local]]
            r_max = max(a.shape[0] for _, (a, _) in loras)
            a0, b0 = loras[0][1]
            bank = _Bank(
                a=torch.zeros(len(self._slots) + 1, r_max, a0.shape[1], dtype=self._dtype, device=self._device),
                b=torch.zeros(len(self._slots) + 1, b0.shape[0], r_max, dtype=self._dtype, device=self._device),
            )
            for slot, (a, b) in loras:
                bank.a[slot, : a.shape[0]] = a
                bank.b[slot, :, : b.shape[1]] = b
            banks[local] = bank
        self._banks = banks
        for local in [m for m in self._hooks if m not in self._banks]:
            self._hooks.pop(local).remove()
        for local in modules:
            if local not in self._hooks:
                self._hooks[local] = self._model.get_submodule(local).register_forward_hook(self._hook(local))

    # ------------------------------------------------------------------ sessions

    def require(self, session_id: str, adapter_id: str) -> None:
        """AdapterNotAttachedError unless sessions may be opened with ``adapter_id``."""
        if adapter_id not in self._ranks:
            raise AdapterNotAttachedError(
                f"session {session_id!r} asks for adapter {adapter_id}, not attached to stage {self._layers} "
                f"(attached: {', '.join(a[:12] for a in self.ids) or 'none'}); attach it before opening the session"
            )

    def bind(self, session: object, session_id: str, adapter_id: str) -> None:
        self.require(session_id, adapter_id)
        # Sessions the store drops (idle, failed) without a close_session are freed: forget them.
        self._bound = {k: v for k, v in self._bound.items() if v[0]() is not None}
        self._bound[session_id] = (weakref.ref(session), adapter_id)

    def unbind(self, session_id: str) -> None:
        self._bound.pop(session_id, None)

    def adapter_of(self, session: object, session_id: str) -> str | None:
        """The adapter a session was opened with (None: the base model). A session reopened under
        the same id after the store dropped the old one starts without one."""
        bound = self._bound.get(session_id)
        if bound is None or bound[0]() is not session:
            return None
        return bound[1]

    # ------------------------------------------------------------------ forward

    @contextmanager
    def rows(self, sessions: Sequence[tuple[object, str]]) -> Iterator[None]:
        """During one forward pass over ``sessions`` ((Session, id), in row order), apply each
        session's adapter to its row."""
        per_row = [self.adapter_of(session, sid) for session, sid in sessions]
        for (_, sid), adapter_id in zip(sessions, per_row, strict=True):
            if adapter_id is not None and adapter_id not in self._ranks:
                raise AdapterNotAttachedError(
                    f"session {sid!r} uses adapter {adapter_id}, detached from stage {self._layers}; "
                    "attach it again and replay the session"
                )
        used = frozenset(a for a in per_row if a is not None)
        if not used:
            self._pass = None
        elif len(used) == 1 and None not in per_row:
            self._pass = _Pass(used, single=next(iter(used)))
        else:
            slots = [0 if a is None else self._slots[a] for a in per_row]
            scales = [0.0 if a is None else self._scaling[a] for a in per_row]
            self._pass = _Pass(
                used,
                slots=torch.tensor(slots, device=self._device),
                scales=torch.tensor(scales, dtype=self._dtype, device=self._device).view(-1, 1, 1),
            )
        try:
            yield
        finally:
            self._pass = None

    def _hook(self, local: str) -> Callable[[nn.Module, tuple[Any, ...], torch.Tensor], torch.Tensor | None]:
        def add_lora(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
            step = self._pass
            if step is None or step.adapters.isdisjoint(self._targets.get(local, ())):
                return None
            x = args[0].to(self._dtype)
            if step.single is not None:  # PEFT's order: result + lora_B(lora_A(x)) * scaling
                a, b = self._lora(step.single, local)
                term = functional.linear(functional.linear(x, a), b) * self._scaling[step.single]
            elif step.slots is not None and step.scales is not None:
                bank = self._banks[local]
                low = torch.bmm(x, bank.a[step.slots].transpose(1, 2))  # [rows, T, r_max]
                term = torch.bmm(low, bank.b[step.slots].transpose(1, 2)) * step.scales
            else:
                return None
            return output + term.to(output.dtype)

        return add_lora
