"""PTP (ISO 15740, PIMA 15740) over USB: containers, codes and datasets.

A *container*, little endian: u32 length (the 12-byte header included), u16 type
(1 command, 2 data, 3 response, 4 event), u16 code, u32 transaction id, then up
to five u32 parameters (command, response, event) or the data. Dataset strings
are a u8 count of UTF-16LE units, the NUL included (0: empty); arrays a u32
count, then the elements.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from stillsvc.common.errors import (
    AccessDenied,
    Busy,
    Cancelled,
    Failed,
    InvalidArgument,
    NotFound,
    NotSupported,
    StillError,
)

HEADER = struct.Struct("<IHHI")


class ContainerType(enum.IntEnum):
    COMMAND = 1
    DATA = 2
    RESPONSE = 3
    EVENT = 4


class Op(enum.IntEnum):
    GetDeviceInfo = 0x1001
    OpenSession = 0x1002
    CloseSession = 0x1003
    GetStorageIDs = 0x1004
    GetStorageInfo = 0x1005
    GetNumObjects = 0x1006
    GetObjectHandles = 0x1007
    GetObjectInfo = 0x1008
    GetObject = 0x1009
    GetThumb = 0x100A
    DeleteObject = 0x100B
    SendObjectInfo = 0x100C
    SendObject = 0x100D
    InitiateCapture = 0x100E
    FormatStore = 0x100F
    ResetDevice = 0x1010
    GetDevicePropDesc = 0x1014
    GetDevicePropValue = 0x1015
    GetPartialObject = 0x101B


class Response(enum.IntEnum):
    OK = 0x2001
    GeneralError = 0x2002
    SessionNotOpen = 0x2003
    InvalidTransactionID = 0x2004
    OperationNotSupported = 0x2005
    ParameterNotSupported = 0x2006
    IncompleteTransfer = 0x2007
    InvalidStorageID = 0x2008
    InvalidObjectHandle = 0x2009
    DevicePropNotSupported = 0x200A
    InvalidObjectFormatCode = 0x200B
    StoreFull = 0x200C
    ObjectWriteProtected = 0x200D
    StoreReadOnly = 0x200E
    AccessDenied = 0x200F
    NoThumbnailPresent = 0x2010
    SelfTestFailed = 0x2011
    PartialDeletion = 0x2012
    StoreNotAvailable = 0x2013
    SpecificationByFormatUnsupported = 0x2014
    NoValidObjectInfo = 0x2015
    InvalidCodeFormat = 0x2016
    UnknownVendorCode = 0x2017
    CaptureAlreadyTerminated = 0x2018
    DeviceBusy = 0x2019
    InvalidParentObject = 0x201A
    InvalidDevicePropFormat = 0x201B
    InvalidDevicePropValue = 0x201C
    InvalidParameter = 0x201D
    SessionAlreadyOpen = 0x201E
    TransactionCancelled = 0x201F
    SpecificationOfDestinationUnsupported = 0x2020


class Event(enum.IntEnum):
    CancelTransaction = 0x4001
    ObjectAdded = 0x4002
    ObjectRemoved = 0x4003
    StoreAdded = 0x4004
    StoreRemoved = 0x4005
    DevicePropChanged = 0x4006
    ObjectInfoChanged = 0x4007
    DeviceInfoChanged = 0x4008
    RequestObjectTransfer = 0x4009
    StoreFull = 0x400A
    DeviceReset = 0x400B
    StorageInfoChanged = 0x400C
    CaptureComplete = 0x400D
    UnreportedStatus = 0x400E


#: Class requests of the USB still image class (wIndex = the interface).
REQUEST_CANCEL = 0x64
REQUEST_RESET = 0x66
REQUEST_STATUS = 0x67

#: Object formats: (MIME type, picture?).
ASSOCIATION = 0x3001
FORMATS: dict[int, tuple[str, bool]] = {
    0x3000: ("application/octet-stream", False), 0x3001: ("inode/directory", False), 0x3002: ("text/x-script", False),
    0x3003: ("application/x-executable", False), 0x3004: ("text/plain", False), 0x3005: ("text/html", False),
    0x3006: ("application/x-dpof", False), 0x3007: ("audio/x-aiff", False), 0x3008: ("audio/wav", False),
    0x3009: ("audio/mpeg", False), 0x300A: ("video/x-msvideo", False), 0x300B: ("video/mpeg", False),
    0x300C: ("video/x-ms-asf", False), 0x3801: ("image/jpeg", True), 0x3802: ("image/tiff", True),
    0x3803: ("image/x-flashpix", True), 0x3804: ("image/bmp", True), 0x3805: ("image/x-ciff", True),
    0x3807: ("image/gif", True), 0x3808: ("image/jpeg", True), 0x3809: ("image/x-photo-cd", True),
    0x380A: ("image/x-pict", True), 0x380B: ("image/png", True), 0x380D: ("image/tiff", True),
    0x380E: ("image/tiff", True), 0x380F: ("image/jp2", True), 0x3810: ("image/jpx", True),
    0x3811: ("image/x-dng", True), 0xB103: ("image/x-canon-crw", True), 0xB104: ("image/x-canon-cr2", True),
    0xB982: ("video/mp4", False), 0xB984: ("video/3gpp", False), 0xBA05: ("audio/x-mpegurl", False),
}


UNDEFINED = 0x3000
#: What a file name says when the format code says nothing (0x3000 "Undefined": QEMU's
#: usb-mtp and some phones report every file so): (MIME type, picture?).
EXTENSIONS: dict[str, tuple[str, bool]] = {
    ".jpg": ("image/jpeg", True), ".jpeg": ("image/jpeg", True), ".png": ("image/png", True),
    ".tif": ("image/tiff", True), ".tiff": ("image/tiff", True), ".gif": ("image/gif", True),
    ".bmp": ("image/bmp", True), ".heic": ("image/heic", True), ".heif": ("image/heif", True),
    ".webp": ("image/webp", True), ".dng": ("image/x-dng", True), ".cr2": ("image/x-canon-cr2", True),
    ".cr3": ("image/x-canon-cr3", True), ".nef": ("image/x-nikon-nef", True), ".arw": ("image/x-sony-arw", True),
    ".orf": ("image/x-olympus-orf", True), ".rw2": ("image/x-panasonic-rw2", True),
    ".raf": ("image/x-fuji-raf", True), ".mp4": ("video/mp4", False), ".mov": ("video/quicktime", False),
    ".txt": ("text/plain", False),
}


def _described(format_code: int, filename: str) -> tuple[str, bool]:
    if format_code == UNDEFINED and filename:
        extension = filename[filename.rfind("."):].lower() if "." in filename else ""
        if extension in EXTENSIONS:
            return EXTENSIONS[extension]
    return FORMATS.get(format_code, ("application/octet-stream", False))


def mime_of(format_code: int, filename: str = "") -> str:
    """The MIME type of an object: by its format code, or (code Undefined) its name."""
    return _described(format_code, filename)[0]


def is_picture(format_code: int, filename: str = "") -> bool:
    return _described(format_code, filename)[1]


def code_name(code: int) -> str:
    for kind in (Op, Response, Event):
        try:
            return kind(code).name
        except ValueError:
            continue
    return f"0x{code:04x}"


#: What a PTP response means to a client.
_ERRORS: dict[int, type[StillError]] = {
    Response.DeviceBusy: Busy, Response.InvalidObjectHandle: NotFound, Response.InvalidStorageID: NotFound,
    Response.StoreNotAvailable: NotFound, Response.InvalidParentObject: NotFound,
    Response.OperationNotSupported: NotSupported, Response.ParameterNotSupported: NotSupported,
    Response.NoThumbnailPresent: NotFound, Response.SpecificationByFormatUnsupported: NotSupported,
    Response.AccessDenied: AccessDenied, Response.ObjectWriteProtected: AccessDenied,
    Response.StoreReadOnly: AccessDenied, Response.TransactionCancelled: Cancelled,
    Response.InvalidParameter: InvalidArgument, Response.InvalidObjectFormatCode: InvalidArgument,
    Response.InvalidCodeFormat: InvalidArgument,
}


class PtpError(Exception):
    """A response other than OK: :meth:`error` is the service's error for it."""

    def __init__(self, op: int, code: int, params: tuple[int, ...] = ()) -> None:
        self.op = op
        self.code = code
        self.params = params
        super().__init__(f"the camera answered {code_name(code)} (0x{code:04x}) to {code_name(op)}")

    def error(self) -> StillError:
        error = _ERRORS.get(self.code, Failed)(str(self))
        error.ptp_code = self.code  # type: ignore[attr-defined]
        return error


