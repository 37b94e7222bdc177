"""Logging: structlog with bound context (device, session, client).

On a terminal: coloured key=value lines. Under systemd (``JOURNAL_STREAM`` set):
plain key=value lines with a ``<N>`` priority prefix the journal understands, no
timestamps (the journal adds its own). ``--log-format json`` gives JSON lines.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}


def _journal_prefix(_logger: object, method: str, event: dict) -> dict:
    event["_prefix"] = f"<{_PRIORITY.get(method, 6)}>"
    return event


class _PrefixRenderer:
    def __init__(self) -> None:
        self._inner = structlog.processors.KeyValueRenderer(key_order=["event"], drop_missing=True)

    def __call__(self, logger: object, method: str, event: dict) -> str:
        prefix = event.pop("_prefix", "")
        return prefix + self._inner(logger, method, event)


def setup(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog (and the stdlib logging that libraries use) once, at start."""
    numeric = getattr(logging, level.upper(), logging.INFO)
    if fmt == "auto":
        if os.environ.get("JOURNAL_STREAM"):
            fmt = "journal"
        elif sys.stderr.isatty():
            fmt = "console"
        else:
            fmt = "plain"

    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.format_exc_info,
    ]
    if fmt == "json":
        processors = [*shared, structlog.processors.TimeStamper(fmt="iso"), structlog.processors.JSONRenderer()]
    elif fmt == "journal":
        processors = [*shared, _journal_prefix, _PrefixRenderer()]
    elif fmt == "console":
        processors = [*shared, structlog.processors.TimeStamper(fmt="%H:%M:%S"), structlog.dev.ConsoleRenderer()]
    else:
        processors = [
            *shared,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.KeyValueRenderer(key_order=["timestamp", "level", "event"], drop_missing=True),
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr,
                        format="level=%(levelname)s logger=%(name)s event=%(message)r")
