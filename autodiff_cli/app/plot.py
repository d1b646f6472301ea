"""The score curve of a run as a PNG, drawn here with zlib + struct (no plotting library).

`score_curve_png(points)` returns the PNG bytes of a 640x400 plot: axes with ticks and labels
(a built-in 5x7 bitmap font), the validation score of the current prompts by step, a dashed
line at the best score, markers for the initial score, accepted steps and rejected proposals
that reached validation, and a legend.
"""
from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field

from autodiff_cli.io.records import StepRecord

# ---------------------------------------------------------------- a 5x7 bitmap font

_GLYPHS: dict[str, tuple[str, ...]] = {
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("####.", "....#", "....#", ".###.", "....#", "....#", "####."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": (".###.", "#....", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "....#", ".###."),
    "a": (".....", ".....", ".###.", "....#", ".####", "#...#", ".####"),
    "b": ("#....", "#....", "####.", "#...#", "#...#", "#...#", "####."),
    "c": (".....", ".....", ".###.", "#....", "#....", "#...#", ".###."),
    "d": ("....#", "....#", ".####", "#...#", "#...#", "#...#", ".####"),
    "e": (".....", ".....", ".###.", "#...#", "#####", "#....", ".###."),
    "f": ("..##.", ".#..#", ".#...", "###..", ".#...", ".#...", ".#..."),
    "g": (".####", "#...#", "#...#", "#...#", ".####", "....#", ".###."),
    "h": ("#....", "#....", "#.##.", "##..#", "#...#", "#...#", "#...#"),
    "i": ("..#..", ".....", ".##..", "..#..", "..#..", "..#..", ".###."),
    "j": ("...#.", ".....", "..##.", "...#.", "...#.", "...#.", "#..#.", ".##.."),
    "k": ("#....", "#....", "#..#.", "#.#..", "##...", "#.#..", "#..#."),
    "l": (".##..", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "m": (".....", ".....", "##.#.", "#.#.#", "#.#.#", "#...#", "#...#"),
    "n": (".....", ".....", "#.##.", "##..#", "#...#", "#...#", "#...#"),
    "o": (".....", ".....", ".###.", "#...#", "#...#", "#...#", ".###."),
    "p": ("####.", "#...#", "#...#", "#...#", "####.", "#....", "#...."),
    "q": (".####", "#...#", "#...#", "#...#", ".####", "....#", "....#"),
    "r": (".....", ".....", "#.##.", "##..#", "#....", "#....", "#...."),
    "s": (".....", ".....", ".####", "#....", ".###.", "....#", "####."),
    "t": (".#...", ".#...", "###..", ".#...", ".#...", ".#..#", "..##."),
    "u": (".....", ".....", "#...#", "#...#", "#...#", "#..##", ".##.#"),
    "v": (".....", ".....", "#...#", "#...#", "#...#", ".#.#.", "..#.."),
    "w": (".....", ".....", "#...#", "#...#", "#.#.#", "#.#.#", ".#.#."),
    "x": (".....", ".....", "#...#", ".#.#.", "..#..", ".#.#.", "#...#"),
    "y": ("#...#", "#...#", "#...#", "#...#", ".####", "....#", ".###."),
    "z": (".....", ".....", "#####", "...#.", "..#..", ".#...", "#####"),
    ".": (".....", ".....", ".....", ".....", ".....", ".##..", ".##.."),
    ",": (".....", ".....", ".....", ".....", ".##..", "..#..", ".#..."),
    ":": (".....", ".##..", ".##..", ".....", ".##..", ".##..", "....."),
    "-": (".....", ".....", ".....", "#####", ".....", ".....", "....."),
    "+": (".....", "..#..", "..#..", "#####", "..#..", "..#..", "....."),
    "=": (".....", ".....", "#####", ".....", "#####", ".....", "....."),
    "(": ("...#.", "..#..", ".#...", ".#...", ".#...", "..#..", "...#."),
    ")": (".#...", "..#..", "...#.", "...#.", "...#.", "..#..", ".#..."),
    "/": (".....", "....#", "...#.", "..#..", ".#...", "#....", "....."),
    "%": ("##...", "##..#", "...#.", "..#..", ".#...", "#..##", "...##"),
    "_": (".....", ".....", ".....", ".....", ".....", ".....", "#####"),
    "'": ("..#..", "..#..", ".#...", ".....", ".....", ".....", "....."),
    "#": (".#.#.", ".#.#.", "#####", ".#.#.", "#####", ".#.#.", ".#.#."),
    "?": (".###.", "#...#", "....#", "...#.", "..#..", ".....", "..#.."),
    " ": (".....",) * 7,
}
GLYPH_W, GLYPH_H = 5, 7
# glyphs drawn 2 rows lower: their first rows are the x-height, the last ones hang below the line
_DESCENDERS = {"g": 2, "p": 2, "q": 2, "y": 2, "j": 1}

Color = tuple[int, int, int]
WHITE: Color = (255, 255, 255)
BLACK: Color = (30, 30, 30)
GREY: Color = (120, 120, 120)
GRID: Color = (225, 228, 232)
BLUE: Color = (31, 100, 180)
GREEN: Color = (22, 150, 60)
RED: Color = (205, 50, 50)
ORANGE: Color = (230, 140, 20)


class Canvas:
    """An RGB image in memory with the few drawing primitives a plot needs."""

    def __init__(self, width: int, height: int, background: Color = WHITE) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(background) * (width * height))

    def set(self, x: int, y: int, color: Color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = (y * self.width + x) * 3
            self.pixels[i:i + 3] = bytes(color)

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: Color) -> None:
        """Filled rectangle, corners included."""
        x0, x1 = sorted((max(0, x0), min(self.width - 1, x1)))
        y0, y1 = sorted((max(0, y0), min(self.height - 1, y1)))
        row = bytes(color) * (x1 - x0 + 1)
        for y in range(y0, y1 + 1):
            i = (y * self.width + x0) * 3
            self.pixels[i:i + len(row)] = row

    def dot(self, x: int, y: int, radius: int, color: Color) -> None:
        for dy in range(-radius, radius + 1):
            for dx in range(-radius, radius + 1):
                if dx * dx + dy * dy <= radius * radius + radius:
                    self.set(x + dx, y + dy, color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color: Color, width: int = 1,
             dash: tuple[int, int] | None = None) -> None:
        """Bresenham line; `width` > 1 stamps a dot, `dash` = (on, off) pixels."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err, n = dx + dy, 0
        while True:
            if dash is None or n % (dash[0] + dash[1]) < dash[0]:
                if width <= 1:
                    self.set(x0, y0, color)
                else:
                    self.dot(x0, y0, width // 2, color)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy
            n += 1

    def cross(self, x: int, y: int, size: int, color: Color, width: int = 2) -> None:
        self.line(x - size, y - size, x + size, y + size, color, width)
        self.line(x - size, y + size, x + size, y - size, color, width)

    def text(self, x: int, y: int, text: str, color: Color = BLACK, scale: int = 2, anchor: str = "left") -> None:
        """`text` with its top at `y`; anchor left, center or right of `x`."""
        w = text_width(text, scale)
        if anchor == "center":
            x -= w // 2
        elif anchor == "right":
            x -= w
        for ch in text:
            ch = ch if ch in _GLYPHS else ch.lower()
            glyph = _GLYPHS.get(ch) or _GLYPHS["?"]
            drop = _DESCENDERS.get(ch, 0)
            for gy, row in enumerate(glyph, drop):
                for gx, bit in enumerate(row):
                    if bit == "#":
                        self.rect(x + gx * scale, y + gy * scale, x + gx * scale + scale - 1,
                                  y + gy * scale + scale - 1, color)
            x += (GLYPH_W + 1) * scale

    def text_vertical(self, x: int, y: int, text: str, color: Color = BLACK, scale: int = 2) -> None:
        """`text` rotated 90 degrees counter-clockwise, centred vertically on `y`, left edge at `x`."""
        h = text_width(text, scale)
        y += h // 2
        for ch in text:
            ch = ch if ch in _GLYPHS else ch.lower()
            glyph = _GLYPHS.get(ch) or _GLYPHS["?"]
            for gy, row in enumerate(glyph, _DESCENDERS.get(ch, 0)):
                for gx, bit in enumerate(row):
                    if bit == "#":
                        px, py = x + gy * scale, y - gx * scale
                        self.rect(px, py - scale + 1, px + scale - 1, py, color)
            y -= (GLYPH_W + 1) * scale

    def png(self) -> bytes:
        return encode_png(self.width, self.height, bytes(self.pixels))


def text_width(text: str, scale: int = 2) -> int:
    return max(0, len(text) * (GLYPH_W + 1) * scale - scale)


def encode_png(width: int, height: int, rgb: bytes) -> bytes:
    """8-bit RGB PNG: signature, IHDR, one zlib-compressed IDAT (filter 0 per row), IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    stride = width * 3
    raw = b"".join(b"\x00" + rgb[y * stride:(y + 1) * stride] for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b""))


