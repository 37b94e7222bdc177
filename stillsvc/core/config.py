"""The configuration file: service limits, policies and static devices (TOML).

A bad file stops the daemon before it touches the bus, with one message that
names the file, the line and what is wrong. Unknown keys are errors too: a typo
silently ignored is a setting silently lost.

Example::

    [service]
    max_sessions = 256            # all clients together
    max_sessions_per_client = 16
    lock_max_hold_ms = 30000      # a device lock held longer is revoked
    io_wait_ms = 5000             # how long a call that did not lock waits for the device lock
    event_queue_length = 64       # per data-mode session
    poll_interval_ms = 1000       # for drivers that can only poll for events
    transfer_stall_ms = 60000     # a transfer whose reader takes nothing this long is stopped

    [udev]
    discover = true               # serve USB devices as they appear (needs pyudev)

    [sane]                        # the SANE bridge: every scanner SANE supports
    discover = true               # bridge the devices libsane lists at start
    exclude = ["v4l:*"]           # SANE names never bridged (fnmatch patterns)
    timeout_ms = 60000            # a backend call that takes longer: its worker is stopped

    [saned]                       # the SANE network server; off without this table
    listen = ["127.0.0.1"]
    port = 6566
    allow = ["127.0.0.0/8"]       # client networks
    start_wait_ms = 10000         # START waits this long for the device, then DEVICE_BUSY
    page_wait_ms = 60000          # a feeder job waits this long for the next START
    max_connections = 64
    max_connections_per_peer = 8

    [[device]]
    id = "scanner1"
    driver = "sim"
    port = ""
    name = "Office scanner"
    options = { feeder = true }
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from stillsvc.common.limits import MAX_WAIT_MS
from stillsvc.common.names import valid_device_id
from stillsvc.driver import DeviceConfig

T = TypeVar("T")

DEFAULT_RUNTIME_DIR = "/run/stillsvc"
DEFAULT_STATE_DIR = "/var/lib/stillsvc"


class ConfigError(Exception):
    """A configuration file the daemon refuses to run with."""

    def __init__(self, path: str, line: int | None, what: str) -> None:
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {what}")
        self.path = path
        self.line = line
        self.what = what


@dataclass(frozen=True)
class Limits:
    max_sessions: int = 256
    max_sessions_per_client: int = 16
    lock_max_hold_ms: int = 30_000
    io_wait_ms: int = 5_000
    event_queue_length: int = 64
    poll_interval_ms: int = 1_000
    transfer_stall_ms: int = 60_000
    max_registrations_per_user: int = 32
    max_string_length: int = 4096


@dataclass(frozen=True)
class SaneSettings:
    """The ``[sane]`` table: the SANE bridge's own settings."""

    #: Bridge every device libsane lists at start (``sane_get_devices``).
    discover: bool = True
    #: SANE device names never bridged, as ``fnmatch`` patterns. Names that lead back
    #: into the service itself (``net`` to its SANE server, ``escl``/``airscan`` to its
    #: eSCL server) are never bridged in any case.
    exclude: tuple[str, ...] = ()
    #: How long one backend call (or one block of a scan) may take before its worker is stopped.
    timeout_ms: int = 60_000


@dataclass(frozen=True)
class SanedSettings:
    """The ``[saned]`` table: the SANE network server (off without the table)."""

    listen: tuple[str, ...] = ("127.0.0.1",)
    port: int = 6566
    allow: tuple[str, ...] = ("127.0.0.0/8",)
    users_file: str | None = None
    start_wait_ms: int = 10_000
    page_wait_ms: int = 60_000
    max_connections: int = 64
    max_connections_per_peer: int = 8


@dataclass(frozen=True)
class EsclSettings:
    """The ``[escl]`` table: the eSCL (AirScan) server and its mDNS announcements."""

    listen: tuple[str, ...] = ("127.0.0.1",)
    port: int = 8090
    allow: tuple[str, ...] = ("127.0.0.0/8",)
    devices: tuple[str, ...] = ("*",)
    mdns: bool = True
    idle_ms: int = 60_000
    max_connections: int = 64
    max_request_bytes: int = 65_536
    #: HTTPS: a PEM certificate (chain) and its private key; announced as _uscans._tcp.
    certificate: str | None = None
    private_key: str | None = None


@dataclass(frozen=True)
class Config:
    limits: Limits = field(default_factory=Limits)
    devices: tuple[DeviceConfig, ...] = ()
    runtime_dir: str = DEFAULT_RUNTIME_DIR
    state_dir: str = DEFAULT_STATE_DIR
    #: Discover USB devices through udev (``[udev] discover``).
    udev_discover: bool = True
    #: The SANE bridge's settings (``[sane]``).
    sane: SaneSettings = field(default_factory=SaneSettings)
    #: The SANE network server's settings; None: it does not run.
    saned: SanedSettings | None = None
    #: The eSCL server's settings; None: it does not run.
    escl: EsclSettings | None = None
    source: str | None = None


