"""The LoRA adapters a worker serves: fetched from IPFS on a session's first use, checked, attached.

A session names an adapter with an :class:`~dlis_market.protocol.adapters.AdapterRef`. Before
any byte is fetched the worker checks the ref against the chain (with a registry): the adapter's
model id must be registered with the ref's CID, with the adapter id as its sha256 and with this
base's layer count, so a broker cannot make the worker sign receipts for one model id while
serving another adapter. It then fetches the adapter's index and files by CID (each file checked
against the index's sha256), checks that the folder hashes to the adapter id and was made for
this worker's exact base manifest, loads the tensors of its own layers and attaches them to the
stage (:class:`~dlis_market.inference.adapter_serving.StageAdapters`). Fetched adapters stay on
disk under ``models_dir/adapters``; at most ``node.max_adapters`` are attached at once (the least
recently used one no open session uses makes room).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

from dlis_market.errors import StorageError
from dlis_market.inference.adapters import LoraAdapter, adapter_sha256, load_adapter
from dlis_market.inference.errors import AdapterError
from dlis_market.inference.stage import Stage
from dlis_market.node.errors import CapacityError, NodeError
from dlis_market.node.model_identity import RegisteredModel
from dlis_market.protocol.adapters import AdapterRef
from dlis_market.settings import Settings
from dlis_market.storage.adapter_store import fetch_adapter
from dlis_market.storage.session import kubo_session

log = logging.getLogger(__name__)


class _CheckRow:
    """The one row of a check's prefill, bound to an adapter like a session."""


class AdapterRefusedError(NodeError):
    """A session's adapter does not check out (chain record, files, base): the opener's fault."""


class WorkerAdapters:
    def __init__(
        self,
        settings: Settings,
        stage: Stage,
        manifest_sha256: str,
        lookup: Callable[[bytes], RegisteredModel | None] | None,
        in_use: Callable[[str], bool],
    ) -> None:
        self.settings = settings
        self.stage = stage
        self.manifest_sha256 = manifest_sha256
        self.lookup = lookup  # model id -> its chain record; None: no registry (a dev swarm)
        self.in_use = in_use  # adapter id -> whether an open session uses it
        self.root = settings.models_dir / "adapters"
        self.max_adapters = settings.node.max_adapters
        self._attached: OrderedDict[str, str] = OrderedDict()  # adapter id -> model id (hex), LRU first
        self._locks: dict[str, asyncio.Lock] = {}

    async def ensure(self, ref: AdapterRef, compute: asyncio.Lock) -> None:
        """Attach ``ref``'s adapter (fetching it if needed) unless it is attached for this model id.
        ``compute`` is held while the stage's hooks change (never during a forward pass)."""
        if self._attached.get(ref.adapter_id) == ref.model_id.hex():
            self._attached.move_to_end(ref.adapter_id)
            return
        lock = self._locks.setdefault(ref.adapter_id, asyncio.Lock())
        async with lock:
            await asyncio.to_thread(self._check_chain, ref)
            if ref.adapter_id in self._attached:  # attached meanwhile, or under another model id
                self._attached[ref.adapter_id] = ref.model_id.hex()
                self._attached.move_to_end(ref.adapter_id)
                return
            began = time.perf_counter()
            folder = await self._fetch(ref)
            adapter = await asyncio.to_thread(self._load, ref, folder)
            async with compute:
                self._make_room(ref)
                self.stage.adapters.attach(adapter)
            self._attached[ref.adapter_id] = ref.model_id.hex()
            log.info("attached adapter %s (%s) from %s: fetched, checked and attached in %.0f ms", ref.name,
                     ref.adapter_id[:12], ref.cid, (time.perf_counter() - began) * 1000)  # fmt: skip

    def _check_chain(self, ref: AdapterRef) -> None:
        if self.lookup is None:
            return
        record = self.lookup(ref.model_id)
        manifest = self.stage.manifest
        if record is None:
            raise AdapterRefusedError(
                f"adapter {ref.name}: model id 0x{ref.model_id.hex()} is not registered in NodeRegistry; "
                "publish it with `dlis model adapter publish`"
            )
        if (record.manifest_sha256, record.manifest_cid, record.num_layers) != (
            ref.adapter_id,
            ref.cid,
            manifest.num_layers,
        ):
            raise AdapterRefusedError(
                f"adapter {ref.name}: the chain records model 0x{ref.model_id.hex()[:16]}.. as CID "
                f"{record.manifest_cid} with sha256 {record.manifest_sha256[:16]}.. and {record.num_layers} layers, "
                f"the session names CID {ref.cid}, adapter {ref.adapter_id[:16]}.. over {manifest.num_layers} "
                "layers; refusing to serve (and sign receipts for) it"
            )

    async def _fetch(self, ref: AdapterRef) -> Path:
        folder = self.root / ref.adapter_id
        if folder.is_dir():
            with contextlib.suppress(AdapterError, OSError):
                if await asyncio.to_thread(adapter_sha256, folder) == ref.adapter_id:
                    return folder
        tmp = self.root / f".fetch-{ref.adapter_id}"
        await asyncio.to_thread(shutil.rmtree, tmp, True)
        timeout = self.settings.storage.request_timeout_s
        try:
            async with kubo_session(self.settings) as kubo:
                record = await fetch_adapter(kubo, ref.cid, tmp, timeout_s=timeout)
        except StorageError as exc:
            raise AdapterRefusedError(f"adapter {ref.name}: fetching {ref.cid} failed: {exc}") from exc
        if record.base_manifest_sha256 != self.manifest_sha256:
            raise AdapterRefusedError(
                f"adapter {ref.name} was made for base manifest {record.base_manifest_sha256[:16]}.., this worker "
                f"serves {self.manifest_sha256[:16]}..; route it to workers of that base"
            )
        await asyncio.to_thread(shutil.rmtree, folder, True)
        await asyncio.to_thread(tmp.rename, folder)
        return folder

    def _load(self, ref: AdapterRef, folder: Path) -> LoraAdapter:
        try:
            return load_adapter(folder, self.stage.manifest, layers=self.stage.layers, expected_sha256=ref.adapter_id)
        except AdapterError as exc:
            raise AdapterRefusedError(f"adapter {ref.name} from {ref.cid}: {exc}") from exc

    def _make_room(self, ref: AdapterRef) -> None:
        while len(self._attached) >= self.max_adapters:
            idle = next((a for a in self._attached if not self.in_use(a)), None)
            if idle is None:
                raise CapacityError(
                    f"{len(self._attached)} adapters attached (node.max_adapters) and every one has open sessions; "
                    f"cannot attach {ref.name} now, route elsewhere or retry"
                )
            self.stage.adapters.detach(idle)
            del self._attached[idle]
            log.info("detached adapter %s to make room", idle[:12])

    @contextlib.contextmanager
    def applied(self, adapter_id: str | None) -> Iterator[None]:
        """Apply an attached adapter to a forward pass outside any session (a fingerprint check's
        prefill over one row)."""
        if adapter_id is None:
            yield
            return
        token = _CheckRow()  # stands for a session (the stage keeps a weak reference to it)
        sid = f"check-{adapter_id[:12]}"
        self.stage.adapters.bind(token, sid, adapter_id)
        try:
            with self.stage.adapters.rows([(token, sid)]):
                yield
        finally:
            self.stage.adapters.unbind(sid)
