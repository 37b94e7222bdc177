"""The simulated scanner's deterministic test pattern.

:func:`pattern_rows` draws the page of the simulated scanner.  All values are
computed as 16-bit samples; 8-bit images use the high byte of each sample.
The two levels used for "on"/"off" are ``HI = 0xEB6C`` and ``LO = 0x1093``, so
swapped bytes in a 16-bit sample are visible.  From the top, for page ``p``
(0-based) of height ``H`` and width ``W``:

=========================  ====================================================
rows                       content
=========================  ====================================================
``[0, H//16)``             page stamp: 32 blocks, block ``k`` is white if bit
                           ``k`` of ``p`` is set, black otherwise
``[H//16, 3*H//8)``        8 vertical colour bars (white, yellow, cyan, green,
                           magenta, red, blue, black), bar ``i`` showing colour
                           ``(i + p) % 8``
``[3*H//8, 3*H//4)``       diagonal ramp: R rises left to right, G falls, B is a
                           sawtooth; row ``y`` is the ramp rotated left by
                           ``(y + 61*p) % W`` pixels
``[3*H//4, H)``            checkerboard of yellow and blue cells ``max(1, W//16)``
                           pixels wide, phase shifted by ``p``
=========================  ====================================================

``gray`` is the luma ``(299 R + 587 G + 114 B) // 1000`` of the colour pattern;
``lineart`` is black where the 16-bit gray pattern is below ``0x8000``.
A page is built from a few cached row templates, so drawing costs little more
than copying bytes.
"""

from __future__ import annotations

import sys
from array import array
from functools import lru_cache

from stillsvc.imaging import ImageInfo

# ---------------------------------------------------------------------------
# Test pattern
# ---------------------------------------------------------------------------

HI = 0xEB6C
LO = 0x1093
_BARS = (
    (HI, HI, HI),  # white
    (HI, HI, LO),  # yellow
    (LO, HI, HI),  # cyan
    (LO, HI, LO),  # green
    (HI, LO, HI),  # magenta
    (HI, LO, LO),  # red
    (LO, LO, HI),  # blue
    (LO, LO, LO),  # black
)
_CHECK_ON = (HI, HI, LO)  # yellow
_CHECK_OFF = (LO, LO, HI)  # blue
_RAMP_STEP = 61
_LINEART_THRESHOLD = 0x8000


def _regions(height: int) -> tuple[int, int, int]:
    """Start rows of the bars, ramp and checkerboard regions."""
    return height // 16, height * 3 // 8, height * 3 // 4


def _luma(r: int, g: int, b: int) -> int:
    return (299 * r + 587 * g + 114 * b) // 1000


class _Rgb:
    """Three lists of 16-bit samples, one row of the colour pattern."""

    __slots__ = ("r", "g", "b")

    def __init__(self, r: list[int], g: list[int], b: list[int]) -> None:
        self.r, self.g, self.b = r, g, b

    @classmethod
    def from_pixels(cls, pixels: list[tuple[int, int, int]]) -> _Rgb:
        return cls([p[0] for p in pixels], [p[1] for p in pixels], [p[2] for p in pixels])

    def gray(self) -> list[int]:
        return [_luma(r, g, b) for r, g, b in zip(self.r, self.g, self.b)]


