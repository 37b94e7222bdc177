"""What every stillctl subcommand shares: the connection (:class:`Ctl`, over
:mod:`stillsvc.client`), the subcommand registry (:func:`command`), and output as
tables or JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from stillsvc.client import Client, parse_bus
from stillsvc.common.limits import MAX_WAIT_MS
from stillsvc.common.names import IFACE_PREFIX

PROG = "stillctl"

#: The longest wait the service accepts for data mode or the device lock (seconds).
MAX_WAIT = MAX_WAIT_MS / 1000
#: After ``lock``'s command ends, how long to wait for the service to take the device back.
TAKE_BACK_WAIT = 3.0


class CtlError(Exception):
    """An expected failure of stillctl's own: printed as ``stillctl: <message>``, then
    exit ``code``. (The client library's errors are printed the same way, with
    status 1.)"""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


# -- values and output ------------------------------------------------------------

def plain(value: Any) -> Any:
    """The client library's plain values as JSON-able ones (bytes and tuples as lists)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return list(value)
    return value


def show(value: Any) -> str:
    """A value as a person reads it in a table or a monitor line."""
    value = plain(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(show(v) for v in value) if value else "-"
    if isinstance(value, dict):
        return " ".join(f"{k}={show(v)}" for k, v in value.items()) if value else "-"
    if value == "":
        return "-"
    return str(value)


def show_assignment(name: str, value: Any) -> str:
    """``Name=value`` for one-line output, quoting values with spaces."""
    text = show(value)
    if any(c.isspace() for c in text):
        text = json.dumps(text)
    return f"{name}={text}"


def print_json(data: Any, *, lines: bool = False) -> None:
    """JSON on stdout: indented, or one compact object per line (``lines``)."""
    if lines:
        print(json.dumps(plain(data), separators=(",", ":")), flush=True)
    else:
        print(json.dumps(plain(data), indent=2), flush=True)


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    """Aligned columns; the last column is not padded."""
    cells = [headers] + [[show(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers) - 1)]
    for row in cells:
        padded = [c.ljust(w) for c, w in zip(row, widths)] + [row[-1]]
        print("  ".join(padded).rstrip())
    sys.stdout.flush()


def print_fields(title: str, values: dict[str, Any], indent: str = "  ") -> None:
    """A title line, then one ``Name  value`` line per entry."""
    print(title)
    width = max((len(k) for k in values), default=0)
    for key, value in values.items():
        print(f"{indent}{key.ljust(width)}  {show(value)}")
    sys.stdout.flush()


def short_interface(name: str) -> str:
    prefix = IFACE_PREFIX + "."
    return name[len(prefix):] if name.startswith(prefix) else name


def clock(timestamp: float | None = None) -> str:
    """``HH:MM:SS.mmm`` in local time."""
    t = time.time() if timestamp is None else timestamp
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"


# -- the bus ------------------------------------------------------------------------

def bus_argument(value: str) -> str:
    """``--bus``: the client library's rule (system, session or a D-Bus address)."""
    try:
        return parse_bus(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


@dataclass
class Ctl:
    """What every subcommand works with: the client and how to print."""

    client: Client
    json: bool = False

    @property
    def bus_spec(self) -> str:
        return self.client.bus


# -- subcommands -----------------------------------------------------------------------

Run = Callable[[Ctl, argparse.Namespace], Awaitable[int]]


@dataclass
class Command:
    name: str
    run: Run
    help: str
    description: str | None
    arguments: list[tuple[tuple[Any, ...], dict[str, Any]]]
    epilog: str | None = None
    usage: str | None = None
    #: Checks the parsed arguments before anything is sent; returns an error or None.
    check: Callable[[argparse.Namespace], str | None] | None = None


COMMANDS: dict[str, Command] = {}


def arg(*names: Any, **options: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """One ``add_argument`` call for :func:`command`."""
    return names, options


def command(name: str, help: str, *arguments: tuple[tuple[Any, ...], dict[str, Any]],
            description: str | None = None, epilog: str | None = None,
            usage: str | None = None,
            check: Callable[[argparse.Namespace], str | None] | None = None) -> Callable[[Run], Run]:
    """Register a subcommand: ``fn(ctl, args) -> exit status``."""

    def register(fn: Run) -> Run:
        COMMANDS[name] = Command(name, fn, help, description, list(arguments), epilog, usage, check)
        return fn

    return register


def silence_stdout() -> None:
    """Send what is left for stdout to /dev/null (its reader is gone)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def warn(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
