"""A PTP session over a claimed USB interface: transactions and events.

One transaction at a time (a lock), from any thread: the device's worker thread
runs the driver's calls, the driver's event thread asks for an object's info
when one is added. A data phase from the camera is read in large reads (1 MiB)
into one buffer and handed to a sink piece by piece, so an object of any size
is never whole in memory. A transaction stopped by ``cancel`` sends the class
request Cancel on the wire, waits for the camera to say it is ready again (Get
Device Status) and drains what it had sent.
"""

from __future__ import annotations

import struct
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass

from stillsvc.common.errors import Cancelled, Failed, Timeout
from stillsvc.driver.usb import UsbPort
from stillsvc.drivers.ptp.protocol import (
    HEADER,
    Container,
    ContainerType,
    DeviceInfo,
    Event,
    Op,
    PtpError,
    Response,
    code_name,
    command,
    data_header,
    parse_header,
    parse_params,
)

#: One bulk read, and the most of an object held in memory at once.
CHUNK = 1024 * 1024
#: How long one USB transfer may take.
TIMEOUT_MS = 20_000
#: How long the camera may take to be ready again after a Cancel.
CANCEL_WAIT = 3.0

Sink = Callable[[memoryview], None]


@dataclass(frozen=True)
class Reply:
    code: int
    params: tuple[int, ...]
    data: bytes = b""


