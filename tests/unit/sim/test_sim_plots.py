"""The PNG writer produces files any decoder reads: valid chunks, CRCs and pixel data."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from dlis_market.sim.plots import bar_chart, line_chart


def _decode(data: bytes) -> tuple[int, int, bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, idat, size = 8, b"", (0, 0)
    while at < len(data):
        (n,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + n]
        (crc,) = struct.unpack(">I", data[at + 8 + n : at + 12 + n])
        assert crc == zlib.crc32(kind + body)
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        at += 12 + n
    return size[0], size[1], zlib.decompress(idat)


def test_charts_are_valid_pngs_with_ink_on_them(tmp_path: Path) -> None:
    bars = bar_chart(tmp_path / "b.png", "earnings", ["phone", "laptop"], [0.5, -0.25], "DLIS")
    lines = line_chart(tmp_path / "l.png", "gain vs p", {"gain": ([0, 0.1, 0.5], [1.0, -2.0, -9.0])}, "p", "DLIS", 0.05)
    for path in (bars, lines):
        w, h, raw = _decode(path.read_bytes())
        assert len(raw) == h * (1 + 3 * w)
        rows = [raw[y * (1 + 3 * w) + 1 : (y + 1) * (1 + 3 * w)] for y in range(h)]
        assert any(set(r) != {255} for r in rows), "the chart drew nothing"
