"""Limits that the service and its clients share (a client that knows them can
refuse a request before sending it)."""

#: The longest any call may wait: for data mode, for the device lock (milliseconds).
MAX_WAIT_MS = 10 * 60 * 1000
#: The most bytes one raw I/O or escape call may move.
MAX_IO_BYTES = 16 * 1024 * 1024
