"""Tests of the test pattern, the raw stream format and the stream encoders."""

from __future__ import annotations

import io
import re
import struct
import sys
import zlib
from array import array

import pytest
from PIL import Image

from stillsvc import imaging
from stillsvc.drivers.sim import pattern
from stillsvc.drivers.sim.pattern import pattern_page, pattern_rows
from stillsvc.imaging import (
    COLOR_MODES,
    FORMATS,
    MULTIPAGE_FORMATS,
    RAW_MAGIC,
    ImageInfo,
    make_encoder,
    parse_raw,
)

MODES = [("color", 8), ("color", 16), ("gray", 8), ("gray", 16), ("lineart", 1)]
MODE_IDS = [f"{m}{d}" for m, d in MODES]


def info_for(mode: str, depth: int, width: int = 67, height: int = 45, resolution: int = 150) -> ImageInfo:
    return ImageInfo(width, height, mode, depth, resolution)


def encode(fmt: str, pages: list[tuple[ImageInfo, int]], band: int = 7) -> bytes:
    """Encode pattern pages ``(info, page)`` with ``band`` rows per add_rows call."""
    enc = make_encoder(fmt)
    out = []
    for info, page in pages:
        out.append(enc.begin_page(info))
        for y in range(0, info.height, band):
            out.append(enc.add_rows(pattern_rows(info, page, y, min(band, info.height - y))))
        out.append(enc.end_page())
    out.append(enc.finish())
    return b"".join(out)


def samples16(data: bytes) -> list[int]:
    arr = array("H", data)
    if sys.byteorder == "little":
        arr.byteswap()
    return arr.tolist()


def high_bytes(data: bytes) -> bytes:
    return data[0::2]


def lineart_to_l(data: bytes, info: ImageInfo) -> bytes:
    """PBM-convention lineart rows to 8-bit gray (1 = black = 0, 0 = white = 255)."""
    bpl = info.bytes_per_line
    out = bytearray()
    for y in range(info.height):
        row = int.from_bytes(data[y * bpl : (y + 1) * bpl], "big")
        nbits = bpl * 8
        out += bytes(0 if (row >> (nbits - 1 - x)) & 1 else 255 for x in range(info.width))
    return bytes(out)


def image_values(im: Image.Image) -> list[int]:
    """Pixel values of a single-channel 16/32-bit Pillow image, row-major."""
    raw = im.tobytes()
    if im.mode == "I;16":
        arr = array("H", raw)
        if sys.byteorder == "big":
            arr.byteswap()
    elif im.mode == "I;16B":
        arr = array("H", raw)
        if sys.byteorder == "little":
            arr.byteswap()
    elif im.mode == "I":
        arr = array("i", raw)
    else:  # pragma: no cover - a failure path
        raise AssertionError(f"unexpected mode {im.mode}")
    return arr.tolist()


def assert_image_matches(im: Image.Image, info: ImageInfo, expected: bytes) -> None:
    """A losslessly decoded Pillow image shows exactly the pattern ``expected``."""
    assert im.size == (info.width, info.height)
    if info.mode == "lineart":
        assert im.mode == "1"
        assert im.convert("L").tobytes() == lineart_to_l(expected, info)
    elif info.mode == "gray" and info.depth == 16:
        assert image_values(im) == samples16(expected)
    elif info.depth == 16:  # colour: Pillow reduces to 8 bits (truncating or rounding)
        assert im.mode == "RGB"
        got = im.tobytes()
        want = samples16(expected)
        assert len(got) == len(want)
        assert max(abs(g - (w / 257)) for g, w in zip(got, want)) <= 1.0
    else:
        assert im.mode == ("RGB" if info.mode == "color" else "L")
        assert im.tobytes() == expected


# ---------------------------------------------------------------------------
# ImageInfo
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode,depth,width,channels,bpl",
    [
        ("color", 8, 5, 3, 15),
        ("color", 16, 5, 3, 30),
        ("gray", 8, 5, 1, 5),
        ("gray", 16, 5, 1, 10),
        ("lineart", 1, 1, 1, 1),
        ("lineart", 1, 7, 1, 1),
        ("lineart", 1, 8, 1, 1),
        ("lineart", 1, 9, 1, 2),
        ("lineart", 1, 17, 1, 3),
        ("lineart", 1, 4961, 1, 621),
    ],
)
def test_image_info_sizes(mode, depth, width, channels, bpl):
    info = ImageInfo(width, 11, mode, depth, 300)
    assert info.channels == channels
    assert info.bytes_per_line == bpl
    assert info.size == bpl * 11
    assert len(pattern_page(info, 0)) == info.size
    assert len(pattern_rows(info, 2, 3, 4)) == 4 * bpl


