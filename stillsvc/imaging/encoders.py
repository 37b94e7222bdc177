"""Encoders
========

One :class:`Encoder` serves one transfer stream: ``begin_page``, ``add_rows``
(any number of whole rows), ``end_page`` for every page, then ``finish``.  Each
call returns the bytes to write next, as early as the format permits:

* ``raw``, ``pnm``, ``png``, ``tiff`` and ``pdf`` stream: output is produced
  while rows arrive and nothing is held back beyond the compressor's window.
  TIFF is written by this module (uncompressed, big-endian, classic TIFF,
  several strips per page): each page's data precedes its IFD, and an IFD is
  emitted once it is known whether another page follows (at the next
  ``begin_page`` or at ``finish``).  A TIFF stream is limited to 4 GiB.  PDF is
  written by this module too, one Flate-compressed image per page, the page
  tree and cross-reference table at ``finish``.
* ``jpeg`` buffers one page and emits it at ``end_page`` (via Pillow).

``png`` and ``jpeg`` hold one page per stream.  Wrong data (partial rows, too
many or too few rows) raises :class:`ValueError`; calls in the wrong order
raise :class:`RuntimeError`.
"""

from __future__ import annotations

import io
import struct
import zlib

from stillsvc.imaging.info import FORMATS, ImageInfo
from stillsvc.imaging.raw import raw_header

# ---------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------


class Encoder:
    """Base of the stream encoders; one instance per transfer stream.

    Subclasses implement ``_begin``, ``_rows``, ``_end`` and ``_finish``; this
    class checks the order of calls and the amount of data.
    """

    content_type = "application/octet-stream"
    multipage = True
    format_name = ""

    def __init__(self) -> None:
        self.info: ImageInfo | None = None
        self.pages = 0
        self._rows_seen = 0
        self._finished = False

    # public API -----------------------------------------------------------

    def begin_page(self, info: ImageInfo) -> bytes:
        if self._finished:
            raise RuntimeError("encoder already finished")
        if self.info is not None:
            raise RuntimeError("begin_page() while a page is open")
        if self.pages and not self.multipage:
            raise RuntimeError(f"{self.format_name or type(self).__name__} holds a single page per stream")
        if not isinstance(info, ImageInfo):
            raise TypeError("begin_page() needs an ImageInfo")
        out = self._begin(info)
        self.info = info
        self._rows_seen = 0
        return out

    def add_rows(self, data: bytes) -> bytes:
        info = self.info
        if info is None:
            raise RuntimeError("add_rows() without begin_page()")
        n, rest = divmod(len(data), info.bytes_per_line)
        if rest:
            raise ValueError(f"{len(data)} bytes is not a whole number of {info.bytes_per_line}-byte rows")
        if self._rows_seen + n > info.height:
            raise ValueError(f"too many rows: {self._rows_seen + n} > height {info.height}")
        if not n:
            return b""
        self._rows_seen += n
        return self._rows(data, n)

    def end_page(self) -> bytes:
        info = self.info
        if info is None:
            raise RuntimeError("end_page() without begin_page()")
        if self._rows_seen != info.height:
            raise ValueError(f"page incomplete: {self._rows_seen} of {info.height} rows")
        out = self._end()
        self.info = None
        self.pages += 1
        return out

    def finish(self) -> bytes:
        if self._finished:
            raise RuntimeError("encoder already finished")
        if self.info is not None:
            raise RuntimeError("finish() while a page is open")
        if not self.pages:
            raise RuntimeError("finish() without any page")
        self._finished = True
        return self._finish()

    # hooks ------------------------------------------------------------------

    def _begin(self, info: ImageInfo) -> bytes:
        return b""

    def _rows(self, data: bytes, count: int) -> bytes:
        # Rows that pass through unchanged are not copied when they are immutable.
        return data if type(data) is bytes else bytes(data)

    def _end(self) -> bytes:
        return b""

    def _finish(self) -> bytes:
        return b""


class RawEncoder(Encoder):
    """The ``raw`` format of the module docstring."""

    content_type = "application/x-stillsvc-raw"
    format_name = "raw"

    def _begin(self, info: ImageInfo) -> bytes:
        return raw_header(info, self.pages)