# ---------------------------------------------------------------- the score curve


@dataclass
class CurvePoints:
    """What the score curve shows; steps are 0 (initial) .. last."""

    current: list[tuple[int, float]] = field(default_factory=list)  # val score of the current prompts by step
    accepted: list[tuple[int, float]] = field(default_factory=list)  # accepted steps
    rejected: list[tuple[int, float]] = field(default_factory=list)  # rejected proposals that were validated
    best: float | None = None
    last_step: int = 0
    title: str = "validation score by step"


def curve_from_metrics(initial_val: float | None, rows: list[dict], best_val: float | None = None,
                       steps: int | None = None) -> CurvePoints:
    """CurvePoints from summary.json's initial val and metrics.jsonl rows."""

    def num(v):
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    pts = CurvePoints()
    current = num(initial_val)
    if current is not None:
        pts.current.append((0, float(current)))
    last = 0
    for record in map(StepRecord.from_row, rows):
        step = record.step
        last = max(last, step)
        for proposal in record.proposals:
            val = proposal.val_score
            if proposal.accepted:
                if val is not None:
                    current = val
                    pts.accepted.append((step, float(val)))
            elif val is not None:
                pts.rejected.append((step, float(val)))
        if current is not None:
            pts.current.append((step, float(current)))
    candidates = [v for _, v in pts.current] + [v for _, v in pts.accepted]
    pts.best = num(best_val) if num(best_val) is not None else (max(candidates) if candidates else None)
    pts.last_step = max(last, steps or 0)
    return pts