def _stamp_row(width: int, page: int) -> _Rgb:
    white, black = _BARS[0], _BARS[7]
    return _Rgb.from_pixels([white if (page >> (x * 32 // width)) & 1 else black for x in range(width)])


def _bar_row(width: int, page: int) -> _Rgb:
    return _Rgb.from_pixels([_BARS[(x * 8 // width + page) % 8] for x in range(width)])


def _ramp_row(width: int) -> _Rgb:
    span = max(1, width - 1)
    r = [x * 0xFFFF // span for x in range(width)]
    g = [0xFFFF - v for v in r]
    b = [(x * 0x0800 + 0x1234) & 0xFFFF for x in range(width)]
    return _Rgb(r, g, b)


def _checker_rows(width: int, page: int) -> tuple[_Rgb, _Rgb]:
    cell = max(1, width // 16)
    rows = []
    for phase in (0, 1):
        rows.append(
            _Rgb.from_pixels(
                [_CHECK_ON if (x // cell + phase + page) % 2 == 0 else _CHECK_OFF for x in range(width)]
            )
        )
    return rows[0], rows[1]


def _samples_to_bytes(samples: list[int], depth: int) -> bytes:
    if depth == 8:
        return bytes([v >> 8 for v in samples])
    arr = array("H", samples)
    if sys.byteorder == "little":
        arr.byteswap()
    return arr.tobytes()


def _row_bytes(row: _Rgb, mode: str, depth: int) -> bytes:
    if mode == "color":
        inter = [0] * (3 * len(row.r))
        inter[0::3] = row.r
        inter[1::3] = row.g
        inter[2::3] = row.b
        return _samples_to_bytes(inter, depth)
    return _samples_to_bytes(row.gray(), depth)


def _row_bits(row: _Rgb) -> int:
    """Lineart row as an int of ``width`` bits, MSB = leftmost pixel, 1 = black."""
    return int("".join("1" if v < _LINEART_THRESHOLD else "0" for v in row.gray()), 2)


class _PagePlan:
    """Row templates of one page, from which any row is cut cheaply."""

    def __init__(self, width: int, height: int, mode: str, depth: int, page: int) -> None:
        self.width = width
        self.height = height
        self.mode = mode
        self.page = page
        self.y_bars, self.y_ramp, self.y_check = _regions(height)
        self.cell = max(1, width // 16)
        self.ramp_shift = (_RAMP_STEP * page) % width
        self.bpl = (width + 7) // 8 if mode == "lineart" else width * (3 if mode == "color" else 1) * depth // 8
        rows = [_stamp_row(width, page), _bar_row(width, page), *_checker_rows(width, page)]
        ramp = _ramp_row(width)
        if mode == "lineart":
            self.pad = self.bpl * 8 - width
            self.mask = (1 << width) - 1
            self.stamp, self.bars, self.check0, self.check1 = (
                self._bits_to_bytes(_row_bits(r)) for r in rows
            )
            self.ramp_bits = _row_bits(ramp)
            self.ramp2 = b""
            self.bpp = 0
        else:
            self.stamp, self.bars, self.check0, self.check1 = (_row_bytes(r, mode, depth) for r in rows)
            ramp_bytes = _row_bytes(ramp, mode, depth)
            self.ramp2 = ramp_bytes + ramp_bytes
            self.ramp_bits = 0
            self.bpp = self.bpl // width

    def _bits_to_bytes(self, bits: int) -> bytes:
        return (bits << self.pad).to_bytes(self.bpl, "big")

    def ramp_row(self, y: int) -> bytes:
        shift = (y + self.ramp_shift) % self.width
        if self.mode == "lineart":
            v = self.ramp_bits
            if shift:
                v = ((v << shift) | (v >> (self.width - shift))) & self.mask
            return self._bits_to_bytes(v)
        start = shift * self.bpp
        return self.ramp2[start : start + self.bpl]

    def rows(self, y0: int, count: int) -> bytes:
        out: list[bytes] = []
        append = out.append
        y_end = y0 + count
        y = y0
        # Stamp and bars are constant over their regions: emit them in one go.
        for start, stop, template in ((0, self.y_bars, self.stamp), (self.y_bars, self.y_ramp, self.bars)):
            n = min(y_end, stop) - max(y, start)
            if n > 0:
                append(template * n)
                y += n
        ramp_stop = min(y_end, self.y_check)
        while y < ramp_stop:
            append(self.ramp_row(y))
            y += 1
        cell = self.cell
        check = (self.check0, self.check1)
        while y < y_end:
            k = (y - self.y_check) // cell
            run = min(y_end, self.y_check + (k + 1) * cell) - y
            append(check[k % 2] * run)
            y += run
        return b"".join(out)


@lru_cache(maxsize=16)
def _plan(width: int, height: int, mode: str, depth: int, page: int) -> _PagePlan:
    return _PagePlan(width, height, mode, depth, page)


def pattern_rows(info: ImageInfo, page: int, y0: int, rows: int) -> bytes:
    """Rows ``y0 .. y0+rows-1`` of page ``page`` (0-based) of the deterministic test pattern."""
    if page < 0:
        raise ValueError(f"page must be >= 0, got {page}")
    if y0 < 0 or rows < 0 or y0 + rows > info.height:
        raise ValueError(f"rows {y0}..{y0 + rows - 1} outside 0..{info.height - 1}")
    if rows == 0:
        return b""
    return _plan(info.width, info.height, info.mode, info.depth, page).rows(y0, rows)


def pattern_page(info: ImageInfo, page: int) -> bytes:
    """The whole page ``page`` of the test pattern."""
    return pattern_rows(info, page, 0, info.height)