class PnmEncoder(Encoder):
    """P6 (color), P5 (gray), P4 (lineart); pages concatenated."""

    content_type = "image/x-portable-anymap"
    format_name = "pnm"

    def _begin(self, info: ImageInfo) -> bytes:
        if info.mode == "lineart":
            return b"P4\n%d %d\n" % (info.width, info.height)
        magic = b"P6" if info.mode == "color" else b"P5"
        maxval = 255 if info.depth == 8 else 65535
        return b"%s\n%d %d\n%d\n" % (magic, info.width, info.height, maxval)


_INVERT = bytes(255 - i for i in range(256))


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(kind)) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


class PngEncoder(Encoder):
    """PNG, streamed: IHDR and pHYs, IDAT chunks as the compressor yields, IEND.

    Filter type 0 on every row.  Lineart becomes 1-bit grayscale (inverted,
    since PNG has 0 = black).  After ``flush_interval`` uncompressed bytes
    without output the compressor is sync-flushed, so the reader always
    sees progress.
    """

    content_type = "image/png"
    multipage = False
    format_name = "png"
    SIGNATURE = b"\x89PNG\r\n\x1a\n"
    MAX_CHUNK = 1 << 24

    def __init__(self, level: int = 6, flush_interval: int = 4 << 20) -> None:
        super().__init__()
        self.level = level
        self.flush_interval = flush_interval
        self._z: zlib._Compress | None = None  # type: ignore[name-defined]
        self._pending = 0

    def _begin(self, info: ImageInfo) -> bytes:
        if info.mode == "color":
            colour_type, bit_depth = 2, info.depth
        else:
            colour_type, bit_depth = 0, info.depth
        ihdr = struct.pack(">IIBBBBB", info.width, info.height, bit_depth, colour_type, 0, 0, 0)
        ppm = round(info.resolution / 0.0254)
        phys = struct.pack(">IIB", ppm, ppm, 1)
        self._z = zlib.compressobj(self.level)
        self._pending = 0
        return self.SIGNATURE + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"pHYs", phys)

    def _idat(self, compressed: bytes) -> bytes:
        if not compressed:
            return b""
        step = self.MAX_CHUNK
        return b"".join(_png_chunk(b"IDAT", compressed[i : i + step]) for i in range(0, len(compressed), step))

    def _rows(self, data: bytes, count: int) -> bytes:
        assert self.info is not None and self._z is not None
        if self.info.mode == "lineart":
            data = bytes(data).translate(_INVERT)
        bpl = self.info.bytes_per_line
        view = memoryview(data)
        parts: list[bytes | memoryview] = []
        for i in range(count):
            parts.append(b"\x00")
            parts.append(view[i * bpl : (i + 1) * bpl])
        raw = b"".join(parts)
        out = self._z.compress(raw)
        if out:
            self._pending = 0
        else:
            self._pending += len(raw)
            if self._pending >= self.flush_interval:
                out = self._z.flush(zlib.Z_SYNC_FLUSH)
                self._pending = 0
        return self._idat(out)

    def _end(self) -> bytes:
        assert self._z is not None
        out = self._idat(self._z.flush())
        self._z = None
        return out + _png_chunk(b"IEND", b"")