@pytest.mark.parametrize(
    "args",
    [
        (0, 10, "color", 8, 300),
        (10, 0, "color", 8, 300),
        (10, 10, "color", 8, 0),
        (10, 10, "cmyk", 8, 300),
        (10, 10, "color", 1, 300),
        (10, 10, "gray", 12, 300),
        (10, 10, "lineart", 8, 300),
    ],
)
def test_image_info_rejects_invalid(args):
    with pytest.raises(ValueError):
        ImageInfo(*args)


def test_constants():
    assert COLOR_MODES == ("color", "gray", "lineart")
    assert FORMATS == ("raw", "pnm", "png", "tiff", "jpeg", "pdf")
    assert MULTIPAGE_FORMATS == {"raw", "pnm", "tiff", "pdf"}
    for fmt in FORMATS:
        assert make_encoder(fmt).multipage == (fmt in MULTIPAGE_FORMATS)


# ---------------------------------------------------------------------------
# Test pattern
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode,depth", MODES, ids=MODE_IDS)
def test_pattern_deterministic(mode, depth):
    info = info_for(mode, depth, width=123, height=97)
    first = pattern_page(info, 3)
    assert pattern_page(info, 3) == first
    pattern._plan.cache_clear()
    assert pattern_page(info, 3) == first
    # The resolution does not change the picture.
    assert pattern_page(ImageInfo(123, 97, mode, depth, 600), 3) == first


@pytest.mark.parametrize("mode,depth", MODES, ids=MODE_IDS)
def test_pattern_pages_differ(mode, depth):
    info = info_for(mode, depth, width=64, height=48)
    pages = [pattern_page(info, p) for p in range(12)]
    assert len(set(pages)) == len(pages)


