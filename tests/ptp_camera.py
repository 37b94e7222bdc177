"""A simulated PTP camera behind a pyusb backend, written from the specifications
(PIMA 15740:2000 / ISO 15740 "Picture Transfer Protocol" and the USB Still Image
Capture Device Definition 1.0, class 06/01/01), for tests and benchmarks.

    cam = SimulatedCamera()
    dcim = cam.add_folder(None, 0, "DCIM")
    cam.add_file(None, dcim, "IMG_0001.JPG")              # a real (tiny) JPEG
    dev = usb.core.find(backend=SimulatedBackend(cam), idVendor=0x04A9)

`SimulatedBackend` is a `usb.backend.IBackend`: pyusb (and any initiator written on
it) talks to the camera exactly as it would through libusb: descriptors, string
descriptors, SET_CONFIGURATION, claim/release, bulk and interrupt transfers with USB
packet semantics, class requests, and the exceptions the libusb1 backend raises.
Nothing here imports stillsvc.

USB side
--------
One device (bus 1, address 2, 04a9:3218 unless told otherwise), one configuration
(value 1, already selected, as Linux leaves a device), one interface 0, class 6/1/1,
endpoints bulk IN 0x81 and bulk OUT 0x02 (wMaxPacketSize 512: high speed; 64: full
speed) and interrupt IN 0x83 (64 bytes, bInterval 4). Strings: 1 manufacturer,
2 product, 3 serial, LANGID 0x0409.

* Bulk OUT (`bulk_write`): containers are reassembled from their length field, so a
  command or data container may come in several writes (header, then payload). A
  data phase whose container length is a multiple of wMaxPacketSize is complete only
  once the host's zero-length write arrives (the device does not answer before); a
  stray zero-length write between transactions is absorbed. A container that breaks
  the protocol (not a command where a command is due, a data container of another
  operation or transaction, a bad length, a non-empty write where the ZLP is owed)
  puts the device in the error state: both bulk endpoints halt, Get Device Status
  answers TransactionCancelled (0x201F) with the halted endpoint addresses until the
  host clears both halts, and the reason is appended to `camera.protocol_errors`.
* Bulk IN (`bulk_read`): each container is one USB transfer cut in packets of
  wMaxPacketSize. A read of N bytes returns min(N, what is left of the current
  container), never bytes of the next container; what it leaves stays for the next
  read. A container whose length is a multiple of wMaxPacketSize ends with a
  zero-length packet, as on the wire: a read that asks for more than is left gets the
  rest and the ZLP ends that read (it is consumed); a read that ends exactly on the
  last byte leaves the ZLP, which the next read returns as 0 bytes. Nothing pending:
  the read waits (really, on a condition variable) and raises USBTimeoutError after
  `timeout` ms (0 = wait for ever, as libusb). With `strict_packets=True` a read
  whose size is not a multiple of wMaxPacketSize and which would split a packet raises
  USBError overflow (-8, EOVERFLOW) as a real host controller does.
* Interrupt IN (`intr_read`): one event container per transfer; waits up to
  `timeout` ms (woken at once by an event queued from another thread, by unplug()),
  then raises USBTimeoutError('Operation timed out', -7, ETIMEDOUT).
* Errors are the ones pyusb's libusb1 backend raises: `USBError(msg, -9, EPIPE)` for a
  halted endpoint, `USBError(msg, -4, ENODEV)` once unplugged, `USBError(msg, -6,
  EBUSY)` when the interface is claimed by another handle or "another program", and
  `USBError(msg, -5, ENOENT)` for what libusb calls NOT_FOUND (releasing an interface
  not claimed, a configuration that does not exist). As on Linux, SET_CONFIGURATION
  while any program has the interface claimed raises EBUSY.
* Control: GET_DESCRIPTOR (device, configuration, string, device qualifier),
  GET/SET_CONFIGURATION, GET_STATUS (device, interface, endpoint halt bit),
  CLEAR_FEATURE/SET_FEATURE ENDPOINT_HALT, GET/SET_INTERFACE; class requests to
  interface 0: Cancel 0x64 (0x21, data u16 0x4001 + u32 TransactionID), Device Reset
  0x66 (0x21), Get Device Status 0x67 (0xA1: u16 length, u16 code, u32 endpoint
  addresses of halted endpoints). Anything else stalls (USBError -9 EPIPE, which is
  what libusb gives for a refused control request). Get Extended Event Data (0x65) is
  not supported (stall).

PTP side: choices made where the specification leaves room
-----------------------------------------------------------
* GetObjectHandles / GetNumObjects (StorageID, ObjectFormatCode, Association): the
  spec's meaning is implemented by default: Association 0x00000000 = every object of
  the storage(s) (the parameter is unused), 0xFFFFFFFF = only the root level, a
  folder's handle = its direct children. StorageID 0xFFFFFFFF = all storages; a
  format code filters (0 = all). `top_level_only=True` mimics QEMU usb-mtp: 0 answers
  the root level too. Handles come in creation order: a folder before its contents.
* DeleteObject: per the spec, the initiator that deleted an object gets no
  ObjectRemoved event for it (`delete_events=True` sends them anyway). A folder is
  deleted with its contents; protected objects stay (PartialDeletion 0x2012).
  DeleteObject(0xFFFFFFFF, format) deletes all objects (of that format).
* Objects removed by the camera itself (remove_object: the user deleted a picture on
  the camera) queue ObjectRemoved, deepest first.
* InitiateCapture(StorageID 0 = first writable store, format 0 = JPEG) answers OK,
  then creates DCIM/100SIMUL/IMG_nnnn.JPG (creating the folders if needed), queueing
  ObjectAdded for each new object, then CaptureComplete; all these events carry the
  InitiateCapture's TransactionID. `capture_delay` seconds delays the capture.
* Events carry TransactionID 0xFFFFFFFF when they are not the result of a transaction
  (`unsolicited_event_tid`). Automatic events are queued only while a session is open,
  with `events=True`, and only for event codes in `events_supported`; CloseSession
  and resets drop the queue. `queue_event()` queues anything, any time.
* Transaction IDs: OpenSession should use 0 (another value is noted in
  protocol_errors but accepted); in a session each operation must use the previous
  ID + 1 (0xFFFFFFFE is followed by 1); otherwise the answer is InvalidTransactionID
  0x2004 (`strict_transaction_ids=False`: accepted, still noted). Outside a session
  IDs are not checked. Every container of a transaction echoes the command's ID.
* Order of checks for a command: transaction ID, busy_next(), operation supported
  (listed in `operations` and implemented, else OperationNotSupported 0x2005),
  session open (all but GetDeviceInfo and OpenSession, else SessionNotOpen 0x2003),
  then the operation's own checks. Absent parameters count as 0. Operations with an
  initiator-to-responder data phase (SendObjectInfo, SendObject, SetDevicePropValue,
  MTP's Set/SendObjectProp*) are not implemented: their data phase is received, then
  OperationNotSupported is answered.
* Cancel (class request) of the transaction in its data-in phase: the rest of its
  data and its response are dropped; bytes still "in flight" remain readable: the
  rest of a packet already partly read, plus `cancel_inflight_packets` packets
  (default 0); after them a read gets nothing and times out (a read asking for more
  than the leftovers returns them after its timeout, as libusb does). During a data-out
  phase: the partial container is dropped. Once the data phase is over (only the
  response is pending) or for another transaction ID, Cancel changes nothing. After a
  cancel that took effect, Get Device Status answers DeviceBusy `cancel_busy_polls`
  times (default 1), then OK. No response container is ever sent for a cancelled
  transaction; the next command is the next transaction (ID + 1).
* Device Reset (class request) and a USB port reset (reset_device) drop everything
  pending, clear halts and close the session. Closing the USB handle does not close
  the PTP session (a real camera keeps it: a new OpenSession answers
  SessionAlreadyOpen 0x201E, with the open session's ID as parameter).
* ObjectInfo of an object > 4 GiB: ObjectCompressedSize 0xFFFFFFFF; its data
  container's length field is 0xFFFFFFFF too. Objects without a thumbnail: ThumbFormat
  0x0000 and sizes 0; GetThumb answers NoThumbnailPresent 0x2010. GetObject of a
  folder sends an empty data phase. GetPartialObject(handle, offset, max): the slice,
  its length as response parameter 1; offset beyond the end: InvalidParameter 0x201D;
  max 0xFFFFFFFF: to the end.
* A storage removed (remove_storage, remove_storage_during_listing) disappears from
  GetStorageIDs; with stale="invalid" (default) its ID answers InvalidStorageID 0x2008
  and its objects' handles InvalidObjectHandle 0x2009, with stale="unavailable" both
  answer StoreNotAvailable 0x2013.

SimulatedCamera(**options)
--------------------------
Identity: manufacturer="stillsvc", model="Simulated Camera", serial="PTPSIM-1",
device_version="1.0", operations=DEFAULT_OPERATIONS, events_supported=DEFAULT_EVENTS,
device_properties=(), capture_formats=(FMT_EXIF_JPEG,), image_formats=None (the
formats present plus Undefined, Association, EXIF/JPEG), vendor_extension_id=0,
vendor_extension_version=0, vendor_extension_desc="", functional_mode=0.
USB: bus=1, address=2, port_numbers=(1,), vendor_id=0x04A9, product_id=0x3218,
bcd_device=0x0100, max_packet_size=512, kernel_driver_active=False.
Behaviour: storage=True (create storage 0x00010001), top_level_only=False, events=True,
delete_events=False, strict_transaction_ids=True, strict_packets=False,
capture_delay=0.0, cancel_busy_polls=1, cancel_inflight_packets=0,
unsolicited_event_tid=0xFFFFFFFF.

Content (all thread-safe; `events=False` on a helper keeps it quiet):
  add_storage(storage_id=None, *, description, label, capacity, free_space=None,
              free_images=None, access=ACCESS_READ_WRITE, storage_type, filesystem_type)
              -> storage ID (next 0x000N0001); queues StoreAdded
  remove_storage(storage_id, *, stale="invalid")            queues StoreRemoved
  add_folder(storage, parent, name, **fields) -> handle      queues ObjectAdded
  add_path(storage, "DCIM/100SIMUL") -> handle of the last folder (mkdir -p)
  add_file(storage, parent, name, data=None, *, size=None, format=FMT_EXIF_JPEG,
           thumb=<default JPEG thumbnail for JPEGs>, width=None, height=None, ...)
           -> handle. data: bytes, or a callable (offset, length) -> bytes together
           with size= (huge objects never held in memory; see pattern_source()); None:
           a valid JPEG for JPEG formats, empty otherwise. storage None = first
           storage, parent 0 = root level.       queues ObjectAdded
  add_many(n, storage=None, parent=0, *, name="IMG_{:05d}.JPG", start=1, data=None,
           size=None, format=FMT_EXIF_JPEG, thumb=...) -> [handles]   (fast: 10,000 in
           well under a second; data and thumbnail shared)
  remove_object(handle) -> removed handles              queues ObjectRemoved (deepest first)
  update_object(handle, **fields)                       queues ObjectInfoChanged
  press_shutter(storage=None) -> handle (a capture started on the camera: ObjectAdded,
           no CaptureComplete)
  queue_event(code, *params, tid=None)
  objects / object(handle) / storages / children(storage, parent)

Faults (all off by default):
  busy_next(n=1)            the next n commands answer DeviceBusy 0x2019
  stall_next_read(abort=True)   the next bulk read raises USBError EPIPE (-9) and 0x81
                            stays halted until CLEAR_FEATURE(ENDPOINT_HALT)/clear_halt;
                            abort=True: the device gave up the transaction (its data and
                            response are dropped; Get Device Status: TransactionCancelled
                            with [0x81] until cleared); abort=False: a transient stall,
                            the read continues where it was once cleared
  timeout_next_read(n=1)    the next n bulk reads wait their whole timeout and raise
                            USBTimeoutError; the pending data stays
  unplug()                  every call now raises USBError ENODEV (-4), blocked reads
                            wake and raise it, the device is no longer enumerated
  plug(address=None)        the device comes back (new address, fresh USB and PTP state,
                            same content); old handles keep raising ENODEV
  remove_storage_during_listing(after_n_infos, storage_id=None, stale="invalid")
                            after the n-th successful GetObjectInfo answer, that
                            object's storage (or storage_id) is removed (StoreRemoved)
  slow_data(bytes_per_second)   GetObject/GetPartialObject/GetThumb data flows at that
                            rate (None: full speed); a read that times out returns the
                            whole packets that made it, as libusb does
  claim_by_other_program() / release_by_other_program()
                            claim_interface (and every transfer) raises USBError EBUSY

Inspection: received (list of Operation: code, params, tid, response,
response_params, data_in, data_out, cancelled; .name), codes_received(), bytes_sent
(bulk IN), bytes_received (bulk OUT), session_open, session_id, interface_claimed,
claim_count, release_count, open_handles, halted (set of endpoint addresses),
cancels (list of (tid, effect)), device_resets, usb_resets, status_requests,
control_requests (bmRequestType, bRequest, wValue, wIndex, length), events_delivered
(list of (code, tid, params)), pending_events(), protocol_errors (list of str).

Module helpers: make_jpeg(width, height, color, size=None) (a valid baseline JPEG,
optionally padded with COM segments to exactly `size` bytes), jpeg_dimensions(),
pattern(offset, length, seed=0) and pattern_source(seed) (deterministic bytes for
callable objects), pack_container/unpack_container, ptp_string, and decoders for the
datasets (decode_device_info, decode_storage_info, decode_object_info,
decode_u32_array) for tests that look at what the camera said.
"""