class TiffEncoder(Encoder):
    """Uncompressed big-endian TIFF, several pages, streamed.

    Layout: header, then per page its strips followed by its IFD (and the
    IFD's out-of-line values).  The IFD of a page is emitted at the next
    ``begin_page`` (pointing at the next IFD) or at ``finish`` (pointing
    nowhere).  Lineart uses PhotometricInterpretation 0 (WhiteIsZero), which
    is the PBM bit convention, so no inversion is needed.
    """

    content_type = "image/tiff"
    format_name = "tiff"
    STRIP_BYTES = 256 << 10
    LIMIT = 0xFFFFFFFF

    def __init__(self) -> None:
        super().__init__()
        self._pos = 0  # bytes emitted so far
        self._held: tuple[ImageInfo, int, int] | None = None  # info, data offset, IFD offset

    def _ifd(self, info: ImageInfo, data_offset: int, ifd_offset: int, next_ifd: int) -> bytes:
        bpl = info.bytes_per_line
        rows_per_strip = max(1, min(info.height, self.STRIP_BYTES // bpl))
        nstrips = -(-info.height // rows_per_strip)
        offsets = [data_offset + i * rows_per_strip * bpl for i in range(nstrips)]
        counts = [min(rows_per_strip, info.height - i * rows_per_strip) * bpl for i in range(nstrips)]
        photometric = {"color": 2, "gray": 1, "lineart": 0}[info.mode]
        # (tag, type, count, packed values); types: 3 SHORT, 4 LONG, 5 RATIONAL
        entries = [
            (254, 4, 1, struct.pack(">I", 0)),
            (256, 4, 1, struct.pack(">I", info.width)),
            (257, 4, 1, struct.pack(">I", info.height)),
            (258, 3, info.channels, struct.pack(">%dH" % info.channels, *[info.depth] * info.channels)),
            (259, 3, 1, struct.pack(">H", 1)),
            (262, 3, 1, struct.pack(">H", photometric)),
            (273, 4, nstrips, struct.pack(">%dI" % nstrips, *offsets)),
            (277, 3, 1, struct.pack(">H", info.channels)),
            (278, 4, 1, struct.pack(">I", rows_per_strip)),
            (279, 4, nstrips, struct.pack(">%dI" % nstrips, *counts)),
            (282, 5, 1, struct.pack(">II", info.resolution, 1)),
            (283, 5, 1, struct.pack(">II", info.resolution, 1)),
            (284, 3, 1, struct.pack(">H", 1)),
            (296, 3, 1, struct.pack(">H", 2)),
        ]
        table_size = 2 + 12 * len(entries) + 4
        extra_offset = ifd_offset + table_size
        table = [struct.pack(">H", len(entries))]
        extra: list[bytes] = []
        for tag, typ, count, value in entries:
            if len(value) <= 4:
                table.append(struct.pack(">HHI", tag, typ, count) + value.ljust(4, b"\x00"))
            else:
                table.append(struct.pack(">HHII", tag, typ, count, extra_offset))
                extra.append(value)
                extra_offset += len(value)  # every value here has an even length
        table.append(struct.pack(">I", next_ifd))
        return b"".join(table + extra)

    def _ifd_size(self, info: ImageInfo) -> int:
        """Bytes of a page's IFD block; independent of the offsets in it."""
        return len(self._ifd(info, 0, 0, 0))

    def _emit_held(self, next_ifd: int) -> bytes:
        assert self._held is not None
        info, data_offset, ifd_offset = self._held
        pad = b"\x00" * (ifd_offset - self._pos)
        block = pad + self._ifd(info, data_offset, ifd_offset, next_ifd)
        self._held = None
        self._pos += len(block)
        return block

    def _begin(self, info: ImageInfo) -> bytes:
        if self.pages == 0:
            out = b""
            data_offset = 8
        else:
            assert self._held is not None
            held_info, _, held_ifd = self._held
            data_offset = held_ifd + self._ifd_size(held_info)
        ifd_offset = data_offset + info.size
        ifd_offset += ifd_offset & 1
        if ifd_offset > self.LIMIT or ifd_offset + self._ifd_size(info) > self.LIMIT:
            raise ValueError("TIFF stream would exceed 4 GiB")
        if self.pages == 0:
            out = b"MM\x00\x2a" + struct.pack(">I", ifd_offset)
            self._pos = len(out)
        else:
            out = self._emit_held(ifd_offset)
        assert self._pos == data_offset
        self._held = (info, data_offset, ifd_offset)
        return out

    def _rows(self, data: bytes, count: int) -> bytes:
        self._pos += len(data)
        return data if type(data) is bytes else bytes(data)

    def _finish(self) -> bytes:
        return self._emit_held(0)


class JpegEncoder(Encoder):
    """Baseline JPEG via Pillow, quality 90, 8-bit; one page buffered.

    16-bit samples are reduced to their high byte, lineart becomes 8-bit gray.
    """

    content_type = "image/jpeg"
    multipage = False
    format_name = "jpeg"

    def __init__(self, quality: int = 90) -> None:
        super().__init__()
        self.quality = quality
        self._buf = bytearray()

    def _begin(self, info: ImageInfo) -> bytes:
        self._buf = bytearray()
        return b""

    def _rows(self, data: bytes, count: int) -> bytes:
        self._buf += data
        return b""

    def _end(self) -> bytes:
        from PIL import Image

        info = self.info
        assert info is not None
        data = bytes(self._buf)
        self._buf = bytearray()
        size = (info.width, info.height)
        if info.mode == "lineart":
            image = Image.frombytes("1", size, data, "raw", "1;I").convert("L")
        else:
            if info.depth == 16:
                data = data[0::2]
            image = Image.frombytes("RGB" if info.mode == "color" else "L", size, data)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=self.quality, dpi=(info.resolution, info.resolution))
        return out.getvalue()


def _pdf_number(value: float) -> bytes:
    text = ("%.4f" % value).rstrip("0").rstrip(".")
    return (text or "0").encode("ascii")


class PdfEncoder(Encoder):
    """PDF 1.5, one Flate-compressed image per page filling the page, streamed.

    Page size in points is ``pixels * 72 / resolution``.  Objects: 1 catalog,
    2 page tree (written at ``finish``), then four per page: image, its
    length, content stream, page.
    """

    content_type = "application/pdf"
    format_name = "pdf"

    def __init__(self, level: int = 6) -> None:
        super().__init__()
        self.level = level
        self._pos = 0
        self._offsets: dict[int, int] = {}
        self._kids: list[int] = []
        self._z: zlib._Compress | None = None  # type: ignore[name-defined]
        self._stream_len = 0
        self._first_obj = 0

    def _emit(self, data: bytes) -> bytes:
        self._pos += len(data)
        return data

    def _obj(self, num: int, body: bytes) -> bytes:
        self._offsets[num] = self._pos
        return self._emit(b"%d 0 obj\n%s\nendobj\n" % (num, body))

    def _begin(self, info: ImageInfo) -> bytes:
        out = []
        if self.pages == 0:
            out.append(self._emit(b"%PDF-1.5\n%\xe2\xe3\xcf\xd3\n"))
            out.append(self._obj(1, b"<< /Type /Catalog /Pages 2 0 R >>"))
        self._first_obj = num = 3 + 4 * self.pages
        if info.mode == "color":
            colour = b"/ColorSpace /DeviceRGB /BitsPerComponent %d" % info.depth
        elif info.mode == "gray":
            colour = b"/ColorSpace /DeviceGray /BitsPerComponent %d" % info.depth
        else:
            colour = b"/ColorSpace /DeviceGray /BitsPerComponent 1 /Decode [1 0]"
        self._offsets[num] = self._pos
        out.append(
            self._emit(
                b"%d 0 obj\n<< /Type /XObject /Subtype /Image /Width %d /Height %d %s"
                b" /Filter /FlateDecode /Length %d 0 R >>\nstream\n"
                % (num, info.width, info.height, colour, num + 1)
            )
        )
        self._z = zlib.compressobj(self.level)
        self._stream_len = 0
        return b"".join(out)

    def _rows(self, data: bytes, count: int) -> bytes:
        assert self._z is not None
        out = self._z.compress(data)
        self._stream_len += len(out)
        return self._emit(out)

    def _end(self) -> bytes:
        info = self.info
        assert info is not None and self._z is not None
        tail = self._z.flush()
        self._z = None
        self._stream_len += len(tail)
        num = self._first_obj
        out = [self._emit(tail + b"\nendstream\nendobj\n")]
        out.append(self._obj(num + 1, b"%d" % self._stream_len))
        w = _pdf_number(info.width * 72 / info.resolution)
        h = _pdf_number(info.height * 72 / info.resolution)
        content = b"q %s 0 0 %s 0 0 cm /Im0 Do Q" % (w, h)
        out.append(self._obj(num + 2, b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content)))
        out.append(
            self._obj(
                num + 3,
                b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %s %s]"
                b" /Resources << /XObject << /Im0 %d 0 R >> >> /Contents %d 0 R >>" % (w, h, num, num + 2),
            )
        )
        self._kids.append(num + 3)
        return b"".join(out)

    def _finish(self) -> bytes:
        kids = b" ".join(b"%d 0 R" % k for k in self._kids)
        out = [self._obj(2, b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, len(self._kids)))]
        size = max(self._offsets) + 1
        xref_pos = self._pos
        xref = [b"xref\n0 %d\n" % size, b"0000000000 65535 f \n"]
        for num in range(1, size):
            xref.append(b"%010d 00000 n \n" % self._offsets[num])
        xref.append(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (size, xref_pos))
        out.append(self._emit(b"".join(xref)))
        return b"".join(out)


_ENCODERS: dict[str, type[Encoder]] = {
    "raw": RawEncoder,
    "pnm": PnmEncoder,
    "png": PngEncoder,
    "tiff": TiffEncoder,
    "jpeg": JpegEncoder,
    "pdf": PdfEncoder,
}


def make_encoder(fmt: str) -> Encoder:
    """A fresh encoder for ``fmt``, one of :data:`FORMATS`."""
    try:
        cls = _ENCODERS[fmt]
    except (KeyError, TypeError):
        raise ValueError(f"unknown image format {fmt!r}; expected one of {', '.join(FORMATS)}") from None
    return cls()
