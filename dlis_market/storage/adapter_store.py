"""LoRA adapters on IPFS and in the local adapter store.

An adapter is published like a shard set, through the same :class:`KuboClient`: every canonical
file is added and pinned, then an index (``adapter.json``: the :class:`AdapterRecord` without its
CID, key-sorted) listing each file's size, sha256 and CID. The index's CID is the adapter's CID;
the adapter id (the sha256 over its canonical files, computed by
:func:`dlis_market.inference.adapters.adapter_sha256`) is what sessions, jobs and receipts name.

NodeRegistry cannot hold an adapter without a contract change (its models have no base model and
no kind), so published adapters are recorded here, one JSON file per adapter under
``HOME/adapters``. This package does not import the inference code: the caller checks the adapter
against its base and hands over the record.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dlis_market.storage.client import KuboClient
from dlis_market.storage.errors import ManifestError, ShardIntegrityError
from dlis_market.types import Cid

INDEX_NAME = "adapter.json"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AdapterFile(_Frozen):
    path: str
    size: int
    sha256: str
    cid: str | None = None  # set once published


ADAPTER_ID = r"^[0-9a-f]{64}$"


class AdapterRecord(_Frozen):
    """One adapter: what it is for, what it changes, its files; ``cid`` once published."""

    adapter_id: str = Field(pattern=ADAPTER_ID)  # sha256 over the canonical files (names the record's file)
    name: str
    base_model: str  # the base manifest's model_name
    base_manifest_sha256: str  # sha256 of the base's manifest.json: the exact base it was checked against
    base_num_layers: int
    r: int
    lora_alpha: float
    target_modules: list[str] | str
    layers: list[int]  # the layers it has tensors for
    files: list[AdapterFile]
    cid: str | None = None

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def index_bytes(self) -> bytes:
        """The published index: the record without its own CID."""
        body = self.model_dump(mode="json", exclude={"cid"})
        return (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()


def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


async def publish_adapter(client: KuboClient, adapter_dir: Path, record: AdapterRecord) -> AdapterRecord:
    """Add and pin the record's files (checked against their sha256 first), then the index;
    returns the record with every CID set."""
    files = []
    for entry in record.files:
        path = adapter_dir / entry.path
        digest = await asyncio.to_thread(_sha256, path)
        if digest != entry.sha256:
            raise ShardIntegrityError(
                f"{path} has sha256 {digest or '(missing)'}, adapter {record.adapter_id[:12]} lists {entry.sha256}; "
                "the folder changed since it was checked, check and publish it again"
            )
        added = await client.add_file(path, name=entry.path, pin=True)
        files.append(entry.model_copy(update={"cid": added.cid}))
    published = record.model_copy(update={"files": files})
    fd, tmp = tempfile.mkstemp(prefix="dlis-adapter-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(published.index_bytes())
        index = await client.add_file(Path(tmp), name=INDEX_NAME, pin=True)
    finally:
        os.unlink(tmp)
    return published.model_copy(update={"cid": Cid(index.cid)})


async def fetch_adapter(
    client: KuboClient, cid: str, out_dir: Path, *, timeout_s: float = 60.0, max_size: int = 1 << 30
) -> AdapterRecord:
    """Read the index at ``cid`` and write its files into ``out_dir``, each checked against the
    index's sha256. The caller checks the folder's adapter id (``adapter_sha256``) against the id
    the job names: the index is only as trustworthy as the CID it was asked for."""
    try:
        record = AdapterRecord.model_validate_json(await client.cat_bytes(cid, timeout_s=timeout_s, max_size=1 << 20))
    except (ValidationError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{cid} is not an adapter index ({exc}); check the CID") from exc
    await asyncio.to_thread(out_dir.mkdir, parents=True, exist_ok=True)
    for entry in record.files:
        if entry.cid is None or not entry.path or "/" in entry.path or "\\" in entry.path or entry.path.startswith("."):
            raise ManifestError(f"adapter index {cid} lists {entry.path!r} without a CID or outside its folder")
        data = await client.cat_bytes(entry.cid, timeout_s=timeout_s, max_size=max_size)
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry.sha256 or len(data) != entry.size:
            raise ShardIntegrityError(
                f"{entry.path} from {entry.cid} has sha256 {digest} ({len(data)} bytes), the index lists "
                f"{entry.sha256} ({entry.size} bytes); fetch it from another provider"
            )
        await asyncio.to_thread((out_dir / entry.path).write_bytes, data)
    return record.model_copy(update={"cid": Cid(cid)})


class AdapterStore:
    """Published adapters known to this machine: ``<root>/<adapter_id>.json`` each."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def put(self, record: AdapterRecord) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{record.adapter_id}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(record.model_dump_json(indent=2) + "\n")
        os.replace(tmp, path)  # a reader never sees half a record
        return path

    def get(self, adapter_id: str) -> AdapterRecord | None:
        if not re.fullmatch(ADAPTER_ID, adapter_id.lower()):
            raise ManifestError(f"{adapter_id!r} is not an adapter id (64 hex digits, the sha256 `adapter list` shows)")
        path = self.root / f"{adapter_id.lower()}.json"
        return self._read(path) if path.is_file() else None

    def list(self, base_model: str | None = None) -> list[AdapterRecord]:
        if not self.root.is_dir():
            return []
        records = [self._read(p) for p in sorted(self.root.glob("*.json"))]
        return [r for r in records if base_model is None or r.base_model == base_model]

    @staticmethod
    def _read(path: Path) -> AdapterRecord:
        try:
            return AdapterRecord.model_validate_json(path.read_text())
        except (ValidationError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{path} is not an adapter record ({exc}); delete it and publish again") from exc
