"""Sockets passed by systemd (socket activation: ``LISTEN_FDS``, ``LISTEN_FDNAMES``).

The daemon hands each front-end that listens on the network the sockets named
for it (``FileDescriptorName=`` in its ``.socket`` unit), to serve instead of
opening its own, so that systemd can start the service on the first connection
and hold the port while the service restarts.
"""

from __future__ import annotations

import os
import socket

#: The first descriptor systemd passes.
LISTEN_FDS_START = 3

_passed: dict[str, list[socket.socket]] | None = None


def _collect() -> dict[str, list[socket.socket]]:
    """Every passed socket by name, read once (the variables are then removed, so
    that programs the service starts do not take them for theirs)."""
    global _passed
    if _passed is not None:
        return _passed
    _passed = {}
    if os.environ.get("LISTEN_PID") == str(os.getpid()):
        try:
            count = int(os.environ.get("LISTEN_FDS", "0"))
        except ValueError:
            count = 0
        names = os.environ.get("LISTEN_FDNAMES", "").split(":")
        for index, fd in enumerate(range(LISTEN_FDS_START, LISTEN_FDS_START + count)):
            name = names[index] if index < len(names) and names[index] else "unknown"
            try:
                sock = socket.socket(fileno=fd)
            except OSError:
                continue
            _passed.setdefault(name, []).append(sock)
    for variable in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(variable, None)
    return _passed


def listening_sockets(name: str) -> list[socket.socket]:
    """The stream sockets systemd passed under ``name`` (none when not activated)."""
    return [s for s in _collect().get(name, []) if s.type == socket.SOCK_STREAM]


__all__ = ["listening_sockets"]
