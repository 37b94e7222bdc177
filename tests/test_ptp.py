"""Cameras end to end: the real daemon drives the real ``ptp`` driver through pyusb over a
simulated camera (the ``ptpsim`` test driver of tests/plugins, a configured device),
whose storage mirrors a folder of the test's own (``tmp_path/card``).

The folder steers the camera while the daemon runs: a file renamed into it is a
picture taken (ObjectAdded), control files make it slow (``.slow-BPS``), add a huge
picture (``.big-SIZE-NAME``) or unplug it (``.unplug``); each control file is deleted
once the camera has acted on it, which is what the tests wait for. Nothing waits by
sleeping: signals, or a state polled with a deadline (helpers.wait_until).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Variant
from helpers import (
    DEVICE,
    ITEM,
    MANAGER,
    REPO,
    ROOT,
    SESSION,
    SIM0,
    Daemon,
    Signals,
    assert_daemon_healthy,
    call,
    connect,
    create_session,
    expect_error,
    get_all,
    get_property,
    readable,
    unwrap,
    wait_until,
)
from ptp_camera import default_thumbnail, make_jpeg, pattern
from test_ctl import stillctl
from test_transfer import open_items, read_all, small, transfer

from stillsvc.common.names import device_path
from stillsvc.imaging import parse_raw

PLUGINS = str(REPO / "tests" / "plugins")
CAMERA = device_path("camera")
STORE = "Root/store-00010001"
PICTURE = f"{STORE}/DCIM/100SIMUL/IMG_0001.JPG"
BIG = f"{STORE}/DCIM/100SIMUL/BIG_0002.JPG"
BIG_BYTES = os.urandom(3 * 1024 * 1024 + 321)  # several 1 MiB reads, and a short last packet
PICTURE_BYTES = make_jpeg(64, 48, size=20_000)
WAIT = 10.0


# -- the daemon with a camera ----------------------------------------------------------------

def config(folder: Path) -> str:
    return ('[[device]]\nid = "camera"\ndriver = "ptpsim"\nport = "usb:001:002"\n'
            f'options = {{ folder = "{folder}" }}\n')


def fill(card: Path) -> None:
    """DCIM/100SIMUL with a small and a big JPEG, and a text file at the top."""
    pictures = card / "DCIM" / "100SIMUL"
    pictures.mkdir(parents=True)
    (pictures / "IMG_0001.JPG").write_bytes(PICTURE_BYTES)
    (pictures / "BIG_0002.JPG").write_bytes(BIG_BYTES)
    (card / "README.txt").write_text("a camera's own file\n")


async def launch(request, bus_address: str, tmp_path: Path, *controls: str) -> tuple[Daemon, Path]:
    """The daemon with ``sim0`` and the camera over ``tmp_path/card`` (filled, and
    ``controls`` files in it as it starts), once the camera is there and its pictures
    are in the service's tree."""
    card = tmp_path / "card"
    card.mkdir()
    fill(card)
    for name in controls:
        (card / name).touch()
    cfg = tmp_path / "stillsvc.toml"
    cfg.write_text(config(card))
    path = os.pathsep.join(p for p in (PLUGINS, os.environ.get("PYTHONPATH", "")) if p)
    daemon = Daemon(bus_address, "--config", str(cfg), workdir=str(tmp_path / "daemon"), env={"PYTHONPATH": path})
    request.node._stillsvc_daemon = daemon  # its log is shown when the test fails
    await daemon.ready()
    bus = await connect(bus_address)
    try:
        await wait_until(lambda: camera_present(bus), what="the camera appearing")
        await wait_until(lambda: listed(bus), what="the camera's pictures listed")
    finally:
        bus.disconnect()
    return daemon, card


@pytest.fixture
async def camera(request, bus_address, tmp_path):
    """(daemon, card folder): see launch()."""
    daemon, card = await launch(request, bus_address, tmp_path)
    yield daemon, card
    daemon.stop()


@pytest.fixture
async def bus(camera):
    client = await connect(camera[0].address)
    yield client
    client.disconnect()


async def camera_present(bus) -> bool:
    (paths,) = await call(bus, ROOT, MANAGER, "GetDevices")
    return CAMERA in paths


async def driver_paths(bus) -> set[str]:
    (entries,) = await call(bus, ROOT, MANAGER, "GetDriverItems", "s", ["camera"])
    return {e["path"].value for e in entries if e["present"].value and not e["removed"].value}


