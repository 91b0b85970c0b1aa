"""PNG charts of a simulation without a plotting library: a small raster canvas, a 5x7 pixel font
and a PNG encoder on :mod:`zlib` (matplotlib and Pillow are not dependencies of the project).

Two chart kinds cover what ``dlis sim`` draws: :func:`bar_chart` (a figure per device class or
per seed) and :func:`line_chart` (latency percentiles, cheater gain against check fraction).
"""

from __future__ import annotations

import itertools
import math
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

Color = tuple[int, int, int]
WHITE: Color = (255, 255, 255)
BLACK: Color = (0, 0, 0)
GREY: Color = (200, 200, 200)
PALETTE: tuple[Color, ...] = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))

# 5x7 glyphs, one int per row, bit 4 = leftmost pixel. Lower case is drawn as upper case.
_FONT: dict[str, tuple[int, ...]] = {
    " ": (0, 0, 0, 0, 0, 0, 0),
    "0": (14, 17, 19, 21, 25, 17, 14),
    "1": (4, 12, 4, 4, 4, 4, 14),
    "2": (14, 17, 1, 2, 4, 8, 31),
    "3": (31, 2, 4, 2, 1, 17, 14),
    "4": (2, 6, 10, 18, 31, 2, 2),
    "5": (31, 16, 30, 1, 1, 17, 14),
    "6": (6, 8, 16, 30, 17, 17, 14),
    "7": (31, 1, 2, 4, 8, 8, 8),
    "8": (14, 17, 17, 14, 17, 17, 14),
    "9": (14, 17, 17, 15, 1, 2, 12),
    "A": (14, 17, 17, 31, 17, 17, 17),
    "B": (30, 17, 17, 30, 17, 17, 30),
    "C": (14, 17, 16, 16, 16, 17, 14),
    "D": (28, 18, 17, 17, 17, 18, 28),
    "E": (31, 16, 16, 30, 16, 16, 31),
    "F": (31, 16, 16, 30, 16, 16, 16),
    "G": (14, 17, 16, 23, 17, 17, 15),
    "H": (17, 17, 17, 31, 17, 17, 17),
    "I": (14, 4, 4, 4, 4, 4, 14),
    "J": (7, 2, 2, 2, 2, 18, 12),
    "K": (17, 18, 20, 24, 20, 18, 17),
    "L": (16, 16, 16, 16, 16, 16, 31),
    "M": (17, 27, 21, 21, 17, 17, 17),
    "N": (17, 17, 25, 21, 19, 17, 17),
    "O": (14, 17, 17, 17, 17, 17, 14),
    "P": (30, 17, 17, 30, 16, 16, 16),
    "Q": (14, 17, 17, 17, 21, 18, 13),
    "R": (30, 17, 17, 30, 20, 18, 17),
    "S": (15, 16, 16, 14, 1, 1, 30),
    "T": (31, 4, 4, 4, 4, 4, 4),
    "U": (17, 17, 17, 17, 17, 17, 14),
    "V": (17, 17, 17, 17, 17, 10, 4),
    "W": (17, 17, 17, 21, 21, 21, 10),
    "X": (17, 17, 10, 4, 10, 17, 17),
    "Y": (17, 17, 17, 10, 4, 4, 4),
    "Z": (31, 1, 2, 4, 8, 16, 31),
    ".": (0, 0, 0, 0, 0, 12, 12),
    ",": (0, 0, 0, 0, 12, 4, 8),
    "-": (0, 0, 0, 31, 0, 0, 0),
    "+": (0, 4, 4, 31, 4, 4, 0),
    "=": (0, 0, 31, 0, 31, 0, 0),
    "%": (24, 25, 2, 4, 8, 19, 3),
    "/": (0, 1, 2, 4, 8, 16, 0),
    ":": (0, 12, 12, 0, 12, 12, 0),
    "(": (2, 4, 8, 8, 8, 4, 2),
    ")": (8, 4, 2, 2, 2, 4, 8),
    "[": (14, 8, 8, 8, 8, 8, 14),
    "]": (14, 2, 2, 2, 2, 2, 14),
    "_": (0, 0, 0, 0, 0, 0, 31),
    "<": (2, 4, 8, 16, 8, 4, 2),
    ">": (8, 4, 2, 1, 2, 4, 8),
    "'": (12, 4, 8, 0, 0, 0, 0),
    "?": (14, 17, 1, 2, 4, 0, 4),
}


class Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.w, self.h = width, height
        self.px = bytearray(WHITE * (width * height))

    def dot(self, x: int, y: int, c: Color) -> None:
        if 0 <= x < self.w and 0 <= y < self.h:
            k = 3 * (y * self.w + x)
            self.px[k : k + 3] = bytes(c)

    def rect(self, x0: int, y0: int, x1: int, y1: int, c: Color) -> None:
        for y in range(max(0, min(y0, y1)), min(self.h, max(y0, y1) + 1)):
            for x in range(max(0, min(x0, x1)), min(self.w, max(x0, x1) + 1)):
                self.dot(x, y, c)

    def line(self, x0: int, y0: int, x1: int, y1: int, c: Color, width: int = 1) -> None:
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for s in range(steps + 1):
            x = round(x0 + (x1 - x0) * s / steps)
            y = round(y0 + (y1 - y0) * s / steps)
            for d in range(width):
                self.dot(x, y + d, c)

    def text(self, x: int, y: int, s: str, c: Color = BLACK, scale: int = 1) -> None:
        for ch in s.upper():
            glyph = _FONT.get(ch, _FONT["?"])
            for row, bits in enumerate(glyph):
                for col in range(5):
                    if bits & (16 >> col):
                        self.rect(
                            x + col * scale,
                            y + row * scale,
                            x + col * scale + scale - 1,
                            y + row * scale + scale - 1,
                            c,
                        )
            x += 6 * scale

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[3 * y * self.w : 3 * (y + 1) * self.w]) for y in range(self.h))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        header = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)  # 8-bit RGB
        return (
            b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
        )


def text_width(s: str, scale: int = 1) -> int:
    return 6 * scale * len(s)


def _label(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 1e5 or abs(x) < 1e-2:
        return f"{x:.1e}"
    return f"{x:.3g}"


_W, _H, _L, _R, _T, _B = 640, 400, 80, 20, 40, 60  # size and margins


def _axes(c: Canvas, title: str, lo: float, hi: float, ylabel: str) -> tuple[float, float]:
    c.text(_L, 12, title, scale=2)
    c.text(8, _T - 12, ylabel)
    span = hi - lo or 1.0
    for k in range(5):
        v = lo + span * k / 4
        y = _H - _B - round((_H - _T - _B) * k / 4)
        c.line(_L, y, _W - _R, y, GREY)
        c.text(_L - 6 - text_width(_label(v)), y - 3, _label(v))
    c.line(_L, _T, _L, _H - _B, BLACK)
    c.line(_L, _H - _B, _W - _R, _H - _B, BLACK)
    return lo, span


def _y(v: float, lo: float, span: float) -> int:
    return _H - _B - round((_H - _T - _B) * (v - lo) / span)


def bar_chart(path: Path, title: str, labels: Sequence[str], values: Sequence[float], ylabel: str) -> Path:
    c = Canvas(_W, _H)
    finite = [v for v in values if math.isfinite(v)]
    lo, hi = min([0.0, *finite]), max([0.0, *finite])
    lo, span = _axes(c, title, lo, hi if hi > lo else lo + 1.0, ylabel)
    n = max(len(values), 1)
    slot = (_W - _L - _R) / n
    zero = _y(0.0, lo, span)
    for k, (label, v) in enumerate(zip(labels, values, strict=True)):
        x0 = round(_L + slot * k + slot * 0.15)
        x1 = round(_L + slot * (k + 1) - slot * 0.15)
        if math.isfinite(v):
            c.rect(x0, _y(v, lo, span), x1, zero, PALETTE[k % len(PALETTE)])
            c.text((x0 + x1) // 2 - text_width(_label(v)) // 2, min(_y(v, lo, span), zero) - 10, _label(v))
        c.text((x0 + x1) // 2 - text_width(label) // 2, _H - _B + 8, label)
    path.write_bytes(c.png())
    return path


def line_chart(
    path: Path,
    title: str,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    marker_x: float | None = None,
) -> Path:
    """Lines through ``(x, y)`` points per named series; ``marker_x`` draws a vertical line."""
    c = Canvas(_W, _H)
    xs = [x for xv, _ in series.values() for x in xv if math.isfinite(x)]
    ys = [y for _, yv in series.values() for y in yv if math.isfinite(y)]
    if marker_x is not None and math.isfinite(marker_x):
        xs.append(marker_x)
    xlo, xhi = (min(xs), max(xs)) if xs else (0.0, 1.0)
    ylo, yhi = (min([0.0, *ys]), max([0.0, *ys])) if ys else (0.0, 1.0)
    ylo, yspan = _axes(c, title, ylo, yhi if yhi > ylo else ylo + 1.0, ylabel)
    xspan = (xhi - xlo) or 1.0

    def px(x: float) -> int:
        return _L + round((_W - _L - _R) * (x - xlo) / xspan)

    for k in range(5):
        v = xlo + xspan * k / 4
        c.text(px(v) - text_width(_label(v)) // 2, _H - _B + 8, _label(v))
    c.text(_W - _R - text_width(xlabel), _H - _B + 24, xlabel)
    if marker_x is not None and math.isfinite(marker_x):
        c.line(px(marker_x), _T, px(marker_x), _H - _B, PALETTE[3])
    zero = _y(0.0, ylo, yspan)
    c.line(_L, zero, _W - _R, zero, BLACK)
    for k, (name, (xv, yv)) in enumerate(series.items()):
        color = PALETTE[k % len(PALETTE)]
        pts = [(px(x), _y(y, ylo, yspan)) for x, y in zip(xv, yv, strict=True) if math.isfinite(x) and math.isfinite(y)]
        for (a, b), (d, e) in itertools.pairwise(pts):
            c.line(a, b, d, e, color, width=2)
        for a, b in pts:
            c.rect(a - 2, b - 2, a + 2, b + 2, color)
        c.text(_L + 10, _T + 6 + 12 * k, name, color)
    path.write_bytes(c.png())
    return path
