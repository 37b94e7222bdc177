"""The SANE worker process: one per bridged device, the only place libsane runs.

Started by :class:`stillsvc.driver.sane.SaneProcess` as
``python -m stillsvc.driver.sane.worker --device NAME``. Requests come on stdin,
replies go to stdout (:mod:`.pipe`); stderr is the service's log.

Two threads: the main thread reads requests; every request but ``cancel`` is
queued for the SANE thread, which makes the libsane calls one at a time.
``cancel`` is done at once on the main thread (``sane_cancel`` may be called
while ``sane_read`` blocks, the SANE standard says), so a scan stops even when
the backend is in the middle of a read.

A scan (``scan``) is streamed: a ``page`` message with the page's geometry, then
``data`` messages of whole rows in the service's raw layout (the pipe's
capacity is the flow control), then ``end`` — or an ``error`` message at any
point. Frames are put together here: RGB and gray pass through (16-bit samples
swapped to big-endian, padding at the end of lines dropped); three-pass red,
green and blue frames are gathered and interleaved; a hand scanner's page (lines
not known in advance) is spooled to a temporary file first, so the page message
can give its height.

The process ends when stdin closes, and (through ``PR_SET_PDEATHSIG``) when the
service does.
"""

from __future__ import annotations

import argparse
import array
import ctypes
import json
import os
import queue
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from stillsvc.common.sane import Cap, Frame, Type
from stillsvc.driver.sane.libsane import Descriptor, Handle, Library, Parameters, SaneError
from stillsvc.driver.sane.pipe import CHUNK, HEADER

PR_SET_PDEATHSIG = 1


