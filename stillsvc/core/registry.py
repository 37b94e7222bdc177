"""Launch registrations: which application to start for which device event.

An application registration names what to run (an argument vector), which events
it wants (all, or a list of event names) and which devices (all, or any of
``id:ID``, ``vendor:VENDOR``, ``model:MODEL``). It is either *per-user* — owned by
the registering user and started in that user's session by that user's agent — or
*system-wide* — started by the service itself as an unprivileged user.

A per-device, per-event *default* names the registration to start when several
match (see :mod:`stillsvc.core.events` for the whole choice).

Everything is kept in ``<state_dir>/registrations.json``, rewritten atomically on
every change (a temporary file in the same directory, ``fsync``, ``rename``,
``fsync`` of the directory), so a crash leaves either the old or the new file. A
file that cannot be read is reported in the log and renamed aside
(``registrations.json.corrupt-<time>``); the service then starts with what it
could read, never with a silently emptied list.

This module knows nothing of D-Bus: callers pass the caller's uid.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from stillsvc.common.errors import AccessDenied, Failed, InvalidArgument, LimitExceeded, NotFound, quote
from stillsvc.common.names import valid_device_id
from stillsvc.core.config import Limits

log = structlog.get_logger(__name__)

#: A front-end's "may this caller manage others' registrations?" (answers or raises AccessDenied).
ManageCheck = Callable[[], Awaitable[bool]]

FILE_NAME = "registrations.json"
FORMAT_VERSION = 1

USER = "user"
SYSTEM = "system"
SCOPES = (USER, SYSTEM)

#: The prefix that names a system-wide registration where a user's could be meant.
SYSTEM_PREFIX = "system:"

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
EVENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+-]{0,63}$")
DEVICE_KINDS = ("id", "vendor", "model")
MAX_ARGS = 256
MAX_LIST = 64
MAX_MATCH_VALUE = 256
#: Placeholders a command may use; expanded for each launch (see expand()).
PLACEHOLDERS = {"d": "device id", "e": "event name", "n": "sequence number", "p": "device object path",
                "%": "a literal %"}


@dataclass(frozen=True)
class Registration:
    name: str
    scope: str
    #: The owner's uid (per-user) or the uid of the administrator who registered it (system-wide).
    uid: int
    command: tuple[str, ...]
    #: Event names; empty means every event.
    events: tuple[str, ...] = ()
    #: ``id:``/``vendor:``/``model:`` specifications; empty means every device.
    devices: tuple[str, ...] = ()
    #: When it was registered (Unix time) and its place in registration order.
    created: float = 0.0
    serial: int = 0

    @property
    def key(self) -> tuple[str, int | None, str]:
        return key_of(self.scope, self.uid, self.name)

    @property
    def ref(self) -> str:
        """How its owner names it: ``NAME`` (per-user) or ``system:NAME``."""
        return self.name if self.scope == USER else SYSTEM_PREFIX + self.name

    def describe(self) -> str:
        return f"'{self.name}' (system-wide)" if self.scope == SYSTEM else f"'{self.name}' (user {self.uid})"

    def matches(self, device_id: str, vendor: str, model: str, event: str) -> bool:
        if self.events and event not in self.events:
            return False
        if not self.devices:
            return True
        for spec in self.devices:
            kind, _, value = spec.partition(":")
            if kind == "id" and value == device_id:
                return True
            if kind == "vendor" and value.casefold() == vendor.casefold():
                return True
            if kind == "model" and value.casefold() == model.casefold():
                return True
        return False

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "scope": self.scope, "uid": self.uid, "command": list(self.command),
                "events": list(self.events), "devices": list(self.devices), "created": self.created,
                "serial": self.serial}


@dataclass(frozen=True)
class Default:
    """The registration to start for ``event`` on ``device_id`` when several match."""

    device_id: str
    event: str
    scope: str
    uid: int | None
    name: str
    set_by: int

    @property
    def target(self) -> tuple[str, int | None, str]:
        return key_of(self.scope, self.uid, self.name)

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device_id, "event": self.event, "scope": self.scope, "uid": self.uid,
                "name": self.name, "set_by": self.set_by}


def key_of(scope: str, uid: int | None, name: str) -> tuple[str, int | None, str]:
    return (scope, uid if scope == USER else None, name)


def expand(command: Iterable[str], values: dict[str, str]) -> list[str]:
    """Replace ``%d %e %n %p %%`` in each argument (``values`` keyed by the letter)."""
    out = []
    for argument in command:
        out.append(re.sub(r"%(.)", lambda m: "%" if m.group(1) == "%" else values[m.group(1)], argument))
    return out


# -- checking what clients send ----------------------------------------------------------

def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise InvalidArgument(f"application name {quote(name)} must be 1-64 letters, digits and _.+- "
                              "starting with a letter or digit")
    return name


def check_command(command: list[str], limits: Limits) -> tuple[str, ...]:
    if not command or not command[0]:
        raise InvalidArgument("the command is empty")
    if len(command) > MAX_ARGS:
        raise InvalidArgument(f"a command has at most {MAX_ARGS} arguments")
    if sum(len(a) for a in command) > limits.max_string_length:
        raise InvalidArgument(f"the command is longer than {limits.max_string_length} characters")
    for argument in command:
        for m in re.finditer(r"%(.?)", argument):
            if m.group(1) not in PLACEHOLDERS:
                known = ", ".join(f"%{k} ({v})" for k, v in PLACEHOLDERS.items())
                raise InvalidArgument(f"unknown placeholder {quote('%' + m.group(1))} in {quote(argument)} "
                                      f"(known: {known})")
    return tuple(command)


def check_events(events: list[str]) -> tuple[str, ...]:
    if len(events) > MAX_LIST:
        raise InvalidArgument(f"at most {MAX_LIST} event names")
    for event in events:
        if not EVENT_RE.match(event):
            raise InvalidArgument(f"event name {quote(event)} is not valid")
    return tuple(dict.fromkeys(events))


def check_devices(devices: list[str]) -> tuple[str, ...]:
    if len(devices) > MAX_LIST:
        raise InvalidArgument(f"at most {MAX_LIST} device specifications")
    for spec in devices:
        kind, sep, value = spec.partition(":")
        if not sep or kind not in DEVICE_KINDS or not value or len(value) > MAX_MATCH_VALUE:
            raise InvalidArgument(f"device specification {quote(spec)} must be id:ID, vendor:VENDOR or "
                                  f"model:MODEL (values up to {MAX_MATCH_VALUE} characters)")
        if kind == "id" and not valid_device_id(value):
            raise InvalidArgument(f"device id {quote(value)} is not valid")
    return tuple(dict.fromkeys(devices))


def check_device_id(device_id: str) -> str:
    if not valid_device_id(device_id):
        raise InvalidArgument(f"device id {quote(device_id)} is not valid")
    return device_id


def check_event(event: str) -> str:
    if not EVENT_RE.match(event):
        raise InvalidArgument(f"event name {quote(event)} is not valid")
    return event


# -- the registry ---------------------------------------------------------------------------

@dataclass
class _State:
    applications: dict[tuple[str, int | None, str], Registration] = field(default_factory=dict)
    defaults: dict[tuple[str, str], Default] = field(default_factory=dict)
    serial: int = 0

    def to_json(self) -> dict[str, Any]:
        apps = sorted(self.applications.values(), key=lambda r: r.serial)
        defaults = sorted(self.defaults.values(), key=lambda d: (d.device_id, d.event))
        return {"version": FORMAT_VERSION, "serial": self.serial,
                "applications": [r.to_json() for r in apps],
                "defaults": [d.to_json() for d in defaults]}


class Registry:
    """Registrations and defaults, persisted in ``state_dir``.

    ``admin(uid)`` decides who may manage system-wide registrations and other
    users' defaults (by default root and the service's own user).
    """

    def __init__(self, state_dir: str | os.PathLike[str], limits: Limits, *, admin_uids: Iterable[int] = ()) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / FILE_NAME
        self.limits = limits
        self.admin_uids = {0, os.getuid(), *admin_uids}
        self._state = _State()
        self._save_lock = asyncio.Lock()

    def is_admin(self, uid: int | None) -> bool:
        return uid is not None and uid in self.admin_uids

    # -- reading ----------------------------------------------------------------------------
    @property
    def applications(self) -> list[Registration]:
        """Every registration, oldest first."""
        return sorted(self._state.applications.values(), key=lambda r: r.serial)

    @property
    def defaults(self) -> list[Default]:
        return sorted(self._state.defaults.values(), key=lambda d: (d.device_id, d.event))

    def get(self, scope: str, uid: int | None, name: str) -> Registration | None:
        return self._state.applications.get(key_of(scope, uid, name))

    def visible_to(self, uid: int | None) -> list[Registration]:
        """What ``uid`` may list: its own and the system-wide ones; administrators see all."""
        if self.is_admin(uid):
            return self.applications
        return [r for r in self.applications if r.scope == SYSTEM or r.uid == uid]

    def matching(self, device_id: str, vendor: str, model: str, event: str) -> list[Registration]:
        """Registrations that want ``event`` from this device, oldest first."""
        return [r for r in self.applications if r.matches(device_id, vendor, model, event)]

    def default_for(self, device_id: str, event: str) -> Default | None:
        return self._state.defaults.get((device_id, event))

    def resolve(self, ref: str, uid: int | None) -> Registration:
        """``NAME`` (the caller's own) or ``system:NAME`` as a registration."""
        if ref.startswith(SYSTEM_PREFIX):
            found = self.get(SYSTEM, None, ref[len(SYSTEM_PREFIX):])
        else:
            found = self.get(USER, uid, ref)
        if found is None:
            raise NotFound(f"no application registered as {quote(ref)}")
        return found

    # -- changing -----------------------------------------------------------------------------
    async def register(self, uid: int | None, name: str, command: list[str], events: list[str],
                       devices: list[str], scope: str = USER, *, admin: bool | None = None) -> Registration:
        """Add a registration, or replace the caller's registration of the same name.

        ``admin`` says whether the caller is an administrator, when the caller
        decided it otherwise (polkit); by default :meth:`is_admin` decides."""
        if uid is None:
            raise AccessDenied("the service cannot tell which user is calling")
        if scope not in SCOPES:
            raise InvalidArgument(f"scope must be 'user' or 'system', not {quote(scope)}")
        if scope == SYSTEM and not (self.is_admin(uid) if admin is None else admin):
            raise AccessDenied("only administrators may register system-wide applications")
        check_name(name)
        cmd = check_command(command, self.limits)
        evs = check_events(events)
        devs = check_devices(devices)
        state = copy.deepcopy(self._state)
        key = key_of(scope, uid, name)
        if key not in state.applications:
            mine = [r for r in state.applications.values()
                    if r.scope == scope and (scope == SYSTEM or r.uid == uid)]
            limit = self.limits.max_registrations_per_user
            if len(mine) >= limit:
                whose = "system-wide" if scope == SYSTEM else f"user {uid}"
                raise LimitExceeded(f"{whose} already has {len(mine)} registrations (the limit is {limit})")
        state.serial += 1
        registration = Registration(name=name, scope=scope, uid=uid, command=cmd, events=evs, devices=devs,
                                    created=time.time(), serial=state.serial)
        state.applications[key] = registration
        await self._commit(state)
        log.info("application registered", application=name, scope=scope, uid=uid, command=list(cmd),
                 events=list(evs) or "all", devices=list(devs) or "all")
        return registration

    async def unregister(self, uid: int | None, name: str, scope: str = USER, *,
                         admin: bool | None = None) -> Registration:
        if uid is None:
            raise AccessDenied("the service cannot tell which user is calling")
        if scope not in SCOPES:
            raise InvalidArgument(f"scope must be 'user' or 'system', not {quote(scope)}")
        if scope == SYSTEM and not (self.is_admin(uid) if admin is None else admin):
            raise AccessDenied("only administrators may remove system-wide applications")
        check_name(name)
        state = copy.deepcopy(self._state)
        registration = state.applications.pop(key_of(scope, uid, name), None)
        if registration is None:
            what = "system-wide application" if scope == SYSTEM else "application of yours"
            raise NotFound(f"no {what} is registered as {quote(name)}")
        for where, default in list(state.defaults.items()):
            if default.target == registration.key:
                del state.defaults[where]
        await self._commit(state)
        log.info("application unregistered", application=name, scope=scope, uid=registration.uid)
        return registration

    async def set_default(self, uid: int | None, device_id: str, event: str, ref: str, *,
                          admin: bool | None = None) -> Default | None:
        """Make ``ref`` the default for ``event`` on ``device_id``; ``""`` clears it.

        Users may name their own registrations or system-wide ones, and may not
        replace or clear a default someone else set, unless it names one of their
        own registrations; administrators may do anything."""
        if uid is None:
            raise AccessDenied("the service cannot tell which user is calling")
        check_device_id(device_id)
        check_event(event)
        admin = self.is_admin(uid) if admin is None else admin
        state = copy.deepcopy(self._state)
        where = (device_id, event)
        current = state.defaults.get(where)
        if current is not None and not admin and current.set_by != uid \
                and not (current.scope == USER and current.uid == uid):
            raise AccessDenied(f"the default for {event} on {device_id} was set by another user")
        if not ref:
            if current is None:
                return None
            del state.defaults[where]
            await self._commit(state)
            log.info("default application cleared", device=device_id, event_name=event, uid=uid)
            return None
        if ref.startswith("user:") and not admin:
            raise AccessDenied("only administrators may name other users' applications (user:UID:NAME)")
        if ref.startswith("user:"):
            # Administrators name a user's registration as user:UID:NAME.
            _, _, rest = ref.partition(":")
            owner, _, name = rest.partition(":")
            if not owner.isdigit():
                raise InvalidArgument(f"{quote(ref)}: expected user:UID:NAME")
            registration = self.get(USER, int(owner), name)
            if registration is None:
                raise NotFound(f"no application registered as {quote(ref)}")
        else:
            registration = self.resolve(ref, uid)
        default = Default(device_id, event, registration.scope,
                          registration.uid if registration.scope == USER else None, registration.name, uid)
        state.defaults[where] = default
        await self._commit(state)
        log.info("default application set", device=device_id, event_name=event, application=registration.name,
                 scope=registration.scope, uid=uid)
        return default

    # -- the file ---------------------------------------------------------------------------------
    # -- the use cases, for any front-end ------------------------------------------------
    # ``may_manage`` is the front-end's question "may this caller manage others'
    # registrations?" (polkit's manage action on the system bus): asked only when the
    # request needs it; it answers or raises AccessDenied.

    async def register_as(self, uid: int | None, name: str, command: list[str], events: list[str],
                          devices: list[str], scope: str, may_manage: ManageCheck) -> Registration:
        admin = await may_manage() if scope == SYSTEM else None
        return await self.register(uid, name, command, events, devices, scope, admin=admin)

    async def unregister_as(self, uid: int | None, name: str, scope: str, owner: int | None,
                            may_manage: ManageCheck) -> None:
        """Remove a registration: one's own (``owner`` None or the caller), a
        system-wide one, or — for administrators — another user's."""
        if owner is not None and owner != uid:
            if scope == SYSTEM:
                raise InvalidArgument("a system-wide registration has no owning user")
            if not await may_manage():
                raise AccessDenied("only administrators may remove other users' applications")
            if self.get(USER, owner, name) is None:
                raise NotFound(f"user {owner} has no application registered as {quote(name)}")
            await self.unregister(owner, name, USER)
            return
        admin = await may_manage() if scope == SYSTEM else None
        await self.unregister(uid, name, scope, admin=admin)

    async def set_default_as(self, uid: int | None, device_id: str, event: str, ref: str,
                             may_manage: ManageCheck) -> Default | None:
        """Set or clear a default; what the caller may not do as a user it may do as
        an administrator (someone else's default, user:UID:NAME)."""
        try:
            return await self.set_default(uid, device_id, event, ref)
        except AccessDenied:
            if not await may_manage():
                raise
            return await self.set_default(uid, device_id, event, ref, admin=True)

    @staticmethod
    def ref_for(registration: Registration, viewer: int | None) -> str:
        """How ``viewer`` names a registration: NAME, system:NAME or user:UID:NAME."""
        if registration.scope == SYSTEM:
            return registration.ref
        if registration.uid == viewer:
            return registration.name
        return f"user:{registration.uid}:{registration.name}"

    def describe_for(self, registration: Registration, viewer: int | None) -> dict[str, Any]:
        """A registration as ``viewer`` sees it (plain values; front-ends type them)."""
        return {
            "id": self.ref_for(registration, viewer),
            "name": registration.name,
            "scope": registration.scope,
            "uid": registration.uid,
            "command": list(registration.command),
            "events": list(registration.events),
            "devices": list(registration.devices),
            "created_us": int(registration.created * 1_000_000),
            "default_for": [[d.device_id, d.event] for d in self.defaults if d.target == registration.key],
        }

    async def _commit(self, state: _State) -> None:
        """Save ``state``, then make it current; on failure nothing changes."""
        async with self._save_lock:
            data = state.to_json()
            try:
                await asyncio.to_thread(self._write, data)
            except OSError as e:
                log.error("could not save the registrations", path=str(self.path), error=str(e))
                raise Failed(f"could not save the registrations: {e.strerror or e}") from None
            self._state = state

    def _write(self, data: dict[str, Any]) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        text = json.dumps(data, indent=2, sort_keys=True) + "\n"
        fd, temporary = tempfile.mkstemp(prefix=f".{FILE_NAME}.", suffix=".tmp", dir=self.dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(temporary, 0o600)
            os.replace(temporary, self.path)
        except BaseException:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise
        directory = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def load(self) -> None:
        """Read the file. Problems are logged and the file is set aside, keeping every
        entry that could be read; a missing file is an empty registry."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError) as e:
            self._set_aside(f"cannot be read: {e}")
            return
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            self._set_aside(f"is not valid JSON: {e}")
            return
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION \
                or not isinstance(data.get("applications"), list) or not isinstance(data.get("defaults", []), list):
            self._set_aside(f"is not a version {FORMAT_VERSION} registrations file")
            return
        state = _State()
        problems: list[str] = []
        for index, entry in enumerate(data["applications"]):
            try:
                registration = self._registration(entry)
            except (KeyError, TypeError, ValueError, InvalidArgument) as e:
                problems.append(f"application #{index + 1}: {getattr(e, 'message', None) or e!r}")
                continue
            if registration.key in state.applications:
                problems.append(f"application #{index + 1}: {registration.describe()} is listed twice")
                continue
            state.applications[registration.key] = registration
        for index, entry in enumerate(data.get("defaults", [])):
            try:
                default = self._default(entry)
            except (KeyError, TypeError, ValueError, InvalidArgument) as e:
                problems.append(f"default #{index + 1}: {getattr(e, 'message', None) or e!r}")
                continue
            if default.target not in state.applications:
                problems.append(f"default #{index + 1}: names no registered application")
                continue
            state.defaults[(default.device_id, default.event)] = default
        serial = data.get("serial", 0)
        state.serial = max([serial if isinstance(serial, int) else 0,
                            *(r.serial for r in state.applications.values())])
        self._state = state
        if problems:
            self._set_aside("has entries that are not valid: " + "; ".join(problems), keep=True)
        log.info("registrations loaded", path=str(self.path), applications=len(state.applications),
                 defaults=len(state.defaults))

    def _registration(self, entry: Any) -> Registration:
        if not isinstance(entry, dict):
            raise TypeError("not an object")
        scope = entry["scope"]
        if scope not in SCOPES:
            raise ValueError(f"scope {scope!r}")
        uid, created, serial = entry["uid"], entry.get("created", 0.0), entry.get("serial", 0)
        if type(uid) is not int or uid < 0 or not isinstance(created, (int, float)) or type(serial) is not int:
            raise TypeError("uid, created or serial has the wrong type")
        lists = [entry["command"], entry.get("events", []), entry.get("devices", [])]
        if not all(isinstance(v, list) and all(isinstance(s, str) for s in v) for v in lists):
            raise TypeError("command, events and devices must be lists of strings")
        return Registration(name=check_name(entry["name"]), scope=scope, uid=uid,
                            command=check_command(lists[0], self.limits), events=check_events(lists[1]),
                            devices=check_devices(lists[2]), created=float(created), serial=serial)

    def _default(self, entry: Any) -> Default:
        if not isinstance(entry, dict):
            raise TypeError("not an object")
        scope, uid, set_by = entry["scope"], entry.get("uid"), entry.get("set_by", 0)
        if scope not in SCOPES or (scope == USER and type(uid) is not int) or type(set_by) is not int:
            raise TypeError("scope, uid or set_by has the wrong type")
        return Default(check_device_id(entry["device"]), check_event(entry["event"]), scope,
                       uid if scope == USER else None, check_name(entry["name"]), set_by)

    def _set_aside(self, problem: str, *, keep: bool = False) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime())
        aside = self.path.with_name(f"{FILE_NAME}.corrupt-{stamp}")
        n = 1
        while aside.exists():
            n += 1
            aside = self.path.with_name(f"{FILE_NAME}.corrupt-{stamp}.{n}")
        try:
            if keep:
                # The readable entries stay in use: keep a copy of the whole file for the administrator.
                aside.write_bytes(self.path.read_bytes())
                os.chmod(aside, 0o600)
            else:
                os.replace(self.path, aside)
        except OSError as e:
            log.error("registrations file is corrupt and could not be set aside", path=str(self.path),
                      problem=problem, error=str(e))
            return
        if keep:
            log.error("registrations file has entries that were not loaded; a copy of the file was kept",
                      path=str(self.path), copy=str(aside), problem=problem)
        else:
            log.error("registrations file is corrupt; it was set aside and the service starts without "
                      "registrations", path=str(self.path), moved_to=str(aside), problem=problem)