# -- containers ----------------------------------------------------------------------------------


def command(code: int, transaction: int, params: tuple[int, ...] = ()) -> bytes:
    if len(params) > 5:
        raise ValueError("a PTP command has at most five parameters")
    return HEADER.pack(HEADER.size + 4 * len(params), ContainerType.COMMAND, code, transaction) + \
        struct.pack(f"<{len(params)}I", *params)


def data_header(code: int, transaction: int, size: int) -> bytes:
    return HEADER.pack(HEADER.size + size, ContainerType.DATA, code, transaction)


@dataclass(frozen=True)
class Container:
    length: int
    type: int
    code: int
    transaction: int
    params: tuple[int, ...] = ()


def parse_header(data: bytes | memoryview) -> Container:
    if len(data) < HEADER.size:
        raise Failed(f"the camera sent a container of {len(data)} bytes, shorter than its header")
    length, kind, code, transaction = HEADER.unpack_from(data)
    if length < HEADER.size:
        raise Failed(f"the camera sent a container whose length ({length}) is shorter than its header")
    return Container(length, kind, code, transaction)


def parse_params(data: bytes | memoryview) -> Container:
    """A response or event container with its parameters."""
    head = parse_header(data)
    count = min(5, (min(head.length, len(data)) - HEADER.size) // 4)
    params = struct.unpack_from(f"<{count}I", data, HEADER.size) if count > 0 else ()
    return Container(head.length, head.type, head.code, head.transaction, tuple(params))


# -- datasets ----------------------------------------------------------------------------------


class Reader:
    """Reads a PTP dataset field by field; a dataset that ends early is a clear error."""

    def __init__(self, data: bytes | bytearray | memoryview, what: str) -> None:
        self.data = bytes(data)
        self.pos = 0
        self.what = what

    def _take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise Failed(f"the camera's {self.what} ends early (at byte {self.pos} of {len(self.data)})")
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value

    def u8(self) -> int:
        return int(self._take("<B"))

    def u16(self) -> int:
        return int(self._take("<H"))

    def u32(self) -> int:
        return int(self._take("<I"))

    def u64(self) -> int:
        return int(self._take("<Q"))

    def string(self) -> str:
        count = self.u8()
        if count == 0:
            return ""
        raw = self.data[self.pos:self.pos + 2 * count]
        if len(raw) < 2 * count:
            raise Failed(f"the camera's {self.what} ends early in a string")
        self.pos += 2 * count
        return raw.decode("utf-16-le", "replace").rstrip("\x00")

    def array16(self) -> tuple[int, ...]:
        count = self.u32()
        if self.pos + 2 * count > len(self.data):
            raise Failed(f"the camera's {self.what} ends early in an array")
        values = struct.unpack_from(f"<{count}H", self.data, self.pos)
        self.pos += 2 * count
        return tuple(values)

    def array32(self) -> tuple[int, ...]:
        count = self.u32()
        if self.pos + 4 * count > len(self.data):
            raise Failed(f"the camera's {self.what} ends early in an array")
        values = struct.unpack_from(f"<{count}I", self.data, self.pos)
        self.pos += 4 * count
        return tuple(values)


def handles(data: bytes | bytearray | memoryview) -> tuple[int, ...]:
    return Reader(data, "list of handles").array32()


@dataclass(frozen=True)
class DeviceInfo:
    standard_version: int
    vendor_extension_id: int
    vendor_extension_version: int
    vendor_extension: str
    functional_mode: int
    operations: frozenset[int]
    events: frozenset[int]
    properties: frozenset[int]
    capture_formats: tuple[int, ...]
    image_formats: tuple[int, ...]
    manufacturer: str
    model: str
    version: str
    serial: str

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> DeviceInfo:
        r = Reader(data, "DeviceInfo")
        return cls(r.u16(), r.u32(), r.u16(), r.string(), r.u16(), frozenset(r.array16()), frozenset(r.array16()),
                   frozenset(r.array16()), r.array16(), r.array16(), r.string(), r.string(), r.string(), r.string())


@dataclass(frozen=True)
class StorageInfo:
    storage_type: int
    filesystem_type: int
    access: int  # 0 read-write, 1 read-only without deletion, 2 read-only with deletion
    capacity: int
    free_bytes: int
    free_images: int
    description: str
    label: str

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> StorageInfo:
        r = Reader(data, "StorageInfo")
        return cls(r.u16(), r.u16(), r.u16(), r.u64(), r.u64(), r.u32(), r.string(), r.string())


STORAGE_TYPES = {0: "undefined", 1: "fixed-rom", 2: "removable-rom", 3: "fixed-ram", 4: "removable-ram"}
ACCESS = {0: "read-write", 1: "read-only", 2: "read-only-with-deletion"}


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    storage: int
    format: int
    protection: int
    size: int
    thumb_format: int
    thumb_size: int
    thumb_width: int
    thumb_height: int
    width: int
    height: int
    bit_depth: int
    parent: int
    association_type: int
    association_desc: int
    sequence: int
    filename: str
    captured: str
    modified: str
    keywords: str = field(default="")

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> ObjectInfo:
        r = Reader(data, "ObjectInfo")
        values = (r.u32(), r.u16(), r.u16(), r.u32(), r.u16(), r.u32(), r.u32(), r.u32(), r.u32(), r.u32(),
                  r.u32(), r.u32(), r.u16(), r.u32(), r.u32(), r.string(), r.string(), r.string())
        keywords = r.string() if r.pos < len(r.data) else ""
        return cls(*values, keywords=keywords)

    @property
    def is_folder(self) -> bool:
        return self.format == ASSOCIATION


def ptp_date(text: str) -> str:
    """A PTP date (``YYYYMMDDThhmmss[.s][Z|±hhmm]``) as ISO 8601, or "" when it is not one."""
    if not text:
        return ""
    core, zone = text, ""
    for mark in ("Z", "+", "-"):
        if mark in core[8:]:
            at = core.index(mark, 8)
            core, zone = core[:at], core[at:]
            break
    core = core.split(".")[0]  # tenths of a second
    try:
        when = datetime.strptime(core, "%Y%m%dT%H%M%S")
    except ValueError:
        return ""
    iso = when.isoformat()
    if zone == "Z":
        return iso + "Z"
    if len(zone) == 5:
        return iso + zone[:3] + ":" + zone[3:]
    return iso


__all__ = ["ASSOCIATION", "Container", "ContainerType", "DeviceInfo", "Event", "HEADER", "ObjectInfo", "Op",
           "PtpError", "Reader", "Response", "StorageInfo", "code_name", "command", "data_header", "handles",
           "is_picture", "mime_of", "parse_header", "parse_params", "ptp_date"]
