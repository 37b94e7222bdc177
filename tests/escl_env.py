"""eSCL (AirScan) clients for the tests of the eSCL server: private configurations of the
two SANE eSCL backends, an HTTP client and an mDNS browser that run inside a network
namespace.

The daemon's eSCL server listens on the namespace's loopback, which the test process
cannot reach: every client runs inside the namespace (tests/netns.py). The SANE backends
get a private ``SANE_CONFIG_DIR``:

* :class:`AirscanConfig` -- sane-airscan with one manual device, discovery off and its
  protocol trace (every request and image) kept in a folder of the test;
* :class:`EsclBackendConfig` -- sane-backends' ``escl`` with an empty ``escl.conf``
  (devices are named ``escl:http://127.0.0.1:PORT``; listing needs avahi).

Run as a script, this file is one of two helpers (it imports nothing of stillsvc or of
the tests, so it runs in any process)::

    python3 tests/escl_env.py http      # JSON requests on stdin, one JSON answer a line
    python3 tests/escl_env.py browse _uscan._tcp.local. 127.0.0.1

``http`` reads one JSON object a line and answers each with one line, in order::

    {"method": "GET", "path": "/eSCL/ScannerStatus", "headers": {...}, "body": "text"}
    {"raw_b64": "..."}         bytes sent as they are (malformed HTTP), then the answer read
    {"body_b64": "..."}        a binary body; "chunked": true sends it chunked
    {"close_after_send": true} send, then close without reading (a client that vanishes)

and answers ``{"status", "reason", "headers": {lower-case name: value}, "body_b64",
"t_sent", "t_done", "error"}`` (``t_*`` are time.monotonic(): the clock is the same in
every process of the machine). Each request has a connection of its own, as
sane-airscan does.

``browse`` runs a python-zeroconf ServiceBrowser and prints ``{"event": "ready"}``, then
``{"event": "added"|"updated", "name", "port", "server", "addresses", "txt"}`` or
``{"event": "removed", "name"}`` as they happen.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import selectors
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HTTP_PORT = 8090
SCAN_NS = "http://schemas.hp.com/imaging/escl/2011/05/03"
PWG_NS = "http://www.pwg.org/schemas/2010/12/sm"
NS = {"scan": SCAN_NS, "pwg": PWG_NS}

# -- the SANE clients' configurations -----------------------------------------------------------


def _client_env(folder: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment without any SANE_ or proxy variable, and a private SANE_CONFIG_DIR."""
    drop = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANE_") and k.lower() not in drop}
    # No trailing colon: with one, libsane would read the system folders as well.
    env["SANE_CONFIG_DIR"] = str(folder)
    env.update(extra or {})
    return env


class AirscanConfig:
    """sane-airscan only, one manual eSCL device, no discovery, the protocol trace kept.

    sane-airscan also reads /etc/sane.d/airscan.conf (Debian's has nothing enabled); what
    is set here wins.
    """

    def __init__(self, folder: Path, url: str, name: str = "Sim") -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.trace = self.folder / "trace"
        self.name = name
        self.url = url
        (self.folder / "dll.conf").write_text("airscan\n")
        (self.folder / "airscan.conf").write_text(
            "[devices]\n"
            f'"{name}" = {url}, eSCL\n'
            "\n[options]\n"
            "discovery = disable\n"
            "\n[debug]\n"
            f"trace = {self.trace}\n"
            # its console log would go to stdout, into the image scanimage writes there
            "enable = false\n")

    @property
    def device(self) -> str:
        """The SANE name of the manual device (``e0``: the first configured eSCL device)."""
        return f"airscan:e0:{self.name}"

    @property
    def env(self) -> dict[str, str]:
        return _client_env(self.folder)

    def evidence(self, tail: int = 6000) -> str:
        """Where the trace is and what it holds, for an assertion message: every file with
        its size, and the end of each protocol log."""
        if not self.trace.exists():
            return f"airscan trace folder {self.trace}: not created"
        lines = [f"airscan trace folder {self.trace} (kept):"]
        logs = []
        for path in sorted(self.trace.iterdir()):
            lines.append(f"  {path.name}  {path.stat().st_size} bytes")
            if path.suffix == ".log" and "zeroconf" not in path.name:
                logs.append(path)
        for path in logs:
            text = path.read_text(errors="replace")
            # the requests with their answers, and what sane-airscan made of them
            key = re.compile(r"HTTP (GET|POST|DELETE) \S+: \d{3} |PROTO_OP_\w+: (decoded|device status|ADF status|"
                             r"job status)|API: sane_(start|read)\(\): (?!called)")
            lines.append(f"--- the exchanges in {path} ---")
            lines.extend(line for line in text.splitlines() if key.search(line))
            lines.append(f"--- end of {path} ---")
            lines.append(text[-tail:])
        return "\n".join(lines)


