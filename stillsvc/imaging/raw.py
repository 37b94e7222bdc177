"""Raw stream format (``raw``)
===========================

Each page is a fixed 36-byte header followed by the page's rows in the raw
layout above.  All header fields are little-endian:

======  ====  =========  ======================================================
offset  size  type       field
======  ====  =========  ======================================================
0       4     bytes      magic ``b"STIL"``
4       2     u16        version, ``1``
6       2     u16        header length in bytes (``36``); readers skip to it
8       4     u32        width in pixels
12      4     u32        height in rows
16      2     u16        depth: bits per sample (1, 8 or 16)
18      1     u8         channels (1 or 3)
19      1     u8         mode code: 0 gray, 1 color, 2 lineart
20      4     u32        resolution in dpi
24      4     u32        page number, 0-based, counting pages of the stream
28      8     u64        payload length = height * bytes_per_line
======  ====  =========  ======================================================

Pages follow one another with nothing in between; the stream ends after the
last payload.  :func:`parse_raw` reads such a stream back.
"""

from __future__ import annotations

from stillsvc.imaging.info import RAW_HEADER, RAW_MAGIC, RAW_MODE_CODES, RAW_MODES, RAW_VERSION, ImageInfo

# ---------------------------------------------------------------------------
# Raw stream
# ---------------------------------------------------------------------------


def raw_header(info: ImageInfo, page: int) -> bytes:
    return RAW_HEADER.pack(
        RAW_MAGIC,
        RAW_VERSION,
        RAW_HEADER.size,
        info.width,
        info.height,
        info.depth,
        info.channels,
        RAW_MODE_CODES[info.mode],
        info.resolution,
        page,
        info.size,
    )


def parse_raw(data: bytes) -> list[tuple[ImageInfo, int, bytes]]:
    """Split a ``raw`` stream into ``(info, page number, rows)`` per page.

    Raises :class:`ValueError` for a malformed or truncated stream.
    """
    view = memoryview(data)
    pages: list[tuple[ImageInfo, int, bytes]] = []
    pos = 0
    while pos < len(view):
        if len(view) - pos < RAW_HEADER.size:
            raise ValueError(f"truncated raw header at offset {pos}")
        (magic, version, header_len, width, height, depth, channels, code, resolution, page, length) = (
            RAW_HEADER.unpack_from(view, pos)
        )
        if magic != RAW_MAGIC:
            raise ValueError(f"bad raw magic {bytes(magic)!r} at offset {pos}")
        if version != RAW_VERSION:
            raise ValueError(f"unsupported raw version {version} at offset {pos}")
        if header_len < RAW_HEADER.size:
            raise ValueError(f"raw header length {header_len} too small at offset {pos}")
        if code not in RAW_MODES:
            raise ValueError(f"unknown raw mode code {code} at offset {pos}")
        info = ImageInfo(width, height, RAW_MODES[code], depth, resolution)
        if channels != info.channels:
            raise ValueError(f"raw header: {channels} channels for mode {info.mode!r}")
        if length != info.size:
            raise ValueError(f"raw header: payload length {length}, expected {info.size}")
        start = pos + header_len
        end = start + length
        if end > len(view):
            raise ValueError(f"truncated raw payload of page {page}")
        pages.append((info, page, bytes(view[start:end])))
        pos = end
    return pages


