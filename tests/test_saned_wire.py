"""The SANE network server's request decoding, byte by byte, in this process.

A DeviceManager with the simulated scanner ``sim0`` and a :class:`SanedServer` on
127.0.0.1 (an ephemeral port: ``port=0``) run on the test's event loop; the tests talk
to it over asyncio streams with requests they encode themselves (the tiny client
below), so every byte the server sees is chosen here: a correct conversation first,
then garbage (hypothesis), truncated requests, lengths that must not be allocated,
unknown procedures, handles that are not the connection's own and option values of
the wrong type. After each bad connection the server must still serve a fresh one
(INIT + GET_DEVICES), the manager must be left with no session once the connection
is gone, and nothing may have been logged as an error, with or without a traceback
(structlog's output is captured; so is the stdlib logging asyncio reports to).

The wire format, as libsane's ``net`` backend and saned speak it: a word is 4 bytes
big-endian; a pointer is a word, 1 for NULL, else 0 and the value; an array is a
length word then its elements; a string is a byte array whose length counts the
trailing NUL (NULL is length 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stillsvc.core.config import Config, ConfigError, DeviceConfig, SanedSettings, parse
from stillsvc.core.listener import Listener
from stillsvc.core.manager import DeviceManager
from stillsvc.drivers.sim import SimulatedScanner
from stillsvc.frontends.saned import server as server_module
from stillsvc.frontends.saned.server import SanedServer

TIMEOUT = 5.0  # a wait that must never run out
HOST = "127.0.0.1"

# Procedure numbers, statuses, types, actions, info bits (SANE's, written out here
# rather than imported so that the test does not lean on the code it checks).
INIT, GET_DEVICES, OPEN, CLOSE, GET_OPTION_DESCRIPTORS, CONTROL_OPTION = 0, 1, 2, 3, 4, 5
GET_PARAMETERS, START, CANCEL, AUTHORIZE, EXIT = 6, 7, 8, 9, 10
GOOD, INVAL = 0, 4
BOOL, INT, FIXED, STRING, BUTTON, GROUP = 0, 1, 2, 3, 4, 5
GET, SET, AUTO = 0, 1, 2
INEXACT, RELOAD_OPTIONS, RELOAD_PARAMS = 1, 2, 4
FRAME_GRAY, FRAME_RGB = 0, 1
CONSTRAINT_NONE, CONSTRAINT_RANGE, CONSTRAINT_WORD_LIST, CONSTRAINT_STRING_LIST = 0, 1, 2, 3
VERSION_3 = 1 << 24 | 0 << 16 | 3  # SANE 1.0, network protocol 3
MM_PER_INCH = 25.4
INT_MAX = 2**31 - 1


def fixed(mm: float) -> int:
    return round(mm * 65536)


# -- the client's encoder ------------------------------------------------------------------------

class Request:
    """One request's bytes: ``Request().word(OPEN).string("sim0").bytes``."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def word(self, value: int) -> Request:
        self.parts.append(struct.pack(">I", value & 0xFFFFFFFF))
        return self

    def string(self, value: str | None) -> Request:
        if value is None:
            return self.word(0)
        data = value.encode() + b"\0"
        self.parts.append(struct.pack(">I", len(data)) + data)
        return self

    def words(self, values: list[int]) -> Request:
        self.word(len(values))
        for v in values:
            self.word(v)
        return self

    def raw(self, data: bytes) -> Request:
        self.parts.append(data)
        return self

    @property
    def bytes(self) -> bytes:
        return b"".join(self.parts)


def init(version: int = VERSION_3, user: str | None = "tester") -> bytes:
    return Request().word(INIT).word(version).string(user).bytes


def on_handle(proc: int, handle: int) -> bytes:
    return Request().word(proc).word(handle).bytes


def control(handle: int, option: int, action: int, value: Any = None, value_type: int | None = None,
            size: int | None = None) -> bytes:
    """CONTROL_OPTION: a list of words or a string (sent as ``size`` bytes, NUL padded);
    set-auto in protocol 3 has no type, size or value."""
    r = Request().word(CONTROL_OPTION).word(handle).word(option).word(action)
    if action == AUTO:
        return r.bytes
    if isinstance(value, str):
        data = value.encode() + b"\0"
        size = len(data) if size is None else size
        data = data[:size] + b"\0" * (size - len(data))
        return r.word(STRING if value_type is None else value_type).word(size).word(size).raw(data).bytes
    words = value if value is not None else []
    return r.word(INT if value_type is None else value_type).word(4 * len(words) if size is None else size) \
        .words(words).bytes


# -- the client's decoder ------------------------------------------------------------------------

