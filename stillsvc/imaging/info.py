"""The raw image layout (:class:`ImageInfo`) and the names of the formats; see the package's documentation."""

from __future__ import annotations

import struct
from dataclasses import dataclass

COLOR_MODES = ("color", "gray", "lineart")
FORMATS = ("raw", "pnm", "png", "tiff", "jpeg", "pdf")
MULTIPAGE_FORMATS = frozenset({"raw", "pnm", "tiff", "pdf"})

RAW_MAGIC = b"STIL"
RAW_VERSION = 1
RAW_HEADER = struct.Struct("<4sHHIIHBBIIQ")
RAW_MODE_CODES = {"gray": 0, "color": 1, "lineart": 2}
RAW_MODES = {code: mode for mode, code in RAW_MODE_CODES.items()}

_VALID_DEPTHS = {"color": (8, 16), "gray": (8, 16), "lineart": (1,)}


@dataclass(frozen=True)
class ImageInfo:
    """Geometry and sample format of one page in the raw layout."""

    width: int
    height: int
    mode: str
    depth: int
    resolution: int

    def __post_init__(self) -> None:
        if self.mode not in COLOR_MODES:
            raise ValueError(f"unknown colour mode {self.mode!r}; expected one of {COLOR_MODES}")
        if self.depth not in _VALID_DEPTHS[self.mode]:
            raise ValueError(
                f"depth {self.depth} is not valid for mode {self.mode!r};"
                f" expected one of {_VALID_DEPTHS[self.mode]}"
            )
        for name in ("width", "height", "resolution"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.width > 0xFFFFFFFF or self.height > 0xFFFFFFFF:
            raise ValueError("width and height must fit in 32 bits")

    @property
    def channels(self) -> int:
        return 3 if self.mode == "color" else 1

    @property
    def bytes_per_pixel(self) -> int:
        """Bytes per pixel; 0 for lineart (which packs 8 pixels per byte)."""
        return 0 if self.mode == "lineart" else self.channels * self.depth // 8

    @property
    def bytes_per_line(self) -> int:
        if self.mode == "lineart":
            return (self.width + 7) // 8
        return self.width * self.channels * self.depth // 8

    @property
    def size(self) -> int:
        return self.bytes_per_line * self.height