def _nice_step(span: int, max_ticks: int = 10) -> int:
    for base in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000):
        if span / base <= max_ticks:
            return base
    return int(10 ** math.ceil(math.log10(max(span, 1))))


def score_curve_png(points: CurvePoints, width: int = 640, height: int = 400) -> bytes:
    c = Canvas(width, height)
    left, right, top, bottom = 78, width - 24, 44, height - 86
    x_max = max(points.last_step, 1)

    def px(step: float) -> int:
        return round(left + (right - left) * step / x_max)

    def py(score: float) -> int:
        return round(bottom - (bottom - top) * min(max(score, 0.0), 1.0))

    c.text(width // 2, 12, points.title, BLACK, 2, "center")
    # grid and y ticks: 0.0 .. 1.0
    for k in range(0, 11, 2):
        y = py(k / 10)
        if k:
            c.line(left + 1, y, right, y, GRID)
        c.line(left - 5, y, left, y, BLACK)
        c.text(left - 10, y - 7, f"{k / 10:.1f}", BLACK, 2, "right")
    # x ticks
    tick = _nice_step(x_max)
    for s in range(0, x_max + 1, tick):
        x = px(s)
        if s:
            c.line(x, top, x, bottom - 1, GRID)
        c.line(x, bottom, x, bottom + 5, BLACK)
        c.text(x, bottom + 10, str(s), BLACK, 2, "center")
    # axes
    c.line(left, top, left, bottom, BLACK, 2)
    c.line(left, bottom, right, bottom, BLACK, 2)
    c.text((left + right) // 2, bottom + 30, "step", BLACK, 2, "center")
    c.text_vertical(12, (top + bottom) // 2, "val score", BLACK, 2)

    if points.best is not None:
        y = py(points.best)
        c.line(left + 2, y, right, y, ORANGE, 2, dash=(8, 6))
        c.text(left + 14, y - 22 if y - 22 > top else y + 9, f"best {points.best:.3f}", ORANGE, 2)
    # the current score: a step line (a score holds until a step changes it)
    pts = points.current
    for (s0, v0), (s1, v1) in zip(pts, pts[1:]):
        c.line(px(s0), py(v0), px(s1), py(v0), BLUE, 3)
        if v1 != v0:
            c.line(px(s1), py(v0), px(s1), py(v1), BLUE, 3)
    for s, v in points.rejected:
        c.cross(px(s), py(v), 5, RED, 2)
    if pts:
        s, v = pts[0]
        c.dot(px(s), py(v), 6, BLUE)
    for s, v in points.accepted:
        c.dot(px(s), py(v), 7, BLACK)
        c.dot(px(s), py(v), 5, GREEN)
    if not pts and not points.accepted:
        c.text((left + right) // 2, (top + bottom) // 2 - 7, "no validation score yet", GREY, 2, "center")

    # legend, one row under the x-axis title
    y = height - 22
    x = 30
    c.line(x, y + 7, x + 24, y + 7, BLUE, 3)
    c.text(x + 30, y, "val", BLACK, 2)
    x += 30 + text_width("val") + 22
    c.dot(x + 6, y + 7, 6, BLUE)
    c.text(x + 18, y, "initial", BLACK, 2)
    x += 18 + text_width("initial") + 22
    c.dot(x + 7, y + 7, 7, BLACK)
    c.dot(x + 7, y + 7, 5, GREEN)
    c.text(x + 20, y, "accepted", BLACK, 2)
    x += 20 + text_width("accepted") + 22
    c.cross(x + 6, y + 7, 5, RED, 2)
    c.text(x + 18, y, "rejected", BLACK, 2)
    x += 18 + text_width("rejected") + 22
    c.line(x, y + 7, x + 24, y + 7, ORANGE, 2, dash=(8, 6))
    c.text(x + 30, y, "best", BLACK, 2)
    return c.png()