from __future__ import annotations

import errno
import functools
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import usb.backend
import usb.core

__all__ = [
    "SimulatedCamera", "SimulatedBackend", "SimObject", "SimStorage", "Operation",
    "make_jpeg", "jpeg_dimensions", "pattern", "pattern_source", "pack_container",
    "unpack_container", "ptp_string", "decode_string", "decode_device_info",
    "decode_storage_info", "decode_object_info", "decode_u32_array", "decode_u16_array",
    "DEFAULT_OPERATIONS", "DEFAULT_EVENTS",
]

# ---------------------------------------------------------------------------
# PTP codes (PIMA 15740:2000)
# ---------------------------------------------------------------------------

CONTAINER_COMMAND = 1
CONTAINER_DATA = 2
CONTAINER_RESPONSE = 3
CONTAINER_EVENT = 4
HEADER_SIZE = 12
ALL = 0xFFFFFFFF

OP_GET_DEVICE_INFO = 0x1001
OP_OPEN_SESSION = 0x1002
OP_CLOSE_SESSION = 0x1003
OP_GET_STORAGE_IDS = 0x1004
OP_GET_STORAGE_INFO = 0x1005
OP_GET_NUM_OBJECTS = 0x1006
OP_GET_OBJECT_HANDLES = 0x1007
OP_GET_OBJECT_INFO = 0x1008
OP_GET_OBJECT = 0x1009
OP_GET_THUMB = 0x100A
OP_DELETE_OBJECT = 0x100B
OP_SEND_OBJECT_INFO = 0x100C
OP_SEND_OBJECT = 0x100D
OP_INITIATE_CAPTURE = 0x100E
OP_FORMAT_STORE = 0x100F
OP_RESET_DEVICE = 0x1010
OP_SELF_TEST = 0x1011
OP_SET_OBJECT_PROTECTION = 0x1012
OP_POWER_DOWN = 0x1013
OP_GET_DEVICE_PROP_DESC = 0x1014
OP_GET_DEVICE_PROP_VALUE = 0x1015
OP_SET_DEVICE_PROP_VALUE = 0x1016
OP_RESET_DEVICE_PROP_VALUE = 0x1017
OP_TERMINATE_OPEN_CAPTURE = 0x1018
OP_MOVE_OBJECT = 0x1019
OP_COPY_OBJECT = 0x101A
OP_GET_PARTIAL_OBJECT = 0x101B
OP_INITIATE_OPEN_CAPTURE = 0x101C

OPERATION_NAMES = {
    0x1001: "GetDeviceInfo", 0x1002: "OpenSession", 0x1003: "CloseSession",
    0x1004: "GetStorageIDs", 0x1005: "GetStorageInfo", 0x1006: "GetNumObjects",
    0x1007: "GetObjectHandles", 0x1008: "GetObjectInfo", 0x1009: "GetObject",
    0x100A: "GetThumb", 0x100B: "DeleteObject", 0x100C: "SendObjectInfo",
    0x100D: "SendObject", 0x100E: "InitiateCapture", 0x100F: "FormatStore",
    0x1010: "ResetDevice", 0x1011: "SelfTest", 0x1012: "SetObjectProtection",
    0x1013: "PowerDown", 0x1014: "GetDevicePropDesc", 0x1015: "GetDevicePropValue",
    0x1016: "SetDevicePropValue", 0x1017: "ResetDevicePropValue",
    0x1018: "TerminateOpenCapture", 0x1019: "MoveObject", 0x101A: "CopyObject",
    0x101B: "GetPartialObject", 0x101C: "InitiateOpenCapture",
}

# Operations whose data phase goes from the initiator to the responder.
DATA_OUT_OPERATIONS = frozenset({
    OP_SEND_OBJECT_INFO, OP_SEND_OBJECT, OP_SET_DEVICE_PROP_VALUE,
    0x9804,  # MTP SetObjectPropValue
    0x9806,  # MTP SetObjectPropList
    0x9808,  # MTP SendObjectPropList
    0x9811,  # MTP SetObjectReferences
})

RC_UNDEFINED = 0x2000
RC_OK = 0x2001
RC_GENERAL_ERROR = 0x2002
RC_SESSION_NOT_OPEN = 0x2003
RC_INVALID_TRANSACTION_ID = 0x2004
RC_OPERATION_NOT_SUPPORTED = 0x2005
RC_PARAMETER_NOT_SUPPORTED = 0x2006
RC_INCOMPLETE_TRANSFER = 0x2007
RC_INVALID_STORAGE_ID = 0x2008
RC_INVALID_OBJECT_HANDLE = 0x2009
RC_DEVICE_PROP_NOT_SUPPORTED = 0x200A
RC_INVALID_OBJECT_FORMAT_CODE = 0x200B
RC_STORE_FULL = 0x200C
RC_OBJECT_WRITE_PROTECTED = 0x200D
RC_STORE_READ_ONLY = 0x200E
RC_ACCESS_DENIED = 0x200F
RC_NO_THUMBNAIL_PRESENT = 0x2010
RC_SELF_TEST_FAILED = 0x2011
RC_PARTIAL_DELETION = 0x2012
RC_STORE_NOT_AVAILABLE = 0x2013
RC_SPECIFICATION_BY_FORMAT_UNSUPPORTED = 0x2014
RC_NO_VALID_OBJECT_INFO = 0x2015
RC_INVALID_CODE_FORMAT = 0x2016
RC_UNKNOWN_VENDOR_CODE = 0x2017
RC_CAPTURE_ALREADY_TERMINATED = 0x2018
RC_DEVICE_BUSY = 0x2019
RC_INVALID_PARENT_OBJECT = 0x201A
RC_INVALID_DEVICE_PROP_FORMAT = 0x201B
RC_INVALID_DEVICE_PROP_VALUE = 0x201C
RC_INVALID_PARAMETER = 0x201D
RC_SESSION_ALREADY_OPEN = 0x201E
RC_TRANSACTION_CANCELLED = 0x201F
RC_SPECIFICATION_OF_DESTINATION_UNSUPPORTED = 0x2020

RESPONSE_NAMES = {
    0x2000: "Undefined", 0x2001: "OK", 0x2002: "GeneralError", 0x2003: "SessionNotOpen",
    0x2004: "InvalidTransactionID", 0x2005: "OperationNotSupported",
    0x2006: "ParameterNotSupported", 0x2007: "IncompleteTransfer",
    0x2008: "InvalidStorageID", 0x2009: "InvalidObjectHandle",
    0x200A: "DevicePropNotSupported", 0x200B: "InvalidObjectFormatCode",
    0x200C: "StoreFull", 0x200D: "ObjectWriteProtected", 0x200E: "StoreReadOnly",
    0x200F: "AccessDenied", 0x2010: "NoThumbnailPresent", 0x2011: "SelfTestFailed",
    0x2012: "PartialDeletion", 0x2013: "StoreNotAvailable",
    0x2014: "SpecificationByFormatUnsupported", 0x2015: "NoValidObjectInfo",
    0x2016: "InvalidCodeFormat", 0x2017: "UnknownVendorCode",
    0x2018: "CaptureAlreadyTerminated", 0x2019: "DeviceBusy",
    0x201A: "InvalidParentObject", 0x201B: "InvalidDevicePropFormat",
    0x201C: "InvalidDevicePropValue", 0x201D: "InvalidParameter",
    0x201E: "SessionAlreadyOpen", 0x201F: "TransactionCancelled",
    0x2020: "SpecificationOfDestinationUnsupported",
}

EV_CANCEL_TRANSACTION = 0x4001
EV_OBJECT_ADDED = 0x4002
EV_OBJECT_REMOVED = 0x4003
EV_STORE_ADDED = 0x4004
EV_STORE_REMOVED = 0x4005
EV_DEVICE_PROP_CHANGED = 0x4006
EV_OBJECT_INFO_CHANGED = 0x4007
EV_DEVICE_INFO_CHANGED = 0x4008
EV_REQUEST_OBJECT_TRANSFER = 0x4009
EV_STORE_FULL = 0x400A
EV_DEVICE_RESET = 0x400B
EV_STORAGE_INFO_CHANGED = 0x400C
EV_CAPTURE_COMPLETE = 0x400D
EV_UNREPORTED_STATUS = 0x400E

EVENT_NAMES = {
    0x4001: "CancelTransaction", 0x4002: "ObjectAdded", 0x4003: "ObjectRemoved",
    0x4004: "StoreAdded", 0x4005: "StoreRemoved", 0x4006: "DevicePropChanged",
    0x4007: "ObjectInfoChanged", 0x4008: "DeviceInfoChanged",
    0x4009: "RequestObjectTransfer", 0x400A: "StoreFull", 0x400B: "DeviceReset",
    0x400C: "StorageInfoChanged", 0x400D: "CaptureComplete", 0x400E: "UnreportedStatus",
}

FMT_UNDEFINED = 0x3000
FMT_ASSOCIATION = 0x3001
FMT_SCRIPT = 0x3002
FMT_EXECUTABLE = 0x3003
FMT_TEXT = 0x3004
FMT_HTML = 0x3005
FMT_DPOF = 0x3006
FMT_AIFF = 0x3007
FMT_WAV = 0x3008
FMT_MP3 = 0x3009
FMT_AVI = 0x300A
FMT_MPEG = 0x300B
FMT_ASF = 0x300C
FMT_UNDEFINED_IMAGE = 0x3800
FMT_EXIF_JPEG = 0x3801
FMT_TIFF_EP = 0x3802
FMT_FLASHPIX = 0x3803
FMT_BMP = 0x3804
FMT_CIFF = 0x3805
FMT_GIF = 0x3807
FMT_JFIF = 0x3808
FMT_PCD = 0x3809
FMT_PICT = 0x380A
FMT_PNG = 0x380B
FMT_TIFF = 0x380D
FMT_TIFF_IT = 0x380E
FMT_JP2 = 0x380F
FMT_JPX = 0x3810

ASSOC_UNDEFINED = 0x0000
ASSOC_GENERIC_FOLDER = 0x0001

STORAGE_FIXED_ROM = 0x0001
STORAGE_REMOVABLE_ROM = 0x0002
STORAGE_FIXED_RAM = 0x0003
STORAGE_REMOVABLE_RAM = 0x0004

FS_GENERIC_FLAT = 0x0001
FS_GENERIC_HIERARCHICAL = 0x0002
FS_DCF = 0x0003

ACCESS_READ_WRITE = 0x0000
ACCESS_READ_ONLY = 0x0001            # read-only, objects cannot be deleted
ACCESS_READ_ONLY_DELETABLE = 0x0002  # read-only, objects can be deleted

PROTECTION_NONE = 0x0000
PROTECTION_READ_ONLY = 0x0001

# USB Still Image class requests (bRequest), sent to the interface.
REQ_CANCEL = 0x64
REQ_GET_EXTENDED_EVENT_DATA = 0x65
REQ_DEVICE_RESET = 0x66
REQ_GET_DEVICE_STATUS = 0x67
CANCEL_CODE = 0x4001

DEFAULT_OPERATIONS = (
    OP_GET_DEVICE_INFO, OP_OPEN_SESSION, OP_CLOSE_SESSION, OP_GET_STORAGE_IDS,
    OP_GET_STORAGE_INFO, OP_GET_NUM_OBJECTS, OP_GET_OBJECT_HANDLES, OP_GET_OBJECT_INFO,
    OP_GET_OBJECT, OP_GET_THUMB, OP_DELETE_OBJECT, OP_INITIATE_CAPTURE,
    OP_GET_PARTIAL_OBJECT,
)
DEFAULT_EVENTS = (
    EV_OBJECT_ADDED, EV_OBJECT_REMOVED, EV_STORE_ADDED, EV_STORE_REMOVED,
    EV_DEVICE_PROP_CHANGED, EV_OBJECT_INFO_CHANGED, EV_DEVICE_INFO_CHANGED,
    EV_CAPTURE_COMPLETE,
)

DEFAULT_DATE = "20240102T030405"

# ---------------------------------------------------------------------------
# libusb errors, as pyusb's libusb1 backend turns them into exceptions
# ---------------------------------------------------------------------------

LIBUSB_ERROR_IO = -1
LIBUSB_ERROR_INVALID_PARAM = -2
LIBUSB_ERROR_ACCESS = -3
LIBUSB_ERROR_NO_DEVICE = -4
LIBUSB_ERROR_NOT_FOUND = -5
LIBUSB_ERROR_BUSY = -6
LIBUSB_ERROR_TIMEOUT = -7
LIBUSB_ERROR_OVERFLOW = -8
LIBUSB_ERROR_PIPE = -9