async def listed(bus) -> bool:
    return {PICTURE, BIG, f"{STORE}/README.txt"} <= await driver_paths(bus)


async def items(bus, session: str) -> dict[str, dict[str, Any]]:
    """A session's application items by item path: object path, kind, connected."""
    found: dict[str, dict[str, Any]] = {}
    pending = [await get_property(bus, session, SESSION, "RootItem")]
    while pending:
        obj = pending.pop()
        props = await get_all(bus, obj, ITEM)
        found[props["ItemPath"]] = {"object": obj, "kind": props["Kind"], "connected": props["Connected"]}
        pending += props["Children"]
    return found


async def props(bus, obj: str) -> dict[str, Any]:
    (values,) = await call(bus, obj, ITEM, "ReadProperties")
    return unwrap(values)


def drop(folder: Path, name: str, data: bytes) -> None:
    """A picture appears on the camera: written under a temporary name, then renamed."""
    temporary = folder / f".tmp{name}"
    temporary.write_bytes(data)
    temporary.rename(folder / name)


async def control(card: Path, name: str) -> None:
    """Create a control file and wait for the camera to have acted on it (it is deleted then)."""
    path = card / name
    path.touch()
    await wait_until(lambda: not path.exists(), what=f"the camera acting on {name}")


async def add_big(bus, card: Path, size: int, name: str) -> None:
    """A picture of ``size`` pattern bytes (pattern seed 1) appears at the card's top."""
    await control(card, f".big-{size}-{name}")

    async def there() -> bool:
        return f"{STORE}/{name}" in await driver_paths(bus)

    await wait_until(there, what=f"{name} in the camera's tree")


class Transferring:
    """A transfer into a pipe read as it comes (in a thread), for tests that interrupt it."""

    def __init__(self, bus, item: str, fmt: str = "native") -> None:
        self.bus, self.item, self.fmt = bus, item, fmt
        self.r, self.w = os.pipe()
        self.reply: asyncio.Future | None = None
        self.reader: asyncio.Future | None = None

    async def start(self) -> Transferring:
        self.reply = asyncio.ensure_future(call(self.bus, self.item, ITEM, "Transfer", "hsa{sv}",
                                                [0, self.fmt, {}], unix_fds=[self.w], timeout=60.0))
        await readable(self.r, WAIT)  # data is flowing
        self.reader = asyncio.get_running_loop().run_in_executor(None, read_all, self.r)
        return self

    async def result(self) -> Any:
        """The reply (or its error); the pipe is read to its end meanwhile."""
        assert self.reply is not None and self.reader is not None
        try:
            return await asyncio.wait_for(self.reply, 30.0)
        finally:
            os.close(self.w)
            await self.reader


# -- the device and its items ------------------------------------------------------------------

async def test_the_camera_appears_with_its_item_tree(camera, bus):
    device = await get_all(bus, CAMERA, DEVICE)
    assert device["Kind"] == "camera" and device["Driver"] == "ptpsim"
    assert device["State"] == "ready"
    assert {"new-picture", "new-file", "picture-removed", "storage-added", "storage-removed"} <= set(
        device["EventNames"])
    assert {"storage", "events", "delete", "thumbnails"} <= set(device["Capabilities"])
    session = await create_session(bus, "camera", mode="status")
    tree = await items(bus, session)
    assert {path: entry["kind"] for path, entry in tree.items()} == {
        "Root": "device", STORE: "storage", f"{STORE}/DCIM": "folder", f"{STORE}/DCIM/100SIMUL": "folder",
        PICTURE: "picture", BIG: "picture", f"{STORE}/README.txt": "file"}
    assert all(entry["connected"] for entry in tree.values())
    root = await props(bus, tree["Root"]["object"])
    assert root["listing"] is False and root["objects"] == 5
    assert (root["vendor"], root["model"]) == ("stillsvc", "Simulated Camera")
    picture = await props(bus, tree[PICTURE]["object"])
    assert (picture["name"], picture["size"], picture["format"]) == ("IMG_0001.JPG", len(PICTURE_BYTES),
                                                                      "image/jpeg")
    assert (picture["width"], picture["height"]) == (64, 48)
    assert picture["thumb_size"] == len(default_thumbnail())
    storage = await props(bus, tree[STORE]["object"])
    assert storage["storage_id"] == 0x00010001 and storage["access"] == "read-write"


