"""The simulated PTP camera (tests/ptp_camera.py) driven by hand through pyusb: raw
containers written to and read from its endpoints with dev.write/dev.read, class
requests with dev.ctrl_transfer. These pin what the simulation does on the wire, so
that the initiator (stillsvc's PTP driver), written separately, is checked against an
independent reading of PIMA 15740 and the USB Still Image class.
"""

from __future__ import annotations

import array
import errno
import io
import struct
import threading
import time

import pytest
import usb.control
import usb.core
import usb.util

import ptp_camera as pc
from ptp_camera import SimulatedBackend, SimulatedCamera

EP_IN, EP_OUT, EP_INT = 0x81, 0x02, 0x83
ALL = 0xFFFFFFFF


class Raw:
    """The initiator side, by hand."""

    def __init__(self, dev: usb.core.Device) -> None:
        self.dev = dev
        self.next_tid = 0

    def send(self, code: int, *params: int, tid: int | None = None, split: bool = False) -> int:
        if tid is None:
            tid = self.next_tid
        self.next_tid = tid + 1
        head = struct.pack("<IHHI", 12 + 4 * len(params), 1, code, tid)
        body = struct.pack("<%dI" % len(params), *params)
        if split:
            assert self.dev.write(EP_OUT, head) == 12
            if body:
                self.dev.write(EP_OUT, body)
        else:
            self.dev.write(EP_OUT, head + body)
        return tid

    def read_container(self, size: int = 1 << 20, timeout: int = 1000) -> bytes:
        got = bytes(self.dev.read(EP_IN, size, timeout))
        length = struct.unpack_from("<I", got)[0]
        last = len(got)
        while len(got) < length:
            chunk = bytes(self.dev.read(EP_IN, size, timeout))
            last = len(chunk)
            got += chunk
        if length % 512 == 0 and last == size:     # ended exactly on our buffer: the ZLP
            assert len(self.dev.read(EP_IN, size, timeout)) == 0
        return got

    def transact(self, code: int, *params: int, **kw) -> tuple[int, tuple[int, ...], bytes | None]:
        tid = self.send(code, *params, **kw)
        data = None
        c = self.read_container()
        length, ctype, ccode, ctid = struct.unpack_from("<IHHI", c)
        if ctype == 2:
            assert (ccode, ctid) == (code, tid)
            data = c[12:]
            c = self.read_container()
            length, ctype, ccode, ctid = struct.unpack_from("<IHHI", c)
        assert ctype == 3 and ctid == tid and length == len(c)
        return ccode, pc.container_params(c[12:]), data

    def open_session(self, session_id: int = 1) -> None:
        rc, _, _ = self.transact(pc.OP_OPEN_SESSION, session_id, tid=0)
        assert rc == pc.RC_OK
        self.next_tid = 1

    def status(self) -> tuple[int, list[int]]:
        reply = bytes(self.dev.ctrl_transfer(0xA1, pc.REQ_GET_DEVICE_STATUS, 0, 0, 64))
        length, code = struct.unpack_from("<HH", reply)
        assert length == len(reply)
        return code, list(struct.unpack_from("<%dI" % ((length - 4) // 4), reply, 4))

    def cancel(self, tid: int) -> None:
        assert self.dev.ctrl_transfer(0x21, pc.REQ_CANCEL, 0, 0, struct.pack("<HI", 0x4001, tid)) == 6

    def event(self, timeout: int = 1000) -> tuple[int, int, tuple[int, ...]]:
        ev = bytes(self.dev.read(EP_INT, 64, timeout))
        length, ctype, code, tid = struct.unpack_from("<IHHI", ev)
        assert ctype == 4 and length == len(ev)
        return code, tid, pc.container_params(ev[12:])


def connect(cam: SimulatedCamera, **find) -> tuple[usb.core.Device, Raw]:
    dev = usb.core.find(backend=SimulatedBackend(cam), idVendor=0x04A9, idProduct=0x3218, **find)
    assert dev is not None
    dev.set_configuration()
    return dev, Raw(dev)


@pytest.fixture
def cam() -> SimulatedCamera:
    return SimulatedCamera()


def test_descriptors_strings_and_standard_requests(cam):
    dev, raw = connect(cam)
    assert (dev.bus, dev.address, dev.speed) == (1, 2, 3)
    intf = dev.get_active_configuration()[(0, 0)]
    assert (intf.bInterfaceClass, intf.bInterfaceSubClass, intf.bInterfaceProtocol) == (6, 1, 1)
    eps = {e.bEndpointAddress: (usb.util.endpoint_type(e.bmAttributes), e.wMaxPacketSize, e.bInterval)
           for e in intf}
    assert eps == {EP_IN: (2, 512, 0), EP_OUT: (2, 512, 0), EP_INT: (3, 64, 4)}
    assert (dev.manufacturer, dev.product, dev.serial_number) == ("stillsvc", "Simulated Camera", "PTPSIM-1")
    # GET_DESCRIPTOR by hand agrees with the parsed descriptors
    raw_dev = bytes(dev.ctrl_transfer(0x80, 6, 0x0100, 0, 18))
    assert struct.unpack_from("<HH", raw_dev, 8) == (0x04A9, 0x3218)
    assert len(dev.ctrl_transfer(0x80, 6, 0x0200, 0, 255)) == 39
    assert usb.control.get_configuration(dev) == 1
    # endpoint halt: SET_FEATURE, GET_STATUS, CLEAR_FEATURE
    dev.ctrl_transfer(0x02, 0x03, 0, EP_IN)
    assert usb.control.get_status(dev, intf[0]) == 1
    with pytest.raises(usb.core.USBError) as exc:
        dev.read(EP_IN, 512, 50)
    assert exc.value.errno == errno.EPIPE and exc.value.backend_error_code == -9
    dev.ctrl_transfer(0x02, 0x01, 0, EP_IN)
    assert usb.control.get_status(dev, intf[0]) == 0
    assert cam.interface_claimed and cam.claim_count == 1
    usb.util.release_interface(dev, 0)
    assert not cam.interface_claimed and cam.release_count == 1
    # an unknown request stalls
    with pytest.raises(usb.core.USBError) as exc:
        dev.ctrl_transfer(0xC0, 0x42, 0, 0, 4)
    assert exc.value.errno == errno.EPIPE


def test_device_info_before_a_session_and_session_rules(cam):
    dev, raw = connect(cam)
    rc, _, data = raw.transact(pc.OP_GET_DEVICE_INFO, tid=0)
    assert rc == pc.RC_OK and not cam.session_open
    info = pc.decode_device_info(data)
    assert info["_end"] == len(data)
    assert (info["manufacturer"], info["model"], info["serial_number"]) == \
        ("stillsvc", "Simulated Camera", "PTPSIM-1")
    assert info["operations"] == list(pc.DEFAULT_OPERATIONS)
    assert info["events"] == list(pc.DEFAULT_EVENTS)
    assert info["standard_version"] == 100 and pc.FMT_EXIF_JPEG in info["capture_formats"]

    assert raw.transact(pc.OP_GET_STORAGE_IDS, tid=0)[0] == pc.RC_SESSION_NOT_OPEN
    assert raw.transact(pc.OP_GET_DEVICE_PROP_DESC, 0x5001, tid=0)[0] == pc.RC_OPERATION_NOT_SUPPORTED
    raw.open_session(7)
    assert cam.session_open and cam.session_id == 7
    rc, params, _ = raw.transact(pc.OP_OPEN_SESSION, 9, tid=0)
    assert (rc, params) == (pc.RC_SESSION_ALREADY_OPEN, (7,))
    # OpenSession inside the session took no transaction ID: the next one is 1
    assert raw.transact(pc.OP_GET_STORAGE_IDS, tid=1)[0] == pc.RC_OK
    assert raw.transact(pc.OP_GET_STORAGE_IDS, tid=5)[0] == pc.RC_INVALID_TRANSACTION_ID
    assert raw.transact(pc.OP_GET_STORAGE_IDS, tid=6)[0] == pc.RC_OK
    assert raw.transact(pc.OP_CLOSE_SESSION)[0] == pc.RC_OK and not cam.session_open
    assert [op.name for op in cam.received][:3] == ["GetDeviceInfo", "GetStorageIDs", "GetDevicePropDesc"]
    assert cam.received[-1].tid == 7 and cam.received[-1].response == pc.RC_OK
    assert any("expected 2" in e for e in cam.protocol_errors)


def build_tree(cam: SimulatedCamera) -> dict[str, int]:
    dcim = cam.add_folder(None, 0, "DCIM")
    sub = cam.add_folder(None, dcim, "100SIMUL")
    a = cam.add_file(None, sub, "IMG_0001.JPG")
    b = cam.add_file(None, sub, "IMG_0002.JPG", thumb=None)
    txt = cam.add_file(None, 0, "README.TXT", b"hello camera\n", format=pc.FMT_TEXT)
    return {"dcim": dcim, "sub": sub, "a": a, "b": b, "txt": txt}


def test_storages_listing_and_object_info(cam):
    t = build_tree(cam)
    dev, raw = connect(cam)
    raw.open_session()
    rc, _, data = raw.transact(pc.OP_GET_STORAGE_IDS)
    sid = 0x00010001
    assert pc.decode_u32_array(data)[0] == [sid]
    rc, _, data = raw.transact(pc.OP_GET_STORAGE_INFO, sid)
    si = pc.decode_storage_info(data)
    assert si["access"] == pc.ACCESS_READ_WRITE and si["capacity"] > si["free_space"] > 0
    assert si["description"] and si["volume_label"] == "SIMCARD"
    assert raw.transact(pc.OP_GET_STORAGE_INFO, 0x00020001)[0] == pc.RC_INVALID_STORAGE_ID

    def handles(*p):
        rc, _, data = raw.transact(pc.OP_GET_OBJECT_HANDLES, *p)
        assert rc == pc.RC_OK
        return pc.decode_u32_array(data)[0]

    assert handles(ALL, 0, ALL) == [t["dcim"], t["txt"]]            # root level
    assert handles(sid, 0, 0) == [t["dcim"], t["sub"], t["a"], t["b"], t["txt"]]  # all
    assert handles(sid) == handles(sid, 0, 0)                          # absent = 0
    assert handles(sid, 0, t["sub"]) == [t["a"], t["b"]]
    assert handles(ALL, pc.FMT_ASSOCIATION, 0) == [t["dcim"], t["sub"]]
    assert raw.transact(pc.OP_GET_NUM_OBJECTS, ALL, 0, 0)[:2] == (pc.RC_OK, (5,))
    assert raw.transact(pc.OP_GET_OBJECT_HANDLES, sid, 0, t["a"])[0] == pc.RC_INVALID_PARENT_OBJECT
    assert raw.transact(pc.OP_GET_OBJECT_HANDLES, sid, 0, 999)[0] == pc.RC_INVALID_OBJECT_HANDLE
    assert raw.transact(pc.OP_GET_OBJECT_HANDLES, 0x00030001, 0, 0)[0] == pc.RC_INVALID_STORAGE_ID

    rc, _, data = raw.transact(pc.OP_GET_OBJECT_INFO, t["a"])
    oi = pc.decode_object_info(data)
    assert oi["_end"] == len(data)
    assert (oi["storage_id"], oi["format"], oi["parent"], oi["filename"]) == (sid, 0x3801, t["sub"], "IMG_0001.JPG")
    assert oi["compressed_size"] == cam.object(t["a"]).size
    assert (oi["width"], oi["height"], oi["thumb_format"], oi["thumb_width"]) == (64, 48, 0x3801, 160)
    assert oi["capture_date"] == "20240102T030405"
    oi = pc.decode_object_info(raw.transact(pc.OP_GET_OBJECT_INFO, t["dcim"])[2])
    assert (oi["format"], oi["association_type"], oi["parent"], oi["compressed_size"]) == (0x3001, 1, 0, 0)
    oi = pc.decode_object_info(raw.transact(pc.OP_GET_OBJECT_INFO, t["b"])[2])
    assert (oi["thumb_format"], oi["thumb_size"]) == (0, 0)
    assert raw.transact(pc.OP_GET_OBJECT_INFO, 12345)[0] == pc.RC_INVALID_OBJECT_HANDLE


def test_top_level_only_mimics_usb_mtp():
    cam = SimulatedCamera(top_level_only=True)
    t = build_tree(cam)
    dev, raw = connect(cam)
    raw.open_session()
    data = raw.transact(pc.OP_GET_OBJECT_HANDLES, ALL, 0, 0)[2]
    assert pc.decode_u32_array(data)[0] == [t["dcim"], t["txt"]]


def test_get_object_packets_and_zero_length_packet(cam):
    payload = pc.pattern(0, 1012, seed=3)          # container: exactly 2 x 512 bytes
    h = cam.add_file(None, 0, "TWO.BIN", payload, format=pc.FMT_UNDEFINED)
    odd = cam.add_file(None, 0, "ODD.BIN", pc.pattern(0, 1500), format=pc.FMT_UNDEFINED)
    dev, raw = connect(cam)
    raw.open_session()
    tid = raw.send(pc.OP_GET_OBJECT, h)
    first = bytes(dev.read(EP_IN, 512))
    assert struct.unpack_from("<IHHI", first) == (1024, 2, pc.OP_GET_OBJECT, tid)
    second = bytes(dev.read(EP_IN, 512))
    assert (first + second)[12:] == payload
    assert len(dev.read(EP_IN, 512)) == 0                 # the ZLP
    resp = bytes(dev.read(EP_IN, 512))
    assert struct.unpack("<IHHI", resp) == (12, 3, pc.RC_OK, tid)

    # a read asking for more than is left: the ZLP ends it, the next read is the response
    tid = raw.send(pc.OP_GET_OBJECT, h)
    assert len(dev.read(EP_IN, 4096)) == 1024
    assert struct.unpack("<IHHI", bytes(dev.read(EP_IN, 4096))) == (12, 3, pc.RC_OK, tid)

    # a short last packet, no ZLP; a read of less than pending keeps the rest
    tid = raw.send(pc.OP_GET_OBJECT, odd)
    head = bytes(dev.read(EP_IN, 12))
    assert struct.unpack("<IHHI", head) == (1512, 2, pc.OP_GET_OBJECT, tid)
    rest = bytes(dev.read(EP_IN, 65536))
    assert rest == pc.pattern(0, 1500)
    assert struct.unpack("<IHHI", bytes(dev.read(EP_IN, 65536)))[2] == pc.RC_OK
    assert cam.bytes_sent == 1024 + 12 + 1024 + 12 + 1512 + 12 + 12  # + OpenSession's response


def test_strict_packets_refuses_to_split_a_packet():
    cam = SimulatedCamera(strict_packets=True)
    h = cam.add_file(None, 0, "X.BIN", bytes(2000), format=pc.FMT_UNDEFINED)
    dev, raw = connect(cam)
    raw.open_session()
    raw.send(pc.OP_GET_OBJECT, h)
    with pytest.raises(usb.core.USBError) as exc:
        dev.read(EP_IN, 12)
    assert exc.value.errno == errno.EOVERFLOW
    assert len(dev.read(EP_IN, 1024)) == 1024


def test_split_command_writes_and_stray_zlp(cam):
    dev, raw = connect(cam)
    rc, _, data = raw.transact(pc.OP_GET_DEVICE_INFO, tid=0, split=True)
    assert rc == pc.RC_OK and data
    dev.write(EP_OUT, b"")
    assert cam.stray_zlps == 1
    raw.next_tid = 0
    raw.open_session()
    assert raw.transact(pc.OP_GET_STORAGE_IDS, split=True)[0] == pc.RC_OK
    assert cam.protocol_errors == []


def test_partial_object_thumb_and_delete(cam):
    t = build_tree(cam)
    big = cam.add_file(None, t["dcim"], "BIG.JPG", pc.make_jpeg(320, 240, size=100_000))
    dev, raw = connect(cam)
    raw.open_session()
    content = cam.object(big).content()
    rc, params, data = raw.transact(pc.OP_GET_PARTIAL_OBJECT, big, 1000, 5000)
    assert (rc, params, data) == (pc.RC_OK, (5000,), content[1000:6000])
    rc, params, data = raw.transact(pc.OP_GET_PARTIAL_OBJECT, big, 99_000, ALL)
    assert (rc, params, data) == (pc.RC_OK, (1000,), content[99_000:])
    assert raw.transact(pc.OP_GET_PARTIAL_OBJECT, big, 100_001, 10)[0] == pc.RC_INVALID_PARAMETER
    rc, _, data = raw.transact(pc.OP_GET_OBJECT, big)
    assert data == content
    rc, _, thumb = raw.transact(pc.OP_GET_THUMB, t["a"])
    assert rc == pc.RC_OK and pc.jpeg_dimensions(thumb) == (160, 120)
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        pass
    else:
        assert Image.open(io.BytesIO(thumb)).size == (160, 120)
        assert Image.open(io.BytesIO(data)).size == (320, 240)
    assert raw.transact(pc.OP_GET_THUMB, t["b"])[0] == pc.RC_NO_THUMBNAIL_PRESENT

    assert raw.transact(pc.OP_DELETE_OBJECT, t["dcim"])[0] == pc.RC_OK
    assert set(cam.objects) == {t["txt"]}
    assert raw.transact(pc.OP_GET_OBJECT_INFO, t["a"])[0] == pc.RC_INVALID_OBJECT_HANDLE
    # per the spec the deleting initiator gets no ObjectRemoved
    with pytest.raises(usb.core.USBTimeoutError):
        raw.event(timeout=30)
    cam.update_object(t["txt"], protected=True)
    assert raw.event()[0] == pc.EV_OBJECT_INFO_CHANGED
    assert raw.transact(pc.OP_DELETE_OBJECT, t["txt"])[0] == pc.RC_OBJECT_WRITE_PROTECTED


def test_event_wakes_a_waiting_interrupt_read(cam):
    dev, raw = connect(cam)
    raw.open_session()
    with pytest.raises(usb.core.USBTimeoutError) as exc:
        dev.read(EP_INT, 64, 20)
    assert exc.value.errno == errno.ETIMEDOUT and exc.value.backend_error_code == -7
    got = []
    reader = threading.Thread(target=lambda: got.append((raw.event(timeout=3000), time.monotonic())))
    reader.start()
    time.sleep(0.05)
    added = time.monotonic()
    h = cam.add_file(None, 0, "NEW.JPG")
    reader.join(2)
    (code, tid, params), when = got[0]
    assert (code, tid, params) == (pc.EV_OBJECT_ADDED, 0xFFFFFFFF, (h,))
    assert when - added < 0.5
    cam.remove_object(h)
    assert raw.event() == (pc.EV_OBJECT_REMOVED, 0xFFFFFFFF, (h,))
    sid = cam.add_storage(label="CARD2")
    assert raw.event() == (pc.EV_STORE_ADDED, 0xFFFFFFFF, (sid,))
    cam.remove_storage(sid)
    assert raw.event() == (pc.EV_STORE_REMOVED, 0xFFFFFFFF, (sid,))
    assert cam.events_delivered[0][0] == pc.EV_OBJECT_ADDED


def test_initiate_capture(cam):
    dev, raw = connect(cam)
    raw.open_session()
    tid = raw.next_tid
    assert raw.transact(pc.OP_INITIATE_CAPTURE, 0, 0)[0] == pc.RC_OK
    events = [raw.event() for _ in range(4)]
    assert [e[0] for e in events] == [pc.EV_OBJECT_ADDED] * 3 + [pc.EV_CAPTURE_COMPLETE]
    assert {e[1] for e in events} == {tid}
    dcim, sub, img = (e[2][0] for e in events[:3])
    assert (cam.object(dcim).name, cam.object(sub).name, cam.object(img).parent) == ("DCIM", "100SIMUL", sub)
    oi = pc.decode_object_info(raw.transact(pc.OP_GET_OBJECT_INFO, img)[2])
    assert (oi["filename"], oi["width"], oi["height"]) == ("IMG_0001.JPG", 640, 480)
    assert raw.transact(pc.OP_INITIATE_CAPTURE, 0, pc.FMT_TIFF)[0] == pc.RC_INVALID_OBJECT_FORMAT_CODE
    assert raw.transact(pc.OP_INITIATE_CAPTURE, 0x00090001, 0)[0] == pc.RC_INVALID_STORAGE_ID


def test_cancel_during_get_object(cam):
    h = cam.add_file(None, 0, "SLOW.BIN", size=1_000_000, data=pc.pattern_source(1),
                     format=pc.FMT_UNDEFINED)
    dev, raw = connect(cam)
    raw.open_session()
    cam.slow_data(400_000)
    tid = raw.send(pc.OP_GET_OBJECT, h)
    got = bytes(dev.read(EP_IN, 4096, 1000))
    assert len(got) == 4096 and got[12:] == pc.pattern(0, 4084, 1)
    raw.cancel(tid)
    assert cam.cancels == [(tid, "data-in dropped")] and cam.received[-1].cancelled
    assert raw.status() == (pc.RC_DEVICE_BUSY, [])
    assert raw.status() == (pc.RC_OK, [])
    with pytest.raises(usb.core.USBTimeoutError):     # no more data, no response
        dev.read(EP_IN, 4096, 30)
    cam.slow_data(None)
    assert raw.transact(pc.OP_GET_STORAGE_IDS)[0] == pc.RC_OK  # tid + 1

    # a cancel from another thread while a slow read waits: the packets that made it
    cam.slow_data(200_000)
    tid = raw.send(pc.OP_GET_OBJECT, h)
    threading.Timer(0.1, raw.cancel, (tid,)).start()
    start = time.monotonic()
    n = len(dev.read(EP_IN, 1 << 20, 2000))
    assert 0 < n < 100_000 and n % 512 == 0 and time.monotonic() - start < 1
    with pytest.raises(usb.core.USBTimeoutError):
        dev.read(EP_IN, 4096, 30)
    # a read that times out on slow data returns the whole packets that came
    tid = raw.send(pc.OP_GET_OBJECT, h)
    n = len(dev.read(EP_IN, 1 << 20, 50))
    assert 0 < n < 30_000 and n % 512 == 0
    raw.cancel(tid)


def test_huge_object_from_a_callable(cam):
    size = 5 * 1024 ** 3
    h = cam.add_file(None, 0, "HUGE.MOV", size=size, data=pc.pattern_source(9), format=pc.FMT_AVI)
    dev, raw = connect(cam)
    raw.open_session()
    oi = pc.decode_object_info(raw.transact(pc.OP_GET_OBJECT_INFO, h)[2])
    assert oi["compressed_size"] == 0xFFFFFFFF
    offset = 0xFFFFFFFF - 5000       # GetPartialObject's offset is a u32
    rc, params, data = raw.transact(pc.OP_GET_PARTIAL_OBJECT, h, offset, 10_000)
    assert (rc, params, data) == (pc.RC_OK, (10_000,), pc.pattern(offset, 10_000, 9))
    tid = raw.send(pc.OP_GET_OBJECT, h)
    first = bytes(dev.read(EP_IN, 65536))
    assert struct.unpack_from("<IHHI", first) == (0xFFFFFFFF, 2, pc.OP_GET_OBJECT, tid)
    raw.cancel(tid)
    raw.status()
    assert raw.transact(pc.OP_GET_STORAGE_IDS)[0] == pc.RC_OK


def test_busy_stall_and_timeout_faults(cam):
    dev, raw = connect(cam)
    raw.open_session()
    cam.busy_next(2)
    assert raw.transact(pc.OP_GET_STORAGE_IDS)[0] == pc.RC_DEVICE_BUSY
    assert raw.transact(pc.OP_GET_STORAGE_IDS)[0] == pc.RC_DEVICE_BUSY
    assert raw.transact(pc.OP_GET_STORAGE_IDS)[0] == pc.RC_OK

    cam.stall_next_read()
    raw.send(pc.OP_GET_DEVICE_INFO)
    for _ in range(2):
        with pytest.raises(usb.core.USBError) as exc:
            dev.read(EP_IN, 512)
        assert exc.value.errno == errno.EPIPE and exc.value.backend_error_code == -9
    assert raw.status() == (pc.RC_TRANSACTION_CANCELLED, [EP_IN])
    dev.clear_halt(EP_IN)
    assert raw.status() == (pc.RC_OK, []) and not cam.halted
    with pytest.raises(usb.core.USBTimeoutError):   # the stalled transaction is gone
        dev.read(EP_IN, 512, 20)
    assert raw.transact(pc.OP_GET_STORAGE_IDS)[0] == pc.RC_OK

    cam.stall_next_read(abort=False)
    tid = raw.send(pc.OP_GET_STORAGE_IDS)
    with pytest.raises(usb.core.USBError):
        dev.read(EP_IN, 512)
    usb.control.clear_feature(dev, usb.control.ENDPOINT_HALT, dev.get_active_configuration()[(0, 0)][0])
    assert struct.unpack_from("<IHHI", bytes(dev.read(EP_IN, 512)))[1:] == (2, pc.OP_GET_STORAGE_IDS, tid)
    assert bytes(dev.read(EP_IN, 512))[6:8] == b"\x01\x20"

    cam.timeout_next_read()
    tid = raw.send(pc.OP_GET_STORAGE_IDS)
    start = time.monotonic()
    with pytest.raises(usb.core.USBTimeoutError):
        dev.read(EP_IN, 512, 60)
    assert time.monotonic() - start >= 0.05
    assert struct.unpack_from("<IHHI", bytes(dev.read(EP_IN, 512)))[3] == tid  # data kept


def test_unplug_wakes_readers_and_plug_comes_back(cam):
    dev, raw = connect(cam)
    raw.open_session()
    errors = []

    def wait_event():
        try:
            raw.event(timeout=5000)
        except usb.core.USBError as exc:
            errors.append((exc, time.monotonic()))

    reader = threading.Thread(target=wait_event)
    reader.start()
    time.sleep(0.05)
    gone = time.monotonic()
    cam.unplug()
    reader.join(2)
    exc, when = errors[0]
    assert exc.errno == errno.ENODEV and exc.backend_error_code == -4 and when - gone < 0.5
    with pytest.raises(usb.core.USBError) as e2:
        dev.write(EP_OUT, b"\x0c\x00\x00\x00\x01\x00\x01\x10\x00\x00\x00\x00")
    assert e2.value.errno == errno.ENODEV
    backend = SimulatedBackend(cam)
    assert usb.core.find(backend=backend, idVendor=0x04A9) is None
    cam.plug()
    dev2 = usb.core.find(backend=backend, idVendor=0x04A9)
    assert dev2.address == 3
    raw2 = Raw(dev2)
    raw2.open_session()       # a new device: no session left over
    with pytest.raises(usb.core.USBError):
        dev.read(EP_IN, 512)


def test_interface_claimed_elsewhere(cam):
    dev, raw = connect(cam)
    cam.claim_by_other_program()
    for call in (lambda: usb.util.claim_interface(dev, 0), lambda: dev.set_configuration(),
                 lambda: dev.write(EP_OUT, bytes(12))):
        with pytest.raises(usb.core.USBError) as exc:
            call()
        assert exc.value.errno == errno.EBUSY and exc.value.backend_error_code == -6
    cam.release_by_other_program()
    usb.util.claim_interface(dev, 0)
    # another process through another backend
    other = usb.core.find(backend=SimulatedBackend(cam), idVendor=0x04A9)
    with pytest.raises(usb.core.USBError) as exc:
        usb.util.claim_interface(other, 0)
    assert exc.value.errno == errno.EBUSY


@pytest.mark.parametrize("stale, rc_obj, rc_store", [
    ("invalid", pc.RC_INVALID_OBJECT_HANDLE, pc.RC_INVALID_STORAGE_ID),
    ("unavailable", pc.RC_STORE_NOT_AVAILABLE, pc.RC_STORE_NOT_AVAILABLE),
])
def test_card_pulled_during_listing(cam, stale, rc_obj, rc_store):
    handles = cam.add_many(5)
    dev, raw = connect(cam)
    raw.open_session()
    cam.remove_storage_during_listing(2, stale=stale)
    assert raw.transact(pc.OP_GET_OBJECT_INFO, handles[0])[0] == pc.RC_OK
    assert raw.transact(pc.OP_GET_OBJECT_INFO, handles[1])[0] == pc.RC_OK
    assert raw.transact(pc.OP_GET_OBJECT_INFO, handles[2])[0] == rc_obj
    assert raw.event() == (pc.EV_STORE_REMOVED, 0xFFFFFFFF, (0x00010001,))
    assert pc.decode_u32_array(raw.transact(pc.OP_GET_STORAGE_IDS)[2])[0] == []
    assert raw.transact(pc.OP_GET_STORAGE_INFO, 0x00010001)[0] == rc_store
    assert raw.transact(pc.OP_GET_OBJECT_HANDLES, 0x00010001, 0, 0)[0] == rc_store


def test_ten_thousand_objects(cam):
    start = time.monotonic()
    handles = cam.add_many(10_000, parent=cam.add_folder(None, 0, "DCIM"))
    assert time.monotonic() - start < 1
    dev, raw = connect(cam)
    raw.open_session()
    data = raw.transact(pc.OP_GET_OBJECT_HANDLES, ALL, 0, 0)[2]
    assert pc.decode_u32_array(data)[0][1:] == handles
    oi = pc.decode_object_info(raw.transact(pc.OP_GET_OBJECT_INFO, handles[-1])[2])
    assert oi["filename"] == "IMG_10000.JPG"


def test_data_out_phase_waits_for_its_zlp():
    cam = SimulatedCamera(operations=pc.DEFAULT_OPERATIONS + (pc.OP_SEND_OBJECT_INFO,))
    dev, raw = connect(cam)
    raw.open_session()
    tid = raw.send(pc.OP_SEND_OBJECT_INFO, 0x00010001, 0)
    dev.write(EP_OUT, struct.pack("<IHHI", 512, 2, pc.OP_SEND_OBJECT_INFO, tid))  # header apart
    dev.write(EP_OUT, bytes(500))
    with pytest.raises(usb.core.USBTimeoutError):   # no answer before the ZLP
        dev.read(EP_IN, 512, 30)
    dev.write(EP_OUT, b"")
    resp = bytes(dev.read(EP_IN, 512))
    assert struct.unpack("<IHHI", resp) == (12, 3, pc.RC_OPERATION_NOT_SUPPORTED, tid)
    assert cam.received[-1].data_out == bytes(500) and cam.protocol_errors == []


def test_protocol_error_stalls_both_pipes_and_device_reset(cam):
    dev, raw = connect(cam)
    raw.open_session()
    dev.write(EP_OUT, struct.pack("<IHHI", 12, 2, pc.OP_GET_OBJECT, 5))   # data, not a command
    assert cam.protocol_errors and cam.halted == {EP_IN, EP_OUT}
    assert raw.status() == (pc.RC_TRANSACTION_CANCELLED, [EP_IN, EP_OUT])
    dev.clear_halt(EP_IN)
    dev.clear_halt(EP_OUT)
    assert raw.status() == (pc.RC_OK, [])
    assert dev.ctrl_transfer(0x21, pc.REQ_DEVICE_RESET, 0, 0, None) == 0
    assert not cam.session_open and cam.device_resets == 1
    raw.next_tid = 0
    raw.open_session()


def test_make_jpeg_decodes():
    Image = pytest.importorskip("PIL.Image")
    for size in (None, 5000):
        data = pc.make_jpeg(33, 17, (10, 200, 30), size=size)
        if size:
            assert len(data) == size
        im = Image.open(io.BytesIO(data))
        im.load()
        assert im.size == (33, 17)
        r, g, b = im.getpixel((32, 16))
        assert abs(r - 10) < 4 and abs(g - 200) < 4 and abs(b - 30) < 4


def test_read_fills_the_given_array_in_place(cam):
    dev, raw = connect(cam)
    raw.send(pc.OP_GET_DEVICE_INFO, tid=0)
    buf = array.array("B", bytes(4096))
    n = dev.read(EP_IN, buf)
    assert n == struct.unpack_from("<I", buf)[0] and buf[4] == 2
