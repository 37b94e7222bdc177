"""Items, properties and transfers through D-Bus, against the real daemon.

Every transfer hands the service the write end of a pipe (or a file) and reads the
other end concurrently; the write end is kept open until the reply arrived.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import zlib
from typing import Any

import pytest
from dbus_fast import DBusError, Variant
from helpers import (
    ITEM,
    MANAGER,
    ROOT,
    SESSION,
    SIM0,
    SIMULATOR,
    Signals,
    call,
    create_session,
    expect_error,
    get_property,
    readable,
    unwrap,
    wait_until,
)
from PIL import Image

from stillsvc.drivers.sim.pattern import pattern_page
from stillsvc.imaging import ImageInfo, parse_raw

SIM1 = f"{ROOT}/devices/sim1"
PROPERTY_TYPES = {
    "resolution": "u", "mode": "s", "depth": "u", "x_offset": "u", "y_offset": "u", "width": "u",
    "height": "u", "brightness": "i", "contrast": "i", "source": "s", "pages": "u", "format": "s",
    "max_width": "u", "max_height": "u",
}
BIG = {"resolution": 600}  # the whole bed in colour at 600 dpi: about 107 MB of raw data


# -- helpers -------------------------------------------------------------------------------------

async def open_items(bus, mode: str = "data", device: str = "sim0") -> tuple[str, str]:
    """A session and its root item's path."""
    session = await create_session(bus, device, mode=mode)
    return session, await get_property(bus, session, SESSION, "RootItem")


async def write(bus, item: str, **values: Any) -> None:
    await call(bus, item, ITEM, "WriteProperties", "a{sv}",
               [{name: Variant(PROPERTY_TYPES[name], value) for name, value in values.items()}])


async def read(bus, item: str) -> dict[str, Any]:
    (values,) = await call(bus, item, ITEM, "ReadProperties")
    return unwrap(values)


async def attributes(bus, item: str) -> dict[str, Any]:
    (attrs,) = await call(bus, item, ITEM, "GetPropertyAttributes")
    return unwrap(attrs)


async def sim(bus, name: str, path: str = SIM0) -> Any:
    return await get_property(bus, path, SIMULATOR, name)


async def driver_items(bus, device_id: str = "sim0") -> dict[tuple[str, int], dict[str, Any]]:
    """GetDriverItems by (item path, generation)."""
    (entries,) = await call(bus, ROOT, MANAGER, "GetDriverItems", "s", [device_id])
    return {(e["path"].value, e["generation"].value): unwrap(e) for e in entries}


def read_all(fd: int) -> bytes:
    chunks = []
    try:
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


async def transfer(bus, item: str, fmt: str, options: dict[str, Variant] | None = None) -> tuple[dict, bytes]:
    """One whole transfer into a pipe: (the reply, the bytes read)."""
    r, w = os.pipe()
    loop = asyncio.get_running_loop()
    reader = loop.run_in_executor(None, read_all, r)
    try:
        (summary,) = await call(bus, item, ITEM, "Transfer", "hsa{sv}", [0, fmt, options or {}], unix_fds=[w])
    finally:
        os.close(w)
        data = await reader
    return unwrap(summary), data


async def drain(fd: int, timeout: float = 5.0) -> int:
    """Read ``fd`` until end of file without blocking the loop; returns the byte count."""
    os.set_blocking(fd, False)
    total = 0
    while True:
        try:
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:
            await readable(fd, timeout)
            continue
        if not chunk:
            return total
        total += len(chunk)


class Parked:
    """A transfer into a pipe nobody reads: the service fills the pipe and waits."""

    def __init__(self, bus, item: str, fmt: str = "raw") -> None:
        self.bus, self.item, self.fmt = bus, item, fmt
        self.r, self.w = os.pipe()
        self.reply: asyncio.Future | None = None

    async def __aenter__(self) -> Parked:
        self.reply = asyncio.ensure_future(call(self.bus, self.item, ITEM, "Transfer", "hsa{sv}",
                                                [0, self.fmt, {}], unix_fds=[self.w]))
        await readable(self.r)
        return self

    async def result(self, timeout: float = 5.0) -> Any:
        assert self.reply is not None
        try:
            return await asyncio.wait_for(asyncio.shield(self.reply), timeout)
        finally:
            self.close_write()

    def close_write(self) -> None:
        if self.w >= 0:
            os.close(self.w)
            self.w = -1

    def close_read(self) -> None:
        if self.r >= 0:
            os.close(self.r)
            self.r = -1

    async def __aexit__(self, *exc: object) -> None:
        self.close_read()  # the service sees the reader gone, whatever state it is in
        if self.reply is not None and not self.reply.done():
            try:
                await asyncio.wait_for(self.reply, 5)
            except (DBusError, TimeoutError):
                pass
        self.close_write()


def pattern(width: int, height: int, mode: str, page: int, resolution: int = 75, depth: int = 8) -> bytes:
    return pattern_page(ImageInfo(width, height, mode, depth, resolution), page)


def mean_error(a: bytes, b: bytes) -> float:
    assert len(a) == len(b)
    return sum(abs(x - y) for x, y in zip(a, b)) / len(a)


async def small(bus, item: str, width: int = 64, height: int = 48, mode: str = "color", **more: Any) -> None:
    await write(bus, item, resolution=75, mode=mode, width=width, height=height, **more)


# -- the item tree ----------------------------------------------------------------------------------

