"""The messages between the service and a SANE worker process.

Requests: one JSON object a line on the worker's stdin. Replies: *messages* on
its stdout, each an 8-byte header (``<II``: JSON length, payload length), the
JSON, then the payload (pixel data, in the service's raw layout).
"""

from __future__ import annotations

import struct

HEADER = struct.Struct("<II")
#: The size of one read from the backend, and the most one data message carries.
CHUNK = 1024 * 1024

__all__ = ["CHUNK", "HEADER"]
