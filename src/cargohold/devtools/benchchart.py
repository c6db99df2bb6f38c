"""The bench's bar chart as a PNG, with no dependency: an RGB canvas with rectangles and a 5x7 bitmap font, and a
PNG writer (zlib + struct: IHDR, one IDAT, IEND; each row filter 0).

Each scenario is one group of bars (one per tool, colours shared with the legend), scaled to the group's
largest median so that a 0.3 s scenario stays readable next to a 30 s one; the seconds are written on the bars.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

Color = tuple[int, int, int]

_GLYPHS: dict[str, tuple[int, ...]] = {
    "0": (0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E), "1": (0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E),
    "2": (0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F), "3": (0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E),
    "4": (0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02), "5": (0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E),
    "6": (0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E), "7": (0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08),
    "8": (0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E), "9": (0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C),
    "A": (0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11), "B": (0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E),
    "C": (0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E), "D": (0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C),
    "E": (0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F), "F": (0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10),
    "G": (0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F), "H": (0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11),
    "I": (0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E), "J": (0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C),
    "K": (0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11), "L": (0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F),
    "M": (0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11), "N": (0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11),
    "O": (0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E), "P": (0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10),
    "Q": (0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D), "R": (0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11),
    "S": (0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E), "T": (0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04),
    "U": (0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E), "V": (0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04),
    "W": (0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A), "X": (0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11),
    "Y": (0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04), "Z": (0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F),
    " ": (0, 0, 0, 0, 0, 0, 0), ".": (0, 0, 0, 0, 0, 0x0C, 0x0C), "-": (0, 0, 0, 0x1F, 0, 0, 0),
    "/": (0, 0x01, 0x02, 0x04, 0x08, 0x10, 0), ":": (0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0),
    "(": (0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02), ")": (0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08),
    "_": (0, 0, 0, 0, 0, 0, 0x1F), "%": (0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03),
    "=": (0, 0, 0x1F, 0, 0x1F, 0, 0), "+": (0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0),
    "?": (0x0E, 0x11, 0x01, 0x02, 0x04, 0, 0x04),
}
GLYPH_W, GLYPH_H = 6, 8  # 5x7 plus spacing

TOOL_COLORS: dict[str, Color] = {
    "cargohold": (46, 139, 87), "ctr": (65, 105, 225), "raw-floor": (128, 128, 128),
    "download": (218, 165, 32), "skopeo": (255, 127, 80), "umoci": (147, 112, 219),
}
_SPARE: tuple[Color, ...] = ((199, 21, 133), (0, 139, 139), (160, 82, 45), (112, 128, 144))
WHITE: Color = (255, 255, 255)
BLACK: Color = (0, 0, 0)


class Canvas:
    """An RGB image in memory (white), drawn on with rectangles and text."""

    def __init__(self, width: int, height: int) -> None:
        if width < 1 or height < 1:
            raise ValueError("a canvas needs a positive size")
        self.width, self.height = width, height
        self.pixels = bytearray(b"\xff" * (width * height * 3))

    def rect(self, x: int, y: int, w: int, h: int, color: Color) -> None:
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(self.width, x + w), min(self.height, y + h)
        if x1 <= x0 or y1 <= y0:
            return
        row = bytes(color) * (x1 - x0)
        for yy in range(y0, y1):
            start = (yy * self.width + x0) * 3
            self.pixels[start:start + len(row)] = row

    def text(self, x: int, y: int, s: str, color: Color = BLACK, scale: int = 1) -> None:
        for i, ch in enumerate(s.upper()):
            rows = _GLYPHS.get(ch, _GLYPHS["?"])
            for r, bits in enumerate(rows):
                for c in range(5):
                    if bits & (0x10 >> c):
                        self.rect(x + (i * GLYPH_W + c) * scale, y + r * scale, scale, scale, color)

    def png(self) -> bytes:
        return encode_png(self.width, self.height, bytes(self.pixels))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(width: int, height: int, rgb: bytes) -> bytes:
    """A truecolour 8-bit PNG of ``rgb`` (``width * height * 3`` bytes, rows top to bottom)."""
    stride = width * 3
    if len(rgb) != stride * height:
        raise ValueError(f"{len(rgb)} bytes of pixels for {width}x{height}")
    raw = b"".join(b"\x00" + rgb[y * stride:(y + 1) * stride] for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 9))
            + _chunk(b"IEND", b""))


def bar_chart(title: str, groups: Sequence[tuple[str, Sequence[tuple[str, float]]]]) -> Canvas:
    """Groups of (scenario, [(tool, median seconds)]) as bars; each group scaled to its own largest value."""
    tools: list[str] = []
    for _, bars in groups:
        tools += [t for t, _ in bars if t not in tools]
    colors = {t: TOOL_COLORS.get(t, _SPARE[i % len(_SPARE)]) for i, t in enumerate(tools)}
    bar_w, gap, plot_h, top, left = 32, 4, 200, 60, 20
    widths = [max(len(bars) * (bar_w + gap) + 16, (len(name) + 1) * GLYPH_W) for name, bars in groups]
    width = max(left * 2 + sum(widths), len(title) * GLYPH_W * 2 + 2 * left, 320)
    height = top + plot_h + 50
    c = Canvas(width, height)
    c.text(left, 10, title, scale=2)
    x = left
    for i, t in enumerate(tools):  # legend
        lx = left + i * 110
        c.rect(lx, 34, 10, 10, colors[t])
        c.text(lx + 14, 36, t)
    base = top + plot_h
    c.rect(left, base, width - 2 * left, 1, BLACK)
    for (name, bars), w in zip(groups, widths, strict=True):
        peak = max((v for _, v in bars), default=0.0) or 1.0
        bx = x + (w - len(bars) * (bar_w + gap)) // 2
        for tool, value in bars:
            h = max(1, round(plot_h * 0.85 * value / peak))
            c.rect(bx, base - h, bar_w, h, colors[tool])
            label = f"{value:.1f}" if value >= 10 else f"{value:.2f}"
            c.text(bx + (bar_w - len(label) * GLYPH_W) // 2, base - h - GLYPH_H - 1, label)
            bx += bar_w + gap
        c.text(x + (w - len(name) * GLYPH_W) // 2, base + 8, name)
        x += w
    return c


def write_chart(path: Path, title: str, groups: Sequence[tuple[str, Sequence[tuple[str, float]]]]) -> None:
    path.write_bytes(bar_chart(title, groups).png())