async def test_root_item_and_children(client):
    session, root = await open_items(client, mode="status")
    assert root == f"{session}/items/Root"
    assert await get_property(client, root, ITEM, "Name") == "Root"
    assert await get_property(client, root, ITEM, "Kind") == "device"
    assert await get_property(client, root, ITEM, "ItemPath") == "Root"
    assert await get_property(client, root, ITEM, "Connected") is True
    children = await get_property(client, root, ITEM, "Children")
    assert children == [f"{root}/Flatbed", f"{root}/Feeder"]
    for path, name, kind in zip(children, ("Flatbed", "Feeder"), ("flatbed", "feeder")):
        assert await get_property(client, path, ITEM, "Name") == name
        assert await get_property(client, path, ITEM, "Kind") == kind
        assert await get_property(client, path, ITEM, "ItemPath") == f"Root/{name}"
        assert await get_property(client, path, ITEM, "Children") == []
        assert await get_property(client, path, ITEM, "Connected") is True
    props = await read(client, root)
    assert props["vendor"] == "stillsvc" and props["optical_resolution"] == 600


async def test_each_session_gets_its_own_items_linked_to_the_driver_items(client, client2):
    before = await driver_items(client)
    assert {path for path, _ in before} == {"Root", "Root/Flatbed", "Root/Feeder"}
    assert all(e["present"] and not e["removed"] for e in before.values())
    s1, root1 = await open_items(client, mode="status")
    s2, root2 = await open_items(client2, mode="status")
    assert root1 != root2
    after = await driver_items(client)
    assert all(after[key]["refcount"] == before[key]["refcount"] + 2 for key in before)
    await call(client, s1, SESSION, "Close")
    await expect_error("NotFound", read(client, root1 + "/Flatbed"))
    assert all(e["refcount"] == before[key]["refcount"] + 1 for key, e in (await driver_items(client)).items())


async def test_items_belong_to_their_session_owner(client, client2):
    _, root = await open_items(client, mode="status")
    await expect_error("AccessDenied", read(client2, root + "/Flatbed"))
    await expect_error("AccessDenied", write(client2, root + "/Flatbed", resolution=300))
    await expect_error("AccessDenied", get_property(client2, root + "/Flatbed", ITEM, "Children"))


async def test_two_clients_items_are_independent(client, client2):
    _, root1 = await open_items(client, mode="status")
    _, root2 = await open_items(client2, mode="status")
    _, root3 = await open_items(client, mode="status")  # the same client's other session
    async with Signals(client, member="PropertiesChanged", path=root1 + "/Flatbed") as changed:
        await write(client, root1 + "/Flatbed", resolution=300)
        (msg,) = await changed.wait(1)
    assert msg.destination == client.unique_name
    assert unwrap(msg.body[1])["Properties"]["resolution"] == 300
    assert (await read(client, root1 + "/Flatbed"))["resolution"] == 300
    assert (await read(client2, root2 + "/Flatbed"))["resolution"] == 150
    assert (await read(client, root3 + "/Flatbed"))["resolution"] == 150
    assert (await read(client, root1 + "/Feeder"))["resolution"] == 150  # items of one session too
    await write(client2, root2 + "/Flatbed", mode="gray")
    assert (await read(client, root1 + "/Flatbed"))["mode"] == "color"


# -- properties -------------------------------------------------------------------------------------

async def test_property_attributes_of_the_flatbed_and_feeder(client):
    _, root = await open_items(client, mode="status")
    flatbed = await attributes(client, root + "/Flatbed")
    assert flatbed["resolution"]["type"] == "u" and flatbed["resolution"]["access"] == "rw"
    assert flatbed["resolution"]["valid"] == {"kind": "list", "values": [75, 100, 150, 200, 300, 600]}
    assert flatbed["mode"]["type"] == "s"
    assert flatbed["mode"]["valid"] == {"kind": "list", "values": ["color", "gray", "lineart"]}
    assert flatbed["depth"]["valid"] == {"kind": "list", "values": [1, 8, 16]}
    assert flatbed["width"] == {"type": "u", "access": "rw", "description": "scan area width, pixels",
                                "valid": {"kind": "range", "min": 1, "max": 1275, "step": 1}, "inactive": False}
    assert flatbed["height"]["valid"] == {"kind": "range", "min": 1, "max": 1753, "step": 1}
    assert flatbed["x_offset"]["valid"] == {"kind": "range", "min": 0, "max": 1274, "step": 1}
    assert flatbed["y_offset"]["valid"] == {"kind": "range", "min": 0, "max": 1752, "step": 1}
    assert flatbed["max_width"]["access"] == "r" and flatbed["max_width"]["valid"] == {"kind": "none"}
    for name in ("brightness", "contrast"):
        assert flatbed[name]["type"] == "i" and flatbed[name]["access"] == "rw"
        assert flatbed[name]["valid"] == {"kind": "range", "min": -100, "max": 100, "step": 1}
    assert flatbed["source"]["access"] == "r"
    assert flatbed["source"]["valid"] == {"kind": "list", "values": ["flatbed"]}
    assert flatbed["pages"]["access"] == "r"
    assert flatbed["pages"]["valid"] == {"kind": "range", "min": 1, "max": 1, "step": 1}
    assert flatbed["format"]["valid"] == {"kind": "list", "values": ["raw", "pnm", "png", "tiff", "jpeg", "pdf"]}
    feeder = await attributes(client, root + "/Feeder")
    assert feeder["source"]["valid"] == {"kind": "list", "values": ["feeder"]}
    assert feeder["pages"]["access"] == "rw"
    assert feeder["pages"]["valid"] == {"kind": "range", "min": 0, "max": 50, "step": 1}
    assert set(feeder) == set(flatbed) == set(await read(client, root + "/Flatbed"))


