"""SANE clients for the tests of the SANE network server: a private client
configuration, PNM decoding, and a small ctypes client of libsane.

Every SANE program the tests run gets :attr:`SaneClientConfig.env`: a private
``SANE_CONFIG_DIR`` whose ``dll.conf`` enables only the ``net`` backend and whose
``net.conf`` names only 127.0.0.1, so no SANE program ever reads the system
configuration (which enables backends that broadcast on the network).

Run as a script, this file is the ctypes client::

    python3 tests/sane_env.py < ops.json

It reads a JSON list of operations from stdin, runs them in order against libsane
(which reaches the server through ``net``) and prints one JSON object per operation
on its own line as soon as that operation is done. It imports nothing of stillsvc
or of the tests, so it runs in any process (inside a network namespace, as a
different user). Operations::

    ["init"]                              version code
    ["devices"]                           [{name, vendor, model, type}, ...]
    ["open", "net:127.0.0.1:sim0"]
    ["descriptors"]                       every option descriptor (index 0 included)
    ["get", "resolution"]                 {status, value}
    ["set", "resolution", 150]            {status, info, value}: value as the backend left it
    ["auto", "brightness"]                {status, info}
    ["parameters"]                        {status, params}
    ["mark", "text"]                      prints {"mark": "text"} (e.g. before a blocking call)
    ["start"]                             {status}
    ["read"]                              reads until EOF: {status, bytes, sha256}
    ["scan"]                              start + parameters + read, frame by frame
    ["cancel"], ["close"], ["exit"]

Statuses are SANE's names ("GOOD", "DEVICE_BUSY", ...). FIXED values are floats.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

# -- the client's configuration ------------------------------------------------------------------


class SaneClientConfig:
    """A private SANE_CONFIG_DIR: only the ``net`` backend, only 127.0.0.1."""

    def __init__(self, folder: Path, hosts: tuple[str, ...] = ("127.0.0.1",), connect_timeout: int = 5) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "dll.conf").write_text("net\n")
        (self.folder / "net.conf").write_text(f"connect_timeout = {connect_timeout}\n" + "".join(
            f"{host}\n" for host in hosts))

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SANE_")}
        # No trailing colon: with one, libsane would read the system folders as well.
        env["SANE_CONFIG_DIR"] = str(self.folder)
        return env


LIBSANE = "libsane.so.1"


def sane_unavailable_reason() -> str | None:
    """Why the SANE clients cannot run here (no scanimage, no libsane, no net backend)."""
    if shutil.which("scanimage") is None:
        return "scanimage is not installed (Debian package sane-utils)"
    try:
        ctypes.CDLL(LIBSANE)
    except OSError as e:
        return f"{LIBSANE} cannot be loaded (Debian package libsane1): {e}"
    folders = [Path(p) / "sane" for p in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib",
                                          "/usr/lib64", "/usr/local/lib")]
    if not any(folder.glob("libsane-net.so*") for folder in folders):
        return "libsane's net backend (libsane-net.so) is not installed"
    return None


# -- PNM as scanimage writes it ------------------------------------------------------------------


class Pnm:
    """A decoded P4 (bitmap), P5 (gray) or P6 (colour) image; ``data`` is the raster as stored:
    P4 rows padded to whole bytes with bit 1 = black, 16-bit samples big-endian."""

    def __init__(self, magic: str, width: int, height: int, maxval: int, data: bytes) -> None:
        self.magic, self.width, self.height, self.maxval, self.data = magic, width, height, maxval, data

    @property
    def mode(self) -> str:
        return {"P4": "lineart", "P5": "gray", "P6": "color"}[self.magic]

    @property
    def depth(self) -> int:
        return 1 if self.magic == "P4" else (16 if self.maxval > 255 else 8)

    def __repr__(self) -> str:
        return f"Pnm({self.magic} {self.width}x{self.height} maxval {self.maxval}, {len(self.data)} bytes)"


def parse_pnm(blob: bytes, offset: int = 0) -> tuple[Pnm, int]:
    """One PNM image starting at ``offset``: (the image, the offset after it)."""
    pos = offset
    tokens: list[bytes] = []
    magic = blob[pos:pos + 2]
    if magic not in (b"P4", b"P5", b"P6"):
        raise ValueError(f"not a binary PNM at {offset}: {blob[pos:pos + 16]!r}")
    want = 3 if magic == b"P4" else 4
    while len(tokens) < want:
        while pos < len(blob) and blob[pos:pos + 1].isspace():
            pos += 1
        if blob[pos:pos + 1] == b"#":
            pos = blob.index(b"\n", pos) + 1
            continue
        start = pos
        while pos < len(blob) and not blob[pos:pos + 1].isspace():
            pos += 1
        if start == pos:
            raise ValueError("truncated PNM header")
        tokens.append(blob[start:pos])
    pos += 1  # the single whitespace after the header
    width, height = int(tokens[1]), int(tokens[2])
    maxval = 1 if magic == b"P4" else int(tokens[3])
    if magic == b"P4":
        size = (width + 7) // 8 * height
    else:
        size = width * height * (3 if magic == b"P6" else 1) * (2 if maxval > 255 else 1)
    data = blob[pos:pos + size]
    if len(data) != size:
        raise ValueError(f"PNM data truncated: {len(data)} of {size} bytes")
    return Pnm(magic.decode(), width, height, maxval, data), pos + size


def read_pnm(path: Path) -> Pnm:
    image, _ = parse_pnm(Path(path).read_bytes())
    return image


# -- the ctypes client ---------------------------------------------------------------------------

STATUS = ["GOOD", "UNSUPPORTED", "CANCELLED", "DEVICE_BUSY", "INVAL", "EOF", "JAMMED", "NO_DOCS", "COVER_OPEN",
          "IO_ERROR", "NO_MEM", "ACCESS_DENIED"]
TYPES = ["BOOL", "INT", "FIXED", "STRING", "BUTTON", "GROUP"]
UNITS = ["NONE", "PIXEL", "BIT", "MM", "DPI", "PERCENT", "MICROSECOND"]
CONSTRAINTS = ["NONE", "RANGE", "WORD_LIST", "STRING_LIST"]
CAPS = {"SOFT_SELECT": 1, "HARD_SELECT": 2, "SOFT_DETECT": 4, "EMULATED": 8, "AUTOMATIC": 16, "INACTIVE": 32,
        "ADVANCED": 64}
INFO_INEXACT, INFO_RELOAD_OPTIONS, INFO_RELOAD_PARAMS = 1, 2, 4
ACTION_GET, ACTION_SET, ACTION_AUTO = 0, 1, 2
FRAMES = ["GRAY", "RGB", "RED", "GREEN", "BLUE"]

Word = ctypes.c_int


class _Device(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("vendor", ctypes.c_char_p), ("model", ctypes.c_char_p),
                ("type", ctypes.c_char_p)]


class _Range(ctypes.Structure):
    _fields_ = [("min", Word), ("max", Word), ("quant", Word)]


class _Constraint(ctypes.Union):
    _fields_ = [("string_list", ctypes.POINTER(ctypes.c_char_p)), ("word_list", ctypes.POINTER(Word)),
                ("range", ctypes.POINTER(_Range))]


class _Descriptor(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("title", ctypes.c_char_p), ("desc", ctypes.c_char_p),
                ("type", ctypes.c_int), ("unit", ctypes.c_int), ("size", Word), ("cap", Word),
                ("constraint_type", ctypes.c_int), ("constraint", _Constraint)]


class _Parameters(ctypes.Structure):
    _fields_ = [("format", ctypes.c_int), ("last_frame", Word), ("bytes_per_line", Word),
                ("pixels_per_line", Word), ("lines", Word), ("depth", Word)]


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "replace")


def _unfix(word: int) -> float:
    return word / 65536.0


#: SANE_Auth_Callback: (resource, username buffer, password buffer), buffers of 128 bytes.
_AUTH = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p)


def _fix(value: float) -> int:
    return int(round(value * 65536))


class SaneClient:
    """libsane through ctypes, one handle at a time."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(LIBSANE)
        lib.sane_init.argtypes = [ctypes.POINTER(Word), ctypes.c_void_p]
        lib.sane_get_devices.argtypes = [ctypes.POINTER(ctypes.POINTER(ctypes.POINTER(_Device))), Word]
        lib.sane_open.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
        lib.sane_close.argtypes = [ctypes.c_void_p]
        lib.sane_get_option_descriptor.argtypes = [ctypes.c_void_p, Word]
        lib.sane_get_option_descriptor.restype = ctypes.POINTER(_Descriptor)
        lib.sane_control_option.argtypes = [ctypes.c_void_p, Word, ctypes.c_int, ctypes.c_void_p,
                                            ctypes.POINTER(Word)]
        lib.sane_get_parameters.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Parameters)]
        lib.sane_start.argtypes = [ctypes.c_void_p]
        lib.sane_read.argtypes = [ctypes.c_void_p, ctypes.c_void_p, Word, ctypes.POINTER(Word)]
        lib.sane_cancel.argtypes = [ctypes.c_void_p]
        lib.sane_cancel.restype = None
        lib.sane_close.restype = None
        lib.sane_exit.restype = None
        lib.sane_strstatus.argtypes = [ctypes.c_int]
        lib.sane_strstatus.restype = ctypes.c_char_p
        self.lib = lib
        self.handle = ctypes.c_void_p()
        self.opened = False
        self.descriptors: dict[str, int] = {}
        #: (user, password, "md5" or "plain") that the authorization callback answers with.
        self.credentials: tuple[str, str, str] | None = None
        self.asked: list[str] = []
        self._callback = _AUTH(self._authorize)

    def _authorize(self, resource: bytes, user: int, password: int) -> None:
        """What scanimage's callback does: the password as "$MD5$" + md5(salt +
        password) when the resource carries a salt, else as it is."""
        text = resource.decode()
        self.asked.append(text)
        if self.credentials is None:
            return
        name, secret, how = self.credentials
        if how == "md5" and "$MD5$" in text:
            secret = "$MD5$" + hashlib.md5((text.split("$MD5$", 1)[1] + secret).encode()).hexdigest()
        ctypes.memmove(user, name.encode() + b"\0", len(name) + 1)
        ctypes.memmove(password, secret.encode() + b"\0", len(secret) + 1)

    @staticmethod
    def status(code: int) -> str:
        return STATUS[code] if 0 <= code < len(STATUS) else f"status {code}"

    def init(self) -> dict[str, Any]:
        version = Word()
        st = self.lib.sane_init(ctypes.byref(version), self._callback)
        return {"status": self.status(st), "version": version.value}

    def devices(self) -> dict[str, Any]:
        listing = ctypes.POINTER(ctypes.POINTER(_Device))()
        st = self.lib.sane_get_devices(ctypes.byref(listing), 0)
        found = []
        if st == 0:
            i = 0
            while listing[i]:
                d = listing[i].contents
                found.append({"name": _text(d.name), "vendor": _text(d.vendor), "model": _text(d.model),
                              "type": _text(d.type)})
                i += 1
        return {"status": self.status(st), "devices": found}

    def open(self, name: str) -> dict[str, Any]:
        st = self.lib.sane_open(name.encode(), ctypes.byref(self.handle))
        self.opened = st == 0
        if self.opened:
            self.descriptors_all()
        return {"status": self.status(st)}

    def _descriptor(self, index: int) -> dict[str, Any] | None:
        p = self.lib.sane_get_option_descriptor(self.handle, index)
        if not p:
            return None
        d = p.contents
        kind = CONSTRAINTS[d.constraint_type] if 0 <= d.constraint_type < len(CONSTRAINTS) else d.constraint_type
        fixed = d.type == 2
        constraint: Any = None
        if kind == "RANGE" and d.constraint.range:
            r = d.constraint.range.contents
            conv = _unfix if fixed else int
            constraint = {"min": conv(r.min), "max": conv(r.max), "quant": conv(r.quant)}
        elif kind == "WORD_LIST" and d.constraint.word_list:
            words = d.constraint.word_list
            constraint = [(_unfix(words[i]) if fixed else words[i]) for i in range(1, words[0] + 1)]
        elif kind == "STRING_LIST" and d.constraint.string_list:
            strings = d.constraint.string_list
            constraint = []
            i = 0
            while strings[i] is not None:
                constraint.append(_text(strings[i]))
                i += 1
        return {"index": index, "name": _text(d.name), "title": _text(d.title), "desc": _text(d.desc),
                "type": TYPES[d.type] if 0 <= d.type < len(TYPES) else d.type,
                "unit": UNITS[d.unit] if 0 <= d.unit < len(UNITS) else d.unit,
                "size": d.size, "cap": d.cap, "caps": sorted(n for n, bit in CAPS.items() if d.cap & bit),
                "constraint_type": kind, "constraint": constraint}

    def descriptors_all(self) -> list[dict[str, Any]]:
        found = []
        index = 0
        while True:
            d = self._descriptor(index)
            if d is None:
                break
            found.append(d)
            index += 1
        self.descriptors = {d["name"]: d["index"] for d in found if d["name"]}
        self._described = {d["index"]: d for d in found}
        return found

    def _index(self, name: str | int) -> int:
        if isinstance(name, int):
            return name
        if name not in self.descriptors:
            raise KeyError(f"no option {name!r}; options: {sorted(self.descriptors)}")
        return self.descriptors[name]

    def _buffer(self, d: dict[str, Any]) -> ctypes.Array:
        return ctypes.create_string_buffer(max(4, d["size"]))

    def _decode(self, d: dict[str, Any], buf: ctypes.Array) -> Any:
        if d["type"] == "STRING":
            return buf.value.decode("utf-8", "replace")
        count = max(1, d["size"] // 4)
        words = (Word * count).from_buffer_copy(buf.raw[:count * 4])
        values = [(_unfix(w) if d["type"] == "FIXED" else (bool(w) if d["type"] == "BOOL" else w)) for w in words]
        return values[0] if count == 1 else values

    def _encode(self, d: dict[str, Any], value: Any) -> ctypes.Array:
        buf = self._buffer(d)
        if d["type"] == "STRING":
            raw = str(value).encode()
            if len(raw) >= len(buf):
                buf = ctypes.create_string_buffer(raw, len(raw) + 1)
            else:
                buf.value = raw
            return buf
        values = value if isinstance(value, list) else [value]
        words = [(_fix(v) if d["type"] == "FIXED" else int(v)) for v in values]
        ctypes.memmove(buf, (Word * len(words))(*words), 4 * len(words))
        return buf

    def control(self, action: int, name: str | int, value: Any = None) -> dict[str, Any]:
        index = self._index(name)
        # An index the backend did not describe is sent as one INT word (to see it refused).
        d = self._described.get(index, {"type": "INT", "size": 4})
        info = Word(0)
        if action == ACTION_AUTO:
            st = self.lib.sane_control_option(self.handle, index, action, None, ctypes.byref(info))
            result: dict[str, Any] = {"status": self.status(st), "info": info.value}
        else:
            buf = self._encode(d, value) if action == ACTION_SET else self._buffer(d)
            st = self.lib.sane_control_option(self.handle, index, action, buf, ctypes.byref(info))
            result = {"status": self.status(st), "info": info.value}
            if st == 0 and d["type"] != "BUTTON":
                result["value"] = self._decode(d, buf)
        if st == 0 and info.value & INFO_RELOAD_OPTIONS:
            self.descriptors_all()  # what a frontend must do before the next control_option
        return result

    def parameters(self) -> dict[str, Any]:
        p = _Parameters()
        st = self.lib.sane_get_parameters(self.handle, ctypes.byref(p))
        return {"status": self.status(st), "params": {
            "format": FRAMES[p.format] if 0 <= p.format < len(FRAMES) else p.format, "last_frame": bool(p.last_frame),
            "bytes_per_line": p.bytes_per_line, "pixels_per_line": p.pixels_per_line, "lines": p.lines,
            "depth": p.depth}}

    def start(self) -> dict[str, Any]:
        return {"status": self.status(self.lib.sane_start(self.handle))}

    def read(self) -> dict[str, Any]:
        size = 1 << 20
        buf = ctypes.create_string_buffer(size)
        length = Word()
        digest = hashlib.sha256()
        total = 0
        while True:
            st = self.lib.sane_read(self.handle, buf, size, ctypes.byref(length))
            if st != 0:
                break
            digest.update(buf.raw[:length.value])
            total += length.value
        return {"status": self.status(st), "bytes": total, "sha256": digest.hexdigest()}

    def scan(self) -> dict[str, Any]:
        frames = []
        while True:
            started = self.start()
            if started["status"] != "GOOD":
                return {"status": started["status"], "frames": frames}
            params = self.parameters()
            got = self.read()
            frames.append({**params["params"], "bytes": got["bytes"], "sha256": got["sha256"], "end": got["status"]})
            if got["status"] != "EOF" or params["params"]["last_frame"]:
                return {"status": got["status"], "frames": frames}

    def cancel(self) -> dict[str, Any]:
        self.lib.sane_cancel(self.handle)
        return {"status": "GOOD"}

    def close(self) -> dict[str, Any]:
        if self.opened:
            self.lib.sane_close(self.handle)
            self.opened = False
        return {"status": "GOOD"}

    def exit(self) -> dict[str, Any]:
        self.lib.sane_exit()
        return {"status": "GOOD"}


def run_ops(ops: list[list[Any]], out: Any = sys.stdout) -> None:
    client = SaneClient()
    for op in ops:
        name, args = op[0], op[1:]
        if name == "mark":
            result: dict[str, Any] = {"mark": args[0]}
        elif name == "auth":  # before init: ["auth", user, password, "md5" | "plain"]
            client.credentials = (args[0], args[1], args[2])
            result = {"status": "GOOD"}
        elif name == "asked":
            result = {"status": "GOOD", "resources": client.asked}
        elif name == "init":
            result = client.init()
        elif name == "devices":
            result = client.devices()
        elif name == "open":
            result = client.open(args[0])
        elif name == "descriptors":
            result = {"status": "GOOD", "descriptors": client.descriptors_all()}
        elif name == "get":
            result = client.control(ACTION_GET, args[0])
        elif name == "set":
            result = client.control(ACTION_SET, args[0], args[1])
        elif name == "auto":
            result = client.control(ACTION_AUTO, args[0])
        elif name in ("parameters", "start", "read", "scan", "cancel", "close", "exit"):
            result = getattr(client, name)()
        else:
            raise ValueError(f"unknown operation {name!r}")
        out.write(json.dumps({"op": name, **result}) + "\n")
        out.flush()


if __name__ == "__main__":
    run_ops(json.load(sys.stdin))