class EsclBackendConfig:
    """sane-backends' ``escl`` only, with an escl.conf that names nothing (the device is
    given by URL, ``escl:http://HOST:PORT``). Its debug output (on stderr) is on, so a
    failed scan says which requests it made and what it chose."""

    def __init__(self, folder: Path, debug: int = 10) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "dll.conf").write_text("escl\n")
        (self.folder / "escl.conf").write_text("")
        self.debug = debug

    @staticmethod
    def device(port: int = HTTP_PORT) -> str:
        return f"escl:http://127.0.0.1:{port}"

    @property
    def env(self) -> dict[str, str]:
        return _client_env(self.folder, {"SANE_DEBUG_ESCL": str(self.debug)})


# -- the HTTP client, test side ------------------------------------------------------------------

HELPER = str(Path(__file__).resolve())


class Response:
    def __init__(self, answer: dict[str, Any]) -> None:
        self.answer = answer
        self.status: int | None = answer.get("status")
        self.reason: str = answer.get("reason") or ""
        self.headers: dict[str, str] = answer.get("headers") or {}
        self.body: bytes = base64.b64decode(answer.get("body_b64") or "")
        self.error: str | None = answer.get("error")
        self.t_sent: float = answer.get("t_sent", 0.0)
        self.t_done: float = answer.get("t_done", 0.0)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def __repr__(self) -> str:
        body = self.text if len(self.body) < 600 else self.text[:600] + f"... ({len(self.body)} bytes)"
        return f"<{self.status} {self.reason!r} {self.headers} {body!r} error={self.error!r}>"


class HttpClient:
    """The ``http`` helper started once inside the namespace; requests go over its stdin.

    Blocking (so a hypothesis test can use it); async tests call :meth:`arequest`, which
    runs the same in a thread. One request at a time.
    """

    def __init__(self, wrap: Any, timeout: float = 20.0) -> None:
        self.proc = subprocess.Popen(wrap([sys.executable, HELPER, "http"]), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.timeout = timeout
        self._lock = threading.Lock()

    def request(self, method: str = "GET", path: str = "/", body: bytes | str | None = None,
                headers: dict[str, str] | None = None, timeout: float | None = None, **extra: Any) -> Response:
        op: dict[str, Any] = {"method": method, "path": path, "headers": headers or {}, **extra}
        if isinstance(body, str):
            body = body.encode()
        if body is not None:
            op["body_b64"] = base64.b64encode(body).decode()
        op["timeout"] = timeout or self.timeout
        return self._exchange(op, (timeout or self.timeout) + 5)

    def raw(self, data: bytes, timeout: float | None = None, **extra: Any) -> Response:
        """Bytes sent as they are on a new connection, and the answer parsed as HTTP."""
        op = {"raw_b64": base64.b64encode(data).decode(), "timeout": timeout or self.timeout, **extra}
        return self._exchange(op, (timeout or self.timeout) + 5)

    async def arequest(self, *args: Any, **kwargs: Any) -> Response:
        import asyncio
        return await asyncio.to_thread(self.request, *args, **kwargs)

    async def araw(self, *args: Any, **kwargs: Any) -> Response:
        import asyncio
        return await asyncio.to_thread(self.raw, *args, **kwargs)

    def _exchange(self, op: dict[str, Any], deadline_s: float) -> Response:
        with self._lock:
            assert self.proc.stdin is not None and self.proc.stdout is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"the HTTP helper exited ({self.proc.returncode}): {self._stderr()}")
            self.proc.stdin.write(json.dumps(op).encode() + b"\n")
            self.proc.stdin.flush()
            with selectors.DefaultSelector() as sel:
                sel.register(self.proc.stdout, selectors.EVENT_READ)
                if not sel.select(deadline_s):
                    raise TimeoutError(f"no answer from the HTTP helper within {deadline_s} s for "
                                       f"{op.get('method')} {op.get('path')}")
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the HTTP helper exited ({self.proc.wait(5)}): {self._stderr()}")
            return Response(json.loads(line))

    def _stderr(self) -> str:
        try:
            assert self.proc.stderr is not None
            return self.proc.stderr.read().decode(errors="replace")[-4000:]
        except Exception:  # noqa: BLE001 - only for a message
            return ""

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.close()
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