async def test_extent_limits_follow_the_resolution(client):
    _, root = await open_items(client, mode="status")
    flatbed = root + "/Flatbed"
    await write(client, flatbed, resolution=600)
    attrs = await attributes(client, flatbed)
    assert attrs["width"]["valid"]["max"] == 5102
    assert attrs["height"]["valid"]["max"] == 7015
    assert attrs["x_offset"]["valid"]["max"] == 5101
    await write(client, flatbed, width=5102)
    await write(client, flatbed, resolution=75)
    assert (await attributes(client, flatbed))["width"]["valid"]["max"] == 637


async def test_resolution_change_scales_the_scan_area(client):
    _, root = await open_items(client, mode="status")
    flatbed = root + "/Flatbed"
    values = await read(client, flatbed)
    assert (values["resolution"], values["width"], values["height"]) == (150, 1275, 1753)
    assert (values["max_width"], values["max_height"]) == (1275, 1753)
    await write(client, flatbed, x_offset=100, y_offset=50, width=200, height=300)
    await write(client, flatbed, resolution=300)
    values = await read(client, flatbed)
    assert (values["x_offset"], values["y_offset"], values["width"], values["height"]) == (200, 100, 400, 600)
    assert (values["max_width"], values["max_height"]) == (2551, 3507)
    await write(client, flatbed, resolution=75, width=10)  # set together: width taken as given
    values = await read(client, flatbed)
    assert (values["x_offset"], values["y_offset"], values["width"], values["height"]) == (50, 25, 10, 150)
    assert values["max_width"] == 637


async def test_lineart_forces_depth_one_and_back(client):
    _, root = await open_items(client, mode="status")
    flatbed = root + "/Flatbed"
    await write(client, flatbed, mode="lineart")
    assert (await read(client, flatbed))["depth"] == 1
    await write(client, flatbed, mode="gray")
    assert (await read(client, flatbed))["depth"] == 8


async def test_validation_errors_name_the_property_and_valid_values(client):
    _, root = await open_items(client, mode="status")
    flatbed = root + "/Flatbed"
    before = await read(client, flatbed)
    e = await expect_error("InvalidArgument", call(client, flatbed, ITEM, "WriteProperties", "a{sv}",
                                                   [{"sharpness": Variant("i", 3)}]))
    assert "sharpness" in e.text and "resolution" in e.text
    e = await expect_error("InvalidArgument", write(client, flatbed, max_width=100))
    assert "max_width" in e.text and "read-only" in e.text
    e = await expect_error("InvalidArgument", write(client, flatbed, resolution=123))
    assert "resolution" in e.text and "75, 100, 150, 200, 300, 600" in e.text
    e = await expect_error("InvalidArgument", write(client, flatbed, width=1276))
    assert "width" in e.text and "1275" in e.text
    e = await expect_error("InvalidArgument", write(client, flatbed, x_offset=1000, width=1000))
    assert "max_width" in e.text and "1275" in e.text
    e = await expect_error("InvalidArgument", write(client, flatbed, depth=1))
    assert "depth" in e.text and "lineart" in e.text
    e = await expect_error("InvalidArgument", write(client, flatbed, mode="sepia"))
    assert "mode" in e.text and "color, gray, lineart" in e.text
    e = await expect_error("InvalidArgument", write(client, flatbed, brightness=101))
    assert "brightness" in e.text and "-100..100" in e.text
    e = await expect_error("InvalidArgument", call(client, flatbed, ITEM, "WriteProperties", "a{sv}",
                                                   [{"resolution": Variant("s", "300")}]))
    assert "resolution" in e.text and "type 'u'" in e.text
    e = await expect_error("InvalidArgument", write(client, flatbed, source="feeder"))
    assert "source" in e.text
    e = await expect_error("InvalidArgument", write(client, flatbed, resolution=300, width=9999))
    assert "width" in e.text and "2551" in e.text  # checked against the new resolution's limits
    assert await read(client, flatbed) == before  # nothing of a refused write was kept


# -- properties reach the device before a transfer -----------------------------------------------------

async def test_item_properties_are_written_to_the_device_before_the_transfer(client, client2):
    _, root = await open_items(client)
    _, other = await open_items(client2, mode="status")
    flatbed = root + "/Flatbed"
    await write(client, flatbed, resolution=100, mode="gray", x_offset=10, y_offset=20, width=40, height=30)
    await write(client2, other + "/Flatbed", resolution=300, mode="color")  # another client's copy
    summary, data = await transfer(client, flatbed, "raw")
    assert {k: summary[k] for k in ("width", "height", "mode", "depth", "resolution", "pages")} == {
        "width": 40, "height": 30, "mode": "gray", "depth": 8, "resolution": 100, "pages": 1}
    ((info, number, _rows),) = parse_raw(data)
    assert (info.width, info.height, info.mode, info.depth, info.resolution) == (40, 30, "gray", 8, 100)
    assert number == 0
    # What the device received, as the simulated driver recorded it: this client's
    # values, brightness and contrast included, not the other client's.
    await write(client, flatbed, brightness=10, contrast=-5)
    await transfer(client, flatbed, "raw")
    received = unwrap(await get_property(client, SIM0, SIMULATOR, "LastSettings"))["Flatbed"]
    assert {k: received[k] for k in ("resolution", "mode", "x_offset", "y_offset", "width", "height",
                                     "brightness", "contrast")} == {
        "resolution": 100, "mode": "gray", "x_offset": 10, "y_offset": 20, "width": 40, "height": 30,
        "brightness": 10, "contrast": -5}
    await write(client, flatbed, mode="color", depth=16, width=20)
    summary, data = await transfer(client, flatbed, "raw")
    ((info, _, rows),) = parse_raw(data)
    assert (info.width, info.height, info.mode, info.depth) == (20, 30, "color", 16)
    assert (summary["width"], summary["depth"], summary["mode"]) == (20, 16, "color")
    assert len(rows) == 20 * 30 * 6