async def test_root_says_when_a_long_listing_is_done(request, bus_address, tmp_path):
    daemon, _ = await launch(request, bus_address, tmp_path, ".many-3000")
    try:
        bus = await connect(bus_address)
        try:
            async def all_there() -> bool:
                return len(await driver_paths(bus)) == 3000 + 8  # Root, the card's 6 items, MANY

            await wait_until(all_there, what="3,000 more pictures in the tree")
            session = await create_session(bus, "camera", mode="status")
            root = await props(bus, await get_property(bus, session, SESSION, "RootItem"))
            assert (root["listing"], root["objects"]) == (False, 3006)
        finally:
            bus.disconnect()
    finally:
        daemon.stop()


async def test_transfers_native_and_thumbnail(camera, bus):
    session = await create_session(bus, "camera", mode="data")
    tree = await items(bus, session)
    big = tree[BIG]["object"]
    async with Signals(bus, member="Progress", interface=ITEM, path=big) as progress:
        summary, data = await transfer(bus, big, "native")
        await progress.wait(until=lambda got: got and got[-1].body[1] == 100)
    assert data == BIG_BYTES
    assert (summary["name"], summary["content_type"], summary["bytes"]) == ("BIG_0002.JPG", "image/jpeg",
                                                                            len(BIG_BYTES))
    reports = [m.body for m in progress.received]
    assert reports[-1] == [1, 100, len(BIG_BYTES)]
    assert [r[1] for r in reports] == sorted(r[1] for r in reports)  # percent never goes back
    assert all(page == 1 for page, _, _ in reports)

    summary, data = await transfer(bus, tree[PICTURE]["object"], "native")
    assert data == PICTURE_BYTES and summary["bytes"] == len(PICTURE_BYTES)
    summary, data = await transfer(bus, tree[PICTURE]["object"], "thumbnail")
    assert data == default_thumbnail()
    assert (summary["content_type"], summary["bytes"]) == ("image/jpeg", len(data))

    r, w = os.pipe()
    try:
        e = await expect_error("InvalidArgument", call(bus, tree[PICTURE]["object"], ITEM, "Transfer", "hsa{sv}",
                                                       [0, "png", {}], unix_fds=[w]))
        assert "native" in e.text
    finally:
        os.close(r)
        os.close(w)

    status = await create_session(bus, "camera", mode="status")
    status_tree = await items(bus, status)
    r, w = os.pipe()
    try:
        await expect_error("AccessDenied", call(bus, status_tree[PICTURE]["object"], ITEM, "Transfer", "hsa{sv}",
                                                [0, "native", {}], unix_fds=[w]))
    finally:
        os.close(r)
        os.close(w)


async def test_an_empty_format_is_native_for_a_picture(camera, bus):
    session = await create_session(bus, "camera", mode="data")
    tree = await items(bus, session)
    summary, data = await transfer(bus, tree[PICTURE]["object"], "")
    assert data == PICTURE_BYTES and summary["bytes"] == len(PICTURE_BYTES)


async def test_delete_needs_data_mode_and_takes_the_item_away(camera, bus):
    status = await create_session(bus, "camera", mode="status")
    status_tree = await items(bus, status)
    await expect_error("AccessDenied", call(bus, status_tree[PICTURE]["object"], ITEM, "Delete"))
    assert PICTURE in await driver_paths(bus)

    session = await create_session(bus, "camera", mode="data")
    tree = await items(bus, session)
    picture = tree[PICTURE]["object"]
    await call(bus, picture, ITEM, "Delete")
    assert await get_property(bus, picture, ITEM, "Connected") is False
    assert (await props(bus, picture))["name"] == "IMG_0001.JPG"  # still readable
    assert await get_property(bus, status_tree[PICTURE]["object"], ITEM, "Connected") is False
    await call(bus, session, SESSION, "Close")
    fresh = await items(bus, await create_session(bus, "camera", mode="status"))
    assert PICTURE not in fresh and BIG in fresh
    assert PICTURE not in await driver_paths(bus)


# -- events: a picture taken goes to exactly one consumer -----------------------------------------

RECORD = 'printf "%%s\\n" "$3" > "$1/ran-$2.tmp" && mv "$1/ran-$2.tmp" "$1/ran-$2"'


class Routed(Signals):
    """EventRouted, as an administrator watching the routing sees it."""

    def __init__(self, bus) -> None:
        super().__init__(bus, member="EventRouted", interface=MANAGER)

    async def __aenter__(self) -> Routed:  # noqa: PYI034
        await super().__aenter__()
        await call(self.bus, ROOT, MANAGER, "WatchEvents")
        return self

    def of(self, sequence: int) -> list[list[Any]]:
        return [m.body for m in self.received if m.body[2] == sequence]


