"""The daemon keeps no descriptor a client sent it unless a method accepted it.

Any client can pass descriptors with any call; if the daemon kept the ones of calls
that never reached a method (or that the method refused), a client could exhaust
its descriptors. Each case below is repeated many times while the daemon's own
descriptor table (``/proc/PID/fd``) is counted: the count must come back to exactly
what it was. The closing happens after the reply, so the test waits for that state.
"""

from __future__ import annotations

import asyncio
import os

import pytest
from dbus_fast import DBusError, Message, MessageFlag
from helpers import BUS_NAME, ERROR, ITEM, ROOT, SESSION, SIM0, call, create_session, get_property, open_fds, wait_until

REPEAT = 1000
STANDARD_ERROR = "org.freedesktop.DBus.Error."
PEER = "org.freedesktop.DBus.Peer"


def fd_count(daemon) -> int:
    return len(open_fds(daemon.proc.pid))


async def assert_fd_count_returns(daemon, before: int, what: str) -> None:
    try:
        await wait_until(lambda: fd_count(daemon) == before, timeout=5, what=what)
    except TimeoutError:
        raise AssertionError(f"{what}: the daemon had {before} descriptors and now has {fd_count(daemon)}") from None


async def flatbed(bus) -> str:
    session = await create_session(bus, mode="data")
    return f"{await get_property(bus, session, SESSION, 'RootItem')}/Flatbed"


async def repeat_refused(bus, path: str, body: list, fd_count: int, expected_error: str,
                         signature: str = "hsa{sv}") -> None:
    """Call Transfer ``REPEAT`` times with ``fd_count`` fresh descriptors; each must fail."""
    for _ in range(REPEAT):
        fds = [os.open(os.devnull, os.O_WRONLY) for _ in range(fd_count)]
        try:
            with pytest.raises(DBusError) as refused:
                await call(bus, path, ITEM, "Transfer", signature, body, unix_fds=fds)
        finally:
            for fd in fds:
                os.close(fd)
        assert refused.value.type == expected_error, refused.value.text


async def test_a_transfer_to_a_session_that_does_not_exist_keeps_no_descriptor(daemon, client) -> None:
    await flatbed(client)  # a session exists, just not this one
    before = fd_count(daemon)
    await repeat_refused(client, f"{ROOT}/sessions/999999/items/Root/Flatbed", [0, "png", {}], 1, f"{ERROR}.NotFound")
    await assert_fd_count_returns(daemon, before, "transfers to a missing session")


async def test_a_transfer_to_an_object_without_items_keeps_no_descriptor(daemon, client) -> None:
    before = fd_count(daemon)
    await repeat_refused(client, SIM0, [0, "png", {}], 1, f"{STANDARD_ERROR}UnknownMethod")
    await assert_fd_count_returns(daemon, before, "transfers to a device object")


async def test_a_transfer_with_the_wrong_signature_keeps_no_descriptor(daemon, client) -> None:
    item = await flatbed(client)
    before = fd_count(daemon)
    await repeat_refused(client, item, [0, "png"], 1, f"{STANDARD_ERROR}UnknownMethod", signature="hs")
    await assert_fd_count_returns(daemon, before, "transfers with the wrong signature")


async def test_a_transfer_refused_to_another_client_keeps_no_descriptor(daemon, client, client2) -> None:
    theirs = await flatbed(client)
    before = fd_count(daemon)
    await repeat_refused(client2, theirs, [0, "png", {}], 1, f"{ERROR}.AccessDenied")
    await assert_fd_count_returns(daemon, before, "transfers from another client's item")


async def test_a_refused_transfer_closes_the_descriptors_it_did_not_use(daemon, client) -> None:
    item = await flatbed(client)
    before = fd_count(daemon)
    # Two descriptors, the argument names the second: the first is never used.
    await repeat_refused(client, item, [1, "no-such-format", {}], 2, f"{ERROR}.InvalidArgument")
    await assert_fd_count_returns(daemon, before, "refused transfers with an unused descriptor")


async def test_refused_transfers_that_expect_no_reply_keep_no_descriptor(daemon, client) -> None:
    item = await flatbed(client)
    before = fd_count(daemon)
    for path, fmt in ((f"{ROOT}/sessions/999999/items/Root/Flatbed", "png"), (item, "no-such-format")):
        for n in range(REPEAT):
            fd = os.open(os.devnull, os.O_WRONLY)
            try:
                await client.send(Message(destination=BUS_NAME, path=path, interface=ITEM, member="Transfer",
                                          signature="hsa{sv}", body=[0, fmt, {}], unix_fds=[fd],
                                          flags=MessageFlag.NO_REPLY_EXPECTED))
            finally:
                os.close(fd)
            if n % 50 == 49:
                # The reply comes after the daemon dispatched every call before it; this
                # also keeps this client's socket from filling up (EAGAIN drops it).
                await call(client, ROOT, PEER, "Ping")
    await assert_fd_count_returns(daemon, before, "refused transfers without a reply")


def at_eof(fd: int) -> bool:
    """Whether every write end of the (non-blocking) pipe read by ``fd`` is closed."""
    try:
        return os.read(fd, 1) == b""
    except BlockingIOError:
        return False


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


async def test_a_transfer_keeps_the_descriptor_it_uses_and_closes_the_other(daemon, client) -> None:
    item = await flatbed(client)
    before = fd_count(daemon)
    unused_r, unused_w = os.pipe()
    os.set_blocking(unused_r, False)
    r, w = os.pipe()
    reader = asyncio.get_running_loop().run_in_executor(None, read_all, r)
    try:
        (summary,) = await call(client, item, ITEM, "Transfer", "hsa{sv}", [1, "png", {}], unix_fds=[unused_w, w])
    finally:
        os.close(w)
        os.close(unused_w)
        data = await reader
        os.close(r)
    try:
        assert summary["content_type"].value == "image/png"
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and summary["bytes"].value == len(data)
        # The daemon's copy of the unused one is closed too.
        await wait_until(lambda: at_eof(unused_r), timeout=5, what="the unused descriptor closed")
    finally:
        os.close(unused_r)
    await assert_fd_count_returns(daemon, before, "a transfer")
