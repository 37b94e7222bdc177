"""The ``ptp`` driver (stillsvc.drivers.ptp.PtpCamera) against the simulated camera of
tests/ptp_camera.py, with no daemon: the driver's USB goes through pyusb's real core
into the camera's pyusb backend (a ``usb_backend()`` override), and a recording
DriverHost stands in for the service.

What the camera saw on the wire is read back from its inspection lists (``received``,
``cancels``, ``protocol_errors``, ``events_delivered``). Nothing waits by sleeping:
the host's condition variable is notified by every call the driver makes to it, and
camera state is polled with a deadline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import ptp_camera as pc
import pytest
from ptp_camera import SimulatedBackend, SimulatedCamera, make_jpeg, pattern_source

from stillsvc.common.errors import (
    AccessDenied,
    Busy,
    Cancelled,
    Disconnected,
    Failed,
    InvalidArgument,
    NotFound,
    NotSupported,
    Timeout,
)
from stillsvc.driver import DeviceConfig, DeviceEvent, Mode
from stillsvc.driver.items import DriverItem
from stillsvc.driver.usb import Stalled
from stillsvc.drivers import ptp
from stillsvc.drivers.ptp import EVENTS, PtpCamera
from stillsvc.drivers.ptp.session import CHUNK

PORT = "usb:001:002"
STORE = "Root/store-00010001"
WAIT = 10.0


class RecordingHost:
    """A DriverHost that records every call with its time; waiters are woken by each."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, float]] = []
        self.cv = threading.Condition()

    def _record(self, kind: str, payload: Any = None) -> None:
        with self.cv:
            self.calls.append((kind, payload, time.monotonic()))
            self.cv.notify_all()

    def emit_event(self, event: DeviceEvent) -> None:
        self._record("emit_event", event)

    def tree_changed(self, event: DeviceEvent | None = None) -> None:
        self._record("tree_changed", event)

    def device_unplugged(self) -> None:
        self._record("device_unplugged")

    def device_replugged(self) -> None:
        self._record("device_replugged")

    def device_failed(self, reason: str) -> None:
        self._record("device_failed", reason)

    def of(self, kind: str) -> list[tuple[Any, float]]:
        with self.cv:
            return [(payload, at) for k, payload, at in self.calls if k == kind]

    def events(self, name: str) -> list[tuple[DeviceEvent, float]]:
        """tree_changed and emit_event calls that carry an event called ``name``."""
        with self.cv:
            return [(p, at) for k, p, at in self.calls
                    if k in ("tree_changed", "emit_event") and p is not None and p.name == name]

    def wait(self, predicate: Callable[[], Any], timeout: float = WAIT, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        with self.cv:
            while not (result := predicate()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{what} did not happen within {timeout} s")
                self.cv.wait(min(remaining, 0.05))  # also re-checks state the host is not told of
            return result


class SimulatedPtp(PtpCamera):
    """The real driver; its pyusb backend is the simulated camera's."""

    name = "ptp"

    def __init__(self, config: DeviceConfig, host: Any, camera: SimulatedCamera) -> None:
        super().__init__(config, host)
        self.camera = camera
        self.backend = SimulatedBackend(camera)

    def usb_backend(self) -> Any:
        return self.backend


class Rig:
    """A camera, its driver and the recording host."""

    def __init__(self, camera: SimulatedCamera) -> None:
        self.camera = camera
        self.host = RecordingHost()
        self.driver = SimulatedPtp(DeviceConfig(id="camera", driver="ptp", port=PORT), self.host, camera)
        self.info = None

    def start(self, wait_listing: bool = True) -> Rig:
        self.info = self.driver.initialize(PORT, Mode.STATUS)
        if wait_listing:
            self.listed()
        return self

    def listed(self, timeout: float = WAIT) -> None:
        """Wait for the background listing to be over: its thread has ended (after
        telling the host the tree is complete)."""
        def over() -> bool:
            return not self.driver.listing and not any(
                t.is_alive() for t in self.driver._threads if t.name.startswith("ptp-listing"))

        self.host.wait(over, timeout, "the background listing ending")

    def stop(self) -> None:
        """shutdown(), without waiting out the event thread's 500 ms interrupt read: the
        thread is told to stop, then woken by an event it ignores (UnreportedStatus)."""
        self.driver._stop.set()
        self.camera.queue_event(0x400E)
        for thread in list(self.driver._threads):  # before CloseSession, which drops queued events
            thread.join(timeout=2.0)
        self.driver.shutdown()

    def tree(self) -> DriverItem:
        return self.driver.build_item_tree()

    def item(self, path: str) -> DriverItem:
        found = items_by_path(self.tree()).get(path)
        assert found is not None, f"no item {path}; the tree has {sorted(items_by_path(self.tree()))}"
        return found

    def get(self, path: str, variant: str = "native", cancel: threading.Event | None = None,
            write: Callable[[memoryview], None] | None = None) -> tuple[bytes, Any, list[int]]:
        """open_file + write_to: (the bytes, the FileInfo, the size of each piece)."""
        out = bytearray()
        pieces: list[int] = []

        def collect(piece: memoryview) -> None:
            out.extend(piece)
            pieces.append(len(piece))
            if write is not None:
                write(piece)

        file = self.driver.open_file(self.item(path), variant, Mode.DATA, cancel or threading.Event())
        file.write_to(collect)
        return bytes(out), file.info, pieces

    def received_since(self, n: int) -> list[pc.Operation]:
        return self.camera.received[n:]


def items_by_path(root: DriverItem) -> dict[str, DriverItem]:
    found: dict[str, DriverItem] = {}
    stack = [root]
    while stack:
        item = stack.pop()
        found[item.path] = item
        stack.extend(item.children)
    return found


@pytest.fixture
def rigs():
    """``rig(camera)`` builds a rig; every driver is shut down at the end, and no rig may
    have reported its device failed."""
    made: list[Rig] = []

    def make(camera: SimulatedCamera | None = None) -> Rig:
        rig = Rig(camera or SimulatedCamera())
        made.append(rig)
        return rig

    yield make
    for rig in made:
        rig.stop()
    for rig in made:
        assert rig.host.of("device_failed") == []
        assert not [t for t in rig.driver._threads if t.is_alive()]


def small_card(camera: SimulatedCamera) -> dict[str, int]:
    """DCIM/100SIMUL with two JPEGs, MISC/notes.txt and a top-level BIN."""
    dcim = camera.add_folder(None, 0, "DCIM")
    sub = camera.add_folder(None, dcim, "100SIMUL")
    return {
        "dcim": dcim, "sub": sub,
        "img1": camera.add_file(None, sub, "IMG_0001.JPG", make_jpeg(64, 48), capture_date="20240102T030405"),
        "img2": camera.add_file(None, sub, "IMG_0002.JPG", make_jpeg(32, 16, (10, 20, 30))),
        "misc": (misc := camera.add_folder(None, 0, "MISC")),
        "notes": camera.add_file(None, misc, "notes.txt", b"hello camera", format=pc.FMT_TEXT),
        "bin": camera.add_file(None, 0, "DATA.BIN", pattern_source(5), size=3 * CHUNK + 100,
                               format=pc.FMT_UNDEFINED),
    }


# -- initialize and the session ---------------------------------------------------------------

def test_initialize_reads_device_info_and_storages_and_opens_a_session(rigs):
    rig = rigs(SimulatedCamera(serial="SN-42"))
    small_card(rig.camera)
    rig.start()
    info = rig.info
    assert info.kind == "camera"
    assert info.name == "stillsvc Simulated Camera"
    assert (info.vendor, info.model, info.serial) == ("stillsvc", "Simulated Camera", "SN-42")
    assert {"storage", "events", "delete", "thumbnails"} <= set(info.capabilities)
    assert info.event_names == EVENTS and "new-picture" in info.event_names
    assert rig.driver.info.operations == frozenset(pc.DEFAULT_OPERATIONS)
    assert list(rig.driver.storages) == [0x00010001]
    assert rig.driver.storages[0x00010001].info.label == "SIMCARD"

    cam = rig.camera
    assert cam.session_open and cam.session_id == 1 and cam.interface_claimed
    ops = cam.received
    # The session first (transaction 0), then everything in it: 1, 2, 3, ...
    assert (ops[0].name, ops[0].tid, ops[0].params) == ("OpenSession", 0, (1,))
    after = ops[1:]
    assert [op.tid for op in after] == list(range(1, len(after) + 1)), [(op.name, op.tid) for op in after]
    assert [op.name for op in after[:3]] == ["GetDeviceInfo", "GetStorageIDs", "GetStorageInfo"]
    assert all(op.response == pc.RC_OK for op in ops)
    assert cam.protocol_errors == []


def _left_open(cam: SimulatedCamera, rigs) -> None:
    """A first driver goes without closing its session (the service was killed): the
    camera keeps the session open, as a real one does."""
    first = rigs(cam).start()
    first.driver._gone = True  # so that shutdown sends no CloseSession
    first.stop()
    assert cam.session_open and not cam.interface_claimed


def test_a_session_left_open_is_closed_and_a_new_one_opened(rigs):
    cam = SimulatedCamera(strict_transaction_ids=False)
    _left_open(cam, rigs)
    rig = rigs(cam).start()
    # The session left open is cleared with a Device Reset (its transaction ids are
    # unknown), then ours is opened.
    assert [op.response for op in cam.received if op.name == "OpenSession"] == [
        pc.RC_OK, pc.RC_SESSION_ALREADY_OPEN, pc.RC_OK]
    assert cam.device_resets == 1
    assert cam.session_open and rig.driver.session.open


def test_a_session_left_open_on_a_camera_that_checks_transaction_ids(rigs):
    cam = SimulatedCamera()  # strict_transaction_ids=True, the simulation's default
    _left_open(cam, rigs)
    rig = rigs(cam).start()
    assert cam.session_open and rig.driver.session.open


# -- the background listing -------------------------------------------------------------------

@pytest.mark.parametrize("top_level_only", [False, True], ids=["spec", "top-level-only"])
def test_background_listing_builds_the_item_tree(rigs, top_level_only):
    rig = rigs(SimulatedCamera(top_level_only=top_level_only))
    h = small_card(rig.camera)
    rig.start()
    items = items_by_path(rig.tree())
    kinds = {path: item.kind for path, item in items.items()}
    assert kinds == {
        "Root": "device", STORE: "storage",
        f"{STORE}/DCIM": "folder", f"{STORE}/DCIM/100SIMUL": "folder",
        f"{STORE}/DCIM/100SIMUL/IMG_0001.JPG": "picture", f"{STORE}/DCIM/100SIMUL/IMG_0002.JPG": "picture",
        f"{STORE}/MISC": "folder", f"{STORE}/MISC/notes.txt": "file", f"{STORE}/DATA.BIN": "file",
    }
    root = items["Root"].values
    assert root["listing"] is False and root["objects"] == 7
    assert (root["vendor"], root["model"], root["serial"]) == ("stillsvc", "Simulated Camera", "PTPSIM-1")
    picture = items[f"{STORE}/DCIM/100SIMUL/IMG_0001.JPG"].values
    assert picture["name"] == "IMG_0001.JPG" and picture["handle"] == h["img1"]
    assert picture["size"] == len(make_jpeg(64, 48)) and picture["format"] == "image/jpeg"
    assert (picture["width"], picture["height"]) == (64, 48)
    assert picture["captured"] == "2024-01-02T03:04:05"
    assert picture["thumb_size"] == len(pc.default_thumbnail()) and picture["thumb_format"] == "image/jpeg"
    storage = items[STORE].values
    assert storage["storage_id"] == 0x00010001 and storage["access"] == "read-write"
    assert storage["storage_type"] == "removable-ram"
    assert rig.driver.path_of(h["notes"]) == f"{STORE}/MISC/notes.txt"
    # The folders were walked: their children asked for by handle.
    parents = {op.params[2] for op in rig.camera.received if op.name == "GetObjectHandles"}
    assert {h["dcim"], h["sub"], h["misc"]} <= parents
    assert rig.host.of("tree_changed"), "the service was never told the tree grew"
    assert rig.camera.protocol_errors == []


def test_initialize_returns_before_a_large_listing_and_10000_objects_are_listed(rigs):
    rig = rigs()
    dcim = rig.camera.add_folder(None, 0, "DCIM")
    rig.camera.add_many(10_000, None, dcim, events=False)
    t0 = time.monotonic()
    rig.start(wait_listing=False)
    returned = time.monotonic() - t0
    # initialize did not wait for the listing: it is still going.
    assert rig.driver.listing is True
    assert len(rig.driver.objects) < 10_001
    assert rig.tree().values["listing"] is True
    rig.listed(timeout=30.0)
    took = time.monotonic() - t0
    assert len(rig.driver.objects) == 10_001
    assert took < 30.0, f"listing 10,000 objects took {took:.1f} s"
    assert returned < took
    tree = items_by_path(rig.tree())
    assert sum(1 for item in tree.values() if item.kind == "picture") == 10_000
    assert tree["Root"].values["objects"] == 10_001
    assert f"{STORE}/DCIM/IMG_10000.JPG" in tree
    print(f"initialize {returned * 1000:.0f} ms, 10,000 objects listed in {took:.2f} s")


def test_a_card_pulled_mid_listing_takes_its_storage_away(rigs):
    rig = rigs()
    dcim = rig.camera.add_folder(None, 0, "DCIM")
    rig.camera.add_many(200, None, dcim, events=False)
    rig.camera.remove_storage_during_listing(20)
    rig.start()
    rig.host.wait(lambda: rig.host.events("storage-removed"), what="storage-removed")
    (event, _), = rig.host.events("storage-removed")
    assert event.data == {"item": STORE, "storage": 0x00010001}
    assert rig.driver.storages == {} and rig.driver.objects == {}
    tree = rig.tree()
    assert tree.children == [] and tree.values["objects"] == 0
    assert rig.host.of("device_unplugged") == []
    # Still working: the session answers, and a card put back in is listed again.
    assert rig.driver.get_status(Mode.STATUS)["storages"] == 0
    rig.camera.add_storage()
    rig.host.wait(lambda: rig.host.events("storage-added"), what="storage-added")
    rig.host.wait(lambda: STORE in items_by_path(rig.tree()), what="the card back in the tree")


# -- transfers --------------------------------------------------------------------------------

def test_get_object_of_several_packets_and_reads_is_byte_exact(rigs):
    rig = rigs()
    h = small_card(rig.camera)
    rig.start()
    before = len(rig.camera.received)
    data, info, pieces = rig.get(f"{STORE}/DATA.BIN")
    assert data == rig.camera.object(h["bin"]).content()
    assert (info.name, info.size, info.content_type) == ("DATA.BIN", 3 * CHUNK + 100, "application/octet-stream")
    assert len(pieces) >= 4 and max(pieces) <= CHUNK  # streamed, never whole in memory
    (op,) = rig.received_since(before)
    assert (op.name, op.params, op.response, op.data_in) == ("GetObject", (h["bin"],), pc.RC_OK, len(data))
    picture, info, _ = rig.get(f"{STORE}/DCIM/100SIMUL/IMG_0002.JPG")
    assert picture == make_jpeg(32, 16, (10, 20, 30)) and info.content_type == "image/jpeg"
    assert rig.camera.protocol_errors == []


@pytest.mark.parametrize("container", [512, 3 * 512, CHUNK, CHUNK + 512, 2 * CHUNK], ids=lambda n: f"{n}B")
def test_a_data_phase_of_a_multiple_of_512_ends_with_its_zero_length_packet(rigs, container):
    rig = rigs()
    h = rig.camera.add_file(None, 0, "EXACT.BIN", pattern_source(7), size=container - 12, format=pc.FMT_UNDEFINED)
    after = rig.camera.add_file(None, 0, "AFTER.JPG")
    rig.start()
    data, _, _ = rig.get(f"{STORE}/EXACT.BIN")
    assert data == rig.camera.object(h).content()
    # The ZLP was taken as the end of the data phase, not as (or before) the response:
    # the next transaction and the one after go through cleanly.
    assert rig.get(f"{STORE}/AFTER.JPG")[0] == rig.camera.object(after).content()
    assert rig.get(f"{STORE}/EXACT.BIN")[0] == data
    assert rig.camera.protocol_errors == []
    assert all(op.response == pc.RC_OK for op in rig.camera.received)


def test_get_thumb(rigs):
    rig = rigs()
    h = small_card(rig.camera)
    rig.start()
    data, info, _ = rig.get(f"{STORE}/DCIM/100SIMUL/IMG_0001.JPG", "thumbnail")
    assert data == rig.camera.object(h["img1"]).thumb == pc.default_thumbnail()
    assert (info.name, info.size, info.content_type) == ("IMG_0001.JPG", len(data), "image/jpeg")
    assert rig.camera.received[-1].name == "GetThumb"
    before = len(rig.camera.received)
    with pytest.raises(NotFound, match="no thumbnail"):
        rig.get(f"{STORE}/MISC/notes.txt", "thumbnail")
    assert rig.received_since(before) == []


def test_transfers_and_deletes_need_data_mode(rigs):
    rig = rigs()
    small_card(rig.camera)
    rig.start()
    before = len(rig.camera.received)
    item = rig.item(f"{STORE}/DCIM/100SIMUL/IMG_0001.JPG")
    with pytest.raises(AccessDenied):
        rig.driver.open_file(item, "native", Mode.STATUS, threading.Event())
    with pytest.raises(AccessDenied):
        rig.driver.command(item, "delete", Mode.STATUS)
    assert rig.received_since(before) == []


def test_part_of_an_object_with_get_partial_object(rigs, monkeypatch):
    monkeypatch.setattr(ptp, "PARTIAL_PIECE", CHUNK + 3)  # several GetPartialObject, odd sizes
    rig = rigs()
    h = small_card(rig.camera)
    rig.start()
    item = rig.item(f"{STORE}/DATA.BIN")
    whole = rig.camera.object(h["bin"]).content()
    before = len(rig.camera.received)
    out = bytearray()
    file = rig.driver.open_file(item, "native", Mode.DATA, threading.Event(), (1000, 2 * CHUNK + 500))
    assert file.info.size == 2 * CHUNK + 500
    file.write_to(out.extend)
    assert bytes(out) == whole[1000:1000 + 2 * CHUNK + 500]
    ops = rig.received_since(before)
    assert [op.name for op in ops] == ["GetPartialObject"] * 3
    assert [op.params for op in ops] == [(h["bin"], 1000, CHUNK + 3), (h["bin"], 1000 + CHUNK + 3, CHUNK + 3),
                                         (h["bin"], 1000 + 2 * CHUNK + 6, 494)]
    rest = bytearray()
    rig.driver.open_file(item, "native", Mode.DATA, threading.Event(), (len(whole) - 10, None)).write_to(rest.extend)
    assert bytes(rest) == whole[-10:]
    with pytest.raises(InvalidArgument, match="beyond the end"):
        rig.driver.open_file(item, "native", Mode.DATA, threading.Event(), (len(whole) + 1, None))
    assert rig.camera.protocol_errors == []


def test_part_of_an_object_from_a_camera_without_get_partial_object_is_not_supported(rigs):
    rig = rigs(SimulatedCamera(operations=[op for op in pc.DEFAULT_OPERATIONS if op != pc.OP_GET_PARTIAL_OBJECT]))
    small_card(rig.camera)
    rig.start()
    before = len(rig.camera.received)
    with pytest.raises(NotSupported, match="GetPartialObject"):
        rig.driver.open_file(rig.item(f"{STORE}/DATA.BIN"), "native", Mode.DATA, threading.Event(), (0, 10))
    assert rig.received_since(before) == []


# -- faults -----------------------------------------------------------------------------------

def test_a_stall_is_reported_and_the_next_transaction_recovers(rigs):
    rig = rigs()
    h = small_card(rig.camera)
    rig.start()
    rig.camera.stall_next_read()
    with pytest.raises(Stalled, match="stalled") as caught:
        rig.get(f"{STORE}/DCIM/100SIMUL/IMG_0001.JPG")
    assert isinstance(caught.value, Failed)
    assert rig.camera.halted == set()  # the driver cleared the halt
    data, _, _ = rig.get(f"{STORE}/DCIM/100SIMUL/IMG_0001.JPG")
    assert data == rig.camera.object(h["img1"]).content()
    assert rig.get(f"{STORE}/DATA.BIN")[0] == rig.camera.object(h["bin"]).content()
    assert rig.camera.protocol_errors == []


def test_a_camera_that_does_not_answer_in_time_is_timeout(rigs):
    rig = rigs()
    small_card(rig.camera)
    rig.start()
    rig.driver.session.timeout_ms = 200
    rig.camera.timeout_next_read()
    t0 = time.monotonic()
    with pytest.raises(Timeout, match="did not answer in time"):
        rig.get(f"{STORE}/DCIM/100SIMUL/IMG_0001.JPG")
    assert time.monotonic() - t0 < 5.0


def test_after_a_timeout_the_next_transaction_works(rigs):
    rig = rigs()
    h = small_card(rig.camera)
    rig.start()
    rig.driver.session.timeout_ms = 200
    rig.camera.timeout_next_read()
    with pytest.raises(Timeout):
        rig.get(f"{STORE}/DCIM/100SIMUL/IMG_0001.JPG")
    rig.driver.session.timeout_ms = 5000
    assert rig.get(f"{STORE}/DCIM/100SIMUL/IMG_0002.JPG")[0] == rig.camera.object(h["img2"]).content()


def test_device_busy_is_busy_with_the_ptp_name(rigs):
    rig = rigs()
    h = small_card(rig.camera)
    rig.start()
    rig.camera.busy_next(1)
    with pytest.raises(Busy, match="DeviceBusy") as caught:
        rig.get(f"{STORE}/DCIM/100SIMUL/IMG_0001.JPG")
    assert "GetObject" in caught.value.message
    assert rig.camera.received[-1].response == pc.RC_DEVICE_BUSY
    assert rig.get(f"{STORE}/DCIM/100SIMUL/IMG_0001.JPG")[0] == rig.camera.object(h["img1"]).content()


def test_an_operation_the_camera_does_not_list_is_not_supported_without_asking_it(rigs):
    missing = {pc.OP_GET_THUMB, pc.OP_DELETE_OBJECT, pc.OP_INITIATE_CAPTURE}
    rig = rigs(SimulatedCamera(operations=[op for op in pc.DEFAULT_OPERATIONS if op not in missing]))
    small_card(rig.camera)
    rig.start()
    assert set(rig.info.capabilities) == {"storage", "events"}
    before = len(rig.camera.received)
    picture = rig.item(f"{STORE}/DCIM/100SIMUL/IMG_0001.JPG")
    with pytest.raises(NotSupported, match="GetThumb"):
        rig.driver.open_file(picture, "thumbnail", Mode.DATA, threading.Event())
    with pytest.raises(NotSupported, match="DeleteObject"):
        rig.driver.command(picture, "delete", Mode.DATA)
    assert rig.received_since(before) == []
    assert not set(rig.camera.codes_received()) & missing


def test_a_camera_claimed_by_another_program_is_busy(rigs):
    cam = SimulatedCamera()
    cam.claim_by_other_program()
    rig = rigs(cam)
    with pytest.raises(Busy, match="claimed by another program"):
        rig.start()
    assert cam.received == [] and cam.open_handles == 0
    cam.release_by_other_program()
    again = rigs(cam).start()
    assert again.info.kind == "camera" and cam.session_open


def test_unplugged_mid_transfer_is_disconnected_and_reported_once(rigs):
    rig = rigs()
    h = small_card(rig.camera)
    rig.start()
    pieces: list[int] = []

    def unplug_after_the_first_piece(piece: memoryview) -> None:
        pieces.append(len(piece))
        if len(pieces) == 1:
            rig.camera.unplug()

    with pytest.raises(Disconnected):
        rig.get(f"{STORE}/DATA.BIN", write=unplug_after_the_first_piece)
    assert len(pieces) == 1
    rig.host.wait(lambda: rig.host.of("device_unplugged"), what="device_unplugged")
    # Both the transfer and the event thread saw the device go; the service is told once.
    rig.host.wait(lambda: not any(t.is_alive() for t in rig.driver._threads), what="the driver's threads ending")
    assert len(rig.host.of("device_unplugged")) == 1
    with pytest.raises(Disconnected):
        rig.get(f"{STORE}/DCIM/100SIMUL/IMG_0001.JPG")
    assert len(rig.host.of("device_unplugged")) == 1
    assert h["bin"] in rig.camera.objects  # the camera still has it; it is the USB that went


def test_an_object_added_during_a_transfer_is_handled_after_it(rigs):
    rig = rigs()
    h = small_card(rig.camera)
    rig.start()
    cam = rig.camera
    added: list[int] = []

    def camera_takes_a_picture(piece: memoryview) -> None:
        if added:
            return
        added.append(cam.add_file(None, h["sub"], "IMG_0003.JPG"))
        # Hold the transfer until the driver's event thread has read the event off the
        # interrupt endpoint: it must now wait for the transfer before asking for the
        # object's info.
        deadline = time.monotonic() + WAIT
        while not any(code == pc.EV_OBJECT_ADDED for code, _, _ in cam.events_delivered):
            assert time.monotonic() < deadline, "the ObjectAdded event was never read"
            time.sleep(0.005)

    data, _, _ = rig.get(f"{STORE}/DATA.BIN", write=camera_takes_a_picture)
    transfer_done = time.monotonic()
    assert data == cam.object(h["bin"]).content()
    rig.host.wait(lambda: rig.host.events("new-picture"), what="new-picture")
    ((event, at),) = rig.host.events("new-picture")
    assert at >= transfer_done
    path = f"{STORE}/DCIM/100SIMUL/IMG_0003.JPG"
    assert event.data == {"item": path, "name": "IMG_0003.JPG", "handle": added[0], "format": "image/jpeg"}
    assert path in items_by_path(rig.tree())  # in the tree when the event is reported
    # On the wire the event's GetObjectInfo came after the GetObject, not inside it.
    names = [(op.name, op.params[:1]) for op in cam.received]
    assert names.index(("GetObjectInfo", (added[0],))) > names.index(("GetObject", (h["bin"],)))
    assert cam.protocol_errors == []


def test_events_from_the_camera_change_the_tree(rigs):
    rig = rigs()
    h = small_card(rig.camera)
    rig.start()
    cam = rig.camera
    cam.add_file(None, 0, "TOP.TXT", b"text", format=pc.FMT_TEXT)
    rig.host.wait(lambda: rig.host.events("new-file"), what="new-file")
    assert rig.host.events("new-file")[0][0].data["item"] == f"{STORE}/TOP.TXT"
    cam.remove_object(h["img2"])
    rig.host.wait(lambda: rig.host.events("picture-removed"), what="picture-removed")
    assert rig.host.events("picture-removed")[0][0].data == {
        "item": f"{STORE}/DCIM/100SIMUL/IMG_0002.JPG", "handle": h["img2"]}
    tree = items_by_path(rig.tree())
    assert f"{STORE}/TOP.TXT" in tree and f"{STORE}/DCIM/100SIMUL/IMG_0002.JPG" not in tree


def test_capture_complete_names_the_capture_transaction(rigs):
    rig = rigs()
    rig.start()
    # A capture another initiator (or the camera's own remote) started in transaction 57:
    # per PIMA 15740 CaptureComplete has no parameters; its container carries the
    # InitiateCapture's TransactionID.
    rig.camera.queue_event(pc.EV_CAPTURE_COMPLETE, tid=57)
    rig.host.wait(lambda: rig.host.events("capture-complete"), what="capture-complete")
    ((complete, _),) = rig.host.events("capture-complete")
    assert complete.data["transaction"] == 57


def test_cancelling_a_transfer_sends_the_ptp_cancel_request(rigs):
    rig = rigs()
    h = small_card(rig.camera)
    rig.start()
    cancel = threading.Event()
    got: list[int] = []

    def stop_after_the_first_piece(piece: memoryview) -> None:
        got.append(len(piece))
        cancel.set()

    with pytest.raises(Cancelled):
        rig.get(f"{STORE}/DATA.BIN", cancel=cancel, write=stop_after_the_first_piece)
    op = rig.camera.received[-1]
    assert op.name == "GetObject" and op.cancelled
    assert rig.camera.cancels == [(op.tid, "data-in dropped")]
    assert sum(got) < 3 * CHUNK + 100
    # Nothing of the cancelled object is left in the pipe: the next transfers are exact.
    assert rig.get(f"{STORE}/DATA.BIN")[0] == rig.camera.object(h["bin"]).content()
    assert rig.get(f"{STORE}/DCIM/100SIMUL/IMG_0001.JPG")[0] == rig.camera.object(h["img1"]).content()
    assert rig.camera.protocol_errors == []


def test_a_consumer_that_stops_taking_data_cancels_on_the_wire(rigs):
    rig = rigs()
    h = small_card(rig.camera)
    rig.start()

    def reader_gone(piece: memoryview) -> None:
        raise BrokenPipeError("the reader closed its end")

    with pytest.raises(BrokenPipeError):
        rig.get(f"{STORE}/DATA.BIN", write=reader_gone)
    op = rig.camera.received[-1]
    assert rig.camera.cancels == [(op.tid, "data-in dropped")]
    assert rig.get(f"{STORE}/DATA.BIN")[0] == rig.camera.object(h["bin"]).content()
    assert rig.camera.protocol_errors == []


def test_delete(rigs):
    rig = rigs()
    h = small_card(rig.camera)
    rig.start()
    path = f"{STORE}/DCIM/100SIMUL/IMG_0001.JPG"
    stale = rig.item(path)
    rig.driver.command(stale, "delete", Mode.DATA)
    op = rig.camera.received[-1]
    assert (op.name, op.params[0], op.response) == ("DeleteObject", h["img1"], pc.RC_OK)
    assert h["img1"] not in rig.camera.objects
    tree = items_by_path(rig.tree())
    assert path not in tree and f"{STORE}/DCIM/100SIMUL/IMG_0002.JPG" in tree
    assert rig.tree().values["objects"] == 6
    # The old item is gone for the driver too: refused without asking the camera.
    before = len(rig.camera.received)
    with pytest.raises(NotFound, match="no longer has"):
        rig.driver.open_file(stale, "native", Mode.DATA, threading.Event())
    assert rig.received_since(before) == []


def test_deleting_a_protected_picture_is_access_denied(rigs):
    rig = rigs()
    h = rig.camera.add_file(None, 0, "KEEP.JPG", protected=True)
    rig.start()
    assert rig.item(f"{STORE}/KEEP.JPG").values["protected"] is True
    with pytest.raises(AccessDenied, match="ObjectWriteProtected"):
        rig.driver.command(rig.item(f"{STORE}/KEEP.JPG"), "delete", Mode.DATA)
    assert h in rig.camera.objects and f"{STORE}/KEEP.JPG" in items_by_path(rig.tree())