class PtpSession:
    def __init__(self, port: UsbPort, timeout_ms: int = TIMEOUT_MS) -> None:
        self.port = port
        self.timeout_ms = timeout_ms
        self.lock = threading.RLock()
        self.transaction_id = 0
        self.session_id = 0
        self.info: DeviceInfo | None = None
        self._buffer = array("B", bytes(CHUNK))

    @property
    def open(self) -> bool:
        return self.session_id != 0

    def supports(self, op: int) -> bool:
        return self.info is None or op in self.info.operations

    def _next(self) -> int:
        self.transaction_id = self.transaction_id + 1 if self.transaction_id < 0xFFFFFFFE else 1
        return self.transaction_id

    # -- transactions ----------------------------------------------------------------------
    def transaction(self, op: int, params: tuple[int, ...] = (), *, data: bytes | None = None,
                    sink: Sink | None = None, cancel: threading.Event | None = None) -> Reply:
        """One operation: command, data out (``data``) or in (to ``sink``, else
        collected in the reply), response. A response other than OK raises
        :class:`PtpError`."""
        with self.lock:
            # Outside a session (GetDeviceInfo before OpenSession) the transaction id is 0.
            tid = 0 if op == Op.OpenSession or not self.session_id else self._next()
            try:
                return self._transaction(op, tid, params, data, sink, cancel)
            except Timeout:
                # What the camera sends late must not meet the next transaction.
                self._cancel(tid)
                raise

    def _transaction(self, op: int, tid: int, params: tuple[int, ...], data: bytes | None, sink: Sink | None,
                     cancel: threading.Event | None) -> Reply:
        self.port.write(command(op, tid, params), self.timeout_ms)
        if data is not None:
            self.port.write(data_header(op, tid, len(data)) + data, self.timeout_ms)
        collected: list[bytes] | None = [] if sink is None else None

        def deliver(view: memoryview) -> None:
            if collected is not None:
                collected.append(bytes(view))
                return
            assert sink is not None
            try:
                sink(view)
            except BaseException:
                # The consumer stopped (cancelled, its reader gone): the camera must
                # stop sending too, or its data would meet the next transaction.
                self._cancel(tid)
                raise

        buffer = self._buffer
        n = self.port.read_into(buffer, self.timeout_ms)
        view = memoryview(buffer)
        head = parse_header(view[:n])
        if head.type == ContainerType.DATA:
            if head.transaction != tid:
                raise Failed(f"the camera sent data for transaction {head.transaction} during {tid}")
            total = head.length - HEADER.size
            received = min(total, n - HEADER.size)
            if received:
                deliver(view[HEADER.size:HEADER.size + received])
            full = n == len(buffer)
            while received < total:
                if cancel is not None and cancel.is_set():
                    self._cancel(tid)
                    raise Cancelled(f"{code_name(op)} cancelled after {received} of {total} bytes")
                n = self.port.read_into(buffer, self.timeout_ms)
                if n == 0:
                    raise Failed(f"the camera ended {code_name(op)}'s data after {received} of {total} bytes")
                take = min(n, total - received)
                deliver(view[:take])
                received += take
                full = n == len(buffer)
            response = None
            if full and head.length % self.port.packet_size == 0:
                # The data phase ended with a full read: its zero-length packet is still to come.
                n = self.port.read_into(buffer, self.timeout_ms)
                if n:
                    response = parse_params(view[:n])
            if response is None:
                n = self.port.read_into(buffer, self.timeout_ms)
                response = parse_params(view[:n])
        else:
            response = parse_params(view[:n])
        if response.type != ContainerType.RESPONSE:
            raise Failed(f"the camera sent a container of type {response.type} where a response belongs "
                         f"({code_name(op)})")
        if response.transaction != tid:
            raise Failed(f"the camera answered transaction {response.transaction} to {tid} ({code_name(op)})")
        if response.code != Response.OK:
            raise PtpError(op, response.code, response.params)
        return Reply(response.code, response.params, b"".join(collected) if collected is not None else b"")

    def _cancel(self, tid: int) -> None:
        """The class request Cancel, then wait for the camera to be ready and drain its data."""
        try:
            self.port.control(0x21, 0x64, 0, struct.pack("<HI", Event.CancelTransaction, tid), 2000)
        except Exception:
            pass
        deadline = time.monotonic() + CANCEL_WAIT
        small = array("B", bytes(max(512, self.port.packet_size)))
        while time.monotonic() < deadline:
            try:
                n = self.port.read_into(small, 50)
            except Exception:
                n = 0
            if n:
                continue  # what the camera had already sent
            if self.status() == Response.OK:
                break
        self.port.clear_halt()

    def status(self) -> int:
        """Get Device Status (a class request): the camera's response code now."""
        try:
            answer = bytes(self.port.control(0xA1, 0x67, 0, 64, 2000))
        except Exception:
            return Response.GeneralError
        if len(answer) < 4:
            return Response.GeneralError
        return int(struct.unpack_from("<H", answer, 2)[0])

    def reset(self) -> None:
        """Device Reset (a class request): the camera closes its session."""
        with self.lock:
            self.port.control(0x21, 0x66, 0, b"", 2000)
            self.session_id = 0

    # -- the session ---------------------------------------------------------------------
    def device_info(self) -> DeviceInfo:
        self.info = DeviceInfo.parse(self.transaction(Op.GetDeviceInfo).data)
        return self.info

    def open_session(self, session_id: int = 1) -> None:
        with self.lock:
            self.transaction_id = 0
            try:
                self.transaction(Op.OpenSession, (session_id,))
            except PtpError as e:
                if e.code != Response.SessionAlreadyOpen:
                    raise
                # A session left open by someone before (whose transaction ids we do not
                # know): Device Reset closes it, then ours is opened.
                self.port.control(0x21, 0x66, 0, b"", 2000)
                self.transaction_id = 0
                self.transaction(Op.OpenSession, (session_id,))
            self.session_id = session_id

    def close_session(self) -> None:
        with self.lock:
            if self.session_id:
                try:
                    self.transaction(Op.CloseSession)
                finally:
                    self.session_id = 0

    def read_event(self, timeout_ms: int) -> Container | None:
        """The next event from the interrupt endpoint; None when none came in time."""
        raw = self.port.read_interrupt(64, timeout_ms)
        if not raw:
            return None
        event = parse_params(raw)
        return event if event.type == ContainerType.EVENT else None


__all__ = ["CHUNK", "PtpSession", "Reply", "Sink"]