# name -> (type, minimum)
_LIMIT_KEYS: dict[str, tuple[type, int]] = {
    "max_sessions": (int, 1),
    "max_sessions_per_client": (int, 1),
    "lock_max_hold_ms": (int, 10),
    "io_wait_ms": (int, 0),
    "event_queue_length": (int, 1),
    "poll_interval_ms": (int, 10),
    "transfer_stall_ms": (int, 100),
    "max_registrations_per_user": (int, 0),
    "max_string_length": (int, 64),
}
_PATH_KEYS = ("runtime_dir", "state_dir")
_DEVICE_KEYS: dict[str, type] = {"id": str, "driver": str, "port": str, "name": str, "options": dict}


class _Locator:
    """Finds the line of a key, so semantic errors can point at it like syntax errors do."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()

    def table(self, header: str, index: int = 0) -> int | None:
        pattern = re.compile(r"^\s*\[+\s*" + re.escape(header) + r"\s*\]+")
        seen = -1
        for number, line in enumerate(self.lines, 1):
            if pattern.match(line):
                seen += 1
                if seen == index:
                    return number
        return None

    def key(self, key: str, after: int | None) -> int | None:
        pattern = re.compile(r"^\s*" + re.escape(key) + r"\s*=")
        for number, line in enumerate(self.lines, 1):
            if after is not None and number < after:
                continue
            if pattern.match(line):
                return number
            if after is not None and number > after and line.lstrip().startswith("["):
                break
        return after


def load(path: str | os.PathLike[str]) -> Config:
    """Read and check a configuration file; raise :class:`ConfigError` on any problem."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(name, None, "no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(name, None, f"cannot read: {e}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        match = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
        line = int(match.group(1)) if match else None
        what = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(e))
        raise ConfigError(name, line, f"not valid TOML: {what}") from None
    return parse(data, name, _Locator(text))


def parse(data: dict[str, Any], name: str = "<config>", where: _Locator | None = None) -> Config:
    where = where or _Locator("")
    unknown = set(data) - {"service", "udev", "sane", "saned", "escl", "device"}
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(name, where.key(key, None) or where.table(key),
                          f"unknown section or key '{key}' (expected [service], [udev], [sane], [saned], [escl] "
                          "or [[device]])")

    service = data.get("service", {})
    if not isinstance(service, dict):
        raise ConfigError(name, where.key("service", None), "'service' must be a table")
    line = where.table("service")
    limits: dict[str, int] = {}
    paths: dict[str, str] = {}
    for key, value in service.items():
        if key in _LIMIT_KEYS:
            kind, minimum = _LIMIT_KEYS[key]
            if type(value) is not kind:
                raise ConfigError(name, where.key(key, line), f"service.{key} must be an integer, not {value!r}")
            if value < minimum:
                raise ConfigError(name, where.key(key, line), f"service.{key} must be at least {minimum}, not {value}")
            limits[key] = value
        elif key in _PATH_KEYS:
            if not isinstance(value, str) or not value.startswith("/"):
                raise ConfigError(name, where.key(key, line), f"service.{key} must be an absolute path")
            paths[key] = value
        else:
            known = ", ".join(sorted([*_LIMIT_KEYS, *_PATH_KEYS]))
            raise ConfigError(name, where.key(key, line), f"unknown key service.{key} (known: {known})")

    udev = data.get("udev", {})
    if not isinstance(udev, dict):
        raise ConfigError(name, where.key("udev", None), "'udev' must be a table")
    line = where.table("udev")
    for key, value in udev.items():
        if key != "discover":
            raise ConfigError(name, where.key(key, line), f"unknown key udev.{key} (known: discover)")
        if not isinstance(value, bool):
            raise ConfigError(name, where.key(key, line), f"udev.discover must be true or false, not {value!r}")

    raw_devices = data.get("device", [])
    if not isinstance(raw_devices, list):
        raise ConfigError(name, where.key("device", None), "devices are written as [[device]] tables")
    devices: list[DeviceConfig] = []
    seen: set[str] = set()
    for index, entry in enumerate(raw_devices):
        line = where.table("device", index)
        for key, value in entry.items():
            if key not in _DEVICE_KEYS:
                raise ConfigError(name, where.key(key, line),
                                  f"unknown key '{key}' in [[device]] (known: {', '.join(_DEVICE_KEYS)})")
            if not isinstance(value, _DEVICE_KEYS[key]):
                raise ConfigError(name, where.key(key, line),
                                  f"device.{key} must be a {_DEVICE_KEYS[key].__name__}, not {value!r}")
        for key in ("id", "driver"):
            if key not in entry:
                raise ConfigError(name, line, f"[[device]] #{index + 1} has no '{key}'")
        if not valid_device_id(entry["id"]):
            raise ConfigError(name, where.key("id", line),
                              f"device id {entry['id']!r} must be 1-64 characters of letters, digits and _.:@+- "
                              "starting with a letter or digit")
        if entry["id"] in seen:
            raise ConfigError(name, where.key("id", line), f"device id {entry['id']!r} is used twice")
        seen.add(entry["id"])
        devices.append(DeviceConfig(**entry))

    sane = _sane(data.get("sane", {}), name, where)
    saned = _listener("saned", data["saned"], name, where, SanedSettings) if "saned" in data else None
    escl = _listener("escl", data["escl"], name, where, EsclSettings) if "escl" in data else None
    return Config(limits=Limits(**limits), devices=tuple(devices), udev_discover=udev.get("discover", True),
                  sane=sane, saned=saned, escl=escl, source=name, **paths)


