"""PTP containers, datasets, response codes and dates (stillsvc.drivers.ptp.protocol).

The datasets are built here by hand, field by field, from PIMA 15740 (ISO 15740),
not with the simulated camera's encoders, so that the parsers are checked against an independent reading of the spec. A dataset
cut short anywhere is a clear ``Failed``; random bytes fed to every parser (with
hypothesis) give a value or a StillError, never an IndexError or struct.error.
"""

from __future__ import annotations

import re
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
from stillsvc.drivers.ptp.protocol import (
    HEADER,
    ContainerType,
    DeviceInfo,
    ObjectInfo,
    Op,
    PtpError,
    Response,
    StorageInfo,
    code_name,
    command,
    data_header,
    handles,
    is_picture,
    mime_of,
    parse_header,
    parse_params,
    ptp_date,
)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- building datasets by hand -------------------------------------------------------------------

def u8(v: int) -> bytes:
    return struct.pack("<B", v)


def u16(v: int) -> bytes:
    return struct.pack("<H", v)


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def string(text: str) -> bytes:
    """A PTP string: u8 count of UTF-16LE units with the terminating NUL; 0 for ""."""
    if not text:
        return b"\x00"
    units = text.encode("utf-16-le") + b"\x00\x00"
    return u8(len(units) // 2) + units


def array16(values: list[int]) -> bytes:
    return u32(len(values)) + b"".join(u16(v) for v in values)


def array32(values: list[int]) -> bytes:
    return u32(len(values)) + b"".join(u32(v) for v in values)


OPERATIONS = [0x1001, 0x1002, 0x1003, 0x1004, 0x1005, 0x1007, 0x1008, 0x1009, 0x100A, 0x100B]
EVENTS = [0x4002, 0x4003, 0x4004, 0x4005]


def device_info_bytes() -> bytes:
    return (u16(100) + u32(6) + u16(100) + string("microsoft.com: 1.0") + u16(0)
            + array16(OPERATIONS) + array16(EVENTS) + array16([0x5001, 0x5003])
            + array16([0x3801]) + array16([0x3000, 0x3001, 0x3801, 0x380B])
            + string("Canon Inc.") + string("EOS 5D") + string("3-1.0.2") + string("0123456789"))


def storage_info_bytes() -> bytes:
    return (u16(4) + u16(2) + u16(0) + u64(32 * 1024 ** 3) + u64(12_345_678_901) + u32(2900)
            + string("SD card") + string("EOS_DIGITAL"))


def object_info_bytes(keywords: str = "holiday") -> bytes:
    return (u32(0x00010001) + u16(0x3801) + u16(1) + u32(4_567_890) + u16(0x3808) + u32(7000) + u32(160)
            + u32(120) + u32(5616) + u32(3744) + u32(24) + u32(42) + u16(0) + u32(0) + u32(7)
            + string("IMG_0001.JPG") + string("20240102T030405") + string("20240103T101112.5")
            + string(keywords))


# -- containers ------------------------------------------------------------------------------------

def test_command_container_is_header_then_params():
    raw = command(Op.GetObject, 7, (0x1234, 5))
    assert raw == u32(20) + u16(1) + u16(0x1009) + u32(7) + u32(0x1234) + u32(5)
    assert command(Op.OpenSession, 0, (1,)) == u32(16) + u16(1) + u16(0x1002) + u32(0) + u32(1)
    assert command(Op.GetDeviceInfo, 1) == u32(12) + u16(1) + u16(0x1001) + u32(1)


def test_command_has_at_most_five_params():
    assert len(command(Op.GetObjectHandles, 3, (1, 2, 3, 4, 5))) == 32
    with pytest.raises(ValueError):
        command(Op.GetObjectHandles, 3, (1, 2, 3, 4, 5, 6))


def test_data_header_counts_the_header_in_its_length():
    assert data_header(Op.GetObject, 9, 1000) == u32(1012) + u16(2) + u16(0x1009) + u32(9)
    assert data_header(Op.SendObject, 1, 0) == u32(12) + u16(2) + u16(0x100D) + u32(1)


def test_parse_header_and_params_of_a_response():
    raw = u32(20) + u16(3) + u16(0x2001) + u32(42) + u32(0xDEADBEEF) + u32(3)
    head = parse_header(raw)
    assert (head.length, head.type, head.code, head.transaction) == (20, ContainerType.RESPONSE, 0x2001, 42)
    assert head.params == ()
    full = parse_params(raw)
    assert full.params == (0xDEADBEEF, 3)
    assert full.type == ContainerType.RESPONSE


def test_parse_params_takes_no_more_than_the_length_says_and_five_at_most():
    # Trailing bytes beyond the container's length are not parameters.
    raw = u32(16) + u16(4) + u16(0x4002) + u32(0xFFFFFFFF) + u32(17) + u32(99)
    event = parse_params(raw)
    assert (event.type, event.code, event.params) == (ContainerType.EVENT, 0x4002, (17,))
    six = u32(36) + u16(3) + u16(0x2001) + u32(1) + b"".join(u32(i) for i in range(6))
    assert parse_params(six).params == (0, 1, 2, 3, 4)
    # A length longer than what came: only whole parameters that are there.
    short = u32(32) + u16(3) + u16(0x2001) + u32(1) + u32(5) + b"\x01\x02"
    assert parse_params(short).params == (5,)


@pytest.mark.parametrize("raw, words", [
    (b"", "shorter than its header"),
    (b"\x0c\x00\x00\x00\x03\x00\x01", "shorter than its header"),
    (u32(4) + u16(3) + u16(0x2001) + u32(1), "length (4) is shorter than its header"),
])
def test_bad_headers_are_failed(raw, words):
    with pytest.raises(Failed, match=re.escape(words)):
        parse_header(raw)
    with pytest.raises(Failed, match=re.escape(words)):
        parse_params(raw)


# -- datasets --------------------------------------------------------------------------------------

def test_device_info_parses_every_field():
    info = DeviceInfo.parse(device_info_bytes())
    assert info.standard_version == 100
    assert (info.vendor_extension_id, info.vendor_extension_version) == (6, 100)
    assert info.vendor_extension == "microsoft.com: 1.0"
    assert info.functional_mode == 0
    assert info.operations == frozenset(OPERATIONS)
    assert info.events == frozenset(EVENTS)
    assert info.properties == frozenset({0x5001, 0x5003})
    assert info.capture_formats == (0x3801,)
    assert info.image_formats == (0x3000, 0x3001, 0x3801, 0x380B)
    assert (info.manufacturer, info.model, info.version, info.serial) == (
        "Canon Inc.", "EOS 5D", "3-1.0.2", "0123456789")


def test_device_info_with_empty_strings_and_arrays():
    raw = (u16(100) + u32(0) + u16(0) + string("") + u16(0) + array16([]) * 5 + string("") * 4)
    info = DeviceInfo.parse(raw)
    assert info.operations == frozenset() and info.image_formats == ()
    assert (info.vendor_extension, info.manufacturer, info.model, info.version, info.serial) == ("",) * 5


def test_storage_info_parses_every_field():
    info = StorageInfo.parse(storage_info_bytes())
    assert (info.storage_type, info.filesystem_type, info.access) == (4, 2, 0)
    assert info.capacity == 32 * 1024 ** 3
    assert info.free_bytes == 12_345_678_901  # a u64 above 4 GiB survives
    assert info.free_images == 2900
    assert (info.description, info.label) == ("SD card", "EOS_DIGITAL")


def test_object_info_parses_every_field():
    info = ObjectInfo.parse(object_info_bytes())
    assert info.storage == 0x00010001
    assert info.format == 0x3801 and not info.is_folder
    assert info.protection == 1
    assert info.size == 4_567_890
    assert (info.thumb_format, info.thumb_size, info.thumb_width, info.thumb_height) == (0x3808, 7000, 160, 120)
    assert (info.width, info.height, info.bit_depth) == (5616, 3744, 24)
    assert info.parent == 42
    assert (info.association_type, info.association_desc, info.sequence) == (0, 0, 7)
    assert info.filename == "IMG_0001.JPG"
    assert (info.captured, info.modified) == ("20240102T030405", "20240103T101112.5")
    assert info.keywords == "holiday"


def test_object_info_of_a_folder_and_without_keywords():
    raw = (u32(0x00010001) + u16(0x3001) + u16(0) + u32(0) + u16(0) + u32(0) * 6 + u32(0) + u16(1) + u32(0)
           + u32(0) + string("DCIM") + string("") + string(""))
    info = ObjectInfo.parse(raw)  # the Keywords string left out altogether, as some cameras do
    assert info.is_folder and info.filename == "DCIM" and info.association_type == 1
    assert info.keywords == "" and info.captured == ""


def test_object_info_names_in_other_scripts():
    raw = object_info_bytes()
    name = "Fotó_日本_😀.JPG"  # a surrogate pair too
    fixed = raw[:52]
    info = ObjectInfo.parse(fixed + string(name) + string("") + string("") + string(""))
    assert info.filename == name


def test_handles_array():
    assert handles(array32([1, 2, 0xFFFFFFFE])) == (1, 2, 0xFFFFFFFE)
    assert handles(array32([])) == ()


def _prefixes(raw: bytes):
    return [raw[:n] for n in range(len(raw))]


@pytest.mark.parametrize("parse, raw, what", [
    (DeviceInfo.parse, device_info_bytes(), "DeviceInfo"),
    (StorageInfo.parse, storage_info_bytes(), "StorageInfo"),
    (handles, array32([1, 2, 3]), "list of handles"),
], ids=["DeviceInfo", "StorageInfo", "handles"])
def test_every_truncation_is_a_clear_failure(parse, raw, what):
    for prefix in _prefixes(raw):
        with pytest.raises(Failed, match=f"the camera's {what} ends early"):
            parse(prefix)


def test_object_info_truncations():
    raw = object_info_bytes(keywords="holiday")
    before_keywords = len(raw) - len(string("holiday"))
    for prefix in _prefixes(raw):
        if len(prefix) == before_keywords:
            # Keywords is the one field a camera may leave out: cut exactly before it, it is "".
            assert ObjectInfo.parse(prefix).keywords == ""
            continue
        with pytest.raises(Failed, match="the camera's ObjectInfo ends early"):
            ObjectInfo.parse(prefix)


def test_an_array_count_beyond_the_data_is_failed_not_a_huge_allocation():
    raw = u16(100) + u32(0) + u16(0) + string("") + u16(0) + u32(0x7FFFFFFF) + b"\x01\x10"
    with pytest.raises(Failed, match="ends early in an array"):
        DeviceInfo.parse(raw)
    with pytest.raises(Failed, match="ends early in an array"):
        handles(u32(0xFFFFFFFF) + u32(1))


def test_a_string_count_beyond_the_data_is_failed():
    raw = storage_info_bytes()[:26] + u8(10) + "SD".encode("utf-16-le")
    with pytest.raises(Failed, match="ends early in a string"):
        StorageInfo.parse(raw)


# -- fuzzing: random bytes give a value or a StillError ---------------------------------------

PARSERS = [DeviceInfo.parse, StorageInfo.parse, ObjectInfo.parse, handles, parse_header, parse_params]


def _only_still_errors(parse, data: bytes) -> None:
    try:
        parse(data)
    except StillError:
        pass  # anything else (IndexError, struct.error, UnicodeDecodeError, MemoryError) fails the test


@FUZZ
@given(data=st.binary(max_size=600))
def test_fuzz_random_bytes(data):
    for parse in PARSERS:
        _only_still_errors(parse, data)


@FUZZ
@given(cut=st.integers(min_value=0, max_value=400), tail=st.binary(max_size=64),
       which=st.sampled_from(["device", "storage", "object"]))
def test_fuzz_valid_datasets_cut_and_followed_by_garbage(cut, tail, which):
    raw = {"device": device_info_bytes, "storage": storage_info_bytes, "object": object_info_bytes}[which]()
    data = raw[:cut] + tail
    for parse in PARSERS:
        _only_still_errors(parse, data)


@FUZZ
@given(flip=st.lists(st.tuples(st.integers(min_value=0, max_value=200), st.integers(min_value=0, max_value=255)),
                     max_size=8))
def test_fuzz_valid_datasets_with_bytes_changed(flip):
    for raw in (device_info_bytes(), storage_info_bytes(), object_info_bytes()):
        data = bytearray(raw)
        for at, value in flip:
            data[at % len(data)] = value
        for parse in PARSERS:
            _only_still_errors(parse, bytes(data))


DATE_LIKE = st.builds(
    lambda digits, tenths, zone: f"{digits[:8]}T{digits[8:]}{tenths}{zone}",
    st.text("0123456789", min_size=14, max_size=14), st.sampled_from(["", ".0", ".9", "."]),
    st.sampled_from(["", "Z", "+0100", "-0530", "+", "-1", "Z+0100"]))


@FUZZ
@given(text=st.text(max_size=40) | DATE_LIKE)
def test_fuzz_ptp_date_gives_a_string(text):
    assert isinstance(ptp_date(text), str)


# -- response codes -------------------------------------------------------------------------------

@pytest.mark.parametrize("code, cls, name", [
    (Response.DeviceBusy, Busy, "DeviceBusy"),
    (Response.InvalidObjectHandle, NotFound, "InvalidObjectHandle"),
    (Response.OperationNotSupported, NotSupported, "OperationNotSupported"),
    (Response.InvalidStorageID, NotFound, "InvalidStorageID"),
    (Response.StoreNotAvailable, NotFound, "StoreNotAvailable"),
    (Response.NoThumbnailPresent, NotFound, "NoThumbnailPresent"),
    (Response.ObjectWriteProtected, AccessDenied, "ObjectWriteProtected"),
    (Response.StoreReadOnly, AccessDenied, "StoreReadOnly"),
    (Response.TransactionCancelled, Cancelled, "TransactionCancelled"),
    (Response.InvalidParameter, InvalidArgument, "InvalidParameter"),
    (Response.GeneralError, Failed, "GeneralError"),
])
def test_ptp_error_maps_to_the_service_error_with_the_ptp_name(code, cls, name):
    error = PtpError(Op.GetObject, code, (5,)).error()
    assert type(error) is cls
    assert name in error.message and f"0x{int(code):04x}" in error.message
    assert "GetObject" in error.message
    assert error.ptp_code == code


def test_an_unknown_response_code_is_failed_with_its_number():
    error = PtpError(0x9201, 0xA001).error()
    assert type(error) is Failed
    assert "0xa001" in error.message and "0x9201" in error.message


def test_code_names_and_formats():
    assert code_name(0x1009) == "GetObject" and code_name(0x2019) == "DeviceBusy"
    assert code_name(0x4002) == "ObjectAdded" and code_name(0xB123) == "0xb123"
    assert mime_of(0x3801) == "image/jpeg" and is_picture(0x3801)
    assert mime_of(0x3001) == "inode/directory" and not is_picture(0x3001)
    assert mime_of(0x1234) == "application/octet-stream" and not is_picture(0x1234)
    assert HEADER.size == 12


# -- dates ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, iso", [
    ("20240102T030405", "2024-01-02T03:04:05"),
    ("20240102T030405.5", "2024-01-02T03:04:05"),
    ("20240102T030405Z", "2024-01-02T03:04:05Z"),
    ("20240102T030405+0100", "2024-01-02T03:04:05+01:00"),
    ("20240102T030405-0530", "2024-01-02T03:04:05-05:30"),
    ("", ""),
    ("not a date", ""),
    ("20241302T030405", ""),  # month 13
    ("2024-01-02", ""),
])
def test_ptp_date(text, iso):
    assert ptp_date(text) == iso


@pytest.mark.parametrize("text, iso", [
    ("20240102T030405.5Z", "2024-01-02T03:04:05Z"),
    ("20240102T030405.5+0100", "2024-01-02T03:04:05+01:00"),
])
def test_ptp_date_with_tenths_and_a_zone(text, iso):
    assert ptp_date(text) == iso