_LIBUSB_MESSAGES = {
    LIBUSB_ERROR_IO: ("Input/output error", errno.EIO),
    LIBUSB_ERROR_INVALID_PARAM: ("Invalid parameter", errno.EINVAL),
    LIBUSB_ERROR_ACCESS: ("Access denied (insufficient permissions)", errno.EACCES),
    LIBUSB_ERROR_NO_DEVICE: ("No such device (it may have been disconnected)", errno.ENODEV),
    LIBUSB_ERROR_NOT_FOUND: ("Entity not found", errno.ENOENT),
    LIBUSB_ERROR_BUSY: ("Resource busy", errno.EBUSY),
    LIBUSB_ERROR_TIMEOUT: ("Operation timed out", errno.ETIMEDOUT),
    LIBUSB_ERROR_OVERFLOW: ("Overflow", errno.EOVERFLOW),
    LIBUSB_ERROR_PIPE: ("Pipe error", errno.EPIPE),
}


def usb_error(code: int) -> usb.core.USBError:
    """The exception pyusb's libusb1 backend raises for a libusb return code."""
    message, err = _LIBUSB_MESSAGES[code]
    if code == LIBUSB_ERROR_TIMEOUT:
        return usb.core.USBTimeoutError(message, code, err)
    return usb.core.USBError(message, code, err)


# ---------------------------------------------------------------------------
# Containers and datasets
# ---------------------------------------------------------------------------

def pack_container(ctype: int, code: int, tid: int, params: Iterable[int] = (),
                   payload: bytes = b"") -> bytes:
    params = tuple(params)
    body = struct.pack("<%dI" % len(params), *params) + payload
    return struct.pack("<IHHI", HEADER_SIZE + len(body), ctype, code, tid) + body


def unpack_container(data: bytes) -> tuple[int, int, int, int, bytes]:
    """(length field, type, code, transaction id, everything after the header)."""
    data = bytes(data)
    if len(data) < HEADER_SIZE:
        raise ValueError("a container is at least 12 bytes, got %d" % len(data))
    length, ctype, code, tid = struct.unpack_from("<IHHI", data)
    return length, ctype, code, tid, data[HEADER_SIZE:]