# -- byte-exact transfers in every format --------------------------------------------------------------

async def test_raw_transfer_of_a_flatbed_page_is_byte_exact(client):
    _, root = await open_items(client)
    flatbed = root + "/Flatbed"
    await small(client, flatbed, width=64, height=48)
    fed = await sim(client, "PagesFed")
    summary, data = await transfer(client, flatbed, "raw")
    assert summary["format"] == "raw" and summary["content_type"] == "application/x-stillsvc-raw"
    assert summary["bytes"] == len(data) == 36 + 64 * 48 * 3
    assert summary["pages"] == 1
    ((info, number, rows),) = parse_raw(data)
    assert info == ImageInfo(64, 48, "color", 8, 75) and number == 0
    assert rows == pattern(64, 48, "color", fed)
    assert await sim(client, "PagesFed") == fed + 1
    _, again = await transfer(client, flatbed, "raw")
    assert parse_raw(again)[0][2] == pattern(64, 48, "color", fed + 1)  # each page is the next one


@pytest.mark.parametrize("fmt", ["pnm", "png", "tiff"])
@pytest.mark.parametrize("mode", ["gray", "color"])
async def test_lossless_formats_decode_to_the_exact_pattern(client, fmt, mode):
    _, root = await open_items(client)
    flatbed = root + "/Flatbed"
    await small(client, flatbed, width=70, height=50, mode=mode)
    fed = await sim(client, "PagesFed")
    summary, data = await transfer(client, flatbed, fmt)
    assert summary["bytes"] == len(data) and summary["pages"] == 1 and summary["format"] == fmt
    image = Image.open(io.BytesIO(data))
    assert image.format == {"pnm": "PPM", "png": "PNG", "tiff": "TIFF"}[fmt]
    assert image.size == (70, 50)
    assert image.mode == ("RGB" if mode == "color" else "L")
    assert image.tobytes() == pattern(70, 50, mode, fed)


@pytest.mark.parametrize(("mode", "tolerance"), [("gray", 2), ("color", 8)])
async def test_jpeg_decodes_close_to_the_pattern(client, mode, tolerance):
    # Lossy: the mean absolute error per sample stays small (colour is higher because of
    # chroma subsampling on the pattern's saturated yellow/blue checkerboard).
    _, root = await open_items(client)
    flatbed = root + "/Flatbed"
    await small(client, flatbed, width=256, height=192, mode=mode)
    fed = await sim(client, "PagesFed")
    summary, data = await transfer(client, flatbed, "jpeg")
    assert summary["content_type"] == "image/jpeg" and summary["bytes"] == len(data)
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG" and image.size == (256, 192)
    assert image.mode == ("RGB" if mode == "color" else "L")
    assert mean_error(image.tobytes(), pattern(256, 192, mode, fed)) < tolerance
    assert mean_error(image.tobytes(), pattern(256, 192, mode, fed + 1)) > 30  # it tells pages apart


def pdf_pages(data: bytes) -> tuple[int, list[tuple[float, float]], list[bytes]]:
    """A simple reading of the service's PDF: /Count, each page's MediaBox, each image's pixels."""
    assert data.startswith(b"%PDF-1.")
    assert data.rstrip().endswith(b"%%EOF")
    count = int(re.search(rb"/Type /Pages /Kids \[[^\]]*\] /Count (\d+)", data).group(1))
    boxes = [(float(w), float(h)) for w, h in re.findall(rb"/MediaBox \[0 0 ([\d.]+) ([\d.]+)\]", data)]
    images = []
    for match in re.finditer(rb"/Subtype /Image .*?>>\nstream\n", data):
        inflate = zlib.decompressobj()
        images.append(inflate.decompress(data[match.end():]))
        assert inflate.eof
    return count, boxes, images


async def test_pdf_from_the_flatbed_has_one_page_of_the_right_size(client):
    _, root = await open_items(client)
    flatbed = root + "/Flatbed"
    await small(client, flatbed, width=64, height=48, mode="gray")
    fed = await sim(client, "PagesFed")
    summary, data = await transfer(client, flatbed, "pdf")
    assert summary["content_type"] == "application/pdf" and summary["pages"] == 1
    count, boxes, images = pdf_pages(data)
    assert count == 1
    assert boxes == [pytest.approx((64 * 72 / 75, 48 * 72 / 75), abs=1e-3)]
    assert images == [pattern(64, 48, "gray", fed)]
    assert b"/Width 64 /Height 48 /ColorSpace /DeviceGray /BitsPerComponent 8" in data


async def test_pdf_from_the_feeder_has_a_page_per_sheet(client):
    _, root = await open_items(client)
    feeder = root + "/Feeder"
    await call(client, SIM0, SIMULATOR, "LoadPages", "u", [2])
    await small(client, feeder, width=40, height=30)
    fed = await sim(client, "PagesFed")
    summary, data = await transfer(client, feeder, "pdf")
    assert summary["pages"] == 2
    count, boxes, images = pdf_pages(data)
    assert count == 2 and len(boxes) == 2
    assert boxes[0] == pytest.approx((40 * 72 / 75, 30 * 72 / 75), abs=1e-3)
    assert images == [pattern(40, 30, "color", fed), pattern(40, 30, "color", fed + 1)]


# -- the feeder -----------------------------------------------------------------------------------------