async def test_a_new_picture_goes_to_the_data_mode_subscriber_or_else_to_the_application(camera, bus):
    daemon, card = camera
    shared = Path(tempfile.mkdtemp(prefix="stillsvc-ptp-app-"))
    try:
        shared.chmod(0o777)  # as root, the service runs system-wide applications as nobody
        await call(bus, ROOT, MANAGER, "RegisterLaunchApplication", "sasasasa{sv}",
                   ["importer", ["/bin/sh", "-c", RECORD, "sh", str(shared), "%n", "%e"], ["new-picture"],
                    ["id:camera"], {"system": Variant("b", True)}])
        session = await create_session(bus, "camera", mode="data")
        number = session.rsplit("/", 1)[1]
        await call(bus, session, SESSION, "Subscribe")
        async with Signals(bus, member="EventQueued", path=session) as queued, Routed(bus) as routed:
            drop(card, "NEW_0003.JPG", make_jpeg(32, 32))
            (msg,) = await queued.wait(1)
            name, first = msg.body
            assert name == "new-picture"
            # When the event arrives, its item is in the tree, and in this session's items.
            (note,) = await call(bus, session, SESSION, "GetLastNotificationData")
            data = unwrap(note["data"])
            assert data["item"] == f"{STORE}/NEW_0003.JPG" and data["name"] == "NEW_0003.JPG"
            assert data["format"] == "image/jpeg"
            assert data["item"] in await driver_paths(bus)
            mine = await items(bus, session)
            assert mine[data["item"]]["connected"] and mine[data["item"]]["kind"] == "picture"
            await routed.wait(until=lambda got: routed.of(first))
            ((_, event, _, _, consumer, _),) = routed.of(first)
            assert event == "new-picture" and consumer == f"queue: session {number} ({bus.unique_name})"

            await call(bus, session, SESSION, "Close")
            drop(card, "NEW_0004.JPG", make_jpeg(16, 16))
            await routed.wait(until=lambda got: any(m.body[2] != first for m in got))
            ((_, event, second, _, consumer, routed_data),) = [m.body for m in routed.received if m.body[2] != first]
            assert event == "new-picture" and consumer.startswith("launch: system:importer as ")
            assert unwrap(routed_data)["item"] == f"{STORE}/NEW_0004.JPG"
            assert f"{STORE}/NEW_0004.JPG" in await driver_paths(bus)
        await wait_until((shared / f"ran-{second}").exists, what="the importer writing its file")
        await wait_until(lambda: "system-wide application ended" in daemon.log, what="the importer reaped")
        assert (shared / f"ran-{second}").read_text() == "new-picture\n"
        # The first event was queued and never launched too; each was routed once.
        assert sorted(p.name for p in shared.iterdir()) == [f"ran-{second}"]
        assert len(routed.of(first)) == 1 and len(routed.of(second)) == 1
        assert queued.received == [msg]
    finally:
        shutil.rmtree(shared)
    assert_daemon_healthy(daemon)


# -- interruptions ------------------------------------------------------------------------------

async def test_unplugged_mid_transfer_is_disconnected_and_sim0_keeps_working(camera, bus):
    daemon, card = camera
    session = await create_session(bus, "camera", mode="data")
    await add_big(bus, card, 40_000_000, "HUGE.JPG")
    await control(card, ".slow-2000000")
    tree = await items(bus, session)
    running = await Transferring(bus, tree[f"{STORE}/HUGE.JPG"]["object"]).start()
    (card / ".unplug").touch()
    e = await expect_error("Disconnected", running.result())
    assert "Traceback" not in e.text
    await wait_until(lambda: not (card / ".unplug").exists(), what="the camera unplugged")

    async def gone() -> bool:
        return not await camera_present(bus)

    await wait_until(gone, what="the camera disappearing")
    assert await get_property(bus, tree[f"{STORE}/HUGE.JPG"]["object"], ITEM, "Connected") is False
    # The simulated scanner next to it is unaffected.
    _, root = await open_items(bus, mode="data", device="sim0")
    flatbed = f"{root}/Flatbed"
    await small(bus, flatbed)
    summary, data = await transfer(bus, flatbed, "raw")
    ((info, _, rows),) = parse_raw(data)
    assert (info.width, info.height) == (64, 48) and len(rows) == 64 * 48 * 3
    assert summary["bytes"] == len(data)
    assert await get_property(bus, SIM0, DEVICE, "State") == "ready"
    assert_daemon_healthy(daemon)