@dataclass
class Descriptor:
    name: str | None
    title: str | None
    desc: str | None
    type: int
    unit: int
    size: int
    cap: int
    constraint: int
    range: tuple[int, int, int] | None = None
    word_list: list[int] | None = None
    string_list: list[str | None] | None = None


class Replies:
    """Reads replies field by field, every read with a deadline."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader

    async def exactly(self, n: int) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(n), TIMEOUT)

    async def word(self) -> int:
        return struct.unpack(">i", await self.exactly(4))[0]

    async def string(self) -> str | None:
        n = await self.word()
        assert 0 <= n <= 1 << 20, f"a reply string of {n} bytes"
        if n == 0:
            return None
        data = await self.exactly(n)
        assert data[-1:] == b"\0", f"a reply string without its NUL: {data!r}"
        return data[:-1].decode()

    async def words(self) -> list[int]:
        n = await self.word()
        assert 0 <= n <= 1 << 18, f"a reply array of {n} words"
        return [await self.word() for _ in range(n)]

    async def pointer(self) -> bool:
        """Whether a value follows (the word is 0), or it is NULL (1)."""
        is_null = await self.word()
        assert is_null in (0, 1), f"a pointer word of {is_null}"
        return not is_null

    async def value(self) -> tuple[int, int, Any]:
        """(type, size, value) of a CONTROL_OPTION reply: words, a string, or None."""
        value_type, size = await self.word(), await self.word()
        if value_type == STRING:
            n = await self.word()
            data = await self.exactly(n)
            return value_type, size, data.split(b"\0", 1)[0].decode()
        if value_type in (BOOL, INT, FIXED):
            return value_type, size, await self.words()
        assert await self.word() == 0
        return value_type, size, None

    async def descriptor(self) -> Descriptor | None:
        if not await self.pointer():
            return None
        d = Descriptor(await self.string(), await self.string(), await self.string(), await self.word(),
                       await self.word(), await self.word(), await self.word(), await self.word())
        if d.constraint == CONSTRAINT_RANGE:
            assert await self.pointer(), f"{d.name}: a NULL range"
            d.range = (await self.word(), await self.word(), await self.word())
        elif d.constraint == CONSTRAINT_WORD_LIST:
            words = await self.words()
            assert words and words[0] == len(words) - 1, f"{d.name}: word list {words}"
            d.word_list = words[1:]
        elif d.constraint == CONSTRAINT_STRING_LIST:
            n = await self.word()
            d.string_list = [await self.string() for _ in range(n)]
            assert d.string_list[-1] is None, f"{d.name}: the string list does not end in NULL"
            d.string_list = d.string_list[:-1]
        else:
            assert d.constraint == CONSTRAINT_NONE, f"{d.name}: constraint type {d.constraint}"
        return d


class Conn:
    """One control connection to the server."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.r = Replies(reader)

    @classmethod
    async def open(cls, port: int, host: str = HOST) -> Conn:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), TIMEOUT)
        return cls(reader, writer)

    async def send(self, *data: bytes) -> None:
        self.writer.write(b"".join(data))
        await self.writer.drain()

    async def ended(self, timeout: float = TIMEOUT) -> bytes:
        """Everything the server sends until it closes the connection (a reset counts as
        closed); fails if it has not closed it within ``timeout``."""
        received = bytearray()
        async with asyncio.timeout(timeout):
            while True:
                try:
                    chunk = await self.reader.read(65536)
                except (ConnectionResetError, BrokenPipeError):
                    break
                if not chunk:
                    break
                received += chunk
        return bytes(received)

    def close(self) -> None:
        self.writer.transport.abort()

    # -- whole procedures ------------------------------------------------------------------
    async def init(self) -> int:
        await self.send(init())
        status, version = await self.r.word(), await self.r.word()
        assert status == GOOD
        return version

    async def get_devices(self) -> list[tuple[str | None, ...]]:
        await self.send(Request().word(GET_DEVICES).bytes)
        assert await self.r.word() == GOOD
        n = await self.r.word()
        devices = []
        for i in range(n):
            if not await self.r.pointer():
                assert i == n - 1, "a NULL device before the end of the list"
                break
            devices.append((await self.r.string(), await self.r.string(), await self.r.string(),
                            await self.r.string()))
        else:
            raise AssertionError("the device list does not end in NULL")
        return devices

    async def open_device(self, name: str) -> tuple[int, int, str | None]:
        await self.send(Request().word(OPEN).string(name).bytes)
        return await self.r.word(), await self.r.word(), await self.r.string()

    async def close_handle(self, handle: int) -> int:
        await self.send(on_handle(CLOSE, handle))
        return await self.r.word()

    async def descriptors(self, handle: int) -> list[Descriptor | None]:
        await self.send(on_handle(GET_OPTION_DESCRIPTORS, handle))
        n = await self.r.word()
        return [await self.r.descriptor() for _ in range(n)]

    async def control(self, *args: Any, **kwargs: Any) -> tuple[int, int, int, int, Any, str | None]:
        """(status, info, type, size, value, resource)."""
        await self.send(control(*args, **kwargs))
        status, info = await self.r.word(), await self.r.word()
        value_type, size, value = await self.r.value()
        return status, info, value_type, size, value, await self.r.string()

    async def parameters(self, handle: int) -> tuple[int, ...]:
        """(status, format, last_frame, bytes_per_line, pixels_per_line, lines, depth)."""
        await self.send(on_handle(GET_PARAMETERS, handle))
        return tuple([await self.r.word() for _ in range(7)])

    async def start(self, handle: int) -> tuple[int, int, int, str | None]:
        await self.send(on_handle(START, handle))
        return await self.r.word(), await self.r.word(), await self.r.word(), await self.r.string()

    async def cancel(self, handle: int) -> int:
        await self.send(on_handle(CANCEL, handle))
        return await self.r.word()