async def test_feeder_tiff_holds_every_loaded_page(client):
    _, root = await open_items(client)
    feeder = root + "/Feeder"
    await call(client, SIM0, SIMULATOR, "LoadPages", "u", [3])
    assert await sim(client, "PagesLoaded") == 3
    await small(client, feeder, width=48, height=32, pages=0)
    fed = await sim(client, "PagesFed")
    summary, data = await transfer(client, feeder, "tiff")
    assert summary["pages"] == 3 and summary["bytes"] == len(data)
    image = Image.open(io.BytesIO(data))
    assert image.n_frames == 3
    for i in range(3):
        image.seek(i)
        assert image.size == (48, 32)
        assert image.tobytes() == pattern(48, 32, "color", fed + i), f"page {i}"
    assert await sim(client, "PagesLoaded") == 0
    assert await sim(client, "PagesFed") == fed + 3


async def test_feeder_pages_property_limits_the_sheets_taken(client):
    _, root = await open_items(client)
    feeder = root + "/Feeder"
    await call(client, SIM0, SIMULATOR, "LoadPages", "u", [3])
    await small(client, feeder, width=16, height=16, pages=2)
    summary, data = await transfer(client, feeder, "raw")
    assert summary["pages"] == 2
    assert [page for _, page, _ in parse_raw(data)] == [0, 1]
    assert await sim(client, "PagesLoaded") == 1


async def test_feeder_png_gives_one_page_per_transfer(client):
    # Single-image formats (png, jpeg) take one sheet per Transfer call; the rest of
    # the loaded sheets stay in the feeder for the next call.
    _, root = await open_items(client)
    feeder = root + "/Feeder"
    await call(client, SIM0, SIMULATOR, "LoadPages", "u", [2])
    await small(client, feeder, width=32, height=24, pages=0)
    fed = await sim(client, "PagesFed")
    for i in range(2):
        summary, data = await transfer(client, feeder, "png")
        assert summary["pages"] == 1
        assert Image.open(io.BytesIO(data)).tobytes() == pattern(32, 24, "color", fed + i)
        assert await sim(client, "PagesLoaded") == 1 - i
    e = await expect_error("Empty", transfer(client, feeder, "png"))
    assert "empty" in e.text


async def test_empty_feeder_fails(client):
    _, root = await open_items(client)
    assert await sim(client, "PagesLoaded") == 0
    e = await expect_error("Empty", transfer(client, root + "/Feeder", "raw"))
    assert "feeder is empty" in e.text


async def test_jam_mid_page_fails_the_transfer_until_reset(client):
    session, root = await open_items(client)
    feeder = root + "/Feeder"
    await call(client, SIM0, SIMULATOR, "LoadPages", "u", [2])
    await write(client, feeder, resolution=75)  # 637 x 876 colour rows: several bands a page
    await call(client, SIM0, SIMULATOR, "Jam", "u", [300])
    r, w = os.pipe()
    reader = asyncio.get_running_loop().run_in_executor(None, read_all, r)
    try:
        e = await expect_error("Failed", call(client, feeder, ITEM, "Transfer", "hsa{sv}", [0, "raw", {}],
                                              unix_fds=[w]))
    finally:
        os.close(w)
    data = await reader
    assert "jam" in e.text
    assert 36 < len(data) < 36 + 637 * 876 * 3  # stopped in the middle of the page
    assert await sim(client, "Jammed") is True
    assert await sim(client, "PagesLoaded") == 1  # the jammed sheet left the tray
    e = await expect_error("Failed", transfer(client, feeder, "raw"))
    assert "jam" in e.text
    assert await sim(client, "PagesLoaded") == 1
    await call(client, session, SESSION, "DeviceReset")
    assert await sim(client, "Jammed") is False
    await write(client, feeder, width=16, height=16)
    summary, _ = await transfer(client, feeder, "raw")
    assert summary["pages"] == 1
    assert await sim(client, "PagesLoaded") == 0


# -- who may transfer ------------------------------------------------------------------------------------

async def test_status_session_may_not_transfer(client):
    _, root = await open_items(client, mode="status")
    await call(client, SIM0, SIMULATOR, "LoadPages", "u", [1])
    fed = await sim(client, "PagesFed")
    for item in ("Flatbed", "Feeder"):
        e = await expect_error("AccessDenied", transfer(client, f"{root}/{item}", "raw"))
        assert "data mode" in e.text
    assert await sim(client, "PagesFed") == fed  # nothing was scanned
    assert await sim(client, "PagesLoaded") == 1


async def test_transfer_without_data_mode_closes_the_descriptor(client):
    _, root = await open_items(client, mode="status")
    r, w = os.pipe()
    reader = asyncio.get_running_loop().run_in_executor(None, read_all, r)
    try:
        await expect_error("AccessDenied", call(client, root + "/Flatbed", ITEM, "Transfer", "hsa{sv}",
                                                [0, "png", {}], unix_fds=[w]))
    finally:
        os.close(w)
    assert await asyncio.wait_for(reader, 5) == b""  # the service kept no copy of the write end


async def test_the_root_item_has_no_image(client):
    _, root = await open_items(client)
    await expect_error("NotSupported", transfer(client, root, "raw"))


# -- descriptors, formats and options ------------------------------------------------------------------------

async def test_transfer_into_a_regular_file(client, tmp_path):
    _, root = await open_items(client)
    flatbed = root + "/Flatbed"
    await small(client, flatbed, width=64, height=48)
    fed = await sim(client, "PagesFed")
    target = tmp_path / "scan.raw"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        (summary,) = await call(client, flatbed, ITEM, "Transfer", "hsa{sv}", [0, "raw", {}], unix_fds=[fd])
    finally:
        os.close(fd)
    data = target.read_bytes()
    assert unwrap(summary)["bytes"] == len(data)
    assert parse_raw(data)[0][2] == pattern(64, 48, "color", fed)


