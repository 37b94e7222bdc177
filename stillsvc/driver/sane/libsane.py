"""A thin ctypes binding of libsane: only what the SANE worker process calls.

Loaded in the worker process alone (:mod:`stillsvc.driver.sane.worker`), never
in the service: SANE backends are C code, some of them vendor blobs, that may
crash, hang or leak. ctypes rather than python-sane because python-sane reads
line by line and holds the GIL around ``control_option``, which stalls a busy
process; here :meth:`Handle.read_into` fills a caller's buffer in large reads
(ctypes releases the GIL around every foreign call).

Every call is counted by name in :attr:`Library.calls`, so that the service can
show (and its tests assert) which SANE calls a device has cost.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections import Counter
from dataclasses import dataclass
from typing import Any

from stillsvc.common.sane import Action, Constraint, Status, Type, fixed, unfixed

SANE_Word = ctypes.c_int
SANE_Handle = ctypes.c_void_p
SANE_String_Const = ctypes.c_char_p


class _Device(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("vendor", ctypes.c_char_p), ("model", ctypes.c_char_p),
                ("type", ctypes.c_char_p)]


class _Range(ctypes.Structure):
    _fields_ = [("min", SANE_Word), ("max", SANE_Word), ("quant", SANE_Word)]


class _ConstraintUnion(ctypes.Union):
    _fields_ = [("string_list", ctypes.POINTER(ctypes.c_char_p)), ("word_list", ctypes.POINTER(SANE_Word)),
                ("range", ctypes.POINTER(_Range))]


class _OptionDescriptor(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("title", ctypes.c_char_p), ("desc", ctypes.c_char_p),
                ("type", ctypes.c_int), ("unit", ctypes.c_int), ("size", SANE_Word), ("cap", SANE_Word),
                ("constraint_type", ctypes.c_int), ("constraint", _ConstraintUnion)]


class _Parameters(ctypes.Structure):
    _fields_ = [("format", ctypes.c_int), ("last_frame", SANE_Word), ("bytes_per_line", SANE_Word),
                ("pixels_per_line", SANE_Word), ("lines", SANE_Word), ("depth", SANE_Word)]


class SaneError(Exception):
    """A SANE call returned a status other than GOOD."""

    def __init__(self, call: str, status: int) -> None:
        self.call = call
        self.status = status
        try:
            self.status_name = Status(status).name
        except ValueError:
            self.status_name = f"status {status}"
        super().__init__(f"{call}: {self.status_name}")


@dataclass(frozen=True)
class Parameters:
    format: int
    last_frame: bool
    bytes_per_line: int
    pixels_per_line: int
    lines: int
    depth: int



def _text(value: bytes | None) -> str:
    return value.decode("utf-8", "replace") if value is not None else ""


class Library:
    """libsane, initialised once (``sane_init``) for the life of the process."""

    def __init__(self, path: str | None = None) -> None:
        name = path or ctypes.util.find_library("sane") or "libsane.so.1"
        self.lib = lib = ctypes.CDLL(name)
        self.calls: Counter[str] = Counter()
        lib.sane_init.argtypes = [ctypes.POINTER(SANE_Word), ctypes.c_void_p]
        lib.sane_get_devices.argtypes = [ctypes.POINTER(ctypes.POINTER(ctypes.POINTER(_Device))), SANE_Word]
        lib.sane_open.argtypes = [SANE_String_Const, ctypes.POINTER(SANE_Handle)]
        lib.sane_close.argtypes = [SANE_Handle]
        lib.sane_close.restype = None
        lib.sane_get_option_descriptor.argtypes = [SANE_Handle, SANE_Word]
        lib.sane_get_option_descriptor.restype = ctypes.POINTER(_OptionDescriptor)
        lib.sane_control_option.argtypes = [SANE_Handle, SANE_Word, ctypes.c_int, ctypes.c_void_p,
                                            ctypes.POINTER(SANE_Word)]
        lib.sane_get_parameters.argtypes = [SANE_Handle, ctypes.POINTER(_Parameters)]
        lib.sane_start.argtypes = [SANE_Handle]
        lib.sane_read.argtypes = [SANE_Handle, ctypes.c_void_p, SANE_Word, ctypes.POINTER(SANE_Word)]
        lib.sane_cancel.argtypes = [SANE_Handle]
        lib.sane_cancel.restype = None
        lib.sane_exit.restype = None
        version = SANE_Word()
        self._check("sane_init", lib.sane_init(ctypes.byref(version), None))
        self.version = version.value

    def _check(self, call: str, status: int) -> None:
        self.calls[call] += 1
        if status != Status.GOOD:
            raise SaneError(call, status)

    def devices(self, local_only: bool = True) -> list[dict[str, str]]:
        array = ctypes.POINTER(ctypes.POINTER(_Device))()
        self._check("sane_get_devices", self.lib.sane_get_devices(ctypes.byref(array), int(local_only)))
        found = []
        index = 0
        while array[index]:
            d = array[index].contents
            found.append({"name": _text(d.name), "vendor": _text(d.vendor), "model": _text(d.model),
                          "type": _text(d.type)})
            index += 1
        return found

    def open(self, name: str) -> Handle:
        handle = SANE_Handle()
        self._check("sane_open", self.lib.sane_open(name.encode(), ctypes.byref(handle)))
        return Handle(self, handle)

    def exit(self) -> None:
        self.calls["sane_exit"] += 1
        self.lib.sane_exit()


@dataclass(frozen=True)
class Descriptor:
    """One option descriptor as plain values (a constraint as a dict)."""

    index: int
    name: str
    title: str
    desc: str
    type: int
    unit: int
    size: int
    cap: int
    constraint: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "title": self.title, "desc": self.desc, "type": self.type,
                "unit": self.unit, "size": self.size, "cap": self.cap, "constraint": self.constraint}


class Handle:
    """An open SANE device."""

    def __init__(self, library: Library, handle: ctypes.c_void_p) -> None:
        self.library = library
        self.lib = library.lib
        self.handle = handle
        self.closed = False
        self._descriptors: dict[int, Descriptor] = {}

    def _check(self, call: str, status: int) -> None:
        self.library._check(call, status)

    def _count(self, call: str) -> None:
        self.library.calls[call] += 1

    # -- options ----------------------------------------------------------------------
    def descriptor(self, index: int) -> Descriptor | None:
        self._count("sane_get_option_descriptor")
        pointer = self.lib.sane_get_option_descriptor(self.handle, index)
        if not pointer:
            return None
        d = pointer.contents
        constraint: dict[str, Any] = {"kind": "none"}
        fixed_type = d.type == Type.FIXED
        if d.constraint_type == Constraint.RANGE and d.constraint.range:
            r = d.constraint.range.contents
            convert = unfixed if fixed_type else int
            constraint = {"kind": "range", "min": convert(r.min), "max": convert(r.max), "quant": convert(r.quant)}
        elif d.constraint_type == Constraint.WORD_LIST and d.constraint.word_list:
            words = d.constraint.word_list
            count = words[0]
            constraint = {"kind": "words",
                          "values": [unfixed(words[i]) if fixed_type else words[i] for i in range(1, count + 1)]}
        elif d.constraint_type == Constraint.STRING_LIST and d.constraint.string_list:
            strings, values, i = d.constraint.string_list, [], 0
            while strings[i] is not None:
                values.append(_text(strings[i]))
                i += 1
            constraint = {"kind": "strings", "values": values}
        result = Descriptor(index, _text(d.name), _text(d.title), _text(d.desc), d.type, d.unit, d.size, d.cap,
                            constraint)
        self._descriptors[index] = result
        return result

    def descriptors(self) -> list[Descriptor]:
        """Every descriptor, option 0 (the count) first."""
        first = self.descriptor(0)
        if first is None:
            return []
        count = self.get(0)
        found = [first]
        for index in range(1, int(count) if isinstance(count, int) else 1):
            d = self.descriptor(index)
            if d is not None:
                found.append(d)
        return found

    def _buffer(self, d: Descriptor) -> tuple[Any, int]:
        if d.type == Type.STRING:
            return ctypes.create_string_buffer(max(1, d.size)), 0
        count = max(1, d.size // ctypes.sizeof(SANE_Word))
        return (SANE_Word * count)(), count

    def get(self, index: int) -> Any:
        d = self._descriptors.get(index) or self.descriptor(index)
        if d is None:
            raise SaneError("sane_get_option_descriptor", Status.INVAL)
        if d.type in (Type.BUTTON, Type.GROUP):
            return None
        buffer, count = self._buffer(d)
        self._check("sane_control_option", self.lib.sane_control_option(
            self.handle, index, Action.GET, ctypes.cast(buffer, ctypes.c_void_p), None))
        return self._value(d, buffer, count)

    def _value(self, d: Descriptor, buffer: Any, count: int) -> Any:
        if d.type == Type.STRING:
            return _text(buffer.value)
        values = [bool(w) if d.type == Type.BOOL else unfixed(w) if d.type == Type.FIXED else int(w)
                  for w in buffer[:count]]
        return values[0] if count == 1 else values

    def set(self, index: int, value: Any) -> tuple[int, Any]:
        """Set option ``index``; returns the info bits and the value as the backend left it."""
        d = self._descriptors.get(index) or self.descriptor(index)
        if d is None:
            raise SaneError("sane_get_option_descriptor", Status.INVAL)
        info = SANE_Word()
        if d.type == Type.BUTTON:
            self._check("sane_control_option", self.lib.sane_control_option(
                self.handle, index, Action.SET, None, ctypes.byref(info)))
            return info.value, None
        buffer, count = self._buffer(d)
        if d.type == Type.STRING:
            encoded = str(value).encode()
            if len(encoded) >= max(1, d.size):
                raise SaneError("sane_control_option", Status.INVAL)
            buffer.value = encoded
        else:
            items = value if isinstance(value, (list, tuple)) else [value] * count
            for i, item in enumerate(items[:count]):
                buffer[i] = fixed(item) if d.type == Type.FIXED else int(item)
        self._check("sane_control_option", self.lib.sane_control_option(
            self.handle, index, Action.SET, ctypes.cast(buffer, ctypes.c_void_p), ctypes.byref(info)))
        return info.value, self._value(d, buffer, count)

    # -- scanning ---------------------------------------------------------------------
    def parameters(self) -> Parameters:
        p = _Parameters()
        self._check("sane_get_parameters", self.lib.sane_get_parameters(self.handle, ctypes.byref(p)))
        return Parameters(p.format, bool(p.last_frame), p.bytes_per_line, p.pixels_per_line, p.lines, p.depth)

    def start(self) -> None:
        self._check("sane_start", self.lib.sane_start(self.handle))

    def read_into(self, buffer: Any, offset: int, size: int) -> int:
        """One ``sane_read`` into ``buffer`` (a writable ctypes-compatible buffer) at
        ``offset``, at most ``size`` bytes; returns how many came, 0 at the end of the
        frame (SANE_STATUS_EOF). Other statuses raise :class:`SaneError`."""
        length = SANE_Word()
        address = ctypes.addressof(buffer) + offset
        self.library.calls["sane_read"] += 1
        status = self.lib.sane_read(self.handle, ctypes.c_void_p(address), size, ctypes.byref(length))
        if status == Status.EOF:
            return 0
        if status != Status.GOOD:
            raise SaneError("sane_read", status)
        return length.value

    def cancel(self) -> None:
        """``sane_cancel``: the SANE standard allows it from another thread during a read."""
        self._count("sane_cancel")
        self.lib.sane_cancel(self.handle)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._count("sane_close")
            self.lib.sane_close(self.handle)


__all__ = ["Descriptor", "Handle", "Library", "Parameters", "SaneError"]