def container_params(body: bytes) -> tuple[int, ...]:
    return struct.unpack("<%dI" % (len(body) // 4), body[: len(body) // 4 * 4])


def ptp_string(text: str) -> bytes:
    """PTP string: u8 number of UTF-16 units including the terminating NUL, 0 = empty."""
    if not text:
        return b"\x00"
    units = text.encode("utf-16-le")
    if len(units) // 2 > 254:
        units = units[: 254 * 2]
        if 0xD8 <= units[-1] <= 0xDB:  # do not cut a surrogate pair in two
            units = units[:-2]
    return bytes([len(units) // 2 + 1]) + units + b"\x00\x00"


def u16_array(values: Iterable[int]) -> bytes:
    values = tuple(values)
    return struct.pack("<I%dH" % len(values), len(values), *values)


def u32_array(values: Iterable[int]) -> bytes:
    values = tuple(values)
    return struct.pack("<I%dI" % len(values), len(values), *values)


def decode_string(buf: bytes, offset: int = 0) -> tuple[str, int]:
    count = buf[offset]
    offset += 1
    if count == 0:
        return "", offset
    raw = bytes(buf[offset: offset + 2 * count])
    return raw.decode("utf-16-le").removesuffix("\x00"), offset + 2 * count


def decode_u16_array(buf: bytes, offset: int = 0) -> tuple[list[int], int]:
    (n,) = struct.unpack_from("<I", buf, offset)
    return list(struct.unpack_from("<%dH" % n, buf, offset + 4)), offset + 4 + 2 * n


def decode_u32_array(buf: bytes, offset: int = 0) -> tuple[list[int], int]:
    (n,) = struct.unpack_from("<I", buf, offset)
    return list(struct.unpack_from("<%dI" % n, buf, offset + 4)), offset + 4 + 4 * n


def decode_device_info(buf: bytes) -> dict[str, Any]:
    buf = bytes(buf)
    standard, vext_id, vext_version = struct.unpack_from("<HIH", buf)
    off = 8
    vext_desc, off = decode_string(buf, off)
    (mode,) = struct.unpack_from("<H", buf, off)
    off += 2
    info: dict[str, Any] = {"standard_version": standard, "vendor_extension_id": vext_id,
                            "vendor_extension_version": vext_version,
                            "vendor_extension_desc": vext_desc, "functional_mode": mode}
    for key in ("operations", "events", "device_properties", "capture_formats",
                "image_formats"):
        info[key], off = decode_u16_array(buf, off)
    for key in ("manufacturer", "model", "device_version", "serial_number"):
        info[key], off = decode_string(buf, off)
    info["_end"] = off
    return info


def decode_storage_info(buf: bytes) -> dict[str, Any]:
    buf = bytes(buf)
    stype, fs, access, capacity, free, free_images = struct.unpack_from("<HHHQQI", buf)
    off = 26
    desc, off = decode_string(buf, off)
    label, off = decode_string(buf, off)
    return {"storage_type": stype, "filesystem_type": fs, "access": access,
            "capacity": capacity, "free_space": free, "free_images": free_images,
            "description": desc, "volume_label": label, "_end": off}


_OBJECT_INFO_FIXED = struct.Struct("<IHHIHIIIIIIIHII")
_OBJECT_INFO_FIELDS = ("storage_id", "format", "protection", "compressed_size",
                       "thumb_format", "thumb_size", "thumb_width", "thumb_height",
                       "width", "height", "bit_depth", "parent", "association_type",
                       "association_desc", "sequence_number")


def decode_object_info(buf: bytes) -> dict[str, Any]:
    buf = bytes(buf)
    info: dict[str, Any] = dict(zip(_OBJECT_INFO_FIELDS, _OBJECT_INFO_FIXED.unpack_from(buf), strict=True))
    off = _OBJECT_INFO_FIXED.size
    for key in ("filename", "capture_date", "modification_date", "keywords"):
        info[key], off = decode_string(buf, off)
    info["_end"] = off
    return info


# ---------------------------------------------------------------------------
# Payloads: a real little JPEG, and deterministic bytes for huge objects
# ---------------------------------------------------------------------------

def _bit_length_category(v: int) -> int:
    return abs(v).bit_length()


@functools.lru_cache(maxsize=64)
def _jpeg(width: int, height: int, color: tuple[int, int, int]) -> bytes:
    r, g, b = color
    ycc = (0.299 * r + 0.587 * g + 0.114 * b,
           128 - 0.168736 * r - 0.331264 * g + 0.5 * b,
           128 + 0.5 * r - 0.418688 * g - 0.081312 * b)
    levels = [min(255, max(0, round(v))) for v in ycc]
    # A uniform 8x8 block has only a DC coefficient: 8 x (sample - 128) with a
    # quantisation table of ones. Each component's first block codes that value as a
    # difference, every later block a difference of 0 and an end-of-block.
    dcs = [8 * (v - 128) for v in levels]
    cats = [_bit_length_category(d) for d in dcs]
    symbols = sorted(set(cats) | {0})
    if len(symbols) == 1:
        dc_bits = [1] + [0] * 15
        dc_code = {symbols[0]: "0"}
    else:  # up to 4 symbols, all 3-bit codes (never the all-ones code)
        dc_bits = [0, 0, len(symbols)] + [0] * 13
        dc_code = {s: format(i, "03b") for i, s in enumerate(symbols)}
    eob = "0"  # the AC table's only symbol, 0x00 (EOB), one bit

    def value_bits(v: int, cat: int) -> str:
        if cat == 0:
            return ""
        if v < 0:
            v += (1 << cat) - 1
        return format(v, "0%db" % cat)

    first = "".join(dc_code[c] + value_bits(d, c) + eob for d, c in zip(dcs, cats, strict=True))
    rest = (dc_code[0] + eob) * 3
    mcus = ((width + 7) // 8) * ((height + 7) // 8)
    bits = first + rest * (mcus - 1)
    bits += "1" * (-len(bits) % 8)
    scan = int(bits, 2).to_bytes(len(bits) // 8, "big").replace(b"\xff", b"\xff\x00")

    def segment(marker: int, body: bytes) -> bytes:
        return struct.pack(">BBH", 0xFF, marker, len(body) + 2) + body

    app0 = segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
    dqt = segment(0xDB, b"\x00" + b"\x01" * 64)
    sof = segment(0xC0, struct.pack(">BHHB", 8, height, width, 3)
                  + b"".join(struct.pack(">BBB", i, 0x11, 0) for i in (1, 2, 3)))
    dht = segment(0xC4, b"\x00" + bytes(dc_bits) + bytes(symbols)
                  + b"\x10" + bytes([1] + [0] * 15) + b"\x00")
    sos = segment(0xDA, b"\x03" + b"\x01\x00\x02\x00\x03\x00" + b"\x00\x3f\x00")
    return b"\xff\xd8" + app0 + dqt + sof + dht + sos + scan + b"\xff\xd9"


def make_jpeg(width: int = 64, height: int = 48, color: tuple[int, int, int] = (200, 120, 40),
              size: int | None = None) -> bytes:
    """A valid baseline JPEG (JFIF, YCbCr 4:4:4) of one uniform colour, that any
    decoder reads back as `width` x `height` pixels. With `size`, padded to exactly
    that many bytes with COM segments (and, for 1 to 3 bytes, trailing bytes)."""
    if not (1 <= width <= 65535 and 1 <= height <= 65535):
        raise ValueError("JPEG dimensions are 1..65535")
    base = _jpeg(width, height, tuple(color))
    if size is None or size == len(base):
        return base
    pad = size - len(base)
    if pad < 0:
        raise ValueError("a %dx%d JPEG needs at least %d bytes" % (width, height, len(base)))
    segments = []
    tail = b""
    if pad < 4:
        tail, pad = b"\x00" * pad, 0
    while pad:
        seg = min(pad, 65537)
        if 0 < pad - seg < 4:
            seg -= 4
        segments.append(b"\xff\xfe" + struct.pack(">H", seg - 2) + b" " * (seg - 4))
        pad -= seg
    # after SOI and APP0 (2 + 18 bytes)
    return base[:20] + b"".join(segments) + base[20:] + tail


def jpeg_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's SOFn segment, None if it is not a JPEG."""
    if not data.startswith(b"\xff\xd8"):
        return None
    i = 2
    n = len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        (seglen,) = struct.unpack_from(">H", data, i + 2)
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > n:
                return None
            height, width = struct.unpack_from(">HH", data, i + 5)
            return width, height
        if marker == 0xDA:
            return None
        i += 2 + seglen
    return None


_PATTERN_PERIOD = 251  # prime, so the pattern does not line up with packet sizes


@functools.lru_cache(maxsize=16)
def _pattern_block(seed: int) -> bytes:
    block = bytes((i * 7 + seed * 13 + 1) % 256 for i in range(_PATTERN_PERIOD))
    return block * (65536 // _PATTERN_PERIOD + 2)


def pattern(offset: int, length: int, seed: int = 0) -> bytes:
    """Bytes [offset, offset+length) of an endless deterministic pattern."""
    if length <= 0:
        return b""
    block = _pattern_block(seed)
    span = len(block) - _PATTERN_PERIOD
    out = []
    start = offset % _PATTERN_PERIOD
    while length > 0:
        take = min(length, span)
        out.append(block[start: start + take])
        length -= take
        start = (start + take) % _PATTERN_PERIOD
    return b"".join(out)


def pattern_source(seed: int = 0) -> Callable[[int, int], bytes]:
    """A `data=` callable for add_file(..., size=N): pattern(offset, length, seed)."""
    return functools.partial(_pattern_at, seed=seed)


def _pattern_at(offset: int, length: int, *, seed: int) -> bytes:
    return pattern(offset, length, seed)


@functools.lru_cache(maxsize=1)
def default_thumbnail() -> bytes:
    return make_jpeg(160, 120, (90, 140, 200))


_DEFAULT: Any = object()  # "argument left out"
_JPEG_FORMATS = frozenset({FMT_EXIF_JPEG, FMT_JFIF})
_PALETTE = ((200, 120, 40), (40, 160, 90), (60, 90, 210), (220, 200, 60), (150, 60, 160))


# ---------------------------------------------------------------------------
# Camera state
# ---------------------------------------------------------------------------

@dataclass(eq=False)
class SimObject:
    handle: int
    storage_id: int
    parent: int
    name: str
    format: int
    size: int
    data: bytes | Callable[[int, int], bytes] | None = None
    thumb: bytes | None = None
    thumb_format: int = 0
    thumb_width: int = 0
    thumb_height: int = 0
    width: int = 0
    height: int = 0
    bit_depth: int = 0
    association_type: int = ASSOC_UNDEFINED
    association_desc: int = 0
    protected: bool = False
    capture_date: str = DEFAULT_DATE
    modification_date: str = DEFAULT_DATE
    keywords: str = ""
    sequence_number: int = 0

    @property
    def is_folder(self) -> bool:
        return self.format == FMT_ASSOCIATION

    def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""
        if callable(self.data):
            chunk = bytes(self.data(offset, length))
            if len(chunk) != length:
                raise RuntimeError("data callable of object %d gave %d bytes for (%d, %d)"
                                   % (self.handle, len(chunk), offset, length))
            return chunk
        return bytes(self.data[offset: offset + length]) if self.data else b"\x00" * length

    def content(self) -> bytes:
        return self.read(0, self.size)

    def info_dataset(self) -> bytes:
        thumb_size = len(self.thumb) if self.thumb is not None else 0
        return _OBJECT_INFO_FIXED.pack(
            self.storage_id, self.format,
            PROTECTION_READ_ONLY if self.protected else PROTECTION_NONE,
            min(self.size, 0xFFFFFFFF),
            self.thumb_format if self.thumb is not None else 0, thumb_size,
            self.thumb_width if self.thumb is not None else 0,
            self.thumb_height if self.thumb is not None else 0,
            self.width, self.height, self.bit_depth, self.parent,
            self.association_type, self.association_desc, self.sequence_number,
        ) + ptp_string(self.name) + ptp_string(self.capture_date) \
            + ptp_string(self.modification_date) + ptp_string(self.keywords)


@dataclass(eq=False)
class SimStorage:
    storage_id: int
    description: str = "Simulated SD card"
    volume_label: str = "SIMCARD"
    capacity: int = 32 * 1024 ** 3
    free_space: int | None = None      # None: capacity minus what the objects use
    free_images: int | None = None     # None: free space / 4 MiB
    access: int = ACCESS_READ_WRITE
    storage_type: int = STORAGE_REMOVABLE_RAM
    filesystem_type: int = FS_GENERIC_HIERARCHICAL
    used: int = 0

    def free(self) -> int:
        if self.free_space is not None:
            return self.free_space
        return max(0, self.capacity - self.used)

    def info_dataset(self) -> bytes:
        free = self.free()
        images = self.free_images if self.free_images is not None else min(free // (4 << 20), 0xFFFFFFFE)
        return struct.pack("<HHHQQI", self.storage_type, self.filesystem_type, self.access,
                           self.capacity, free, images) \
            + ptp_string(self.description) + ptp_string(self.volume_label)


@dataclass
class Operation:
    """One command the camera received, and what it answered."""
    code: int
    params: tuple[int, ...]
    tid: int
    response: int | None = None
    response_params: tuple[int, ...] = ()
    data_in: int = 0              # payload bytes of the camera's data phase
    data_out: bytes | None = None  # payload of the initiator's data phase
    cancelled: bool = False

    @property
    def name(self) -> str:
        return OPERATION_NAMES.get(self.code, "0x%04X" % self.code)

    @property
    def response_name(self) -> str | None:
        if self.response is None:
            return None
        return RESPONSE_NAMES.get(self.response, "0x%04X" % self.response)


class _InTransfer:
    """One container on bulk IN: a USB transfer of `total` bytes."""

    __slots__ = ("kind", "tid", "head", "source", "total", "pos", "throttle",
                 "truncated", "cancelled")

    def __init__(self, kind: str, tid: int, head: bytes,
                 source: Callable[[int, int], bytes] | None = None, payload_len: int = 0,
                 throttle: bool = False) -> None:
        self.kind = kind
        self.tid = tid
        self.head = head
        self.source = source
        self.total = len(head) + payload_len
        self.pos = 0
        self.throttle = throttle
        self.truncated = False   # cut short by a cancel: no short packet/ZLP ends it
        self.cancelled = False

    def chunk(self, n: int) -> bytes:
        p = self.pos
        parts = []
        hl = len(self.head)
        if p < hl:
            part = self.head[p: p + n]
            parts.append(part)
            p += len(part)
            n -= len(part)
        if n > 0 and self.source is not None:
            parts.append(self.source(p - hl, n))
        return b"".join(parts)


class _DeviceRef:
    """What enumerate_devices() yields: a camera as plugged in at one time."""

    __slots__ = ("camera", "generation")

    def __init__(self, camera: SimulatedCamera, generation: int) -> None:
        self.camera = camera
        self.generation = generation

    def __repr__(self) -> str:
        return "<simulated PTP camera %s gen %d>" % (self.camera.serial, self.generation)


class _Handle:
    __slots__ = ("camera", "generation", "backend", "closed")

    def __init__(self, camera: SimulatedCamera, generation: int, backend: Any) -> None:
        self.camera = camera
        self.generation = generation
        self.backend = backend
        self.closed = False


_OTHER_PROGRAM = object()


class _Descriptor:
    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)

    def __repr__(self) -> str:
        return "<%s>" % ", ".join("%s=%r" % kv for kv in self.__dict__.items())


def _next_tid(tid: int) -> int:
    return 1 if tid >= 0xFFFFFFFE else tid + 1


class SimulatedCamera:
    """The camera: PTP responder state, content, and its USB device state."""

    EP_IN = 0x81
    EP_OUT = 0x02
    EP_INT = 0x83
    INTERFACE = 0

    def __init__(self, *, manufacturer: str = "stillsvc", model: str = "Simulated Camera",
                 serial: str = "PTPSIM-1", device_version: str = "1.0",
                 operations: Iterable[int] = DEFAULT_OPERATIONS,
                 events_supported: Iterable[int] = DEFAULT_EVENTS,
                 device_properties: Iterable[int] = (),
                 capture_formats: Iterable[int] = (FMT_EXIF_JPEG,),
                 image_formats: Iterable[int] | None = None,
                 vendor_extension_id: int = 0, vendor_extension_version: int = 0,
                 vendor_extension_desc: str = "", functional_mode: int = 0,
                 bus: int = 1, address: int = 2, port_numbers: tuple[int, ...] = (1,),
                 vendor_id: int = 0x04A9, product_id: int = 0x3218, bcd_device: int = 0x0100,
                 max_packet_size: int = 512, kernel_driver_active: bool = False,
                 storage: bool = True, top_level_only: bool = False, events: bool = True,
                 delete_events: bool = False, strict_transaction_ids: bool = True,
                 strict_packets: bool = False, capture_delay: float = 0.0,
                 cancel_busy_polls: int = 1, cancel_inflight_packets: int = 0,
                 unsolicited_event_tid: int = 0xFFFFFFFF) -> None:
        self._cv = threading.Condition(threading.RLock())
        # identity
        self.manufacturer = manufacturer
        self.model = model
        self.serial = serial
        self.device_version = device_version
        self.supported_operations = list(operations)
        self.events_supported = list(events_supported)
        self.device_properties = list(device_properties)
        self.capture_formats = list(capture_formats)
        self.image_formats = list(image_formats) if image_formats is not None else None
        self.vendor_extension_id = vendor_extension_id
        self.vendor_extension_version = vendor_extension_version
        self.vendor_extension_desc = vendor_extension_desc
        self.functional_mode = functional_mode
        # USB identity
        self.bus = bus
        self.address = address
        self.port_numbers = tuple(port_numbers)
        self.vendor_id = vendor_id
        self.product_id = product_id
        self.bcd_device = bcd_device
        if max_packet_size not in (8, 16, 32, 64, 512):
            raise ValueError("bulk wMaxPacketSize is 8..64 (full speed) or 512 (high speed)")
        self.max_packet_size = max_packet_size
        self.speed = 3 if max_packet_size == 512 else 2  # LIBUSB_SPEED_HIGH / _FULL
        self.kernel_driver_active = kernel_driver_active
        # behaviour
        self.top_level_only = top_level_only
        self.events = events
        self.delete_events = delete_events
        self.strict_transaction_ids = strict_transaction_ids
        self.strict_packets = strict_packets
        self.capture_delay = capture_delay
        self.cancel_busy_polls = cancel_busy_polls
        self.cancel_inflight_packets = cancel_inflight_packets
        self.unsolicited_event_tid = unsolicited_event_tid
        # content
        self._storages: dict[int, SimStorage] = {}
        self._objects: dict[int, SimObject] = {}
        self._kids: dict[tuple[int, int], dict[int, None]] = {}
        self._next_handle = 1
        self._stale_storages: dict[int, int] = {}
        self._stale_objects: dict[int, int] = {}
        self._capture_count = 0
        # inspection
        self.received: list[Operation] = []
        self.bytes_sent = 0
        self.bytes_received = 0
        self.bulk_reads = 0
        self.bulk_writes = 0
        self.stray_zlps = 0
        self.claim_count = 0
        self.release_count = 0
        self.cancels: list[tuple[int, str]] = []
        self.device_resets = 0
        self.usb_resets = 0
        self.status_requests = 0
        self.control_requests: list[tuple[int, int, int, int, int]] = []
        self.events_delivered: list[tuple[int, int, tuple[int, ...]]] = []
        self.protocol_errors: list[str] = []
        # USB state
        self._generation = 0
        self._gone = False
        self._configuration = 1
        self._claims: dict[int, Any] = {}
        self._handles: set[_Handle] = set()
        self.halted: set[int] = set()
        # PTP state
        self._session_id = 0
        self._last_tid = 0
        self._reset_transport()
        # faults
        self._busy = 0
        self._stall_reads: list[bool] = []
        self._timeout_reads = 0
        self._rate: float | None = None
        self._listing_countdown: int | None = None
        self._listing_storage: int | None = None
        self._listing_stale = "invalid"
        if storage:
            self.add_storage(0x00010001)

    # ------------------------------------------------------------------ state
    def _reset_transport(self) -> None:
        for t in getattr(self, "_in", ()):
            t.cancelled = True
        self._in: deque[_InTransfer] = deque()
        self._events: deque[bytes] = deque()
        self._out = bytearray()
        self._out_phase = "command"     # "command" | "data" | "zlp"
        self._pending: Operation | None = None
        self._pending_payload = b""
        self._current: Operation | None = None
        self._error_phase = False
        self._status_busy = 0

    def __repr__(self) -> str:
        return "<SimulatedCamera %s %04x:%04x bus %d address %d%s>" % (
            self.serial, self.vendor_id, self.product_id, self.bus, self.address,
            " unplugged" if self._gone else "")

    @property
    def session_open(self) -> bool:
        return self._session_id != 0

    @property
    def session_id(self) -> int:
        return self._session_id

    @property
    def interface_claimed(self) -> bool:
        """Claimed through a backend handle (not counting claim_by_other_program)."""
        owner = self._claims.get(self.INTERFACE)
        return owner is not None and owner is not _OTHER_PROGRAM

    @property
    def open_handles(self) -> int:
        return sum(1 for h in self._handles if not h.closed)

    @property
    def plugged(self) -> bool:
        return not self._gone

    @property
    def storages(self) -> dict[int, SimStorage]:
        return dict(self._storages)

    @property
    def objects(self) -> dict[int, SimObject]:
        return dict(self._objects)

    def object(self, handle: int) -> SimObject:
        return self._objects[handle]

    def children(self, storage: int | None, parent: int = 0) -> list[int]:
        with self._cv:
            return list(self._kids.get((self._storage_id(storage), parent), ()))

    def codes_received(self) -> list[int]:
        return [op.code for op in self.received]

    def pending_events(self) -> int:
        with self._cv:
            return len(self._events)

    # ---------------------------------------------------------------- content
    def _storage_id(self, storage: int | None) -> int:
        if storage is None:
            if not self._storages:
                raise ValueError("the camera has no storage")
            return next(iter(self._storages))
        if storage not in self._storages:
            raise ValueError("no storage 0x%08X" % storage)
        return storage

    def add_storage(self, storage_id: int | None = None, *, description: str = "Simulated SD card",
                    label: str = "SIMCARD", capacity: int = 32 * 1024 ** 3,
                    free_space: int | None = None, free_images: int | None = None,
                    access: int = ACCESS_READ_WRITE, storage_type: int = STORAGE_REMOVABLE_RAM,
                    filesystem_type: int = FS_GENERIC_HIERARCHICAL, events: bool = True) -> int:
        with self._cv:
            if storage_id is None:
                physical = 1
                while any(s >> 16 == physical for s in self._storages):
                    physical += 1
                storage_id = (physical << 16) | 1
            if storage_id in self._storages:
                raise ValueError("storage 0x%08X exists" % storage_id)
            if storage_id & 0xFFFF == 0 or storage_id in (0, ALL):
                raise ValueError("a present storage has a non-zero logical ID")
            self._storages[storage_id] = SimStorage(
                storage_id, description, label, capacity, free_space, free_images, access,
                storage_type, filesystem_type)
            self._stale_storages.pop(storage_id, None)
            if events:
                self._auto_event(EV_STORE_ADDED, (storage_id,))
            return storage_id

    def remove_storage(self, storage_id: int, *, stale: str = "invalid", events: bool = True) -> None:
        """The card is taken out: the storage and all its objects disappear."""
        if stale not in ("invalid", "unavailable"):
            raise ValueError("stale is 'invalid' or 'unavailable'")
        with self._cv:
            self._storage_id(storage_id)
            del self._storages[storage_id]
            gone = [h for h, o in self._objects.items() if o.storage_id == storage_id]
            for h in gone:
                del self._objects[h]
                if stale == "unavailable":
                    self._stale_objects[h] = RC_STORE_NOT_AVAILABLE
            for key in [k for k in self._kids if k[0] == storage_id]:
                del self._kids[key]
            self._stale_storages[storage_id] = (RC_STORE_NOT_AVAILABLE if stale == "unavailable"
                                                else RC_INVALID_STORAGE_ID)
            if events:
                self._auto_event(EV_STORE_REMOVED, (storage_id,))

    def _check_parent(self, sid: int, parent: int) -> None:
        if parent == 0:
            return
        obj = self._objects.get(parent)
        if obj is None or not obj.is_folder or obj.storage_id != sid:
            raise ValueError("parent %d is not a folder of storage 0x%08X" % (parent, sid))

    def _insert(self, obj: SimObject) -> None:
        self._objects[obj.handle] = obj
        self._kids.setdefault((obj.storage_id, obj.parent), {})[obj.handle] = None
        self._storages[obj.storage_id].used += obj.size

    def _unlink(self, obj: SimObject) -> None:
        del self._objects[obj.handle]
        kids = self._kids.get((obj.storage_id, obj.parent))
        if kids is not None:
            kids.pop(obj.handle, None)
        self._kids.pop((obj.storage_id, obj.handle), None)
        st = self._storages.get(obj.storage_id)
        if st is not None:
            st.used -= obj.size

    def _new_handle(self) -> int:
        h = self._next_handle
        self._next_handle += 1
        return h

    def add_folder(self, storage: int | None = None, parent: int = 0, name: str = "DCIM", *,
                   events: bool = True, **fields: Any) -> int:
        with self._cv:
            sid = self._storage_id(storage)
            self._check_parent(sid, parent)
            obj = SimObject(self._new_handle(), sid, parent, name, FMT_ASSOCIATION, 0,
                            association_type=ASSOC_GENERIC_FOLDER, **fields)
            self._insert(obj)
            if events:
                self._auto_event(EV_OBJECT_ADDED, (obj.handle,))
            return obj.handle

    def add_path(self, storage: int | None, path: str, *, events: bool = True) -> int:
        """The folder at `path` ("DCIM/100SIMUL"), creating what is missing."""
        with self._cv:
            sid = self._storage_id(storage)
            parent = 0
            for part in [p for p in path.split("/") if p]:
                for h in self._kids.get((sid, parent), ()):
                    o = self._objects[h]
                    if o.is_folder and o.name == part:
                        parent = h
                        break
                else:
                    parent = self.add_folder(sid, parent, part, events=events)
            return parent

    def _file_object(self, handle: int, sid: int, parent: int, name: str, data: Any,
                     size: int | None, format: int, thumb: Any, thumb_format: int | None,
                     thumb_size: tuple[int, int] | None, width: int | None, height: int | None,
                     bit_depth: int | None, protected: bool, capture_date: str | None,
                     modification_date: str | None, keywords: str) -> SimObject:
        if data is None:
            data = make_jpeg(64, 48, _PALETTE[handle % len(_PALETTE)]) if format in _JPEG_FORMATS else b""
        if callable(data):
            if size is None:
                raise ValueError("a data callable needs size=")
        else:
            data = bytes(data)
            if size is not None and size != len(data):
                raise ValueError("size= disagrees with len(data)")
            size = len(data)
        if thumb is _DEFAULT:
            thumb = default_thumbnail() if format in _JPEG_FORMATS else None
        tw = th = 0
        if thumb is not None:
            thumb = bytes(thumb)
            if thumb_format is None:
                thumb_format = FMT_EXIF_JPEG
            dims = thumb_size or jpeg_dimensions(thumb) or (160, 120)
            tw, th = dims
        is_image = (format & 0xF800) == 0x3800
        if width is None or height is None:
            dims = jpeg_dimensions(data) if isinstance(data, bytes) else None
            if dims is None:
                dims = (640, 480) if is_image else (0, 0)
            width = dims[0] if width is None else width
            height = dims[1] if height is None else height
        if bit_depth is None:
            bit_depth = 24 if is_image else 0
        return SimObject(handle, sid, parent, name, format, size, data, thumb,
                         thumb_format or 0, tw, th, width, height, bit_depth,
                         protected=protected,
                         capture_date=capture_date or DEFAULT_DATE,
                         modification_date=modification_date or capture_date or DEFAULT_DATE,
                         keywords=keywords)

    def add_file(self, storage: int | None = None, parent: int = 0, name: str = "IMG_0001.JPG",
                 data: bytes | Callable[[int, int], bytes] | None = None, *,
                 size: int | None = None, format: int = FMT_EXIF_JPEG, thumb: Any = _DEFAULT,
                 thumb_format: int | None = None, thumb_size: tuple[int, int] | None = None,
                 width: int | None = None, height: int | None = None,
                 bit_depth: int | None = None, protected: bool = False,
                 capture_date: str | None = None, modification_date: str | None = None,
                 keywords: str = "", events: bool = True) -> int:
        """A file; returns its handle. data: bytes, or a callable (offset, length) ->
        bytes together with size= (never held in memory); None: a valid 64x48 JPEG for
        JPEG formats, empty otherwise. thumb: bytes, or None for no thumbnail; left out,
        JPEGs get a 160x120 JPEG thumbnail. width/height: read from a JPEG's SOF when
        left out (640x480 for other images, 0 for non-images)."""
        with self._cv:
            sid = self._storage_id(storage)
            self._check_parent(sid, parent)
            if format == FMT_ASSOCIATION:
                raise ValueError("use add_folder for associations")
            obj = self._file_object(self._next_handle, sid, parent, name, data, size, format,
                                    thumb, thumb_format, thumb_size, width, height, bit_depth,
                                    protected, capture_date, modification_date, keywords)
            self._next_handle += 1
            self._insert(obj)
            if events:
                self._auto_event(EV_OBJECT_ADDED, (obj.handle,))
            return obj.handle

    def add_many(self, n: int, storage: int | None = None, parent: int = 0, *,
                 name: str = "IMG_{:05d}.JPG", start: int = 1,
                 data: bytes | Callable[[int, int], bytes] | None = None,
                 size: int | None = None, format: int = FMT_EXIF_JPEG, thumb: Any = _DEFAULT,
                 events: bool = True) -> list[int]:
        """n files named name.format(i) for i from start, all sharing one payload and
        one thumbnail (fast: 10,000 objects in a fraction of a second)."""
        with self._cv:
            sid = self._storage_id(storage)
            self._check_parent(sid, parent)
            if data is None and format in _JPEG_FORMATS:
                data = make_jpeg(64, 48)
            template = self._file_object(0, sid, parent, "", data, size, format, thumb, None,
                                         None, None, None, None, False, None, None, "")
            kids = self._kids.setdefault((sid, parent), {})
            fields = dict(template.__dict__)
            handles = []
            for i in range(start, start + n):
                h = self._next_handle
                self._next_handle += 1
                fields["handle"] = h
                fields["name"] = name.format(i)
                self._objects[h] = SimObject(**fields)
                kids[h] = None
                handles.append(h)
            self._storages[sid].used += template.size * n
            if events:
                for h in handles:
                    self._auto_event(EV_OBJECT_ADDED, (h,))
            return handles

    def remove_object(self, handle: int, *, events: bool = True) -> list[int]:
        """The object (and a folder's contents) disappears, as if deleted on the
        camera itself: ObjectRemoved for each, deepest first."""
        with self._cv:
            obj = self._objects[handle]
            removed: list[int] = []
            self._remove_tree(obj, removed)
            if events:
                for h in removed:
                    self._auto_event(EV_OBJECT_REMOVED, (h,))
            return removed

    def _remove_tree(self, obj: SimObject, removed: list[int]) -> None:
        for h in list(self._kids.get((obj.storage_id, obj.handle), ())):
            self._remove_tree(self._objects[h], removed)
        self._unlink(obj)
        removed.append(obj.handle)

    def update_object(self, handle: int, *, events: bool = True, **fields: Any) -> None:
        """Change an object's fields (data=, size=, name=, protected=, thumb=, ...):
        ObjectInfoChanged."""
        with self._cv:
            obj = self._objects[handle]
            st = self._storages[obj.storage_id]
            st.used -= obj.size
            if "data" in fields and "size" not in fields and not callable(fields["data"]):
                fields["size"] = len(fields["data"])
            for key, value in fields.items():
                if not hasattr(obj, key):
                    raise AttributeError(key)
                setattr(obj, key, value)
            st.used += obj.size
            if events:
                self._auto_event(EV_OBJECT_INFO_CHANGED, (handle,))

    def press_shutter(self, storage: int | None = None) -> int:
        """A picture taken on the camera itself: ObjectAdded, no CaptureComplete."""
        with self._cv:
            sid = self._storage_id(storage)
            return self._capture(sid, None)

    def queue_event(self, code: int, *params: int, tid: int | None = None) -> None:
        """Queue any event on the interrupt endpoint, session or not."""
        if len(params) > 3:
            raise ValueError("an event has at most 3 parameters")
        with self._cv:
            self._push_event(code, params, self.unsolicited_event_tid if tid is None else tid)

    def _push_event(self, code: int, params: tuple[int, ...], tid: int) -> None:
        self._events.append(pack_container(CONTAINER_EVENT, code, tid, params))
        self._cv.notify_all()

    def _auto_event(self, code: int, params: tuple[int, ...], tid: int | None = None) -> None:
        if self.events and self._session_id and code in self.events_supported and not self._gone:
            self._push_event(code, params, self.unsolicited_event_tid if tid is None else tid)

    def _capture(self, sid: int, tid: int | None) -> int:
        before = self._next_handle
        folder = self.add_path(sid, "DCIM/100SIMUL", events=False)
        new_folders = [h for h in range(before, self._next_handle) if h in self._objects]
        self._capture_count += 1
        n = self._capture_count
        handle = self._new_handle()
        stamp = time.strftime("%Y%m%dT%H%M%S")
        obj = self._file_object(handle, sid, folder, "IMG_%04d.JPG" % (n % 10000),
                                make_jpeg(640, 480, _PALETTE[n % len(_PALETTE)]), None,
                                FMT_EXIF_JPEG, _DEFAULT, None, None, None, None, None,
                                False, stamp, stamp, "")
        self._insert(obj)
        for h in new_folders + [handle]:
            self._auto_event(EV_OBJECT_ADDED, (h,), tid)
        return handle

    # ----------------------------------------------------------------- faults
    def busy_next(self, n: int = 1) -> None:
        with self._cv:
            self._busy += n

    def stall_next_read(self, abort: bool = True) -> None:
        with self._cv:
            self._stall_reads.append(abort)

    def timeout_next_read(self, n: int = 1) -> None:
        with self._cv:
            self._timeout_reads += n

    def slow_data(self, bytes_per_second: float | None) -> None:
        with self._cv:
            self._rate = float(bytes_per_second) if bytes_per_second else None
            self._cv.notify_all()

    def remove_storage_during_listing(self, after_n_infos: int, storage_id: int | None = None,
                                      stale: str = "invalid") -> None:
        if after_n_infos < 1:
            raise ValueError("after_n_infos >= 1")
        with self._cv:
            self._listing_countdown = after_n_infos
            self._listing_storage = storage_id
            self._listing_stale = stale

    def claim_by_other_program(self) -> None:
        with self._cv:
            owner = self._claims.get(self.INTERFACE)
            if owner is not None and owner is not _OTHER_PROGRAM:
                raise RuntimeError("the interface is claimed through a backend handle")
            self._claims[self.INTERFACE] = _OTHER_PROGRAM

    def release_by_other_program(self) -> None:
        with self._cv:
            if self._claims.get(self.INTERFACE) is _OTHER_PROGRAM:
                del self._claims[self.INTERFACE]

    def unplug(self) -> None:
        with self._cv:
            self._gone = True
            self._reset_transport()
            self._session_id = 0
            self._cv.notify_all()

    def plug(self, address: int | None = None) -> None:
        """Plugged back in: a new device (new address), fresh USB and PTP state."""
        with self._cv:
            self._gone = False
            self._generation += 1
            self.address = address if address is not None else self.address % 127 + 1
            self._claims = {k: v for k, v in self._claims.items() if v is _OTHER_PROGRAM}
            self._handles = set()
            self.halted = set()
            self._configuration = 1
            self._reset_transport()
            self._session_id = 0
            self._cv.notify_all()

    # -------------------------------------------------------- USB descriptors
    def _device_descriptor(self, dev: _DeviceRef) -> _Descriptor:
        return _Descriptor(
            bLength=18, bDescriptorType=1, bcdUSB=0x0200, bDeviceClass=0,
            bDeviceSubClass=0, bDeviceProtocol=0, bMaxPacketSize0=64,
            idVendor=self.vendor_id, idProduct=self.product_id, bcdDevice=self.bcd_device,
            iManufacturer=1, iProduct=2, iSerialNumber=3, bNumConfigurations=1,
            address=self.address, bus=self.bus, port_number=self.port_numbers[-1],
            port_numbers=self.port_numbers, speed=self.speed)

    def _endpoints(self) -> list[tuple[int, int, int, int]]:
        return [(self.EP_IN, 2, self.max_packet_size, 0),
                (self.EP_OUT, 2, self.max_packet_size, 0),
                (self.EP_INT, 3, 64 if self.max_packet_size == 512 else min(64, self.max_packet_size), 4)]

    def _config_descriptor(self) -> _Descriptor:
        return _Descriptor(bLength=9, bDescriptorType=2, wTotalLength=9 + 9 + 7 * 3,
                           bNumInterfaces=1, bConfigurationValue=1, iConfiguration=0,
                           bmAttributes=0xC0, bMaxPower=1, extra_descriptors=[])

    def _interface_descriptor(self) -> _Descriptor:
        return _Descriptor(bLength=9, bDescriptorType=4, bInterfaceNumber=0,
                           bAlternateSetting=0, bNumEndpoints=3, bInterfaceClass=6,
                           bInterfaceSubClass=1, bInterfaceProtocol=1, iInterface=0,
                           extra_descriptors=[])

    def _endpoint_descriptor(self, index: int) -> _Descriptor:
        addr, attrs, mps, interval = self._endpoints()[index]
        return _Descriptor(bLength=7, bDescriptorType=5, bEndpointAddress=addr,
                           bmAttributes=attrs, wMaxPacketSize=mps, bInterval=interval,
                           bRefresh=0, bSynchAddress=0, extra_descriptors=[])

    def _descriptor_bytes(self, dtype: int, index: int) -> bytes | None:
        if dtype == 1:
            return struct.pack("<BBHBBBBHHHBBBB", 18, 1, 0x0200, 0, 0, 0, 64, self.vendor_id,
                               self.product_id, self.bcd_device, 1, 2, 3, 1)
        if dtype == 2 and index == 0:
            out = struct.pack("<BBHBBBBB", 9, 2, 39, 1, 1, 0, 0xC0, 1)
            out += struct.pack("<BBBBBBBBB", 9, 4, 0, 0, 3, 6, 1, 1, 0)
            for addr, attrs, mps, interval in self._endpoints():
                out += struct.pack("<BBBBHB", 7, 5, addr, attrs, mps, interval)
            return out
        if dtype == 3:
            if index == 0:
                return b"\x04\x03\x09\x04"
            text = {1: self.manufacturer, 2: self.model, 3: self.serial}.get(index)
            if text is None:
                return None
            raw = text.encode("utf-16-le")[:252]
            return bytes([2 + len(raw), 3]) + raw
        if dtype == 6 and self.speed == 3:
            return struct.pack("<BBHBBBBBB", 10, 6, 0x0200, 0, 0, 0, 64, 1, 0)
        return None

    # --------------------------------------------------------- USB operations
    def _check_handle(self, h: _Handle) -> None:
        if self._gone or h.generation != self._generation:
            raise usb_error(LIBUSB_ERROR_NO_DEVICE)
        if h.closed:
            raise usb_error(LIBUSB_ERROR_INVALID_PARAM)

    def _check_io(self, h: _Handle) -> None:
        """A transfer on the interface: it must be ours (usbfs claims it if free)."""
        self._check_handle(h)
        if self._configuration == 0:
            raise usb_error(LIBUSB_ERROR_IO)
        owner = self._claims.get(self.INTERFACE)
        if owner is None:
            self._claims[self.INTERFACE] = h
        elif owner is not h:
            raise usb_error(LIBUSB_ERROR_BUSY)

    def _open(self, dev: _DeviceRef, backend: Any) -> _Handle:
        with self._cv:
            if self._gone or dev.generation != self._generation:
                raise usb_error(LIBUSB_ERROR_NO_DEVICE)
            h = _Handle(self, self._generation, backend)
            self._handles.add(h)
            return h

    def _close(self, h: _Handle) -> None:
        with self._cv:
            h.closed = True
            for intf in [i for i, owner in self._claims.items() if owner is h]:
                del self._claims[intf]
            self._handles.discard(h)

    def _set_configuration(self, h: _Handle, value: int) -> None:
        with self._cv:
            self._check_handle(h)
            if value not in (0, 1):
                raise usb_error(LIBUSB_ERROR_NOT_FOUND)
            if self._claims:
                raise usb_error(LIBUSB_ERROR_BUSY)
            self._configuration = value
            self.halted.clear()

    def _claim(self, h: _Handle, intf: int) -> None:
        with self._cv:
            self._check_handle(h)
            if intf != self.INTERFACE or self._configuration == 0:
                raise usb_error(LIBUSB_ERROR_NOT_FOUND)
            owner = self._claims.get(intf)
            if owner is h:
                return
            if owner is not None or self.kernel_driver_active:
                raise usb_error(LIBUSB_ERROR_BUSY)
            self._claims[intf] = h
            self.claim_count += 1

    def _release(self, h: _Handle, intf: int) -> None:
        with self._cv:
            self._check_handle(h)
            if self._claims.get(intf) is not h:
                raise usb_error(LIBUSB_ERROR_NOT_FOUND)
            del self._claims[intf]
            self.release_count += 1

    def _set_altsetting(self, h: _Handle, intf: int, alt: int) -> None:
        with self._cv:
            self._check_handle(h)
            if self._claims.get(intf) is not h or alt != 0:
                raise usb_error(LIBUSB_ERROR_NOT_FOUND)
            self.halted.clear()

    def _clear_halt(self, h: _Handle, ep: int) -> None:
        with self._cv:
            self._check_handle(h)
            if ep not in (self.EP_IN, self.EP_OUT, self.EP_INT):
                raise usb_error(LIBUSB_ERROR_NOT_FOUND)
            self.halted.discard(ep)
            if self._error_phase and not (self.halted & {self.EP_IN, self.EP_OUT}):
                self._error_phase = False
            self._cv.notify_all()

    def _usb_reset(self, h: _Handle) -> None:
        with self._cv:
            self._check_handle(h)
            self.usb_resets += 1
            self.halted.clear()
            self._reset_transport()
            self._session_id = 0
            self._cv.notify_all()

    def _kernel_driver(self, h: _Handle, intf: int, action: str) -> bool | None:
        with self._cv:
            self._check_handle(h)
            if intf != self.INTERFACE:
                raise usb_error(LIBUSB_ERROR_NOT_FOUND)
            if action == "query":
                return self.kernel_driver_active
            if action == "detach":
                if not self.kernel_driver_active:
                    raise usb_error(LIBUSB_ERROR_NOT_FOUND)
                self.kernel_driver_active = False
            else:
                if self.kernel_driver_active or self._claims.get(intf) is not None:
                    raise usb_error(LIBUSB_ERROR_BUSY)
                self.kernel_driver_active = True
            return None

    @staticmethod
    def _deadline(timeout: int) -> float | None:
        return None if not timeout else time.monotonic() + timeout / 1000.0

    def _wait(self, deadline: float | None) -> bool:
        """Wait for a notification; False once the deadline has passed."""
        if deadline is None:
            self._cv.wait()
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        self._cv.wait(remaining)
        return True

    def _idle_until(self, h: _Handle, deadline: float | None) -> None:
        """Nothing will come: wait for the deadline (or an unplug)."""
        while True:
            self._check_handle(h)
            if not self._wait(deadline):
                return

    # ---- bulk IN
    def _bulk_read(self, h: _Handle, ep: int, buff: Any, timeout: int) -> int:
        with self._cv:
            self._check_io(h)
            if ep != self.EP_IN:
                raise usb_error(LIBUSB_ERROR_IO)
            deadline = self._deadline(timeout)
            if ep in self.halted:
                raise usb_error(LIBUSB_ERROR_PIPE)
            self.bulk_reads += 1
            if self._stall_reads:
                abort = self._stall_reads.pop(0)
                self.halted.add(ep)
                if abort:
                    self._abort_transaction("stall")
                    self._error_phase = True
                raise usb_error(LIBUSB_ERROR_PIPE)
            if self._timeout_reads:
                self._timeout_reads -= 1
                self._idle_until(h, deadline)
                raise usb_error(LIBUSB_ERROR_TIMEOUT)
            while not self._in:
                self._check_handle(h)
                if ep in self.halted:
                    raise usb_error(LIBUSB_ERROR_PIPE)
                if not self._wait(deadline):
                    raise usb_error(LIBUSB_ERROR_TIMEOUT)
            t = self._in[0]
            n = len(buff) * buff.itemsize
            mps = self.max_packet_size
            remaining = t.total - t.pos
            if remaining == 0:        # the zero-length packet after a full last packet
                self._in.popleft()
                self._transfer_done(t)
                return 0
            want = min(n, remaining)
            if self.strict_packets and n < remaining and (n % mps or t.pos % mps):
                raise usb_error(LIBUSB_ERROR_OVERFLOW)
            if t.throttle and self._rate:
                want = self._throttle(h, t, want, deadline)
                if t.cancelled:       # cancelled while we waited: what made it
                    return self._deliver(t, buff, want, pop=False)
            count = self._deliver(t, buff, want, pop=False)
            if t.pos == t.total:
                if t.truncated:
                    if n > count:     # the rest never comes: libusb returns at the timeout
                        self._in.popleft()
                        self._idle_until(h, deadline)
                    else:
                        self._in.popleft()
                elif t.total % mps == 0 and n > count:
                    self._in.popleft()  # the ZLP ended this read
                    self._transfer_done(t)
                elif t.total % mps != 0:
                    self._in.popleft()  # ended by a short packet
                    self._transfer_done(t)
                # else: the ZLP is still to be read
            return count

    def _deliver(self, t: _InTransfer, buff: Any, count: int, pop: bool) -> int:
        if count:
            chunk = t.chunk(count)
            memoryview(buff).cast("B")[:count] = chunk
            t.pos += count
            self.bytes_sent += count
        return count

    def _throttle(self, h: _Handle, t: _InTransfer, want: int, deadline: float | None) -> int:
        """Wait for `want` bytes at the slow_data rate; return how many made it."""
        mps = self.max_packet_size
        start = time.monotonic()
        while True:
            self._check_handle(h)
            rate = self._rate
            now = time.monotonic()
            if t.cancelled or t.truncated:
                want = min(want, t.total - t.pos)
            if not rate:
                return want
            made = int((now - start) * rate)
            if made >= want:
                return want
            if t.cancelled:
                packets = made // mps * mps
                if packets:
                    return packets
                self._idle_until(h, deadline)
                raise usb_error(LIBUSB_ERROR_TIMEOUT)
            end = start + want / rate
            if deadline is not None and now >= deadline:
                packets = min(want, made // mps * mps)
                if packets:
                    return packets
                raise usb_error(LIBUSB_ERROR_TIMEOUT)
            until = end if deadline is None else min(end, deadline)
            self._cv.wait(max(0.0, until - now))

    def _transfer_done(self, t: _InTransfer) -> None:
        if t.kind == "response" and self._current is not None and self._current.tid == t.tid:
            self._current = None

    def _abort_transaction(self, why: str) -> None:
        """Drop everything pending on bulk IN and the partial bulk OUT."""
        for t in self._in:
            t.cancelled = True
        self._in.clear()
        self._out.clear()
        self._out_phase = "command"
        self._pending = None
        if self._current is not None:
            self._current.cancelled = True
            self._current = None
        self._cv.notify_all()

    # ---- interrupt IN
    def _intr_read(self, h: _Handle, ep: int, buff: Any, timeout: int) -> int:
        with self._cv:
            self._check_io(h)
            if ep != self.EP_INT:
                raise usb_error(LIBUSB_ERROR_IO)
            deadline = self._deadline(timeout)
            while True:
                self._check_handle(h)
                if ep in self.halted:
                    raise usb_error(LIBUSB_ERROR_PIPE)
                if self._events:
                    break
                if not self._wait(deadline):
                    raise usb_error(LIBUSB_ERROR_TIMEOUT)
            ev = self._events[0]
            n = min(len(buff) * buff.itemsize, len(ev))
            memoryview(buff).cast("B")[:n] = ev[:n]
            if n < len(ev):
                self._events[0] = ev[n:]
            else:
                self._events.popleft()
                _, _, code, tid, body = unpack_container(ev)
                self.events_delivered.append((code, tid, container_params(body)))
            return n

    # ---- bulk OUT
    def _bulk_write(self, h: _Handle, ep: int, data: Any, timeout: int) -> int:
        with self._cv:
            self._check_io(h)
            if ep != self.EP_OUT:
                raise usb_error(LIBUSB_ERROR_IO)
            if ep in self.halted:
                raise usb_error(LIBUSB_ERROR_PIPE)
            raw = bytes(memoryview(data).cast("B"))
            self.bulk_writes += 1
            self.bytes_received += len(raw)
            if not raw:
                if self._out_phase == "zlp":
                    self._out_phase = "command"
                    op, payload = self._pending, self._pending_payload
                    self._pending, self._pending_payload = None, b""
                    self._execute(op, payload)
                elif self._out_phase == "command" and not self._out:
                    self.stray_zlps += 1
                else:
                    self._protocol_error("a zero-length packet in the middle of a container")
                return 0
            if self._out_phase == "zlp":
                self._protocol_error(
                    "%s: the data phase was a multiple of %d bytes and no zero-length "
                    "packet followed it" % (self._pending.name, self.max_packet_size))
                return len(raw)
            self._out += raw
            self._parse_out()
            self._cv.notify_all()
            return len(raw)

    def _protocol_error(self, message: str) -> None:
        """The initiator broke the protocol: record, stall both bulk pipes."""
        self.protocol_errors.append(message)
        self._abort_transaction("protocol error")
        self.halted |= {self.EP_IN, self.EP_OUT}
        self._error_phase = True
        self._cv.notify_all()

    def _note(self, message: str) -> None:
        self.protocol_errors.append(message)

    def _parse_out(self) -> None:
        while len(self._out) >= HEADER_SIZE:
            length, ctype, code, tid = struct.unpack_from("<IHHI", self._out)
            if self._out_phase == "command":
                if ctype != CONTAINER_COMMAND:
                    self._protocol_error("expected a command container, got type %d "
                                         "(code 0x%04X, transaction %d)" % (ctype, code, tid))
                    return
                if length < HEADER_SIZE or length > HEADER_SIZE + 20 or length % 4:
                    self._protocol_error("command 0x%04X: bad container length %d" % (code, length))
                    return
                if len(self._out) < length:
                    return
                params = struct.unpack_from("<%dI" % ((length - HEADER_SIZE) // 4), self._out, HEADER_SIZE)
                del self._out[:length]
                self._command(code, params, tid)
            elif self._out_phase == "data":
                op = self._pending
                assert op is not None
                if ctype != CONTAINER_DATA or code != op.code or tid != op.tid:
                    self._protocol_error(
                        "%s (transaction %d): expected its data container, got type %d code "
                        "0x%04X transaction %d" % (op.name, op.tid, ctype, code, tid))
                    return
                if length < HEADER_SIZE or length == 0xFFFFFFFF:
                    self._protocol_error("%s: data container length 0x%X not handled" % (op.name, length))
                    return
                if len(self._out) < length:
                    return
                payload = bytes(self._out[HEADER_SIZE:length])
                del self._out[:length]
                if length % self.max_packet_size == 0:
                    self._out_phase = "zlp"
                    self._pending_payload = payload
                    if self._out:
                        self._protocol_error("%s: data after a packet-multiple data phase "
                                             "with no zero-length packet" % op.name)
                    return
                self._out_phase = "command"
                self._pending = None
                self._execute(op, payload)
            else:
                return

    def _command(self, code: int, params: tuple[int, ...], tid: int) -> None:
        op = Operation(code, tuple(params), tid)
        self.received.append(op)
        if any(not t.truncated for t in self._in):
            stale = self._in[0]
            self._note("%s (transaction %d) sent while %d bytes of transaction %d were unread"
                       % (op.name, tid, sum(t.total - t.pos for t in self._in), stale.tid))
        self._current = op
        if code in DATA_OUT_OPERATIONS:
            self._out_phase = "data"
            self._pending = op
            return
        self._execute(op, None)

    # ---- PTP operations
    def _execute(self, op: Operation, data_out: bytes | None) -> None:
        op.data_out = data_out
        try:
            rc, rparams, payload = self._dispatch(op)
        except Exception as exc:  # a bug here must not hang the initiator
            self._note("%s raised %r" % (op.name, exc))
            rc, rparams, payload = RC_GENERAL_ERROR, (), None
        op.response = rc
        op.response_params = tuple(rparams)
        if payload is not None:
            if isinstance(payload, tuple):
                plen, source, throttle = payload
            else:
                plen, source, throttle = len(payload), (lambda off, n, b=payload: b[off: off + n]), False
            total = HEADER_SIZE + plen
            head = struct.pack("<IHHI", total if total <= 0xFFFFFFFF else 0xFFFFFFFF,
                               CONTAINER_DATA, op.code, op.tid)
            self._in.append(_InTransfer("data", op.tid, head, source, plen, throttle))
            op.data_in = plen
        self._in.append(_InTransfer("response", op.tid,
                                    pack_container(CONTAINER_RESPONSE, rc, op.tid, rparams)))
        self._cv.notify_all()
        if op.code == OP_GET_OBJECT_INFO and rc == RC_OK and self._listing_countdown is not None:
            self._listing_countdown -= 1
            if self._listing_countdown == 0:
                self._listing_countdown = None
                sid = self._listing_storage
                if sid is None:
                    sid = self._objects[op.params[0]].storage_id
                if sid in self._storages:
                    self.remove_storage(sid, stale=self._listing_stale)

    def _dispatch(self, op: Operation) -> tuple[int, tuple[int, ...], Any]:
        code = op.code
        if self._session_id and code != OP_OPEN_SESSION:
            expected = _next_tid(self._last_tid)
            self._last_tid = op.tid
            if op.tid != expected:
                self._note("%s: transaction ID %d, expected %d" % (op.name, op.tid, expected))
                if self.strict_transaction_ids:
                    return RC_INVALID_TRANSACTION_ID, (), None
        if self._busy > 0:
            self._busy -= 1
            return RC_DEVICE_BUSY, (), None
        handler = self._HANDLERS.get(code)
        if handler is None or code not in self.supported_operations:
            return RC_OPERATION_NOT_SUPPORTED, (), None
        if code not in (OP_GET_DEVICE_INFO, OP_OPEN_SESSION) and not self._session_id:
            return RC_SESSION_NOT_OPEN, (), None
        p = tuple(op.params) + (0,) * (5 - len(op.params))
        return handler(self, op, p)

    def device_info_dataset(self) -> bytes:
        formats = self.image_formats
        if formats is None:
            present = {o.format for o in self._objects.values()}
            formats = sorted({FMT_UNDEFINED, FMT_ASSOCIATION, FMT_EXIF_JPEG}
                             | present | set(self.capture_formats))
        return (struct.pack("<HIH", 100, self.vendor_extension_id, self.vendor_extension_version)
                + ptp_string(self.vendor_extension_desc)
                + struct.pack("<H", self.functional_mode)
                + u16_array(self.supported_operations) + u16_array(self.events_supported)
                + u16_array(self.device_properties) + u16_array(self.capture_formats)
                + u16_array(formats)
                + ptp_string(self.manufacturer) + ptp_string(self.model)
                + ptp_string(self.device_version) + ptp_string(self.serial))

    def _op_get_device_info(self, op: Operation, p: tuple[int, ...]) -> Any:
        return RC_OK, (), self.device_info_dataset()

    def _op_open_session(self, op: Operation, p: tuple[int, ...]) -> Any:
        if self._session_id:
            return RC_SESSION_ALREADY_OPEN, (self._session_id,), None
        if p[0] == 0:
            return RC_INVALID_PARAMETER, (), None
        if op.tid != 0:
            self._note("OpenSession with transaction ID %d (the spec says 0)" % op.tid)
        self._session_id = p[0]
        self._last_tid = 0
        self._events.clear()
        return RC_OK, (), None

    def _op_close_session(self, op: Operation, p: tuple[int, ...]) -> Any:
        self._session_id = 0
        self._events.clear()
        return RC_OK, (), None

    def _op_get_storage_ids(self, op: Operation, p: tuple[int, ...]) -> Any:
        return RC_OK, (), u32_array(self._storages)

    def _storage_rc(self, sid: int) -> int:
        if sid in self._storages:
            return RC_OK
        return self._stale_storages.get(sid, RC_INVALID_STORAGE_ID)

    def _object_rc(self, handle: int) -> tuple[SimObject | None, int]:
        obj = self._objects.get(handle)
        if obj is not None:
            return obj, RC_OK
        return None, self._stale_objects.get(handle, RC_INVALID_OBJECT_HANDLE)

    def _op_get_storage_info(self, op: Operation, p: tuple[int, ...]) -> Any:
        rc = self._storage_rc(p[0])
        if rc != RC_OK:
            return rc, (), None
        return RC_OK, (), self._storages[p[0]].info_dataset()

    def _select(self, sid: int, fmt: int, parent: int) -> tuple[int, list[int]]:
        if sid != ALL:
            rc = self._storage_rc(sid)
            if rc != RC_OK:
                return rc, []
        if parent == 0 and self.top_level_only:
            parent = ALL
        if parent == ALL:
            sids = list(self._storages) if sid == ALL else [sid]
            handles = [h for s in sids for h in self._kids.get((s, 0), ())]
        elif parent == 0:
            handles = [h for h, o in self._objects.items() if sid == ALL or o.storage_id == sid]
        else:
            obj, rc = self._object_rc(parent)
            if obj is None:
                return rc, []
            if not obj.is_folder:
                return RC_INVALID_PARENT_OBJECT, []
            if sid != ALL and obj.storage_id != sid:
                return RC_OK, []
            handles = list(self._kids.get((obj.storage_id, parent), ()))
        if fmt:
            handles = [h for h in handles if self._objects[h].format == fmt]
        return RC_OK, handles

    def _op_get_num_objects(self, op: Operation, p: tuple[int, ...]) -> Any:
        rc, handles = self._select(p[0], p[1], p[2])
        return (rc, (len(handles),), None) if rc == RC_OK else (rc, (), None)

    def _op_get_object_handles(self, op: Operation, p: tuple[int, ...]) -> Any:
        rc, handles = self._select(p[0], p[1], p[2])
        return (rc, (), u32_array(handles)) if rc == RC_OK else (rc, (), None)

    def _op_get_object_info(self, op: Operation, p: tuple[int, ...]) -> Any:
        obj, rc = self._object_rc(p[0])
        if obj is None:
            return rc, (), None
        return RC_OK, (), obj.info_dataset()

    def _op_get_object(self, op: Operation, p: tuple[int, ...]) -> Any:
        obj, rc = self._object_rc(p[0])
        if obj is None:
            return rc, (), None
        return RC_OK, (), (obj.size, obj.read, True)

    def _op_get_thumb(self, op: Operation, p: tuple[int, ...]) -> Any:
        obj, rc = self._object_rc(p[0])
        if obj is None:
            return rc, (), None
        if obj.thumb is None:
            return RC_NO_THUMBNAIL_PRESENT, (), None
        thumb = obj.thumb
        return RC_OK, (), (len(thumb), lambda off, n: thumb[off: off + n], True)

    def _op_get_partial_object(self, op: Operation, p: tuple[int, ...]) -> Any:
        obj, rc = self._object_rc(p[0])
        if obj is None:
            return rc, (), None
        offset, maximum = p[1], p[2]
        if offset > obj.size:
            return RC_INVALID_PARAMETER, (), None
        count = min(maximum, obj.size - offset)
        return RC_OK, (count,), (count, lambda off, n: obj.read(offset + off, n), True)

    def _op_delete_object(self, op: Operation, p: tuple[int, ...]) -> Any:
        handle, fmt = p[0], p[1]
        removed: list[int] = []
        failed = False
        if handle == ALL:
            targets = [o for o in self._objects.values() if o.parent == 0]
            for obj in targets:
                if self._storages[obj.storage_id].access == ACCESS_READ_ONLY:
                    failed = True
                    continue
                failed |= self._delete_tree(obj, fmt, removed)
        else:
            obj, rc = self._object_rc(handle)
            if obj is None:
                return rc, (), None
            if self._storages[obj.storage_id].access == ACCESS_READ_ONLY:
                return RC_STORE_READ_ONLY, (), None
            if obj.protected:
                return RC_OBJECT_WRITE_PROTECTED, (), None
            failed = self._delete_tree(obj, 0, removed)
        if self.delete_events:
            for h in removed:
                self._auto_event(EV_OBJECT_REMOVED, (h,))
        if failed:
            return (RC_PARTIAL_DELETION if removed else RC_OBJECT_WRITE_PROTECTED), (), None
        return RC_OK, (), None

    def _delete_tree(self, obj: SimObject, fmt: int, removed: list[int]) -> bool:
        """Delete obj (of format fmt, 0 = any) and a folder's contents; True if
        something had to stay."""
        failed = False
        if obj.is_folder:
            for h in list(self._kids.get((obj.storage_id, obj.handle), ())):
                failed |= self._delete_tree(self._objects[h], fmt, removed)
        if fmt and obj.format != fmt:
            return failed
        if obj.protected:
            return True
        if obj.is_folder and self._kids.get((obj.storage_id, obj.handle)):
            return failed
        self._unlink(obj)
        removed.append(obj.handle)
        return failed

    def _op_initiate_capture(self, op: Operation, p: tuple[int, ...]) -> Any:
        sid, fmt = p[0], p[1]
        if sid == 0:
            writable = [s for s, st in self._storages.items() if st.access == ACCESS_READ_WRITE]
            if not writable:
                return (RC_STORE_READ_ONLY if self._storages else RC_STORE_NOT_AVAILABLE), (), None
            sid = writable[0]
        else:
            rc = self._storage_rc(sid)
            if rc != RC_OK:
                return rc, (), None
        st = self._storages[sid]
        if st.access != ACCESS_READ_WRITE:
            return RC_STORE_READ_ONLY, (), None
        if fmt and fmt not in self.capture_formats:
            return RC_INVALID_OBJECT_FORMAT_CODE, (), None
        if st.free() < 64 * 1024:
            return RC_STORE_FULL, (), None
        tid = op.tid
        generation = self._generation

        def shoot() -> None:
            with self._cv:
                if self._gone or self._generation != generation or sid not in self._storages:
                    return
                self._capture(sid, tid)
                self._auto_event(EV_CAPTURE_COMPLETE, (), tid)

        if self.capture_delay > 0:
            timer = threading.Timer(self.capture_delay, shoot)
            timer.daemon = True
            timer.start()
        else:
            shoot()
        return RC_OK, (), None

    _HANDLERS: dict[int, Callable[..., Any]] = {
        OP_GET_DEVICE_INFO: _op_get_device_info,
        OP_OPEN_SESSION: _op_open_session,
        OP_CLOSE_SESSION: _op_close_session,
        OP_GET_STORAGE_IDS: _op_get_storage_ids,
        OP_GET_STORAGE_INFO: _op_get_storage_info,
        OP_GET_NUM_OBJECTS: _op_get_num_objects,
        OP_GET_OBJECT_HANDLES: _op_get_object_handles,
        OP_GET_OBJECT_INFO: _op_get_object_info,
        OP_GET_OBJECT: _op_get_object,
        OP_GET_THUMB: _op_get_thumb,
        OP_DELETE_OBJECT: _op_delete_object,
        OP_INITIATE_CAPTURE: _op_initiate_capture,
        OP_GET_PARTIAL_OBJECT: _op_get_partial_object,
    }

    # ---- control transfers
    def _ctrl(self, h: _Handle, bm: int, req: int, value: int, index: int, data: Any,
              timeout: int) -> int:
        with self._cv:
            self._check_handle(h)
            length = len(data) * data.itemsize if data is not None else 0
            self.control_requests.append((bm, req, value, index, length))
            rtype = (bm >> 5) & 3
            recipient = bm & 0x1F
            if recipient == 1 and rtype != 2:
                self._check_io(h)   # usbfs: a request to an interface needs it claimed
            if rtype == 0:
                reply = self._standard_request(h, bm, req, value, index, data)
            elif rtype == 1 and recipient == 1 and index & 0xFF == self.INTERFACE:
                reply = self._class_request(h, bm, req, value, data)
            else:
                raise usb_error(LIBUSB_ERROR_PIPE)
            if bm & 0x80:
                n = min(length, len(reply or b""))
                if n:
                    memoryview(data).cast("B")[:n] = reply[:n]
                return n
            return length

    def _standard_request(self, h: _Handle, bm: int, req: int, value: int, index: int,
                          data: Any) -> bytes | None:
        recipient = bm & 0x1F
        if bm == 0x80 and req == 0x06:   # GET_DESCRIPTOR
            reply = self._descriptor_bytes(value >> 8, value & 0xFF)
            if reply is None:
                raise usb_error(LIBUSB_ERROR_PIPE)
            return reply
        if bm & 0x80 and req == 0x00:    # GET_STATUS
            if recipient == 0:
                return b"\x01\x00"       # self-powered
            if recipient == 1 and index == self.INTERFACE:
                return b"\x00\x00"
            if recipient == 2 and index in (self.EP_IN, self.EP_OUT, self.EP_INT, 0, 0x80):
                return b"\x01\x00" if index in self.halted else b"\x00\x00"
            raise usb_error(LIBUSB_ERROR_PIPE)
        if bm == 0x80 and req == 0x08:   # GET_CONFIGURATION
            return bytes([self._configuration])
        if bm == 0x00 and req == 0x09:   # SET_CONFIGURATION
            self._set_configuration(h, value)
            return None
        if bm == 0x81 and req == 0x0A and index == self.INTERFACE:  # GET_INTERFACE
            return b"\x00"
        if bm == 0x01 and req == 0x0B and index == self.INTERFACE:  # SET_INTERFACE
            if value != 0:
                raise usb_error(LIBUSB_ERROR_PIPE)
            self.halted.clear()
            return None
        if req in (0x01, 0x03) and not bm & 0x80:  # CLEAR_FEATURE / SET_FEATURE
            if recipient == 2 and value == 0 and index in (self.EP_IN, self.EP_OUT, self.EP_INT):
                if req == 0x01:
                    self._clear_halt(h, index)
                else:
                    self.halted.add(index)
                return None
            if recipient == 0 and value in (1, 2):  # DEVICE_REMOTE_WAKEUP, TEST_MODE
                return None
        raise usb_error(LIBUSB_ERROR_PIPE)

    def _class_request(self, h: _Handle, bm: int, req: int, value: int, data: Any) -> bytes | None:
        raw = bytes(memoryview(data).cast("B")) if data is not None else b""
        if bm == 0x21 and req == REQ_CANCEL:
            if len(raw) < 6:
                raise usb_error(LIBUSB_ERROR_PIPE)
            code, tid = struct.unpack_from("<HI", raw)
            if code != CANCEL_CODE:
                raise usb_error(LIBUSB_ERROR_PIPE)
            self._cancel(tid)
            return None
        if bm == 0x21 and req == REQ_DEVICE_RESET:
            self.device_resets += 1
            self._reset_transport()
            self.halted -= {self.EP_IN, self.EP_OUT}
            self._session_id = 0
            self._cv.notify_all()
            return None
        if bm == 0xA1 and req == REQ_GET_DEVICE_STATUS:
            self.status_requests += 1
            halted = [ep for ep in (self.EP_IN, self.EP_OUT) if ep in self.halted]
            if self._error_phase:
                code = RC_TRANSACTION_CANCELLED
            elif self._status_busy > 0:
                self._status_busy -= 1
                code, halted = RC_DEVICE_BUSY, []
            else:
                code = RC_OK
            return struct.pack("<HH%dI" % len(halted), 4 + 4 * len(halted), code, *halted)
        raise usb_error(LIBUSB_ERROR_PIPE)

    def _cancel(self, tid: int) -> None:
        cur = self._current
        effect = "ignored"
        if cur is not None and cur.tid == tid:
            if self._pending is cur:                       # data-out phase
                self._out.clear()
                self._out_phase = "command"
                self._pending = None
                effect = "data-out dropped"
            else:
                data = next((t for t in self._in if t.tid == tid and t.kind == "data"), None)
                if data is not None and (data.pos < data.total):
                    mps = self.max_packet_size
                    leftover = (-data.pos) % mps + self.cancel_inflight_packets * mps
                    leftover = min(leftover, data.total - data.pos)
                    keep = []
                    for t in self._in:
                        if t.tid != tid:
                            keep.append(t)
                        elif t is data and leftover:
                            t.total = t.pos + leftover
                            t.truncated = True
                            keep.append(t)
                        else:
                            t.cancelled = True
                    self._in = deque(keep)
                    effect = "data-in dropped"
            if effect != "ignored":
                cur.cancelled = True
                self._current = None
                self._status_busy = self.cancel_busy_polls
        self.cancels.append((tid, effect))
        self._cv.notify_all()



# ---------------------------------------------------------------------------
# The pyusb backend
# ---------------------------------------------------------------------------

class SimulatedBackend(usb.backend.IBackend):
    """A pyusb backend whose bus holds the given simulated camera(s)."""

    def __init__(self, cameras: SimulatedCamera | Iterable[SimulatedCamera] = ()) -> None:
        usb.backend.IBackend.__init__(self)
        if isinstance(cameras, SimulatedCamera):
            cameras = [cameras]
        self.cameras: list[SimulatedCamera] = list(cameras)
        self.calls: Counter[str] = Counter()

    def add_camera(self, camera: SimulatedCamera) -> None:
        self.cameras.append(camera)

    def remove_camera(self, camera: SimulatedCamera) -> None:
        self.cameras.remove(camera)

    # enumeration and descriptors (libusb serves them from its cache, unplugged or not)
    def enumerate_devices(self) -> list[_DeviceRef]:
        self.calls["enumerate_devices"] += 1
        return [_DeviceRef(c, c._generation) for c in list(self.cameras) if not c._gone]

    def get_parent(self, dev: _DeviceRef) -> None:
        return None

    def get_device_descriptor(self, dev: _DeviceRef) -> _Descriptor:
        self.calls["get_device_descriptor"] += 1
        return dev.camera._device_descriptor(dev)

    def get_configuration_descriptor(self, dev: _DeviceRef, config: int) -> _Descriptor:
        self.calls["get_configuration_descriptor"] += 1
        if config != 0:
            raise usb_error(LIBUSB_ERROR_NOT_FOUND)
        return dev.camera._config_descriptor()

    def get_interface_descriptor(self, dev: _DeviceRef, intf: int, alt: int, config: int) -> _Descriptor:
        if config != 0:
            raise usb_error(LIBUSB_ERROR_NOT_FOUND)
        if intf != 0:
            raise IndexError("Invalid interface index " + str(intf))
        if alt != 0:
            raise IndexError("Invalid alternate setting index " + str(alt))
        return dev.camera._interface_descriptor()

    def get_endpoint_descriptor(self, dev: _DeviceRef, ep: int, intf: int, alt: int,
                                config: int) -> _Descriptor:
        self.get_interface_descriptor(dev, intf, alt, config)
        if not 0 <= ep < 3:
            raise IndexError("Invalid endpoint index " + str(ep))
        return dev.camera._endpoint_descriptor(ep)

    # device handles
    def open_device(self, dev: _DeviceRef) -> _Handle:
        self.calls["open_device"] += 1
        return dev.camera._open(dev, self)

    def close_device(self, dev_handle: _Handle) -> None:
        self.calls["close_device"] += 1
        dev_handle.camera._close(dev_handle)   # libusb_close never fails

    def set_configuration(self, dev_handle: _Handle, config_value: int) -> None:
        self.calls["set_configuration"] += 1
        dev_handle.camera._set_configuration(dev_handle, config_value)

    def get_configuration(self, dev_handle: _Handle) -> int:
        self.calls["get_configuration"] += 1
        cam = dev_handle.camera
        with cam._cv:
            cam._check_handle(dev_handle)
            return cam._configuration

    def set_interface_altsetting(self, dev_handle: _Handle, intf: int, altsetting: int) -> None:
        self.calls["set_interface_altsetting"] += 1
        dev_handle.camera._set_altsetting(dev_handle, intf, altsetting)

    def claim_interface(self, dev_handle: _Handle, intf: int) -> None:
        self.calls["claim_interface"] += 1
        dev_handle.camera._claim(dev_handle, intf)

    def release_interface(self, dev_handle: _Handle, intf: int) -> None:
        self.calls["release_interface"] += 1
        dev_handle.camera._release(dev_handle, intf)

    # transfers
    def bulk_write(self, dev_handle: _Handle, ep: int, intf: int, data: Any, timeout: int) -> int:
        self.calls["bulk_write"] += 1
        return dev_handle.camera._bulk_write(dev_handle, ep, data, timeout)

    def bulk_read(self, dev_handle: _Handle, ep: int, intf: int, buff: Any, timeout: int) -> int:
        self.calls["bulk_read"] += 1
        return dev_handle.camera._bulk_read(dev_handle, ep, buff, timeout)

    def intr_write(self, dev_handle: _Handle, ep: int, intf: int, data: Any, timeout: int) -> int:
        raise usb_error(LIBUSB_ERROR_IO)   # the camera has no interrupt OUT endpoint

    def intr_read(self, dev_handle: _Handle, ep: int, intf: int, buff: Any, timeout: int) -> int:
        self.calls["intr_read"] += 1
        return dev_handle.camera._intr_read(dev_handle, ep, buff, timeout)

    def ctrl_transfer(self, dev_handle: _Handle, bmRequestType: int, bRequest: int, wValue: int,
                      wIndex: int, data: Any, timeout: int) -> int:
        self.calls["ctrl_transfer"] += 1
        return dev_handle.camera._ctrl(dev_handle, bmRequestType, bRequest, wValue, wIndex,
                                       data, timeout)

    def clear_halt(self, dev_handle: _Handle, ep: int) -> None:
        self.calls["clear_halt"] += 1
        dev_handle.camera._clear_halt(dev_handle, ep)

    def reset_device(self, dev_handle: _Handle) -> None:
        self.calls["reset_device"] += 1
        dev_handle.camera._usb_reset(dev_handle)

    def is_kernel_driver_active(self, dev_handle: _Handle, intf: int) -> bool:
        return bool(dev_handle.camera._kernel_driver(dev_handle, intf, "query"))

    def detach_kernel_driver(self, dev_handle: _Handle, intf: int) -> None:
        dev_handle.camera._kernel_driver(dev_handle, intf, "detach")

    def attach_kernel_driver(self, dev_handle: _Handle, intf: int) -> None:
        dev_handle.camera._kernel_driver(dev_handle, intf, "attach")
