"""A private network namespace for tests that need fixed ports (libsane's ``net`` backend
only ever connects to port 6566).

:class:`NetNamespace` starts a holder process in a new network namespace with its own
loopback brought up, and :meth:`NetNamespace.wrap` turns any command line into one that
runs inside it (``nsenter --net=/proc/PID/ns/net -- ...``). nsenter execs the program
(no fork for a network namespace), so the wrapped process keeps the Popen's pid: a signal
sent to the Popen reaches the program itself. Unix sockets with a path (the private
D-Bus bus) are reachable from every network namespace, so a daemon inside it still talks
to the bus outside.

Nothing here sleeps to synchronise: the holder prints a line once ``lo`` is up, and that
line is waited for with a deadline.
"""

from __future__ import annotations

import functools
import selectors
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dbus_fast.aio import MessageBus
from helpers import Daemon, connect, wait_until

READY = "netns-ready"
START_TIMEOUT = 10.0


class NamespaceUnavailable(RuntimeError):
    """A private network namespace cannot be made here (no permission, no tools)."""


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The first line of a process's stdout, or "" at end of file or when time runs out."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return ""
    return proc.stdout.readline().strip()


class NetNamespace:
    """``with NetNamespace() as ns: subprocess.run(ns.wrap(["scanimage", "-L"]))``."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> NetNamespace:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        for tool in ("unshare", "nsenter", "ip"):
            if shutil.which(tool) is None:
                raise NamespaceUnavailable(f"{tool} is not installed (util-linux, iproute2)")
        # unshare execs sh without forking, and sh execs sleep: the holder is self.proc.pid.
        script = f"ip link set lo up && echo {READY} && exec sleep infinity"
        self.proc = subprocess.Popen(["unshare", "-n", "sh", "-c", script], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = _read_line(self.proc, START_TIMEOUT)
        if line != READY:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(10)
            assert self.proc.stderr is not None
            error = self.proc.stderr.read().strip()
            self.stop()
            raise NamespaceUnavailable(f"unshare -n failed: {error or line or 'no answer'}")

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the namespace is not started"
        return self.proc.pid

    @property
    def path(self) -> str:
        """The namespace as a file: /proc/PID/ns/net of the holder."""
        return f"/proc/{self.pid}/ns/net"

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` as a command line that runs inside the namespace."""
        return ["nsenter", f"--net={self.path}", "--", *argv]

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess:
        """subprocess.run inside the namespace (give a timeout)."""
        kwargs.setdefault("timeout", 30)
        return subprocess.run(self.wrap(argv), **kwargs)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        return subprocess.Popen(self.wrap(argv), **kwargs)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@functools.cache
def unavailable_reason() -> str | None:
    """Why a private network namespace cannot be made here, or None if it can."""
    try:
        with NetNamespace() as ns:
            # nsenter needs its own permission (CAP_SYS_ADMIN over the namespace): try it once.
            probe = ns.run(["ip", "-o", "link", "show", "lo"], capture_output=True, text=True, timeout=10)
            if probe.returncode != 0 or "UP" not in probe.stdout:
                return f"nsenter into the namespace failed: {probe.stderr.strip() or probe.stdout.strip()}"
    except NamespaceUnavailable as e:
        return str(e)
    except (OSError, subprocess.SubprocessError) as e:
        return f"network namespace: {e}"
    return None


def wait_for_port(ns: NetNamespace, port: int, host: str = "127.0.0.1", timeout: float = 10.0,
                  alive: subprocess.Popen | None = None) -> None:
    """Wait until something listens on host:port inside the namespace.

    Listening sockets are read from /proc/PID/net/tcp of the holder (that file shows the
    holder's namespace), after each change of the clock, with a deadline: there is no
    event for "a socket started listening" to wait on.
    """
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        if listening(ns, port, host):
            return
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"the server exited with {alive.returncode} before listening on {host}:{port}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {host}:{port} in the namespace within {timeout} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _hex_address(host: str) -> str:
    a, b, c, d = (int(part) for part in host.split("."))
    return f"{d:02X}{c:02X}{b:02X}{a:02X}"


def listening(ns: NetNamespace, port: int, host: str = "127.0.0.1") -> bool:
    """Whether a TCP socket listens on host:port (or any address, that port) in the namespace."""
    want = f"{_hex_address(host)}:{port:04X}"
    try:
        with open(f"/proc/{ns.pid}/net/tcp", encoding="ascii") as f:
            next(f)
            for line in f:
                fields = line.split()
                # st 0A = LISTEN; 00000000 (any address) also serves 127.0.0.1
                if fields[3] == "0A" and (fields[1] == want or fields[1] == "00000000:" + want.split(":")[1]):
                    return True
    except FileNotFoundError:
        return False
    return False



async def serve_in_namespace(request: Any, bus_address: str, config: Path, workdir: Path, port: int,
                             cleanup: list[Callable[[], Any]]) -> tuple[NetNamespace, Daemon, MessageBus]:
    """The daemon with ``config``, started inside a fresh network namespace, once it
    listens on 127.0.0.1:``port``; and a client of the private bus. What must be
    stopped afterwards is appended to ``cleanup``, in the order it was started."""
    ns = NetNamespace()
    ns.start()
    cleanup.append(ns.stop)
    daemon = Daemon(bus_address, "--config", str(config), workdir=str(workdir))
    daemon.args = ns.wrap(daemon.args)
    request.node._stillsvc_daemon = daemon  # its log is shown when the test fails
    cleanup.append(daemon.stop)
    await daemon.ready()
    await wait_until(lambda: listening(ns, port) or daemon.proc.poll() is not None, timeout=10,
                     what=f"the daemon listening on 127.0.0.1:{port}")
    assert daemon.proc is not None and daemon.proc.poll() is None, f"the daemon exited ({daemon.proc.returncode})"
    bus = await connect(bus_address)
    cleanup.append(bus.disconnect)
    return ns, daemon, bus