class Worker:
    def __init__(self, name: str, out: int) -> None:
        self.name = name
        self.out = out
        self.library: Library | None = None
        self.handle: Handle | None = None
        self.descriptors: list[Descriptor] = []
        self.scanning = False
        #: Test aid: extra read-only BOOL/INT sensor options whose values are read
        #: from a JSON file ({"name": value}) at every read. See README, "SANE bridge".
        self.fake_sensors = os.environ.get("STILLSVC_SANE_FAKE_SENSORS") or None
        self.fake: dict[str, Any] = {}

    # -- messages -----------------------------------------------------------------------
    def send(self, message: dict[str, Any], payload: bytes | bytearray | memoryview = b"") -> None:
        body = json.dumps(message).encode()
        view = memoryview(HEADER.pack(len(body), len(payload)) + body)
        _write_all(self.out, view)
        if payload:
            _write_all(self.out, memoryview(payload))

    # -- requests -------------------------------------------------------------------------
    def handle_request(self, request: dict[str, Any]) -> None:
        op = request.get("op")
        try:
            if self.library is None:
                self.library = Library()
            method = getattr(self, f"op_{op}", None)
            if method is None:
                self.send({"error": {"call": str(op), "status": "INVAL", "message": f"unknown request {op!r}"}})
                return
            reply = method(request)
            if reply is not None:
                self.send(reply)
        except SaneError as e:
            self.send({"error": {"call": e.call, "status": e.status_name, "message": str(e)}})
        except Exception as e:  # a bug here must reach the service as an error, not kill the worker
            print(f"sane worker {self.name}: {op} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            self.send({"error": {"call": str(op), "status": "IO_ERROR", "message": f"{type(e).__name__}: {e}"}})

    def op_hello(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.library is not None
        return {"version": self.library.version, "pid": os.getpid()}

    def op_devices(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.library is not None
        return {"devices": self.library.devices(bool(request.get("local_only", True)))}

    def op_open(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.library is not None
        if self.handle is None:
            self.handle = self.library.open(self.name)
        return {"options": self.read_options()}

    def op_close(self, request: dict[str, Any]) -> dict[str, Any]:
        self.close()
        return {}

    def op_get(self, request: dict[str, Any]) -> dict[str, Any]:
        handle = self.require_handle()
        values = []
        for index in request["indices"]:
            if index in self.fake.values():
                values.append(self.fake_value(index))
            else:
                values.append(handle.get(index))
        return {"values": values}

    def op_set(self, request: dict[str, Any]) -> dict[str, Any]:
        handle = self.require_handle()
        info, value = handle.set(int(request["index"]), request.get("value"))
        reply: dict[str, Any] = {"info": info, "value": value}
        if info & 2:  # SANE_INFO_RELOAD_OPTIONS: the backend wants its descriptors read again
            reply["options"] = self.read_options()
        return reply

    def op_finish(self, request: dict[str, Any]) -> dict[str, Any]:
        """End a batch (or an abandoned scan): ``sane_cancel``."""
        if self.handle is not None:
            self.handle.cancel()
        self.scanning = False
        return {}

    def op_stats(self, request: dict[str, Any]) -> dict[str, Any]:
        calls = dict(self.library.calls) if self.library is not None else {}
        return {"calls": calls, "open": self.handle is not None, "pid": os.getpid()}

    def op_scan(self, request: dict[str, Any]) -> None:
        handle = self.require_handle()
        self.scanning = True
        handle.start()
        params = handle.parameters()
        if params.format in (Frame.RED, Frame.GREEN, Frame.BLUE):
            self.send_planes(handle, params)
        elif params.lines < 0:
            self.send_spooled(handle, params)
        else:
            self.send_streamed(handle, params)

    # -- options ----------------------------------------------------------------------------
    def require_handle(self) -> Handle:
        if self.handle is None:
            raise SaneError("sane_open", 4)
        return self.handle

    def read_options(self) -> list[dict[str, Any]]:
        handle = self.require_handle()
        self.descriptors = handle.descriptors()
        options = []
        for d in self.descriptors:
            entry = d.as_dict()
            entry["value"] = None
            readable = d.type not in (Type.BUTTON, Type.GROUP) and not d.cap & Cap.INACTIVE and d.index > 0
            if readable:
                try:
                    entry["value"] = handle.get(d.index)
                except SaneError as e:
                    entry["error"] = e.status_name
            options.append(entry)
        options.extend(self.fake_options(len(self.descriptors)))
        return options

    def fake_options(self, first: int) -> list[dict[str, Any]]:
        self.fake = {}
        if not self.fake_sensors:
            return []
        found = []
        for offset, (name, value) in enumerate(sorted(self.read_fake().items())):
            kind = Type.BOOL if isinstance(value, bool) else Type.INT if isinstance(value, int) else Type.STRING
            self.fake[name] = first + offset
            found.append({"index": first + offset, "name": name, "title": name, "desc": "simulated sensor",
                          "type": int(kind), "unit": 0, "size": 4 if kind != Type.STRING else 64,
                          "cap": int(Cap.SOFT_DETECT | Cap.HARD_SELECT), "constraint": {"kind": "none"},
                          "group": "Sensors", "value": value})
        return found

    def read_fake(self) -> dict[str, Any]:
        try:
            data = json.loads(Path(self.fake_sensors or "").read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def fake_value(self, index: int) -> Any:
        values = self.read_fake()
        for name, at in self.fake.items():
            if at == index:
                return values.get(name)
        raise SaneError("sane_control_option", 4)

    # -- frames ---------------------------------------------------------------------------
    def page_message(self, params: Parameters, channels: int, lines: int) -> dict[str, Any]:
        mode = "color" if channels == 3 else "lineart" if params.depth == 1 else "gray"
        return {"page": {"width": params.pixels_per_line, "height": lines, "mode": mode, "depth": params.depth}}

    def send_streamed(self, handle: Handle, params: Parameters) -> None:
        channels = 3 if params.format == Frame.RGB else 1
        self.send(self.page_message(params, channels, params.lines))
        rows = 0
        for block in self.frame_blocks(handle, params, channels):
            take = min(len(block) // _line_bytes(params, channels), params.lines - rows)
            if take <= 0:
                continue
            rows += take
            self.send({"data": take}, memoryview(block)[:take * _line_bytes(params, channels)])
        self.finish_page(params, channels, rows, params.lines)

    def finish_page(self, params: Parameters, channels: int, rows: int, lines: int) -> None:
        if rows < lines:
            # The backend ended the frame early: the page is filled up with white,
            # so every page has the height it announced.
            line = _line_bytes(params, channels)
            white = b"\x00" if params.depth == 1 else b"\xff"
            missing = lines - rows
            while missing:
                take = min(missing, max(1, CHUNK // line))
                self.send({"data": take}, white * (take * line))
                missing -= take
        self.send({"end": True, "short": max(0, lines - rows)})

    def frame_blocks(self, handle: Handle, params: Parameters, channels: int) -> Iterator[memoryview | bytearray]:
        """The rest of the current frame in blocks of whole rows, converted to the
        raw layout. A block may be a view of a buffer the next block reuses."""
        bpl = max(1, params.bytes_per_line)
        size = max(1, CHUNK // bpl) * bpl
        buffer = bytearray(size)
        raw = (ctypes.c_char * size).from_buffer(buffer)
        view = memoryview(buffer)
        try:
            while True:
                filled = 0
                eof = False
                while filled < size:
                    n = handle.read_into(raw, filled, size - filled)
                    if n == 0:
                        eof = True
                        break
                    filled += n
                whole = filled - filled % bpl
                if whole:
                    yield _convert(view[:whole], params, channels)
                if eof:
                    return
        finally:
            del raw

    def send_spooled(self, handle: Handle, params: Parameters) -> None:
        """A hand scanner: spool the frame, then send it with its height known."""
        channels = 3 if params.format == Frame.RGB else 1
        with tempfile.TemporaryFile(prefix="stillsvc-sane-") as spool:
            rows = 0
            for block in self.frame_blocks(handle, params, channels):
                spool.write(block)
                rows += len(block) // _line_bytes(params, channels)
            spool.seek(0)
            self.send(self.page_message(params, channels, rows))
            self.send_file(spool, params, channels, rows)
        self.send({"end": True, "short": 0})

    def send_file(self, spool: IO[bytes], params: Parameters, channels: int, rows: int) -> None:
        line = _line_bytes(params, channels)
        per = max(1, CHUNK // line)
        left = rows
        while left:
            take = min(per, left)
            self.send({"data": take}, spool.read(take * line))
            left -= take

    def send_planes(self, handle: Handle, params: Parameters) -> None:
        """Three-pass: a red, a green and a blue frame, in the backend's order, interleaved."""
        planes: dict[int, bytearray] = {}
        first = params
        while True:
            plane = bytearray()
            for block in self.frame_blocks(handle, params, 1):
                plane += block
            planes[params.format] = plane
            if params.last_frame or len(planes) == 3:
                break
            handle.start()
            params = handle.parameters()
            if params.format not in (Frame.RED, Frame.GREEN, Frame.BLUE) or params.format in planes:
                raise SaneError("sane_get_parameters", 4)
        if set(planes) != {Frame.RED, Frame.GREEN, Frame.BLUE}:
            raise SaneError("sane_start", 4)
        line = _line_bytes(first, 1)
        rows = min(len(p) for p in planes.values()) // line
        lines = rows if first.lines < 0 else first.lines
        self.send(self.page_message(first, 3, lines))
        sample = 2 if first.depth == 16 else 1
        per = max(1, CHUNK // (line * 3))
        for y0 in range(0, rows, per):
            take = min(per, rows - y0)
            parts = [memoryview(planes[f])[y0 * line:(y0 + take) * line] for f in (Frame.RED, Frame.GREEN, Frame.BLUE)]
            self.send({"data": take}, _interleave(parts, sample))
        self.finish_page(first, 3, rows, lines)

    def close(self) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            self.scanning = False
            handle.close()

    def cancel(self) -> None:
        handle = self.handle
        if handle is not None and self.scanning:
            handle.cancel()


def _line_bytes(params: Parameters, channels: int) -> int:
    """Bytes of one row in the raw layout (no padding)."""
    if params.depth == 1:
        return (params.pixels_per_line * channels + 7) // 8
    return params.pixels_per_line * channels * params.depth // 8


def _convert(block: memoryview, params: Parameters, channels: int) -> memoryview | bytearray:
    """SANE's rows to the raw layout: padding dropped, 16-bit samples big-endian."""
    line = _line_bytes(params, channels)
    bpl = params.bytes_per_line
    if bpl != line and line > 0:
        rows = len(block) // bpl
        block = memoryview(b"".join(block[y * bpl:y * bpl + line] for y in range(rows)))
    if params.depth == 16 and sys.byteorder == "little":
        samples = array.array("H")
        samples.frombytes(block)
        samples.byteswap()
        return bytearray(samples.tobytes())
    return block


def _interleave(parts: list[memoryview], sample: int) -> bytearray:
    """Red, green and blue rows into RGB rows (``sample``: bytes a sample)."""
    if sample == 1:
        out = bytearray(len(parts[0]) * 3)
        for i, part in enumerate(parts):
            out[i::3] = part
        return out
    samples = array.array("H", bytes(len(parts[0]) * 3))
    for i, part in enumerate(parts):
        plane = array.array("H")
        plane.frombytes(part)
        samples[i::3] = plane
    return bytearray(samples.tobytes())


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stillsvc-sane-worker")
    parser.add_argument("--device", default="", help="the SANE device name this worker serves")
    args = parser.parse_args(argv)
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the service stops its workers itself
    out = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a backend that prints must not corrupt the replies
    worker = Worker(args.device, out)
    requests: queue.Queue[dict[str, Any] | None] = queue.Queue()

    def sane_thread() -> None:
        while (request := requests.get()) is not None:
            if request.get("op") == "exit":
                break
            worker.handle_request(request)
        try:
            worker.close()
            if worker.library is not None:
                worker.library.exit()
        except Exception:
            pass

    thread = threading.Thread(target=sane_thread, name="sane", daemon=True)
    thread.start()
    for line in sys.stdin.buffer:
        try:
            request = json.loads(line)
        except ValueError:
            continue
        if not isinstance(request, dict):
            continue
        if request.get("op") == "cancel":
            worker.cancel()
            continue
        requests.put(request)
        if request.get("op") == "exit":
            break
    requests.put(None)
    thread.join(timeout=5.0)
    if thread.is_alive():  # the backend hangs: leave without it
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