def _sane(table: Any, name: str, where: _Locator) -> SaneSettings:
    if not isinstance(table, dict):
        raise ConfigError(name, where.key("sane", None), "'sane' must be a table")
    line = where.table("sane")
    values: dict[str, Any] = {}
    for key, value in table.items():
        at = where.key(key, line)
        if key == "discover":
            if not isinstance(value, bool):
                raise ConfigError(name, at, f"sane.discover must be true or false, not {value!r}")
            values[key] = value
        elif key == "exclude":
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise ConfigError(name, at, "sane.exclude must be a list of SANE name patterns, such as \"v4l:*\"")
            values[key] = tuple(value)
        elif key == "timeout_ms":
            if type(value) is not int or not 100 <= value <= MAX_WAIT_MS:
                raise ConfigError(name, at, f"sane.timeout_ms must be an integer from 100 to {MAX_WAIT_MS}, "
                                  f"not {value!r}")
            values[key] = value
        else:
            raise ConfigError(name, at, f"unknown key sane.{key} (known: discover, exclude, timeout_ms)")
    return SaneSettings(**values)


#: Integer keys of the network servers' tables: (minimum, maximum).
_LISTENER_INTEGERS = {"port": (1, 65535), "start_wait_ms": (0, MAX_WAIT_MS), "page_wait_ms": (100, MAX_WAIT_MS),
                      "idle_ms": (100, MAX_WAIT_MS), "max_connections": (1, 100_000),
                      "max_connections_per_peer": (1, 100_000), "max_request_bytes": (1024, 16 * 1024 * 1024)}


def _listener(section: str, table: Any, name: str, where: _Locator, kind: type[T]) -> T:
    """A network server's table ([saned], [escl]) checked key by key against ``kind``."""
    if not isinstance(table, dict):
        raise ConfigError(name, where.key(section, None), f"'{section}' must be a table")
    line = where.table(section)
    known = {f.name for f in fields(kind)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for key, value in table.items():
        at = where.key(key, line)
        if key not in known:
            raise ConfigError(name, at, f"unknown key {section}.{key} (known: {', '.join(sorted(known))})")
        if key in ("listen", "allow", "devices"):
            if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
                raise ConfigError(name, at, f"{section}.{key} must be a non-empty list of strings")
            for item in value:
                if key == "devices":
                    if item != "*" and not valid_device_id(item):
                        raise ConfigError(name, at, f"{section}.devices: {item!r} is not a device id or \"*\"")
                    continue
                try:
                    ipaddress.ip_address(item) if key == "listen" else ipaddress.ip_network(item, strict=False)
                except ValueError:
                    what = "an IP address" if key == "listen" else "a network such as 192.168.1.0/24"
                    raise ConfigError(name, at, f"{section}.{key}: {item!r} is not {what}") from None
            values[key] = tuple(value)
        elif key in ("users_file", "certificate", "private_key"):
            if not isinstance(value, str) or not value.startswith("/"):
                raise ConfigError(name, at, f"{section}.{key} must be an absolute path")
            values[key] = value
        elif key == "mdns":
            if not isinstance(value, bool):
                raise ConfigError(name, at, f"{section}.mdns must be true or false, not {value!r}")
            values[key] = value
        else:
            low, high = _LISTENER_INTEGERS[key]
            if type(value) is not int or not low <= value <= high:
                raise ConfigError(name, at, f"{section}.{key} must be an integer from {low} to {high}, not {value!r}")
            values[key] = value
    if ("certificate" in values) != ("private_key" in values):
        raise ConfigError(name, line, f"{section}.certificate and {section}.private_key go together")
    return kind(**values)