async def test_read_only_descriptor_is_refused(client, tmp_path):
    _, root = await open_items(client)
    target = tmp_path / "existing"
    target.write_bytes(b"keep")
    fd = os.open(target, os.O_RDONLY)
    try:
        e = await expect_error("InvalidArgument", call(client, root + "/Flatbed", ITEM, "Transfer", "hsa{sv}",
                                                       [0, "raw", {}], unix_fds=[fd]))
    finally:
        os.close(fd)
    assert "writing" in e.text
    assert target.read_bytes() == b"keep"


async def test_unknown_format_and_option_are_refused(client):
    _, root = await open_items(client)
    flatbed = root + "/Flatbed"
    e = await expect_error("InvalidArgument", transfer(client, flatbed, "bmp"))
    assert "bmp" in e.text and "png" in e.text and "tiff" in e.text
    e = await expect_error("InvalidArgument", transfer(client, flatbed, "raw", {"quality": Variant("u", 5)}))
    assert "quality" in e.text


async def test_empty_format_uses_the_items_format_property(client):
    _, root = await open_items(client)
    flatbed = root + "/Flatbed"
    await small(client, flatbed, width=8, height=8, format="raw")
    summary, data = await transfer(client, flatbed, "")
    assert summary["format"] == "raw"
    assert parse_raw(data)[0][0].width == 8


# -- cancelling, readers that go away or never read ------------------------------------------------------------

async def test_cancel_stops_a_big_transfer_and_the_device_stays_usable(client, client2, daemon):
    _, root = await open_items(client)
    flatbed = root + "/Flatbed"
    await write(client, flatbed, **BIG)
    async with Parked(client, flatbed) as parked:
        await expect_error("InvalidArgument", transfer(client, flatbed, "raw"))  # one at a time per item
        await expect_error("AccessDenied", call(client2, flatbed, ITEM, "Cancel"))
        await call(client, flatbed, ITEM, "Cancel")
        e = await expect_error("Cancelled", parked.result())
        assert "cancelled by the client" in e.text
    await call(client, ROOT, "org.freedesktop.DBus.Peer", "Ping", timeout=2)
    assert await call(client2, ROOT, MANAGER, "GetDevices", timeout=2) == [[SIM0]]
    await expect_error("InvalidArgument", call(client, flatbed, ITEM, "Cancel"))  # nothing is running
    await small(client, flatbed, width=16, height=16)
    fed = await sim(client, "PagesFed")
    _, data = await transfer(client, flatbed, "raw")
    assert parse_raw(data)[0][2] == pattern(16, 16, "color", fed)
    assert daemon.proc.poll() is None


async def test_reader_closing_early_ends_the_transfer(client, daemon):
    _, root = await open_items(client)
    flatbed = root + "/Flatbed"
    await write(client, flatbed, **BIG)
    async with Parked(client, flatbed) as parked:
        assert len(os.read(parked.r, 4096)) > 0
        parked.close_read()
        e = await expect_error("Cancelled", parked.result())
    assert "reader" in e.text
    assert daemon.proc.poll() is None
    await call(client, ROOT, "org.freedesktop.DBus.Peer", "Ping", timeout=2)
    await small(client, flatbed, width=16, height=16)
    summary, _ = await transfer(client, flatbed, "raw")
    assert summary["pages"] == 1


@pytest.mark.daemon_args("--config", "tests/data/transfer-second-sim.toml")
async def test_a_reader_that_never_reads_does_not_hold_up_the_service(client, client2):
    _, root = await open_items(client)
    flatbed = root + "/Flatbed"
    await write(client, flatbed, **BIG)
    other, other_root = await open_items(client2, mode="both", device="sim1")
    watcher = await create_session(client2, mode="status")
    async with Parked(client, flatbed) as parked:
        for _ in range(3):
            assert await call(client2, ROOT, MANAGER, "GetDevices", timeout=1) == [[SIM0, SIM1]]
            status = unwrap((await call(client2, other, SESSION, "GetStatus", timeout=1))[0])
            assert status["online"] is True
        await small(client2, other_root + "/Flatbed", width=16, height=16)
        summary, _ = await transfer(client2, other_root + "/Flatbed", "raw")  # another device scans meanwhile
        assert summary["pages"] == 1
        watcher_root = await get_property(client2, watcher, SESSION, "RootItem")
        assert (await read(client2, watcher_root + "/Flatbed"))["resolution"] == 150
        assert not parked.reply.done()  # still parked
        await call(client, flatbed, ITEM, "Cancel")
        await expect_error("Cancelled", parked.result())


async def test_progress_signals_go_to_the_owner_with_increasing_percent(client, client2):
    _, root = await open_items(client)
    flatbed = root + "/Flatbed"
    await write(client, flatbed, resolution=75)  # 637 x 876 colour: several bands
    async with Signals(client, member="Progress", interface=ITEM) as progress, \
            Signals(client2, member="Progress", interface=ITEM) as elsewhere:
        summary, data = await transfer(client, flatbed, "raw")
        received = await progress.wait(until=lambda got: any(m.body[1] == 100 for m in got))
    assert len(received) >= 2
    assert all(m.path == flatbed and m.destination == client.unique_name for m in received)
    assert all(m.body[0] == 1 for m in received)
    percents = [m.body[1] for m in received]
    assert percents == sorted(percents) and percents[0] < 100 and percents[-1] == 100
    written = [m.body[2] for m in received]
    assert written == sorted(written) and written[-1] <= summary["bytes"] == len(data)
    assert elsewhere.received == []