# -- the server under test -------------------------------------------------------------------------

class Changes(Listener):
    """Wakes ``until`` whenever a session closes or a client goes."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def _poke(self, *args: Any) -> None:
        self.event.set()

    session_closed = client_gone = device_changed = _poke

    async def until(self, predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    self.event.clear()
                    await self.event.wait()
        except TimeoutError:
            raise AssertionError(f"{what}: not within {timeout} s") from None


class Rig:
    def __init__(self, manager: DeviceManager, server: SanedServer, changes: Changes, logs: list[dict[str, Any]],
                 caplog: pytest.LogCaptureFixture) -> None:
        self.manager = manager
        self.server = server
        self.changes = changes
        self.logs = logs
        self.caplog = caplog
        self.port = server.servers[0].sockets[0].getsockname()[1]
        self.conns: list[Conn] = []

    async def connect(self) -> Conn:
        conn = await Conn.open(self.port)
        self.conns.append(conn)
        return conn

    async def sessions_gone(self, left: int = 0) -> None:
        """Wait until the manager has ``left`` sessions (those of connections still open)."""
        await self.changes.until(lambda: len(self.manager.sessions) == left,
                                 f"the manager's sessions down to {left}")

    def connections_gone(self, left: int = 0) -> None:
        """The server has let go of every connection but ``left``. It drops one in the same
        loop turn as it aborts its socket, before the client can see the end; so once the
        client has seen its connection end, this is a check, not a wait."""
        assert len(self.server.connections) == left and sum(self.server.per_peer.values()) == left, \
            (self.server.connections, self.server.per_peer)

    def no_errors_logged(self) -> None:
        bad = [e for e in self.logs if e.get("log_level") in ("error", "critical") or e.get("exc_info")]
        assert not bad, f"errors logged: {bad}"
        records = [r for r in self.caplog.records if r.levelno >= logging.ERROR]
        assert not records, "\n".join(r.getMessage() + (r.exc_text or "") for r in records)

    async def still_serving(self, sessions: int = 0, connections: int = 0) -> None:
        """A fresh connection completes INIT and GET_DEVICES; then, with it gone too, only
        ``sessions`` sessions and ``connections`` connections remain (those the test
        keeps open), and nothing went wrong on the way."""
        conn = await self.connect()
        assert await conn.init() == VERSION_3
        assert [d[0] for d in await conn.get_devices()] == ["sim0"]
        await conn.send(Request().word(EXIT).bytes)
        assert await conn.ended() == b""
        self.connections_gone(connections)
        await self.sessions_gone(sessions)
        self.no_errors_logged()


Start = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def start_server(tmp_path, caplog) -> AsyncIterator[Start]:
    """``await start_server(allow=...)``: the manager with sim0 and a SANE server on an
    ephemeral port of 127.0.0.1 (settings as given), logs captured."""
    caplog.set_level(logging.WARNING)
    stack = contextlib.AsyncExitStack()
    logs = stack.enter_context(structlog.testing.capture_logs())
    server_module.log.warning("log capture probe")  # the server's own logger reaches the capture
    assert [e["event"] for e in logs] == ["log capture probe"], "structlog output is not captured"
    manager = DeviceManager(Config(runtime_dir=str(tmp_path / "run"), state_dir=str(tmp_path / "state")),
                            drivers={"sim": SimulatedScanner})
    stack.push_async_callback(manager.stop)
    changes = Changes()
    manager.listeners.append(changes)
    await manager.add_device(DeviceConfig(id="sim0", driver="sim"))
    rigs: list[Rig] = []

    async def start(**overrides: Any) -> Rig:
        config = replace(SanedSettings(listen=(HOST,), port=0), **overrides)
        server = SanedServer(manager, config)
        await server.start()
        stack.push_async_callback(server.stop)
        rig = Rig(manager, server, changes, logs, caplog)
        rigs.append(rig)
        return rig

    try:
        yield start
    finally:
        for rig in rigs:
            for conn in rig.conns:
                conn.close()
        await stack.aclose()


@pytest.fixture
async def rig(start_server: Start) -> Rig:
    return await start_server()


async def opened(rig: Rig) -> tuple[Conn, int, list[Descriptor]]:
    """A connection that has INITed and OPENed sim0: it, the handle, the descriptors."""
    conn = await rig.connect()
    await conn.init()
    status, handle, resource = await conn.open_device("sim0")
    assert (status, resource) == (GOOD, None)
    return conn, handle, await conn.descriptors(handle)


def index_of(descriptors: list[Descriptor | None], name: str) -> int:
    return next(i for i, d in enumerate(descriptors) if d is not None and d.name == name)


# -- a correct conversation ------------------------------------------------------------------------

async def test_a_whole_conversation_decodes_as_sane_has_it(rig: Rig) -> None:
    conn = await rig.connect()
    assert await conn.init() == VERSION_3

    devices = await conn.get_devices()
    assert devices == [("sim0", "stillsvc", "Simulated Flatbed + ADF", "flatbed scanner")]

    status, handle, resource = await conn.open_device("sim0")
    assert (status, resource) == (GOOD, None)
    assert len(rig.manager.sessions) == 1

    ds = await conn.descriptors(handle)
    assert all(d is not None for d in ds)
    count = ds[0]
    assert count.type == INT and count.size == 4 and not count.name
    names = [d.name for d in ds if d.type != GROUP]
    for name in ("mode", "resolution", "source", "tl-x", "tl-y", "br-x", "br-y", "depth", "brightness"):
        assert name in names, names
    assert await conn.control(handle, 0, GET) == (GOOD, 0, INT, 4, [len(ds)], None)

    mode, res, source = (ds[index_of(ds, n)] for n in ("mode", "resolution", "source"))
    assert mode.type == STRING and mode.string_list == ["Color", "Gray", "Lineart"]
    assert mode.size == len("Lineart") + 1
    assert res.type == INT and res.unit == 4 and res.word_list == [75, 100, 150, 200, 300, 600]
    assert source.type == STRING and source.string_list[0] == "Flatbed"
    for name in ("tl-x", "tl-y", "br-x", "br-y"):
        d = ds[index_of(ds, name)]
        assert d.type == FIXED and d.unit == 3 and d.constraint == CONSTRAINT_RANGE, d
    r_mode, r_res, r_tlx = index_of(ds, "mode"), index_of(ds, "resolution"), index_of(ds, "tl-x")
    r_tly, r_brx, r_bry = index_of(ds, "tl-y"), index_of(ds, "br-x"), index_of(ds, "br-y")

    assert await conn.control(handle, r_res, GET) == (GOOD, 0, INT, 4, [150], None)
    assert await conn.control(handle, r_mode, GET) == (GOOD, 0, STRING, mode.size, "Color", None)

    # 80 is not in the word list: the nearest value is taken, and INEXACT says so.
    status, info, value_type, size, value, _ = await conn.control(handle, r_res, SET, [80])
    assert (status, value_type, size, value) == (GOOD, INT, 4, [75])
    assert info & INEXACT and info & RELOAD_PARAMS
    assert (await conn.control(handle, r_res, GET))[4] == [75]

    # Case-insensitive string list match: "gray" becomes "Gray", INEXACT.
    status, info, value_type, _, value, _ = await conn.control(handle, r_mode, SET, "gray")
    assert (status, value_type, value) == (GOOD, STRING, "Gray") and info & INEXACT
    status, info, *_, value, _ = await conn.control(handle, r_mode, SET, "Gray")
    assert status == GOOD and not info & INEXACT and value == "Gray"

    # Set-auto (protocol 3: no type, size or value): back to the default, 150 dpi.
    status, info, value_type, size, value, _ = await conn.control(handle, r_res, AUTO)
    assert (status, value_type, value) == (GOOD, INT, [150])
    assert (await conn.control(handle, r_res, GET))[4] == [150]

    # The area in millimetres gives the parameters' pixels at the resolution of the moment.
    await conn.control(handle, r_mode, SET, "Color")
    for option, mm in ((r_tlx, 10.0), (r_tly, 20.0), (r_brx, 110.0), (r_bry, 170.0)):
        status, _, value_type, _, value, _ = await conn.control(handle, option, SET, [fixed(mm)], FIXED)
        assert (status, value_type, value) == (GOOD, FIXED, [fixed(mm)])

    def px(mm: float, dpi: int) -> int:
        return round(mm / MM_PER_INCH * dpi)

    width, height = px(110, 150) - px(10, 150), px(170, 150) - px(20, 150)
    assert await conn.parameters(handle) == (GOOD, FRAME_RGB, 1, 3 * width, width, height, 8)
    await conn.control(handle, r_res, SET, [300])
    width, height = px(110, 300) - px(10, 300), px(170, 300) - px(20, 300)
    assert await conn.parameters(handle) == (GOOD, FRAME_RGB, 1, 3 * width, width, height, 8)
    await conn.control(handle, r_mode, SET, "Gray")
    assert await conn.parameters(handle) == (GOOD, FRAME_GRAY, 1, width, width, height, 8)

    assert await conn.close_handle(handle) == 0
    await rig.sessions_gone()
    await conn.send(Request().word(EXIT).bytes)
    assert await conn.ended() == b""
    rig.connections_gone()
    rig.no_errors_logged()


async def test_descriptors_can_be_read_again_after_reload(rig: Rig) -> None:
    """A client re-reads descriptors after RELOAD_OPTIONS: the same options, decodable."""
    conn, handle, ds = await opened(rig)
    first = [d.name for d in ds]
    await conn.control(handle, index_of(ds, "source"), SET, "ADF")
    again = await conn.descriptors(handle)
    assert [d.name for d in again] == first
    assert (await conn.control(handle, index_of(again, "source"), GET))[4] == "ADF"
    conn.close()
    await rig.sessions_gone()
    await rig.still_serving()


# -- bad input --------------------------------------------------------------------------------------

async def test_a_first_request_that_is_not_init_ends_the_connection(rig: Rig) -> None:
    for first in (Request().word(GET_DEVICES).bytes, Request().word(OPEN).string("sim0").bytes,
                  Request().word(EXIT).bytes, init(version=2 << 24 | 3)):
        conn = await rig.connect()
        await conn.send(first)
        assert await conn.ended() == b"", first
        await rig.still_serving()


async def test_huge_lengths_end_the_connection_without_waiting_for_the_bytes(rig: Rig) -> None:
    """A length over the limit ends the connection as soon as it is read: the server does
    not allocate it, nor wait for bytes that would never come (nothing is half-closed
    here: the connection must end by the server's own doing)."""
    _, handle, ds = await opened(rig)
    r_mode = index_of(ds, "mode")
    cases = {
        "INIT user name 2^31-1": Request().word(INIT).word(VERSION_3).word(INT_MAX).bytes,
        "INIT user name -1": Request().word(INIT).word(VERSION_3).word(-1).bytes,
        "OPEN name 2^31-1": Request().word(OPEN).word(INT_MAX).bytes,
        "OPEN name 64 KiB + 1": Request().word(OPEN).word(64 * 1024 + 1).bytes,
        "OPEN name 2^32-1 (-1)": Request().word(OPEN).word(-1).bytes,
        "OPEN name -2^31": Request().word(OPEN).word(-(2**31)).bytes,
        "AUTHORIZE resource 2^31-1": Request().word(AUTHORIZE).word(INT_MAX).bytes,
        "CONTROL_OPTION size 2^31-1": Request().word(CONTROL_OPTION).word(handle).word(r_mode).word(SET)
        .word(STRING).word(INT_MAX).bytes,
        "CONTROL_OPTION size -1": Request().word(CONTROL_OPTION).word(handle).word(r_mode).word(SET)
        .word(STRING).word(-1).bytes,
        "CONTROL_OPTION string array 2^31-1": Request().word(CONTROL_OPTION).word(handle).word(r_mode)
        .word(SET).word(STRING).word(8).word(INT_MAX).bytes,
        "CONTROL_OPTION word array 2^31-1": Request().word(CONTROL_OPTION).word(handle).word(1).word(SET)
        .word(INT).word(4).word(INT_MAX).bytes,
        "CONTROL_OPTION word array -1": Request().word(CONTROL_OPTION).word(handle).word(1).word(SET)
        .word(INT).word(4).word(-1).bytes,
        "CONTROL_OPTION button value 1": Request().word(CONTROL_OPTION).word(handle).word(1).word(SET)
        .word(BUTTON).word(0).word(1).bytes,
        "CONTROL_OPTION unknown value type": Request().word(CONTROL_OPTION).word(handle).word(1).word(SET)
        .word(9).word(4).word(1).word(0).bytes,
    }
    for what, request in cases.items():
        conn = await rig.connect()
        if not what.startswith("INIT"):
            await conn.init()
        await conn.send(request)
        assert await conn.ended() == b"", what
        await rig.still_serving(sessions=1, connections=1)
    assert len(rig.manager.sessions) == 1  # the first connection's OPEN, untouched


async def test_set_auto_carries_a_value_in_protocol_2_only(rig: Rig) -> None:
    """Protocol 3 set-auto is the three words alone: a GET_DEVICES sent right behind it is
    the next request. In protocol 2 a type, a size and a value follow, as for a set."""
    conn, handle, ds = await opened(rig)
    r_res = index_of(ds, "resolution")
    await conn.control(handle, r_res, SET, [300])
    await conn.send(control(handle, r_res, AUTO), Request().word(GET_DEVICES).bytes)
    status, info = await conn.r.word(), await conn.r.word()
    assert status == GOOD and info & RELOAD_PARAMS
    assert await conn.r.value() == (INT, 4, [150])
    assert await conn.r.string() is None
    assert await conn.r.word() == GOOD and await conn.r.word() == 2  # GET_DEVICES: sim0 and NULL
    conn.close()

    old = await rig.connect()
    await old.send(init(version=1 << 24 | 2))
    assert (await old.r.word(), await old.r.word()) == (GOOD, VERSION_3)
    status, handle, _ = await old.open_device("sim0")
    assert status == GOOD
    await old.control(handle, r_res, SET, [300])
    status, info, value_type, size, value, _ = await _auto_with_value(old, handle, r_res)
    assert (status, value_type, size, value) == (GOOD, INT, 4, [150]) and info & RELOAD_PARAMS
    assert [d[0] for d in await old.get_devices()] == ["sim0"]
    old.close()
    await rig.sessions_gone()
    await rig.still_serving()


async def _auto_with_value(conn: Conn, handle: int, option: int) -> tuple[int, int, int, int, Any, str | None]:
    """A protocol 2 set-auto: type, size and a value follow the action."""
    await conn.send(Request().word(CONTROL_OPTION).word(handle).word(option).word(AUTO).word(INT).word(4)
                    .words([0]).bytes)
    status, info = await conn.r.word(), await conn.r.word()
    value_type, size, value = await conn.r.value()
    return status, info, value_type, size, value, await conn.r.string()


def requests(handle: int = 0) -> dict[str, bytes]:
    """One well-formed request of each procedure (after INIT)."""
    return {
        "GET_DEVICES": Request().word(GET_DEVICES).bytes,
        "OPEN": Request().word(OPEN).string("sim0").bytes,
        "CLOSE": on_handle(CLOSE, handle),
        "GET_OPTION_DESCRIPTORS": on_handle(GET_OPTION_DESCRIPTORS, handle),
        "CONTROL_OPTION get": control(handle, 2, GET, [0]),
        "CONTROL_OPTION set string": control(handle, 2, SET, "Gray"),
        "CONTROL_OPTION set words": control(handle, 3, SET, [300, 300]),
        "CONTROL_OPTION set-auto": control(handle, 3, AUTO),
        "GET_PARAMETERS": on_handle(GET_PARAMETERS, handle),
        "START": on_handle(START, handle),
        "CANCEL": on_handle(CANCEL, handle),
        "AUTHORIZE": Request().word(AUTHORIZE).string("sim0$MD5$x").string("user").string("$MD5$00").bytes,
    }


async def test_truncated_requests_end_the_connection_with_no_reply(rig: Rig) -> None:
    """Every proper prefix of every request, then end of file: no reply, the connection
    ends, and nothing is left behind (OPEN truncated after its name is complete is not
    a prefix: it is whole)."""
    cases = [(what, request[:cut]) for what, request in requests().items() for cut in range(1, len(request))]
    cases += [("INIT", init()[:cut]) for cut in range(1, len(init()))]
    for what, prefix in cases:
        conn = await rig.connect()
        if what != "INIT":
            await conn.init()
        await conn.send(prefix)
        conn.writer.write_eof()
        assert await conn.ended() == b"", (what, prefix)
        rig.connections_gone()
        await rig.sessions_gone()
    await rig.still_serving()


async def test_unknown_procedures_end_the_connection(rig: Rig) -> None:
    for proc in (11, 12, 255, 1 << 16, INT_MAX, -1, -(2**31)):
        conn = await rig.connect()
        await conn.init()
        await conn.send(Request().word(proc).word(0).word(0).bytes)
        assert await conn.ended() == b"", proc
        await rig.still_serving()


async def test_a_handle_that_is_not_the_connections_own_is_refused_and_the_connection_stays(rig: Rig) -> None:
    owner, handle, ds = await opened(rig)
    r_res = index_of(ds, "resolution")
    assert handle == 0
    other = await rig.connect()
    await other.init()
    for foreign in (handle, 1, 7, -1, INT_MAX):
        assert await other.close_handle(foreign) == 0  # CLOSE's reply is a dummy word
        assert await other.descriptors(foreign) == []  # an empty array
        status, info, *_, resource = await other.control(foreign, r_res, GET, [0])
        assert (status, info, resource) == (INVAL, 0, None)
        status, *_ = await other.control(foreign, r_res, SET, [300])
        assert status == INVAL
        status, *_ = await other.control(foreign, r_res, AUTO)
        assert status == INVAL
        assert await other.parameters(foreign) == (INVAL, FRAME_GRAY, 1, 0, 0, 0, 0)
        status, port, _, resource = await other.start(foreign)
        assert (status, port, resource) == (INVAL, 0, None)
        assert await other.cancel(foreign) == 0
        # Still usable: the connection answers a proper request.
        assert [d[0] for d in await other.get_devices()] == ["sim0"]
    # And the owner's handle is untouched: its session is open, its value unchanged.
    assert len(rig.manager.sessions) == 1
    assert (await owner.control(handle, r_res, GET))[:5] == (GOOD, 0, INT, 4, [150])
    # A handle of its own that it closed is no longer its own either.
    status, mine, _ = await other.open_device("sim0")
    assert status == GOOD and mine == 0  # handles are numbered per connection
    assert await other.close_handle(mine) == 0
    assert (await other.control(mine, r_res, GET))[0] == INVAL
    assert await other.descriptors(mine) == []
    assert (await owner.control(handle, r_res, GET))[0] == GOOD
    other.close()
    owner.close()
    await rig.sessions_gone()
    await rig.still_serving()


async def test_option_index_out_of_range_or_a_value_of_the_wrong_type_is_inval(rig: Rig) -> None:
    conn, handle, ds = await opened(rig)
    r_mode, r_res, r_tlx = index_of(ds, "mode"), index_of(ds, "resolution"), index_of(ds, "tl-x")
    r_group = next(i for i, d in enumerate(ds) if d.type == GROUP)
    for option in (len(ds), len(ds) + 1, -1, INT_MAX, -(2**31)):
        for action, value in ((GET, [0]), (SET, [1]), (AUTO, None)):
            status, info, *_, resource = await conn.control(handle, option, action, value)
            assert (status, info, resource) == (INVAL, 0, None), (option, action)
    wrong = [
        ("resolution as a string", r_res, "300", None),
        ("resolution as two words", r_res, [300, 300], None),
        ("resolution as no word", r_res, [], None),
        ("mode as a word", r_mode, [1], None),
        ("mode as an unknown string", r_mode, "Infrared", None),
        ("tl-x as a string", r_tlx, "10", None),
        ("the option count", 0, [5], None),
        ("a group", r_group, [0], None),
        ("a group as a button", r_group, None, BUTTON),
    ]
    for what, option, value, value_type in wrong:
        status, info, *_, resource = await conn.control(handle, option, SET, value, value_type)
        assert (status, info, resource) == (INVAL, 0, None), what
    status, *_ = await conn.control(handle, r_group, GET, [0])
    assert status == INVAL
    assert (await conn.control(handle, 0, AUTO))[0] == INVAL  # no automatic value
    # Nothing changed, and the connection is still usable.
    assert (await conn.control(handle, r_res, GET))[4] == [150]
    assert (await conn.control(handle, r_mode, GET))[4] == "Color"
    status, info, *_, value, _ = await conn.control(handle, r_res, SET, [300])
    assert (status, value) == (GOOD, [300]) and info & RELOAD_PARAMS and not info & INEXACT
    conn.close()
    await rig.sessions_gone()
    await rig.still_serving()


# Words the decoder treats specially: procedure numbers, small lengths, the limits, signs.
SPECIAL_WORDS = [*range(12), 16, 255, 4096, 64 * 1024, 64 * 1024 + 1, 1 << 18, 1 << 20, (1 << 20) + 1,
                 1 << 24, INT_MAX, -1, -2, -(2**31)]
word_bytes = st.one_of(st.sampled_from(SPECIAL_WORDS), st.integers(-(2**31), 2**31 - 1)) \
    .map(lambda w: struct.pack(">i", w))
string_bytes = st.one_of(st.none(), st.text(max_size=20)).map(lambda s: Request().string(s).bytes)
garbage = st.one_of(
    st.binary(max_size=200),
    st.lists(st.one_of(word_bytes, word_bytes, string_bytes, st.binary(max_size=9)), max_size=16).map(b"".join),
)
# Garbage that mostly starts like a request: a procedure number the server knows.
request_like = st.tuples(st.integers(0, 11).map(lambda p: struct.pack(">i", p)), garbage).map(b"".join)

HYPOTHESIS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


async def send_garbage(rig: Rig, data: bytes, after_init: bool) -> bytes:
    """Send ``data`` (after INIT or instead of it) and half-close: the server must end
    the connection, whatever it answered. Then it must still serve, with nothing left
    of this connection."""
    conn = await rig.connect()
    if after_init:
        await conn.init()
    try:
        await conn.send(data)
        conn.writer.write_eof()
    except (ConnectionResetError, BrokenPipeError):
        pass  # it ended the connection before reading it all: fine
    answered = await conn.ended()
    conn.close()
    rig.connections_gone()
    await rig.sessions_gone()
    await rig.still_serving()
    return answered


@HYPOTHESIS
@given(data=st.one_of(garbage, request_like))
async def test_garbage_after_init_never_breaks_the_server(rig: Rig, data: bytes) -> None:
    await send_garbage(rig, data, after_init=True)


@HYPOTHESIS
@given(data=garbage)
async def test_garbage_instead_of_init_gets_no_reply(rig: Rig, data: bytes) -> None:
    answered = await send_garbage(rig, data, after_init=False)
    if not data.startswith(b"\0\0\0\0"):
        assert answered == b"", data


@HYPOTHESIS
@given(data=st.lists(st.one_of(request_like, st.sampled_from(list(requests().values()))), min_size=1, max_size=6))
async def test_garbage_on_a_connection_with_an_open_handle(rig: Rig, data: list[bytes]) -> None:
    """With sim0 OPENed (handle 0), so that the handle-taking procedures reach the options."""
    conn = await rig.connect()
    await conn.init()
    assert (await conn.open_device("sim0"))[0] == GOOD
    try:
        await conn.send(b"".join(data))
        conn.writer.write_eof()
    except (ConnectionResetError, BrokenPipeError):
        pass
    await conn.ended()
    conn.close()
    rig.connections_gone()
    await rig.sessions_gone()
    await rig.still_serving()


# -- who may connect ---------------------------------------------------------------------------------

async def test_a_peer_outside_allow_is_closed_before_any_reply(start_server: Start) -> None:
    rig = await start_server(allow=("10.0.0.0/8",))
    conn = await rig.connect()
    try:
        await conn.send(init())
    except (ConnectionResetError, BrokenPipeError):
        pass
    assert await conn.ended() == b""
    assert any(e["event"].startswith("SANE client refused: not in the allowed") for e in rig.logs)
    assert not rig.manager.sessions and not rig.server.connections
    rig.no_errors_logged()


async def test_the_connection_over_max_per_peer_is_closed_at_once_and_the_others_stay(start_server: Start) -> None:
    n = 3
    rig = await start_server(max_connections_per_peer=n)
    conns = [await rig.connect() for _ in range(n)]
    for conn in conns:
        assert await conn.init() == VERSION_3
    assert rig.server.per_peer == {HOST: n}
    extra = await rig.connect()
    # Closed at once: without sending a byte, it sees the end of the connection.
    assert await extra.ended(timeout=2.0) == b""
    for conn in conns:
        assert [d[0] for d in await conn.get_devices()] == ["sim0"]
        assert (await conn.open_device("sim0"))[0] == GOOD
    assert len(rig.manager.sessions) == n
    # One leaves: a new one is served in its place.
    await conns[0].send(Request().word(EXIT).bytes)
    assert await conns[0].ended() == b""
    assert rig.server.per_peer == {HOST: n - 1}
    again = await rig.connect()
    assert await again.init() == VERSION_3
    assert [d[0] for d in await again.get_devices()] == ["sim0"]
    for conn in (*conns[1:], again):
        conn.close()
    await rig.sessions_gone()
    rig.no_errors_logged()


def test_port_zero_is_an_ephemeral_port_in_process_only() -> None:
    """SanedSettings(port=0) is what these tests use; the configuration file refuses it
    (saned.port is 1 to 65535), so a daemon cannot be told to take an ephemeral port."""
    with pytest.raises(ConfigError, match="saned.port"):
        parse({"saned": {"port": 0}}, "test.toml")