@pytest.mark.parametrize("mode,depth", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("band", [1, 2, 7, 16, 33, 100])
def test_pattern_bands_are_page_slices(mode, depth, band):
    info = info_for(mode, depth, width=53, height=100)
    page = pattern_page(info, 1)
    bpl = info.bytes_per_line
    pieces = []
    for y in range(0, info.height, band):
        n = min(band, info.height - y)
        chunk = pattern_rows(info, 1, y, n)
        assert chunk == page[y * bpl : (y + n) * bpl]
        pieces.append(chunk)
    assert b"".join(pieces) == page


def test_pattern_rows_bounds():
    info = info_for("gray", 8, height=10)
    assert pattern_rows(info, 0, 10, 0) == b""
    with pytest.raises(ValueError):
        pattern_rows(info, 0, 5, 6)
    with pytest.raises(ValueError):
        pattern_rows(info, 0, -1, 2)
    with pytest.raises(ValueError):
        pattern_rows(info, -1, 0, 1)


def test_pattern_rows_vary_and_channels_differ():
    """Row stride and channel order errors must be visible in the pattern."""
    info = info_for("color", 8, width=90, height=80)
    page = pattern_page(info, 0)
    bpl = info.bytes_per_line
    rows = [page[y * bpl : (y + 1) * bpl] for y in range(info.height)]
    # The ramp region changes on every row.
    ramp = rows[info.height * 3 // 8 : info.height * 3 // 4]
    assert len(set(ramp)) == len(ramp)
    # Swapping R and B changes the page.
    swapped = bytearray(page)
    swapped[0::3], swapped[2::3] = page[2::3], page[0::3]
    assert bytes(swapped) != page
    # Reading with a stride one pixel off changes the page.
    assert page[3 : 3 + info.size - 3] != page[: info.size - 3]


def test_pattern_16bit_bytes_differ_and_8bit_is_high_byte():
    for mode in ("color", "gray"):
        p16 = pattern_page(info_for(mode, 16), 2)
        p8 = pattern_page(info_for(mode, 8), 2)
        assert high_bytes(p16) == p8
        assert p16[0::2] != p16[1::2]  # a byte swap would show


def test_gray_is_luma_of_color_and_lineart_thresholds_gray():
    color = samples16(pattern_page(info_for("color", 16), 4))
    gray = samples16(pattern_page(info_for("gray", 16), 4))
    expected = [(299 * r + 587 * g + 114 * b) // 1000 for r, g, b in zip(color[0::3], color[1::3], color[2::3])]
    assert gray == expected
    info = info_for("lineart", 1)
    lineart = pattern_page(info, 4)
    black = [v < 0x8000 for v in gray]
    assert lineart_to_l(lineart, info) == bytes(0 if b else 255 for b in black)
    assert 0.1 < sum(black) / len(black) < 0.9


@pytest.mark.parametrize("width", [1, 7, 9, 13, 67])
def test_lineart_padding_bits_are_zero(width):
    info = ImageInfo(width, 40, "lineart", 1, 300)
    page = pattern_page(info, 1)
    bpl = info.bytes_per_line
    pad = bpl * 8 - width
    mask = (1 << pad) - 1
    for y in range(info.height):
        assert page[(y + 1) * bpl - 1] & mask == 0


def test_pattern_large_page():
    info = ImageInfo(4960, 7016, "color", 8, 600)  # A4 at 600 dpi
    band = pattern_rows(info, 1, 3000, 64)
    assert len(band) == 64 * info.bytes_per_line
    assert band == pattern_rows(info, 1, 3000, 64)
    assert band != pattern_rows(info, 2, 3000, 64)


# ---------------------------------------------------------------------------
# Raw stream
# ---------------------------------------------------------------------------


def test_raw_header_layout():
    info = ImageInfo(67, 45, "color", 16, 300)
    data = encode("raw", [(info, 0), (info, 1)])
    assert data[0:4] == RAW_MAGIC
    version, header_len = struct.unpack_from("<HH", data, 4)
    assert (version, header_len) == (1, 36)
    width, height, depth, channels, code, resolution, page, length = struct.unpack_from("<IIHBBIIQ", data, 8)
    assert (width, height, depth, channels, code, resolution, page) == (67, 45, 16, 3, 1, 300, 0)
    assert length == info.size
    assert data[36 : 36 + info.size] == pattern_page(info, 0)
    second = 36 + info.size
    assert data[second : second + 4] == RAW_MAGIC
    assert struct.unpack_from("<I", data, second + 24)[0] == 1
    assert len(data) == 2 * (36 + info.size)


def test_raw_mode_codes():
    for mode, depth, code in [("gray", 8, 0), ("color", 8, 1), ("lineart", 1, 2)]:
        data = encode("raw", [(info_for(mode, depth), 0)])
        assert data[19] == code


def test_parse_raw_round_trip():
    pages = [
        (ImageInfo(67, 45, "color", 8, 300), 0),
        (ImageInfo(33, 20, "gray", 16, 600), 1),
        (ImageInfo(13, 9, "lineart", 1, 1200), 2),
        (ImageInfo(5, 3, "color", 16, 75), 3),
    ]
    parsed = parse_raw(encode("raw", pages))
    assert len(parsed) == 4
    for (info, page), (pinfo, ppage, pdata) in zip(pages, parsed):
        assert pinfo == info
        assert ppage == page
        assert pdata == pattern_page(info, page)
    assert parse_raw(b"") == []


def test_parse_raw_rejects_bad_streams():
    data = encode("raw", [(info_for("gray", 8), 0)])
    with pytest.raises(ValueError):
        parse_raw(b"XXXX" + data[4:])
    with pytest.raises(ValueError):
        parse_raw(data[:-1])
    with pytest.raises(ValueError):
        parse_raw(data[:20])
    bad_version = data[:4] + struct.pack("<H", 2) + data[6:]
    with pytest.raises(ValueError):
        parse_raw(bad_version)
    bad_length = data[:28] + struct.pack("<Q", 5) + data[36:]
    with pytest.raises(ValueError):
        parse_raw(bad_length)


def test_parse_raw_skips_longer_header():
    info = info_for("gray", 8, width=10, height=4)
    data = encode("raw", [(info, 0)])
    longer = data[:6] + struct.pack("<H", 40) + data[8:36] + b"\xaa" * 4 + data[36:]
    ((pinfo, page, rows),) = parse_raw(longer)
    assert pinfo == info and page == 0 and rows == pattern_page(info, 0)


# ---------------------------------------------------------------------------
# Lossless formats decode to the pattern
# ---------------------------------------------------------------------------


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        kind = data[pos + 4 : pos + 8]
        payload = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack_from(">I", data, pos + 8 + length)
        assert crc == zlib.crc32(kind + payload)
        chunks.append((kind, payload))
        pos += 12 + length
    return chunks


@pytest.mark.parametrize("mode,depth", MODES, ids=MODE_IDS)
def test_png_decodes_to_pattern(mode, depth):
    info = info_for(mode, depth, width=61, height=50, resolution=300)
    data = encode("png", [(info, 2)])
    im = Image.open(io.BytesIO(data))
    im.load()
    expected = pattern_page(info, 2)
    assert_image_matches(im, info, expected)
    assert im.info["dpi"] == pytest.approx((300, 300), abs=0.01)
    # Exact samples (Pillow reduces 16-bit colour): every row has filter 0.
    chunks = png_chunks(data)
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    assert b"pHYs" in [k for k, _ in chunks]
    raw = zlib.decompress(b"".join(p for k, p in chunks if k == b"IDAT"))
    bpl = info.bytes_per_line
    assert len(raw) == info.height * (bpl + 1)
    rows = [raw[y * (bpl + 1) : (y + 1) * (bpl + 1)] for y in range(info.height)]
    assert all(r[0] == 0 for r in rows)
    body = b"".join(r[1:] for r in rows)
    if mode == "lineart":
        body = bytes(255 - b for b in body)
        pad = bpl * 8 - info.width
        expected = bytearray(expected)
        body = bytearray(body)
        for y in range(info.height):  # padding bits are unspecified in PNG
            body[(y + 1) * bpl - 1] &= 0xFF ^ ((1 << pad) - 1)
        expected = bytes(expected)
        body = bytes(body)
    assert body == expected


def split_pnm(data: bytes) -> list[bytes]:
    """Split concatenated PNM images."""
    images = []
    pos = 0
    header = re.compile(rb"(P[456])\s+(\d+)\s+(\d+)\s")
    while pos < len(data):
        m = header.match(data, pos)
        assert m, f"no PNM header at {pos}"
        magic, w, h = m.group(1), int(m.group(2)), int(m.group(3))
        end = m.end()
        if magic == b"P4":
            size = (w + 7) // 8 * h
        else:
            m2 = re.compile(rb"(\d+)\s").match(data, end)
            assert m2
            maxval = int(m2.group(1))
            end = m2.end()
            size = w * h * (3 if magic == b"P6" else 1) * (2 if maxval > 255 else 1)
        images.append(data[pos : end + size])
        pos = end + size
    return images


@pytest.mark.parametrize("mode,depth", MODES, ids=MODE_IDS)
def test_pnm_decodes_to_pattern(mode, depth):
    info = info_for(mode, depth, width=61, height=50)
    data = encode("pnm", [(info, 1)])
    magic = {"color": b"P6", "gray": b"P5", "lineart": b"P4"}[mode]
    assert data.startswith(magic + b"\n61 50\n")
    if mode != "lineart":
        assert data.startswith(magic + b"\n61 50\n%d\n" % (255 if depth == 8 else 65535))
    assert data.endswith(pattern_page(info, 1))
    im = Image.open(io.BytesIO(data))
    im.load()
    assert_image_matches(im, info, pattern_page(info, 1))


def tiff_frames(data: bytes) -> list[Image.Image]:
    im = Image.open(io.BytesIO(data))
    frames = []
    for i in range(im.n_frames):
        im.seek(i)
        im.load()
        frames.append(im.copy())
        frames[-1].info = dict(im.info)
    return frames


@pytest.mark.parametrize("mode,depth", MODES, ids=MODE_IDS)
def test_tiff_decodes_to_pattern(mode, depth):
    info = info_for(mode, depth, width=61, height=50, resolution=600)
    data = encode("tiff", [(info, 0)])
    assert data[:4] == b"MM\x00\x2a"
    (frame,) = tiff_frames(data)
    assert_image_matches(frame, info, pattern_page(info, 0))
    assert frame.info["dpi"] == pytest.approx((600, 600))
    # The strips hold exactly the raw rows (big-endian samples, WhiteIsZero lineart).
    assert pattern_page(info, 0) in data


def test_tiff_many_strips():
    info = ImageInfo(700, 400, "color", 16, 300)  # 1.6 MiB: several strips
    data = encode("tiff", [(info, 0), (info, 1)], band=50)
    im = Image.open(io.BytesIO(data))
    assert len(im.tag_v2[273]) > 1
    for i in range(2):
        im.seek(i)
        im.load()
        offsets, counts = im.tag_v2[273], im.tag_v2[279]
        strips = b"".join(data[o : o + c] for o, c in zip(offsets, counts))
        assert strips == pattern_page(info, i)
        assert_image_matches(im, info, pattern_page(info, i))


# ---------------------------------------------------------------------------
# Multi-page streams
# ---------------------------------------------------------------------------

MIXED_PAGES = [
    (ImageInfo(61, 50, "color", 8, 300), 0),
    (ImageInfo(33, 21, "gray", 16, 150), 1),
    (ImageInfo(13, 9, "lineart", 1, 600), 2),
    (ImageInfo(13, 9, "gray", 8, 200), 3),  # odd byte count
    (ImageInfo(17, 11, "color", 16, 100), 4),
]


def test_tiff_ifd_chain():
    """Walk the IFDs by hand: word-aligned, one per page, last one ends the chain."""
    data = encode("tiff", MIXED_PAGES)
    (offset,) = struct.unpack_from(">I", data, 4)
    seen = []
    while offset:
        assert offset % 2 == 0
        (count,) = struct.unpack_from(">H", data, offset)
        tags = {}
        for i in range(count):
            tag, typ, n, value = struct.unpack_from(">HHI4s", data, offset + 2 + 12 * i)
            tags[tag] = (typ, n, value)
        assert list(tags) == sorted(tags)
        seen.append((struct.unpack(">I", tags[256][2])[0], struct.unpack(">I", tags[257][2])[0]))
        (offset,) = struct.unpack_from(">I", data, offset + 2 + 12 * count)
    assert seen == [(i.width, i.height) for i, _ in MIXED_PAGES]


def test_tiff_multipage():
    data = encode("tiff", MIXED_PAGES)
    frames = tiff_frames(data)
    assert len(frames) == len(MIXED_PAGES)
    for frame, (info, page) in zip(frames, MIXED_PAGES):
        assert_image_matches(frame, info, pattern_page(info, page))
        assert frame.info["dpi"] == pytest.approx((info.resolution, info.resolution))


def test_pnm_multipage():
    data = encode("pnm", MIXED_PAGES)
    images = split_pnm(data)
    assert len(images) == len(MIXED_PAGES)
    for blob, (info, page) in zip(images, MIXED_PAGES):
        im = Image.open(io.BytesIO(blob))
        im.load()
        assert_image_matches(im, info, pattern_page(info, page))


def test_raw_multipage():
    parsed = parse_raw(encode("raw", MIXED_PAGES))
    assert [p for _, p, _ in parsed] == list(range(len(MIXED_PAGES)))
    assert [i for i, _, _ in parsed] == [i for i, _ in MIXED_PAGES]


def parse_pdf(data: bytes) -> dict[int, bytes]:
    """Objects of a PDF by number, checked against the xref table."""
    assert data.startswith(b"%PDF-1.")
    assert data.rstrip().endswith(b"%%EOF")
    startxref = int(re.search(rb"startxref\s+(\d+)\s+%%EOF\s*$", data).group(1))
    assert data[startxref:].startswith(b"xref")
    m = re.compile(rb"xref\s+0 (\d+)\s+").match(data, startxref)
    count = int(m.group(1))
    table = data[m.end() : m.end() + 20 * count]
    objects = {}
    for num in range(1, count):
        entry = table[20 * num : 20 * num + 20]
        assert entry.endswith(b" n \n") or entry.endswith(b" n\r\n")
        offset = int(entry[:10])
        head = re.compile(rb"%d 0 obj\s" % num).match(data, offset)
        assert head, f"xref of object {num} is wrong"
        end = data.index(b"endobj", head.end())
        if b"stream" in data[head.end() : end]:
            # The stream may contain "endobj" by chance: use /Length.
            body_start = head.end()
            stream_start = data.index(b"stream\n", body_start) + len(b"stream\n")
            objects[num] = data[body_start:stream_start]
        else:
            objects[num] = data[head.end() : end].strip()
    return objects


def pdf_resolve_int(objects: dict[int, bytes], value: bytes) -> int:
    ref = re.fullmatch(rb"(\d+) 0 R", value.strip())
    return int(objects[int(ref.group(1))]) if ref else int(value)


def pdf_pages(data: bytes) -> list[tuple[list[float], dict, bytes]]:
    """(MediaBox, image dictionary, decoded image samples) for every page, in order."""
    objects = parse_pdf(data)
    root = int(re.search(rb"/Root (\d+) 0 R", data[data.rindex(b"trailer") :]).group(1))
    pages_ref = int(re.search(rb"/Pages (\d+) 0 R", objects[root]).group(1))
    tree = objects[pages_ref]
    count = int(re.search(rb"/Count (\d+)", tree).group(1))
    kids = [int(k) for k in re.findall(rb"(\d+) 0 R", re.search(rb"/Kids \[([^\]]*)\]", tree).group(1))]
    assert count == len(kids)
    result = []
    for kid in kids:
        page = objects[kid]
        assert b"/Type /Page" in page
        box = [float(v) for v in re.search(rb"/MediaBox \[([^\]]*)\]", page).group(1).split()]
        image_num = int(re.search(rb"/Im0 (\d+) 0 R", page).group(1))
        head = objects[image_num]
        fields = {
            "width": int(re.search(rb"/Width (\d+)", head).group(1)),
            "height": int(re.search(rb"/Height (\d+)", head).group(1)),
            "bpc": int(re.search(rb"/BitsPerComponent (\d+)", head).group(1)),
            "colorspace": re.search(rb"/ColorSpace /(\w+)", head).group(1).decode(),
            "decode": re.search(rb"/Decode \[([^\]]*)\]", head),
        }
        length = pdf_resolve_int(objects, re.search(rb"/Length (\d+(?: 0 R)?)", head).group(1))
        start = data.index(head) + len(head)
        stream = data[start : start + length]
        assert data[start + length :].startswith(b"\nendstream")
        result.append((box, fields, zlib.decompress(stream)))
    return result


def test_pdf_multipage():
    data = encode("pdf", MIXED_PAGES)
    pages = pdf_pages(data)
    assert len(pages) == len(MIXED_PAGES)
    for (box, fields, samples), (info, page) in zip(pages, MIXED_PAGES):
        assert box[:2] == [0, 0]
        assert box[2] == pytest.approx(info.width * 72 / info.resolution, abs=1e-3)
        assert box[3] == pytest.approx(info.height * 72 / info.resolution, abs=1e-3)
        assert (fields["width"], fields["height"], fields["bpc"]) == (info.width, info.height, info.depth)
        assert fields["colorspace"] == ("DeviceRGB" if info.mode == "color" else "DeviceGray")
        if info.mode == "lineart":
            assert fields["decode"].group(1).split() == [b"1", b"0"]  # PBM: 1 = black
        assert samples == pattern_page(info, page)


def test_pdf_a4_page_size():
    info = ImageInfo(2480, 3508, "gray", 8, 300)  # A4 at 300 dpi
    data = encode("pdf", [(info, 0)], band=256)
    ((box, _, samples),) = pdf_pages(data)
    assert box[2] == pytest.approx(595.2, abs=0.01)
    assert box[3] == pytest.approx(841.92, abs=0.01)
    assert samples == pattern_page(info, 0)


def test_pdf_readable_by_pypdf():
    pypdf = pytest.importorskip("pypdf")
    reader = pypdf.PdfReader(io.BytesIO(encode("pdf", MIXED_PAGES)))
    assert len(reader.pages) == len(MIXED_PAGES)


# ---------------------------------------------------------------------------
# JPEG
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode,depth", MODES, ids=MODE_IDS)
def test_jpeg_decodes_close_to_pattern(mode, depth):
    info = info_for(mode, depth, width=480, height=360, resolution=200)
    data = encode("jpeg", [(info, 1)])
    assert data[:2] == b"\xff\xd8"
    im = Image.open(io.BytesIO(data))
    im.load()
    assert im.format == "JPEG"
    assert im.size == (480, 360)
    assert im.info["dpi"] == pytest.approx((200, 200))
    expected = pattern_page(info, 1)
    if mode == "lineart":
        expected = lineart_to_l(expected, info)
    elif depth == 16:
        expected = high_bytes(expected)
    assert im.mode == ("RGB" if mode == "color" else "L")
    got = im.tobytes()
    assert len(got) == len(expected)
    mae = sum(abs(a - b) for a, b in zip(got, expected)) / len(got)
    assert mae < (6 if mode == "color" else 1.5), mae


# ---------------------------------------------------------------------------
# Streaming and the call protocol
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["raw", "pnm", "png", "tiff", "pdf"])
@pytest.mark.parametrize("mode,depth", [("color", 8), ("lineart", 1)])
def test_streaming_output_before_end_page(fmt, mode, depth):
    info = ImageInfo(2480, 3508, mode, depth, 300)
    enc = make_encoder(fmt)
    parts = [enc.begin_page(info)]
    band = 64
    in_page = 0
    first_half = 0
    for y in range(0, info.height, band):
        out = enc.add_rows(pattern_rows(info, 0, y, min(band, info.height - y)))
        in_page += len(out)
        if y < info.height // 2:
            first_half += len(out)
        parts.append(out)
    assert first_half > 0, "no output during the first half of the page"
    if fmt in ("raw", "pnm", "tiff"):
        assert in_page == info.size
    parts.append(enc.end_page())
    parts.append(enc.finish())
    data = b"".join(parts)
    if fmt == "raw":
        ((pinfo, _, rows),) = parse_raw(data)
        assert rows == pattern_page(info, 0)
    elif fmt == "pdf":
        ((_, _, samples),) = pdf_pages(data)
        assert samples == pattern_page(info, 0)
    else:
        im = Image.open(io.BytesIO(data))
        im.load()
        assert_image_matches(im, info, pattern_page(info, 0))


def test_png_sync_flush_keeps_output_flowing():
    """Even highly compressible rows produce output at least every flush interval."""
    info = ImageInfo(4000, 2000, "gray", 8, 300)
    enc = imaging.PngEncoder(flush_interval=64 << 10)
    enc.begin_page(info)
    silent = 0
    row = bytes(info.bytes_per_line)
    for _ in range(0, info.height, 8):
        out = enc.add_rows(row * 8)
        silent = 0 if out else silent + 8 * (info.bytes_per_line + 1)
        assert silent < (64 << 10) + 8 * (info.bytes_per_line + 1)
    data = b"".join([enc.end_page(), enc.finish()])
    assert data.endswith(struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND")))


def test_jpeg_buffers_one_page():
    info = info_for("color", 8)
    enc = make_encoder("jpeg")
    enc.begin_page(info)
    assert enc.add_rows(pattern_page(info, 0)) == b""
    out = enc.end_page()
    assert out[:2] == b"\xff\xd8" and out[-2:] == b"\xff\xd9"
    assert enc.finish() == b""


def test_unknown_format():
    with pytest.raises(ValueError) as exc:
        make_encoder("bmp")
    for fmt in FORMATS:
        assert fmt in str(exc.value)


@pytest.mark.parametrize("fmt", FORMATS)
def test_call_protocol(fmt):
    info = info_for("gray", 8, width=10, height=4)
    enc = make_encoder(fmt)
    with pytest.raises(RuntimeError):
        enc.add_rows(bytes(10))
    with pytest.raises(RuntimeError):
        enc.end_page()
    with pytest.raises(RuntimeError):
        enc.finish()  # no page yet
    enc.begin_page(info)
    with pytest.raises(RuntimeError):
        enc.begin_page(info)
    with pytest.raises(ValueError):
        enc.add_rows(bytes(15))  # not whole rows
    with pytest.raises(ValueError):
        enc.add_rows(bytes(50))  # more rows than the page has
    enc.add_rows(bytes(30))
    with pytest.raises(ValueError):
        enc.end_page()  # one row missing
    with pytest.raises(RuntimeError):
        enc.finish()  # page open
    enc.add_rows(bytes(10))
    enc.end_page()
    if fmt in MULTIPAGE_FORMATS:
        enc.begin_page(info)
        enc.add_rows(bytes(40))
        enc.end_page()
    else:
        with pytest.raises(RuntimeError):
            enc.begin_page(info)
    enc.finish()
    with pytest.raises(RuntimeError):
        enc.finish()


def test_tiff_size_limit():
    enc = make_encoder("tiff")
    huge = ImageInfo(70000, 70000, "color", 8, 300)
    with pytest.raises(ValueError):
        enc.begin_page(huge)