async def test_a_cancelled_transfer_leaves_the_camera_ready_for_the_next(camera, bus):
    daemon, card = camera
    size = 8_000_000
    session = await create_session(bus, "camera", mode="data")
    await add_big(bus, card, size, "LARGE.JPG")
    await control(card, ".slow-2000000")
    tree = await items(bus, session)
    large = tree[f"{STORE}/LARGE.JPG"]["object"]
    running = await Transferring(bus, large).start()
    await call(bus, large, ITEM, "Cancel")
    e = await expect_error("Cancelled", running.result())
    assert "cancelled by the client" in e.text
    await control(card, ".slow-0")
    # Had the camera not been told to stop (PTP Cancel), the rest of the cancelled data
    # would still be in the pipe and these would fail or come back wrong.
    summary, data = await transfer(bus, large, "native")
    assert summary["bytes"] == size and data == pattern(0, size, seed=1)
    summary, data = await transfer(bus, tree[PICTURE]["object"], "native")
    assert data == PICTURE_BYTES
    assert_daemon_healthy(daemon)


# -- stillctl -------------------------------------------------------------------------------------

async def test_stillctl_items_get_and_delete(camera, tmp_path):
    daemon, _ = camera
    r = await stillctl(daemon.address, "items", "camera")
    assert r.code == 0, r.err
    assert "IMG_0001.JPG" in r.out and "picture" in r.out and "store-00010001" in r.out

    out = tmp_path / "copy.jpg"
    r = await stillctl(daemon.address, "get", f"camera/{PICTURE}", "-o", str(out))
    assert r.code == 0, r.err
    assert out.read_bytes() == PICTURE_BYTES
    assert f"image/jpeg, {len(PICTURE_BYTES)} bytes" in r.err
    thumb = tmp_path / "thumb.jpg"
    r = await stillctl(daemon.address, "get", "--thumbnail", f"camera/{PICTURE}", "-o", str(thumb))
    assert r.code == 0, r.err
    assert thumb.read_bytes() == default_thumbnail()

    r = await stillctl(daemon.address, "delete", f"camera/{PICTURE}")
    assert r.code == 0, r.err
    assert f"deleted {PICTURE}" in r.err
    r = await stillctl(daemon.address, "items", "camera")
    assert r.code == 0 and "IMG_0001.JPG" not in r.out and "BIG_0002.JPG" in r.out
    r = await stillctl(daemon.address, "get", f"camera/{PICTURE}", "-o", str(tmp_path / "again.jpg"))
    assert r.code != 0 and "no item" in r.err and "img_0001.jpg" in r.err.lower()
    assert_daemon_healthy(daemon)



async def test_capture_on_the_root_takes_a_picture_that_comes_as_new_picture(camera, bus):
    """Item.Capture on a camera's Root: InitiateCapture; the picture the camera takes
    comes as new-picture (its item in the tree), then capture-complete; a status
    session and another item are refused."""
    caps = await get_property(bus, "/org/stillsvc/StillImage1/devices/camera", DEVICE, "Capabilities")
    assert "capture" in caps
    status = await create_session(bus, "camera", mode="status")
    root = await get_property(bus, status, SESSION, "RootItem")
    await expect_error("AccessDenied", call(bus, root, ITEM, "Capture"))
    await call(bus, status, SESSION, "Close")
    session = await create_session(bus, "camera", mode="data")
    root = await get_property(bus, session, SESSION, "RootItem")
    await call(bus, session, SESSION, "Subscribe")
    before = await items(bus, session)
    async with Signals(bus, member="EventQueued", path=session) as queued:
        await call(bus, root, ITEM, "Capture")
        await queued.wait(2)
        names = [m.body[0] for m in queued.received]
        assert names[:2] == ["new-picture", "capture-complete"], names
    (note,) = await call(bus, session, SESSION, "GetLastNotificationData")
    mine = await items(bus, session)
    taken = sorted(set(mine) - set(before))
    assert taken and all(mine[path]["connected"] for path in taken), taken
    assert any(mine[path]["kind"] == "picture" for path in taken)
    storage = next(path for path in mine if mine[path]["kind"] == "storage")
    await expect_error("InvalidArgument", call(bus, mine[storage]["object"], ITEM, "Capture"))
    await call(bus, session, SESSION, "Close")
