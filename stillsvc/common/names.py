"""Every name that crosses a process boundary, in one place.

Bus name, object paths, interface names and error names are relied on by tools
outside this code (stillctl, busctl scripts, desktop applications, the D-Bus
policy file), so they live here and nowhere else.
"""

from __future__ import annotations

import hashlib
import re

BUS_NAME = "org.stillsvc.StillImage1"
ROOT_PATH = "/org/stillsvc/StillImage1"
DEVICES_PATH = f"{ROOT_PATH}/devices"
SESSIONS_PATH = f"{ROOT_PATH}/sessions"
AGENTS_PATH = f"{ROOT_PATH}/agents"

IFACE_PREFIX = BUS_NAME
MANAGER_IFACE = f"{IFACE_PREFIX}.Manager"
DEVICE_IFACE = f"{IFACE_PREFIX}.Device"
SESSION_IFACE = f"{IFACE_PREFIX}.Session"
ITEM_IFACE = f"{IFACE_PREFIX}.Item"
SIMULATOR_IFACE = f"{IFACE_PREFIX}.Simulator"
AGENT_IFACE = f"{IFACE_PREFIX}.Agent"

ERROR_PREFIX = f"{IFACE_PREFIX}.Error"

_UNSAFE = re.compile(r"[^A-Za-z0-9_]")
#: What a device id may be (configuration files, registrations, discovery): 1-64
#: letters, digits and ``_.:@+-``, starting with a letter or digit.
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,63}$")


def valid_device_id(device_id: str) -> bool:
    return bool(DEVICE_ID_RE.match(device_id))


_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_.:@+-]")


def stable_id(*parts: str) -> str:
    """A device id made of ``parts`` (driver, vendor, product, serial or port), joined
    with ``-``: characters a device id may not have become ``_``, and an id longer
    than 64 characters keeps its first 55 and ends in 8 hex digits of a hash of
    the whole, so that it stays unique and the same on every run."""
    text = "-".join(_ID_UNSAFE.sub("_", part) for part in parts if part)
    if not text or not text[0].isalnum():
        text = "x" + text
    if len(text) > 64:
        text = text[:55] + "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return text


def sanitise_id(device_id: str) -> str:
    """Reduce a device id to an object path element (``[A-Za-z0-9_]``).

    Characters outside the set become ``_``; an id that starts with a digit or is
    empty is prefixed with ``_`` so the element is never empty. Different ids may
    collide after this; the device manager refuses the second one.
    """
    element = _UNSAFE.sub("_", device_id)
    if not element or element[0].isdigit():
        element = "_" + element
    return element


def device_path(device_id: str) -> str:
    return f"{DEVICES_PATH}/{sanitise_id(device_id)}"


def session_path(number: int) -> str:
    return f"{SESSIONS_PATH}/{number}"
