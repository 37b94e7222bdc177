"""``ptp``: digital cameras (and phones in photo transfer mode) over USB, with PTP.

The camera is a tree of items: Root (the camera) → one item per storage (a
memory card) → folders → pictures and other files, built from the camera's
object infos. The storages are known when the device appears; the objects are
listed **in the background** (Root's ``listing`` is true until it is done), so a
card with 10,000 pictures does not make the device slow to appear: the tree
grows as the listing goes (the service is told through ``host.tree_changed``).

A picture is copied out unchanged (``Transfer(fd, "native")``) or as the
camera's thumbnail (``"thumbnail"``), streamed from GetObject in large reads,
never whole in memory; cancelling sends the PTP Cancel request so the camera
stops sending. ``Delete`` on an item is DeleteObject. Events come from the
interrupt endpoint, read by a thread of the driver's own: ObjectAdded adds the
item and raises ``new-picture`` (or ``new-file``) with the item's path,
ObjectRemoved, StoreAdded and StoreRemoved change the tree, CaptureComplete
raises ``capture-complete``.

Operations the camera does not list in its DeviceInfo are NotSupported without
asking it; PTP response codes become the service's errors with the PTP name in
the message (DeviceBusy → Busy, InvalidObjectHandle → NotFound, …).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from stillsvc.common.errors import Disconnected, InvalidArgument, NotFound, NotSupported, StillError
from stillsvc.driver import (
    DeviceEvent,
    DeviceInfo,
    EventSource,
    FileInfo,
    Match,
    Minidriver,
    Mode,
    PortPolicy,
)
from stillsvc.driver.items import Access, DriverItem, PropertySpec
from stillsvc.driver.usb import UsbPort
from stillsvc.drivers.ptp.protocol import (
    ACCESS,
    STORAGE_TYPES,
    Event,
    ObjectInfo,
    Op,
    PtpError,
    StorageInfo,
    code_name,
    handles,
    is_picture,
    mime_of,
    ptp_date,
)
from stillsvc.drivers.ptp.session import PtpSession

log = structlog.get_logger(__name__)

EVENTS = ("new-picture", "new-file", "picture-removed", "storage-added", "storage-removed", "capture-complete")
#: How often the background listing tells the service its tree has grown (seconds).
LISTING_REPORT = 0.5
ROOT_LEVEL = 0xFFFFFFFF
#: GetPartialObject asks for this much at a time.
PARTIAL_PIECE = 16 * 1024 * 1024
_UNSAFE = re.compile(r"[^A-Za-z0-9_]")


def _spec(name: str, signature: str, description: str = "") -> PropertySpec:
    default: Any = {"s": "", "b": False, "d": 0.0}.get(signature, 0)
    return PropertySpec(name, signature, default, access=Access.READ, description=description)


#: One dict of property specs per kind of item, shared by every item of that kind
#: (a card of 10,000 pictures costs one values dict per picture, not a specs dict too).
FILE_SPECS = {s.name: s for s in (
    _spec("name", "s", "file name"),
    _spec("size", "t", "bytes"),
    _spec("format", "s", "MIME type"),
    _spec("ptp_format", "u", "PTP object format code"),
    _spec("width", "u", "pixels"),
    _spec("height", "u", "pixels"),
    _spec("bit_depth", "u", "bits per pixel"),
    _spec("captured", "s", "capture date (ISO 8601, as the camera says)"),
    _spec("modified", "s", "modification date (ISO 8601)"),
    _spec("thumb_size", "u", "bytes of the thumbnail (0: none)"),
    _spec("thumb_format", "s", "the thumbnail's MIME type"),
    _spec("thumb_width", "u", "pixels"),
    _spec("thumb_height", "u", "pixels"),
    _spec("protected", "b", "the camera protects it from deletion"),
    _spec("handle", "u", "PTP object handle"),
)}
FOLDER_SPECS = {s.name: s for s in (
    _spec("name", "s", "folder name"), _spec("modified", "s", "modification date (ISO 8601)"),
    _spec("handle", "u", "PTP object handle"),
)}
STORAGE_SPECS = {s.name: s for s in (
    _spec("description", "s"), _spec("label", "s", "volume label"), _spec("capacity", "t", "bytes"),
    _spec("free_space", "t", "bytes free"), _spec("free_images", "u", "pictures that still fit (as the camera says)"),
    _spec("storage_type", "s", "fixed-rom, removable-rom, fixed-ram, removable-ram"),
    _spec("access", "s", "read-write, read-only, read-only-with-deletion"), _spec("storage_id", "u", "PTP storage id"),
)}


@dataclass(slots=True)
class _Object:
    handle: int
    info: ObjectInfo
    children: list[int] = field(default_factory=list)


@dataclass
class _Storage:
    id: int
    info: StorageInfo
    top: list[int] = field(default_factory=list)


def _has_ptp_endpoints(interface: Any) -> bool:
    """An interface that is not 06/01/01 but carries PTP (an MTP phone's vendor class):
    bulk in, bulk out and interrupt in."""
    kinds = {(e.bEndpointAddress & 0x80, e.bmAttributes & 3) for e in interface}
    return {(0x80, 2), (0, 2), (0x80, 3)} <= kinds


class _PtpFile:
    def __init__(self, info: FileInfo, run: Callable[[Callable[[memoryview], None]], None]) -> None:
        self.info = info
        self._run = run

    def write_to(self, write: Callable[[bytes | memoryview], None]) -> None:
        self._run(write)


class PtpCamera(Minidriver):
    name = "ptp"
    matches = (Match(subsystem="usb", interface=(6, 1, 1)),
               Match(subsystem="usb", properties=(("GPHOTO2_DRIVER", "PTP"),)))
    port_policy = PortPolicy.DEDICATED
    events = EventSource.PUSH


    def __init__(self, config, host) -> None:  # type: ignore[no-untyped-def]
        super().__init__(config, host)
        self.usb: UsbPort | None = None
        self.session: PtpSession | None = None
        self.info = None
        self.model_lock = threading.RLock()
        self.storages: dict[int, _Storage] = {}
        self.objects: dict[int, _Object] = {}
        self.listing = False
        self.listed = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._gone = False
        self.log = log.bind(device=config.id)

    # -- the session ----------------------------------------------------------------------
    def _session(self) -> PtpSession:
        if self.session is None:
            raise Disconnected(f"the camera {self.config.id} is not connected")
        return self.session

    def _call(self, op: int, params: tuple[int, ...] = (), **kw: Any) -> Any:
        """One PTP operation; not offered by the camera → NotSupported, without asking it."""
        session = self._session()
        if not session.supports(op):
            raise NotSupported(f"the camera does not offer {code_name(op)}")
        try:
            return session.transaction(op, params, **kw)
        except PtpError as e:
            raise e.error() from None
        except Disconnected:
            self._disconnected()
            raise

    def _disconnected(self) -> None:
        if not self._gone:
            self._gone = True
            self._stop.set()
            self.host.device_unplugged()

    def usb_backend(self) -> Any:
        """pyusb's backend: None for the real one (libusb1); a simulated camera's in tests."""
        return None

    def _open(self) -> None:
        self.usb = UsbPort(self.port, (6, 1, 1), backend=self.usb_backend(), accept=_has_ptp_endpoints)
        self.usb.open()
        self.session = PtpSession(self.usb)
        try:
            # The session first: a camera that still has one open (the service was
            # killed) answers OpenSession with SessionAlreadyOpen, which a Device Reset
            # clears; GetDeviceInfo outside of it could meet unknown transaction ids.
            self.session.open_session()
            self.info = self.session.device_info()
        except PtpError as e:
            self._close()
            raise e.error() from None
        except BaseException:
            self._close()
            raise
        self._gone = False
        self._stop = threading.Event()
        self._start_thread(self._events, "ptp-events")

    def _close(self) -> None:
        self._stop.set()
        session, self.session = self.session, None
        if session is not None and not self._gone:
            try:
                session.close_session()
            except (StillError, PtpError):
                pass
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=2.0)
        self._threads = []
        if self.usb is not None:
            self.usb.close()
            self.usb = None

    def _start_thread(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=f"{name}-{self.config.id}", daemon=True)
        self._threads.append(thread)
        thread.start()

    # -- device half ------------------------------------------------------------------------
    def initialize(self, port: str, mode: Mode) -> DeviceInfo:
        self.port = port
        self.mode = mode
        self._open()
        assert self.info is not None and self.session is not None
        self._load_storages()
        self._start_listing()
        info = self.info
        capabilities = ["storage", "events"]
        if Op.InitiateCapture in info.operations:
            capabilities.append("capture")
        if Op.DeleteObject in info.operations:
            capabilities.append("delete")
        if Op.GetThumb in info.operations:
            capabilities.append("thumbnails")
        props = self.config.properties
        return DeviceInfo(
            name=self.config.name or " ".join(p for p in (info.manufacturer, info.model) if p) or "PTP camera",
            vendor=info.manufacturer or props.get("ID_VENDOR", ""), model=info.model or props.get("ID_MODEL", ""),
            serial=info.serial or props.get("ID_SERIAL_SHORT", ""), kind="camera",
            capabilities=tuple(capabilities), event_names=EVENTS)

    def _load_storages(self) -> None:
        ids = handles(self._call(Op.GetStorageIDs).data)
        found: dict[int, _Storage] = {}
        for storage_id in ids:
            if storage_id & 0xFFFF == 0:
                continue  # a slot with no logical storage (no card)
            try:
                found[storage_id] = _Storage(storage_id, StorageInfo.parse(
                    self._call(Op.GetStorageInfo, (storage_id,)).data))
            except NotFound:
                continue
        with self.model_lock:
            self.storages = found
            self.objects = {}

    def _start_listing(self) -> None:
        self.listing = True
        self.listed = 0
        self._start_thread(self._list_all, "ptp-listing")

    def _list_all(self) -> None:
        """The background listing: every storage's objects, walking folders."""
        try:
            for storage_id in list(self.storages):
                if self._stop.is_set():
                    return
                self._walk(storage_id)
        except StillError as e:
            if not self._stop.is_set():
                self.log.warning("listing the camera's pictures stopped", error=e.message, listed=self.listed)
        finally:
            self.listing = False
            if not self._stop.is_set():
                self.log.info("camera's pictures listed", objects=self.listed)
                self.host.tree_changed()

    def _walk(self, storage_id: int) -> None:
        """One storage's objects into the model, folder by folder (some responders
        list only a folder's own children, whatever the parent asked for), telling
        the service every LISTING_REPORT seconds that the tree has grown."""
        last = time.monotonic()
        pending = [ROOT_LEVEL]
        while pending and not self._stop.is_set():
            for handle in self._children(storage_id, pending.pop(0)):
                if self._stop.is_set() or storage_id not in self.storages:
                    return  # stopping, or the card was pulled
                obj = self._fetch(handle)
                if obj is None:
                    continue
                with self.model_lock:
                    storage = self.storages.get(storage_id)
                    if storage is None or handle in self.objects:
                        continue
                    self.objects[handle] = obj
                    parent = self.objects.get(obj.info.parent)
                    (parent.children if parent is not None else storage.top).append(handle)
                    self.listed += 1
                if obj.info.is_folder:
                    pending.append(handle)
                if time.monotonic() - last > LISTING_REPORT:
                    last = time.monotonic()
                    self.host.tree_changed()

    def _children(self, storage_id: int, parent: int) -> tuple[int, ...]:
        try:
            found = handles(self._call(Op.GetObjectHandles, (storage_id, 0, parent)).data)
        except (InvalidArgument, NotSupported, NotFound):
            if parent != ROOT_LEVEL:
                raise
            # Some responders do not know 0xFFFFFFFF for the top level: 0 then (all, or the top level).
            found = handles(self._call(Op.GetObjectHandles, (storage_id, 0, 0)).data)
        return found

    def _fetch(self, handle: int) -> _Object | None:
        try:
            return _Object(handle, ObjectInfo.parse(self._call(Op.GetObjectInfo, (handle,)).data))
        except NotFound:
            return None

    def shutdown(self) -> None:
        self._close()

    def release_port(self) -> None:
        """Another program takes the camera: close the session, let go of the interface."""
        self._close()

    def reclaim_port(self) -> None:
        self._open()
        self._load_storages()
        self._start_listing()
        self.host.tree_changed()

    def get_status(self, mode: Mode) -> dict[str, Any]:
        session = self._session()
        status = session.status()
        with self.model_lock:
            return {"online": True, "ptp_status": code_name(status), "session_open": session.open,
                    "storages": len(self.storages), "objects": len(self.objects), "listing": self.listing}

    def reset(self) -> None:
        """Device Reset (the class request), then a new session."""
        self._session().reset()
        self._session().open_session()

    def diagnostic(self) -> dict[str, Any]:
        info = self.info
        assert info is not None
        return {"result": "pass", "ptp_status": code_name(self._session().status()),
                "operations": ", ".join(sorted(code_name(o) for o in info.operations)),
                "events": ", ".join(sorted(code_name(e) for e in info.events)),
                "vendor_extension": info.vendor_extension, "device_version": info.version}

    # -- events ---------------------------------------------------------------------------------
    def _events(self) -> None:
        """The interrupt endpoint, read on this thread (blocking, with a timeout so that
        stopping is noticed), never polled from the event loop."""
        session = self.session
        while session is not None and not self._stop.is_set():
            try:
                event = session.read_event(500)
            except Disconnected:
                self._disconnected()
                return
            except StillError as e:
                if self._stop.is_set():
                    return
                self.log.warning("reading the camera's events failed", error=e.message)
                time.sleep(0.5)
                continue
            if event is None:
                continue
            try:
                self._event(event.code, event.params, event.transaction)
            except StillError as e:
                self.log.warning("handling a camera event failed", event=code_name(event.code), error=e.message)

    def _event(self, code: int, params: tuple[int, ...], transaction: int = 0) -> None:
        first = params[0] if params else 0
        self.log.debug("camera event", ptp_event=code_name(code), params=params)
        if code == Event.ObjectAdded:
            obj = self._fetch(first)
            if obj is None:
                return
            with self.model_lock:
                storage = self.storages.get(obj.info.storage)
                if storage is None or first in self.objects:
                    return
                self.objects[first] = obj
                parent = self.objects.get(obj.info.parent)
                (parent.children if parent is not None else storage.top).append(first)
            path = self.path_of(first)
            kind = "new-picture" if is_picture(obj.info.format, obj.info.filename) else "new-file"
            self.host.tree_changed(DeviceEvent(kind, {"item": path, "name": obj.info.filename, "handle": first,
                                                      "format": mime_of(obj.info.format, obj.info.filename)}))
        elif code == Event.ObjectRemoved:
            path = self.path_of(first)
            if self._forget(first):
                self.host.tree_changed(DeviceEvent("picture-removed", {"item": path, "handle": first}))
        elif code == Event.ObjectInfoChanged:
            obj = self._fetch(first)
            if obj is not None:
                with self.model_lock:
                    known = self.objects.get(first)
                    if known is not None:
                        known.info = obj.info
                self.host.tree_changed()
        elif code == Event.StoreAdded:
            try:
                info = StorageInfo.parse(self._call(Op.GetStorageInfo, (first,)).data)
            except NotFound:
                return
            with self.model_lock:
                self.storages[first] = _Storage(first, info)
            self._start_thread(lambda: self._list_storage(first), "ptp-listing")
            self.host.tree_changed(DeviceEvent("storage-added", {"item": f"Root/{_storage_name(first)}",
                                                                 "storage": first}))
        elif code == Event.StoreRemoved:
            with self.model_lock:
                storage = self.storages.pop(first, None)
                if storage is not None:
                    for handle in [h for h, o in self.objects.items() if o.info.storage == first]:
                        del self.objects[handle]
            if storage is not None:
                self.host.tree_changed(DeviceEvent("storage-removed", {"item": f"Root/{_storage_name(first)}",
                                                                       "storage": first}))
        elif code == Event.CaptureComplete:
            self.host.emit_event(DeviceEvent("capture-complete", {"transaction": transaction}))
        elif code == Event.DeviceInfoChanged:
            try:
                self.info = self._session().device_info()
            except (StillError, PtpError) as e:
                self.log.warning("re-reading the camera's DeviceInfo failed", error=str(e))
        elif code == Event.StorageInfoChanged:
            try:
                info = StorageInfo.parse(self._call(Op.GetStorageInfo, (first,)).data)
            except NotFound:
                return
            with self.model_lock:
                if first in self.storages:
                    self.storages[first].info = info
            self.host.tree_changed()

    def _list_storage(self, storage_id: int) -> None:
        """A card put in: its objects, on a thread of its own."""
        try:
            self._walk(storage_id)
        except StillError as e:
            self.log.warning("listing a new storage stopped", storage=f"{storage_id:08x}", error=e.message)
        self.host.tree_changed()

    def _forget(self, handle: int) -> bool:
        with self.model_lock:
            obj = self.objects.pop(handle, None)
            if obj is None:
                return False
            for child in list(obj.children):
                self._forget(child)
            parent = self.objects.get(obj.info.parent)
            siblings = parent.children if parent is not None else \
                self.storages[obj.info.storage].top if obj.info.storage in self.storages else []
            if handle in siblings:
                siblings.remove(handle)
            return True

    # -- item half ------------------------------------------------------------------------------
    def path_of(self, handle: int) -> str:
        """The item path of an object (names as :meth:`build_item_tree` gives them)."""
        with self.model_lock:
            names = []
            obj = self.objects.get(handle)
            storage = obj.info.storage if obj is not None else 0
            while obj is not None:
                names.append(self._names_of(obj.info.parent, storage)[obj.handle])
                obj = self.objects.get(obj.info.parent)
            return "/".join(["Root", _storage_name(storage), *reversed(names)])

    def _names_of(self, parent: int, storage: int) -> dict[int, str]:
        """The item names of a folder's (or a storage's top level's) objects: the file
        names, made unique where two would look the same on the bus."""
        obj = self.objects.get(parent)
        if obj is not None:
            siblings = obj.children
        else:
            found = self.storages.get(storage)
            siblings = found.top if found is not None else []
        names: dict[int, str] = {}
        seen: set[str] = set()
        for handle in sorted(siblings):
            child = self.objects.get(handle)
            if child is None:
                continue
            name = child.info.filename or f"object-{handle:08x}"
            if _UNSAFE.sub("_", name) in seen:
                name = f"{name}~{handle:08x}"
            seen.add(_UNSAFE.sub("_", name))
            names[handle] = name
        return names

    def build_item_tree(self) -> DriverItem:
        info = self.info
        assert info is not None
        root = DriverItem("Root", "device", [
            PropertySpec("vendor", "s", info.manufacturer, access=Access.READ),
            PropertySpec("model", "s", info.model, access=Access.READ),
            PropertySpec("serial", "s", info.serial, access=Access.READ),
            PropertySpec("device_version", "s", info.version, access=Access.READ),
            PropertySpec("listing", "b", self.listing, access=Access.READ,
                         description="the camera's pictures are still being listed (the tree grows meanwhile)"),
            PropertySpec("objects", "u", len(self.objects), access=Access.READ, description="objects listed"),
        ])
        root.add_to_tree()
        with self.model_lock:
            for storage_id in sorted(self.storages):
                storage = self.storages[storage_id]
                item = _item(_storage_name(storage_id), "storage", STORAGE_SPECS, _storage_values(storage))
                root.add_child(item)
                self._add_children(item, storage.top, 0, storage_id)
        return root

    def _add_children(self, parent_item: DriverItem, siblings: list[int], parent: int, storage: int) -> None:
        names = self._names_of(parent, storage)
        for handle in sorted(siblings):
            obj = self.objects.get(handle)
            if obj is None or handle not in names:
                continue
            if obj.info.is_folder:
                item = _item(names[handle], "folder", FOLDER_SPECS, {
                    "name": obj.info.filename, "modified": ptp_date(obj.info.modified), "handle": handle})
                parent_item.add_child(item)
                self._add_children(item, obj.children, handle, storage)
            else:
                parent_item.add_child(_item(names[handle], "picture" if is_picture(obj.info.format, obj.info.filename) else "file",
                                            FILE_SPECS, _file_values(obj)))

    def _object(self, item: DriverItem) -> _Object:
        handle = item.values.get("handle")
        with self.model_lock:
            obj = self.objects.get(handle) if isinstance(handle, int) else None
        if obj is None:
            raise NotFound(f"the camera no longer has {item.path}")
        return obj

    def open_file(self, item: DriverItem, variant: str, mode: Mode, cancel: threading.Event,
                  span: tuple[int, int | None] | None = None) -> _PtpFile:
        self.require_data(mode)
        obj = self._object(item)
        name = obj.info.filename
        if span is not None:
            return self._partial(obj, span, cancel)
        if variant == "thumbnail":
            if not obj.info.thumb_format or not obj.info.thumb_size:
                raise NotFound(f"the camera has no thumbnail of {item.path}")
            info = FileInfo(name, obj.info.thumb_size, mime_of(obj.info.thumb_format))
            op = Op.GetThumb
        else:
            info = FileInfo(name, obj.info.size, mime_of(obj.info.format, name))
            op = Op.GetObject
        session = self._session()
        if not session.supports(op):
            raise NotSupported(f"the camera does not offer {code_name(op)}")

        def run(write: Callable[[memoryview], None]) -> None:
            self._call(op, (obj.handle,), sink=write, cancel=cancel)

        return _PtpFile(info, run)

    def _partial(self, obj: _Object, span: tuple[int, int | None], cancel: threading.Event) -> _PtpFile:
        """Part of an object, with GetPartialObject (in pieces, as its offset is 32 bits)."""
        if not self._session().supports(Op.GetPartialObject):
            raise NotSupported("the camera does not offer GetPartialObject: only whole pictures can be copied")
        offset, length = span
        size = obj.info.size
        if offset > size:
            raise InvalidArgument(f"offset {offset} is beyond the end of {obj.info.filename} ({size} bytes)")
        length = size - offset if length is None else min(length, size - offset)
        if offset + length > 0xFFFFFFFF:
            raise NotSupported("GetPartialObject reaches only the first 4 GiB of an object")

        def run(write: Callable[[memoryview], None]) -> None:
            done = 0
            while done < length:
                if cancel.is_set():
                    return
                piece = min(PARTIAL_PIECE, length - done)
                reply = self._call(Op.GetPartialObject, (obj.handle, offset + done, piece), sink=write,
                                   cancel=cancel)
                sent = reply.params[0] if reply.params else piece
                if sent == 0:
                    return
                done += sent

        return _PtpFile(FileInfo(obj.info.filename, length, mime_of(obj.info.format, obj.info.filename)), run)

    def command(self, item: DriverItem, command: str, mode: Mode) -> None:
        if command == "synchronize":
            # Everything listed again, on this thread (the caller waits); a background
            # listing still running adds to the same model without harm.
            self._load_storages()
            self.listed = 0
            for storage_id in list(self.storages):
                self._walk(storage_id)
            return
        if command == "capture":
            self.require_data(mode, "taking a picture")
            self._call(Op.InitiateCapture, (0, 0))  # the camera's own storage and format
            return
        if command == "delete":
            self.require_data(mode, "deleting a picture")
            obj = self._object(item)
            self._call(Op.DeleteObject, (obj.handle, 0))
            self._forget(obj.handle)
            return
        super().command(item, command, mode)


def _storage_name(storage_id: int) -> str:
    return f"store-{storage_id:08x}"


def _item(name: str, kind: str, specs: dict[str, PropertySpec], values: dict[str, Any]) -> DriverItem:
    item = DriverItem(name, kind)
    item.specs = specs
    item.values = values
    return item


def _storage_values(storage: _Storage) -> dict[str, Any]:
    info = storage.info
    return {"description": info.description, "label": info.label, "capacity": info.capacity,
            "free_space": info.free_bytes, "free_images": info.free_images,
            "storage_type": STORAGE_TYPES.get(info.storage_type, str(info.storage_type)),
            "access": ACCESS.get(info.access, str(info.access)), "storage_id": storage.id}


def _file_values(obj: _Object) -> dict[str, Any]:
    info = obj.info
    return {"name": info.filename, "size": info.size, "format": mime_of(info.format, info.filename),
            "ptp_format": info.format,
            "width": info.width, "height": info.height, "bit_depth": info.bit_depth,
            "captured": ptp_date(info.captured), "modified": ptp_date(info.modified), "thumb_size": info.thumb_size,
            "thumb_format": mime_of(info.thumb_format) if info.thumb_format else "", "thumb_width": info.thumb_width,
            "thumb_height": info.thumb_height, "protected": bool(info.protection), "handle": obj.handle}


__all__ = ["EVENTS", "PtpCamera"]
