"""Lenient manifest reading and the publication index."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from dlis_market.storage.errors import LayerSelectionError, ManifestError
from dlis_market.storage.manifest_files import files_for_layers, parse_manifest, safe_relative_path
from dlis_market.storage.publication import PartRef, Publication, PublishedFile
from dlis_market.storage.publish import hash_parts, part_ranges
from dlis_market.types import LayerRange

H = hashlib.sha256(b"x").hexdigest()


def test_top_level_files_list() -> None:
    data = json.dumps({"num_layers": 30, "files": [{"path": "a.safetensors", "size": 3, "sha256": H}]}).encode()
    m = parse_manifest(data)
    assert [f.path for f in m.files] == ["a.safetensors"]
    assert m.num_layers == 30
    assert m.sha256 == hashlib.sha256(data).hexdigest()


def test_nested_per_stage_and_extra_fields() -> None:
    doc = {
        "model": {"name": "smollm2", "num_hidden_layers": 30},
        "stages": [
            {
                "layers": {"start": 0, "end": 15},
                "files": [{"path": "s0/w.st", "size": 1, "sha256": H, "dtype": "bf16"}],
            },
            {
                "layers": {"start": 15, "end": 30},
                "files": [{"path": "s1/w.st", "size": 2, "sha256": H.upper()}],
            },
        ],
    }
    m = parse_manifest(json.dumps(doc).encode())
    assert [(f.path, f.size) for f in m.files] == [("s0/w.st", 1), ("s1/w.st", 2)]
    assert m.files[1].sha256 == H
    assert m.num_layers == 30
    assert m.total_size == 3


@pytest.mark.parametrize(
    "entry",
    [
        {"path": "../etc/passwd", "size": 1, "sha256": H},
        {"path": "/abs", "size": 1, "sha256": H},
        {"path": "a/./b", "size": 1, "sha256": H},
        {"path": "a", "size": -1, "sha256": H},
        {"path": "a", "size": 1, "sha256": "nothex"},
        {"path": "manifest.json", "size": 1, "sha256": H},
    ],
)
def test_bad_entries_are_refused(entry: dict[str, object]) -> None:
    with pytest.raises(ManifestError):
        parse_manifest(json.dumps({"files": [entry]}).encode())


def test_no_files_or_not_json_refused() -> None:
    with pytest.raises(ManifestError, match="lists no files"):
        parse_manifest(b'{"files": []}')
    with pytest.raises(ManifestError, match="not valid JSON"):
        parse_manifest(b"{")
    with pytest.raises(ManifestError, match="twice"):
        parse_manifest(
            json.dumps(
                {"files": [{"path": "a", "size": 1, "sha256": H}, {"path": "a", "size": 2, "sha256": H}]}
            ).encode()
        )


def test_safe_relative_path() -> None:
    assert safe_relative_path("a/b.bin") == "a/b.bin"
    for bad in ["", "a\\b", "a//b", "..", "a/../../b"]:
        with pytest.raises(ManifestError):
            safe_relative_path(bad)


def _pub() -> Publication:
    return Publication(
        manifest=PublishedFile(path="manifest.json", size=5, sha256=H, parts=(PartRef(cid="Qm1", size=5, sha256=H),)),
        files=(
            PublishedFile(
                path="a",
                size=7,
                sha256=H,
                parts=(PartRef(cid="Qm2", size=4, sha256=H), PartRef(cid="Qm3", size=3, sha256=H)),
            ),
        ),
    )


def test_publication_round_trip_is_canonical() -> None:
    pub = _pub()
    data = pub.to_bytes()
    assert Publication.from_bytes(data) == pub
    assert Publication.from_bytes(data).to_bytes() == data
    assert b" " not in data and json.loads(data)["format"] == "dlis-publication/2"


def test_publication_refuses_bad_documents() -> None:
    doc = json.loads(_pub().to_bytes())
    doc["files"][0]["size"] = 8  # parts add up to 7
    with pytest.raises(ManifestError, match="add up"):
        Publication.from_bytes(json.dumps(doc).encode())
    doc = json.loads(_pub().to_bytes())
    doc["files"][0]["path"] = "../x"
    with pytest.raises(ManifestError):
        Publication.from_bytes(json.dumps(doc).encode())
    with pytest.raises(ManifestError, match="not a dlis publication"):
        Publication.from_bytes(b'{"Hash": "Qm"}')
    doc = json.loads(_pub().to_bytes())
    del doc["files"][0]["parts"][1]["sha256"]  # format 2 needs every part's sha256
    with pytest.raises(ManifestError, match="lacks a sha256"):
        Publication.from_bytes(json.dumps(doc).encode())
    doc = json.loads(_pub().to_bytes())
    doc["format"] = "dlis-publication/1"  # format 1 has none
    with pytest.raises(ManifestError, match="has a sha256"):
        Publication.from_bytes(json.dumps(doc).encode())
    doc["files"][0]["parts"][0]["sha256"] = "XYZ"
    with pytest.raises(ManifestError, match="64 lowercase hex"):
        Publication.from_bytes(json.dumps(doc).encode())


def test_format_1_index_reads_and_serializes_as_before() -> None:
    old = (
        b'{"files":[{"parts":[{"cid":"Qm2","size":4},{"cid":"Qm3","size":3}],"path":"a","sha256":"'
        + H.encode()
        + b'","size":7}],"format":"dlis-publication/1","manifest":{"parts":[{"cid":"Qm1","size":5}],'
        b'"path":"manifest.json","sha256":"' + H.encode() + b'","size":5}}'
    )
    pub = Publication.from_bytes(old)
    assert pub.format == "dlis-publication/1" and not pub.parts_verifiable
    assert pub.to_bytes() == old  # the same bytes, so the same CID as when it was published


def test_hash_parts_gives_the_file_and_each_part(tmp_path: Path) -> None:
    data = os.urandom(9)
    (tmp_path / "f").write_bytes(data)
    whole, size, parts = hash_parts(tmp_path / "f", 4)
    assert (whole, size) == (hashlib.sha256(data).hexdigest(), 9)
    assert parts == [hashlib.sha256(data[o : o + n]).hexdigest() for o, n in part_ranges(9, 4)]
    (tmp_path / "e").write_bytes(b"")
    assert hash_parts(tmp_path / "e", 4)[2] == [hashlib.sha256(b"").hexdigest()]
    (tmp_path / "g").write_bytes(data[:8])
    assert len(hash_parts(tmp_path / "g", 4)[2]) == len(part_ranges(8, 4)) == 2


def test_part_ranges() -> None:
    assert part_ranges(0, 4) == [(0, 0)]
    assert part_ranges(4, 4) == [(0, 4)]
    assert part_ranges(9, 4) == [(0, 4), (4, 4), (8, 1)]
    with pytest.raises(ValueError):
        part_ranges(1, 0)


def _staged_manifest(stages: object) -> bytes:
    files = [{"path": f"s{i}.safetensors", "size": 1, "sha256": "a" * 64} for i in range(2)]
    files.append({"path": "config.json", "size": 1, "sha256": "b" * 64})
    return json.dumps({"num_layers": 4, "config_file": files[2], "stages": stages, "extra": files[:2]}).encode()


def test_layer_selection_keeps_overlapping_stages_and_shared_files() -> None:
    stages = [
        {"layers": {"start": 0, "end": 2}, "file": {"path": "s0.safetensors", "size": 1, "sha256": "a" * 64}},
        {"layers": {"start": 2, "end": 4}, "file": {"path": "s1.safetensors", "size": 1, "sha256": "a" * 64}},
    ]
    manifest = parse_manifest(_staged_manifest(stages))
    assert files_for_layers(manifest, LayerRange(start=2, end=3)) == {"s1.safetensors", "config.json"}
    assert files_for_layers(manifest, LayerRange(start=1, end=3)) == {"s0.safetensors", "s1.safetensors", "config.json"}
    with pytest.raises(LayerSelectionError, match=r"\[2, 5\).*4 layers"):
        files_for_layers(manifest, LayerRange(start=2, end=5))


def test_stage_entries_that_lie_are_refused() -> None:
    bad_path = [{"layers": {"start": 0, "end": 4}, "file": {"path": "elsewhere.bin"}}]
    with pytest.raises(ManifestError, match=r"'elsewhere\.bin' it does not list"):
        parse_manifest(_staged_manifest(bad_path))
    bad_range = [{"layers": {"start": 3, "end": 1}, "file": {"path": "s0.safetensors"}}]
    with pytest.raises(ManifestError, match="bad layer range"):
        parse_manifest(_staged_manifest(bad_range))
    with pytest.raises(ManifestError, match="need integers"):
        parse_manifest(_staged_manifest([{"layers": {"start": "0", "end": 4}, "file": {"path": "s0.safetensors"}}]))


def test_manifest_without_stages_cannot_select_layers() -> None:
    manifest = parse_manifest(json.dumps({"files": [{"path": "w.bin", "size": 1, "sha256": "a" * 64}]}).encode())
    with pytest.raises(LayerSelectionError, match="whole model"):
        files_for_layers(manifest, LayerRange(start=0, end=1))