# -- the helpers, process side ----------------------------------------------------------------


def _read_answer(sock: socket.socket, method: str) -> dict[str, Any]:
    response = http.client.HTTPResponse(sock, method=method)
    response.begin()
    body = response.read()
    return {"status": response.status, "reason": response.reason,
            "headers": {k.lower(): v for k, v in response.getheaders()},
            "body_b64": base64.b64encode(body).decode()}


def _request_bytes(op: dict[str, Any], host: str, port: int) -> bytes:
    method, path = op.get("method", "GET"), op.get("path", "/")
    body = base64.b64decode(op["body_b64"]) if "body_b64" in op else b""
    headers = {"Host": f"{host}:{port}", "Connection": "close", **(op.get("headers") or {})}
    if op.get("chunked"):
        headers["Transfer-Encoding"] = "chunked"
        step = 16384
        body = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + step]), body[i:i + step])
                        for i in range(0, len(body), step)) + b"0\r\n\r\n"
    elif body or method in ("POST", "PUT"):
        headers.setdefault("Content-Length", str(len(body)))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return head.encode("latin-1") + body


def _http_one(op: dict[str, Any]) -> dict[str, Any]:
    host, port = op.get("host", "127.0.0.1"), int(op.get("port", HTTP_PORT))
    data = base64.b64decode(op["raw_b64"]) if "raw_b64" in op else _request_bytes(op, host, port)
    method = op.get("method", "GET")
    answer: dict[str, Any] = {"status": None}
    sock = socket.create_connection((host, port), timeout=float(op.get("timeout", 20)))
    try:
        answer["t_start"] = time.monotonic()
        try:
            sock.sendall(data)
        except OSError as e:  # the server may answer (413) and close before taking it all
            answer["send_error"] = f"{type(e).__name__}: {e}"
        answer["t_sent"] = time.monotonic()
        if op.get("close_after_send"):
            return answer
        if op.get("shutdown_write"):
            sock.shutdown(socket.SHUT_WR)
        try:
            answer.update(_read_answer(sock, method))
        except (OSError, http.client.HTTPException) as e:
            answer["error"] = f"{type(e).__name__}: {e}"
        answer["t_done"] = time.monotonic()
    finally:
        sock.close()
    return answer


def http_main() -> int:
    for line in sys.stdin:
        if not line.strip():
            continue
        op = json.loads(line)
        try:
            answer = _http_one(op)
        except OSError as e:
            answer = {"status": None, "error": f"{type(e).__name__}: {e}", "t_done": time.monotonic()}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    return 0


def browse_main(service_type: str, interfaces: list[str]) -> int:
    from zeroconf import IPVersion, ServiceBrowser, ServiceStateChange, Zeroconf

    zc = Zeroconf(interfaces=interfaces or ["127.0.0.1"], ip_version=IPVersion.V4Only)
    out_lock = threading.Lock()

    def emit(event: dict[str, Any]) -> None:
        with out_lock:
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()

    def changed(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            emit({"event": "removed", "name": name, "t": time.monotonic()})
            return
        info = zeroconf.get_service_info(service_type, name, timeout=3000)
        event: dict[str, Any] = {"event": "added" if state_change is ServiceStateChange.Added else "updated",
                                 "name": name, "t": time.monotonic()}
        if info is None:
            event["unresolved"] = True
        else:
            event.update(port=info.port, server=info.server, addresses=info.parsed_addresses(),
                         txt={k.decode("utf-8", "replace"): None if v is None else v.decode("utf-8", "replace")
                              for k, v in info.properties.items()})
        emit(event)

    browser = ServiceBrowser(zc, service_type, handlers=[changed])
    emit({"event": "ready", "t": time.monotonic()})
    try:
        sys.stdin.read()  # until the test closes our stdin (or kills us)
    finally:
        browser.cancel()
        zc.close()
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["http"]:
        sys.exit(http_main())
    if sys.argv[1:2] == ["browse"]:
        sys.exit(browse_main(sys.argv[2] if len(sys.argv) > 2 else "_uscan._tcp.local.", sys.argv[3:]))
    sys.exit(f"usage: {sys.argv[0]} http | browse [TYPE] [INTERFACE...]")