async def test_progress_counts_pages_from_the_feeder(client):
    _, root = await open_items(client)
    feeder = root + "/Feeder"
    await call(client, SIM0, SIMULATOR, "LoadPages", "u", [2])
    await small(client, feeder, width=16, height=16)
    async with Signals(client, member="Progress", interface=ITEM, path=feeder) as progress:
        await transfer(client, feeder, "tiff")
        received = await progress.wait(until=lambda got: (2, 100) in [tuple(m.body[:2]) for m in got])
    assert (1, 100) in [tuple(m.body[:2]) for m in received]


async def test_closing_the_session_during_a_transfer_ends_it(client):
    session, root = await open_items(client)
    flatbed = root + "/Flatbed"
    await write(client, flatbed, **BIG)
    async with Parked(client, flatbed) as parked:
        await call(client, session, SESSION, "Close")
        e = await expect_error("Cancelled", parked.result())
        assert "session was closed" in e.text
        await drain(parked.r)  # the service let go of the pipe: the reader reaches its end
    await expect_error("NotFound", read(client, flatbed))
    _, root2 = await open_items(client)  # data mode and the device lock were given back
    await small(client, root2 + "/Flatbed", width=8, height=8)
    assert (await transfer(client, root2 + "/Flatbed", "raw"))[0]["pages"] == 1


# -- unplug --------------------------------------------------------------------------------------------------

async def unplugged(bus, root: str) -> None:
    async def gone() -> bool:
        return await get_property(bus, root + "/Flatbed", ITEM, "Connected") is False

    await wait_until(gone, timeout=5, what="the items are disconnected")


async def test_unplug_during_a_transfer_fails_it_with_disconnected(client, client2):
    _, root = await open_items(client)
    flatbed = root + "/Flatbed"
    await write(client, flatbed, **BIG)
    async with Parked(client, flatbed) as parked:
        await call(client2, SIM0, SIMULATOR, "Unplug", timeout=1.5)
        await expect_error("Disconnected", parked.result())
    await unplugged(client, root)


async def test_after_unplug_items_answer_reads_but_nothing_reaches_the_device(client):
    session, root = await open_items(client)
    flatbed = root + "/Flatbed"
    await write(client, flatbed, resolution=300)
    await call(client, SIM0, SIMULATOR, "Unplug")
    await unplugged(client, root)
    values = await read(client, flatbed)
    assert values["resolution"] == 300 and values["width"] == 2550
    assert (await attributes(client, flatbed))["resolution"]["valid"]["values"][0] == 75
    for item in (root, flatbed, root + "/Feeder"):
        assert await get_property(client, item, ITEM, "Connected") is False
    await expect_error("Disconnected", transfer(client, flatbed, "raw"))
    await expect_error("Disconnected", call(client, session, SESSION, "GetStatus"))
    await expect_error("Disconnected", call(client, root, ITEM, "Synchronize"))
    items = await driver_items(client)
    assert sorted(path for path, _ in items) == ["Root", "Root/Feeder", "Root/Flatbed"]
    for entry in items.values():
        assert (entry["refcount"], entry["removed"], entry["present"]) == (1, True, False)
    await call(client, session, SESSION, "Close")
    await expect_error("NotFound", call(client, ROOT, MANAGER, "GetDriverItems", "s", ["sim0"]))


async def test_replug_gives_a_new_tree_while_old_items_live_on(client):
    session, root = await open_items(client, mode="status")
    await call(client, SIM0, SIMULATOR, "Unplug")
    await unplugged(client, root)
    await call(client, SIM0, SIMULATOR, "Replug")
    await wait_until(lambda: _has_present(client), timeout=5, what="the device is back")
    items = await driver_items(client)
    assert items[("Root/Flatbed", 1)]["present"] is False and items[("Root/Flatbed", 1)]["refcount"] == 1
    assert items[("Root/Flatbed", 2)]["present"] is True and not items[("Root/Flatbed", 2)]["removed"]
    assert await get_property(client, root + "/Flatbed", ITEM, "Connected") is False
    await call(client, session, SESSION, "Close")
    assert {gen for _, gen in await driver_items(client)} == {2}  # only the present tree is left
    _, root2 = await open_items(client)
    await small(client, root2 + "/Flatbed", width=8, height=8)
    assert (await transfer(client, root2 + "/Flatbed", "raw"))[0]["pages"] == 1


async def _has_present(bus) -> bool:
    try:
        return any(e["present"] for e in (await driver_items(bus)).values())
    except DBusError:
        return False


SYNC_EXPORT_BUG = (
    "dbus.service.Service.items_changed walks every session of the device, including the event "
    "monitor's internal session (client 'event-monitor', never exported on the bus): it exports that "
    "session's items under /org/stillsvc/StillImage1/sessions/<n>/items, then sends a unicast "
    "PropertiesChanged to the bus name 'event-monitor', which raises InvalidBusNameError; the exception "
    "ends the loop, so client sessions after it in set order get no objects for the items synchronize "
    "added (Children names objects that do not exist) and no Children signal")


async def session_nodes(bus) -> set[str]:
    """The session numbers that have objects on the bus, from introspection."""
    (xml,) = await call(bus, f"{ROOT}/sessions", "org.freedesktop.DBus.Introspectable", "Introspect")
    return set(re.findall(r'<node name="(\d+)"', xml))


def number(session: str) -> str:
    return session.rsplit("/", 1)[1]


# -- synchronize ------------------------------------------------------------------------------------------------

async def test_synchronize_after_the_feeder_was_detached(client):
    _, root = await open_items(client)
    before = await driver_items(client)
    await call(client, SIM0, SIMULATOR, "AttachFeeder", "b", [False])
    assert await get_property(client, root + "/Feeder", ITEM, "Connected") is True  # not yet synchronized
    await call(client, root, ITEM, "Synchronize")
    assert await get_property(client, root + "/Feeder", ITEM, "Connected") is False
    assert await get_property(client, root + "/Flatbed", ITEM, "Connected") is True
    after = await driver_items(client)
    feeder = after[("Root/Feeder", 1)]
    assert feeder["removed"] is True and feeder["present"] is True
    assert feeder["refcount"] == before[("Root/Feeder", 1)]["refcount"] - 1
    assert after[("Root/Flatbed", 1)] == before[("Root/Flatbed", 1)]
    assert (await read(client, root + "/Feeder"))["source"] == "feeder"  # still readable
    await expect_error("Disconnected", transfer(client, root + "/Feeder", "raw"))
    await small(client, root + "/Flatbed", width=8, height=8)
    assert (await transfer(client, root + "/Flatbed", "raw"))[0]["pages"] == 1
    _, fresh = await open_items(client, mode="status")
    assert await get_property(client, fresh, ITEM, "Children") == [fresh + "/Flatbed"]


async def test_synchronize_after_a_feeder_was_attached_adds_an_item(client):
    await call(client, SIM0, SIMULATOR, "AttachFeeder", "b", [False])
    setup, setup_root = await open_items(client, mode="status")
    await call(client, setup_root, ITEM, "Synchronize")
    await call(client, setup, SESSION, "Close")
    session, root = await open_items(client)
    assert await get_property(client, root, ITEM, "Children") == [root + "/Flatbed"]
    await call(client, SIM0, SIMULATOR, "AttachFeeder", "b", [True])
    async with Signals(client, member="PropertiesChanged", path=root) as changed:
        await call(client, root, ITEM, "Synchronize")
        assert await session_nodes(client) == {number(session)}  # only the client's own session
        (msg,) = await changed.wait(1, timeout=2)
    assert unwrap(msg.body[1])["Children"] == [root + "/Flatbed", root + "/Feeder"]
    assert await get_property(client, root, ITEM, "Children") == [root + "/Flatbed", root + "/Feeder"]
    assert await get_property(client, root + "/Feeder", ITEM, "Connected") is True
    items = await driver_items(client)
    assert items[("Root/Feeder", 1)]["removed"] is False
    await call(client, SIM0, SIMULATOR, "LoadPages", "u", [1])
    await small(client, root + "/Feeder", width=8, height=8)
    assert (await transfer(client, root + "/Feeder", "raw"))[0]["pages"] == 1


async def test_a_session_sees_a_reattached_feeder_after_synchronize(client):
    session, root = await open_items(client)
    await call(client, SIM0, SIMULATOR, "AttachFeeder", "b", [False])
    await call(client, root, ITEM, "Synchronize")
    assert await get_property(client, root + "/Feeder", ITEM, "Connected") is False
    await call(client, SIM0, SIMULATOR, "AttachFeeder", "b", [True])
    async with Signals(client, member="PropertiesChanged", path=root) as changed:
        await call(client, root, ITEM, "Synchronize")
        assert await session_nodes(client) == {number(session)}  # only the client's own session
        await changed.wait(1, timeout=2)
    assert await get_property(client, root, ITEM, "Children") == [root + "/Flatbed", root + "/Feeder"]
    assert await get_property(client, root + "/Feeder", ITEM, "Connected") is True
    old_before = await feeder_entries(client)
    assert [removed for removed, _ in old_before] == [False, True]  # the new one, and the old one still linked
    await call(client, SIM0, SIMULATOR, "LoadPages", "u", [1])
    await small(client, root + "/Feeder", width=8, height=8)
    assert (await transfer(client, root + "/Feeder", "raw"))[0]["pages"] == 1
    await call(client, session, SESSION, "Close")
    # Closing the session released both its Feeder items (other sessions may still link the old one).
    new_after, *old_after = await feeder_entries(client)
    assert new_after == (False, old_before[0][1] - 1)
    assert old_after == ([] if old_before[1][1] == 1 else [(True, old_before[1][1] - 1)])


async def feeder_entries(bus) -> list[tuple[bool, int]]:
    """(removed, refcount) of every live Root/Feeder driver item of sim0, the present one first."""
    (entries,) = await call(bus, ROOT, MANAGER, "GetDriverItems", "s", ["sim0"])
    return sorted((e["removed"].value, e["refcount"].value) for e in entries if e["path"].value == "Root/Feeder")


@pytest.mark.daemon_args("--config", "tests/data/transfer-no-feeder.toml")
async def test_synchronize_exports_new_items_for_every_client_session_only(client, client2):
    roots = []
    for bus in (client, client, client, client2, client2):
        session, root = await open_items(bus, mode="status")
        roots.append((bus, session, root))
    assert await get_property(client, roots[0][2], ITEM, "Children") == [roots[0][2] + "/Flatbed"]
    owned = {number(session) for _, session, _ in roots}
    assert await session_nodes(client) == owned
    await call(client, SIM0, SIMULATOR, "AttachFeeder", "b", [True])
    await call(client, roots[0][2], ITEM, "Synchronize")
    for bus, _, root in roots:
        assert await get_property(bus, root, ITEM, "Children") == [root + "/Flatbed", root + "/Feeder"]
    assert await session_nodes(client) == owned  # nothing exported for sessions no client owns
    for bus, _, root in roots:
        assert await get_property(bus, root + "/Feeder", ITEM, "Connected") is True
