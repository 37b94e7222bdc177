"""Hostile input: every exported method called with random values of the right D-Bus
types, and with wrong ones, from several connections at once.

Nothing is listed by hand: the methods and properties are discovered by introspecting
the running daemon (the manager at the root, the simulated scanner, a session and its
items Root, Root/Flatbed and Root/Feeder), so a method added later is fuzzed too. For
each example, hypothesis draws a few calls, each from one of three clients:

* a discovered method with arguments generated from its signature (integers at their
  bounds, unicode, empty and huge strings, object paths, signatures, deep variants,
  arrays of 10 000 elements, and real file descriptors for ``h``: the read end of a
  pipe (the wrong direction), the write end of a drained pipe, /dev/null opened
  read-only, and a pipe closed on our side as soon as the call is sent);
* the same method with a wrong signature, an unknown method, an unknown interface or
  no interface at all;
* org.freedesktop.DBus.Properties Get, Set and GetAll with known and random names;

some of them sent with NO_REPLY_EXPECTED. Checked for every reply and after every
example:

* the reply is a method return (with the introspected signature) or an error named
  ``org.stillsvc.StillImage1.Error.*`` or one of the standard
  ``org.freedesktop.DBus.Error.*`` names;
* no error text carries a traceback or a path of the source tree;
* a call gets its reply within 2 s, except for the calls that wait by design
  (CreateDevice with "wait_ms", LockDevice, Transfer);
* a well-behaved client gets Manager.GetDevices and Peer.Ping answered within 1 s,
  and the daemon process is alive, both while the example's clients are connected and
  after they have left; once they have left, the device is free again.

A sweep then calls every discovered method with the extremes of its argument types
(hypothesis favours some choices, so it may leave a method out). The flood tests check
the resource limits (sessions, registrations, agents, the event queue, string sizes)
under one client's flood, and that 2000 pipelined calls from one client leave another
one served. The defects the fuzz once found have tests of their own at the end.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import re
import reprlib
import tempfile
import tomllib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from dbus_fast import DBusError, Message, MessageFlag, MessageType, Variant
from dbus_fast.introspection import Node
from dbus_fast.signature import SignatureType, get_signature_tree
from helpers import (
    DEVICE,
    ERROR,
    IFACE,
    ITEM,
    MANAGER,
    REPO,
    ROOT,
    SESSION,
    SIM0,
    SIMULATOR,
    Daemon,
    DBusDaemon,
    call,
    connect,
    create_session,
    get_all,
    get_property,
    wait_for_name,
    wait_until,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stillsvc.common.errors import ALL_ERRORS
from stillsvc.common.names import SESSIONS_PATH
from stillsvc.frontends.dbus.bus import ServiceBus

CLIENTS = 3
MAX_EXAMPLES = 200
MAX_CALLS_PER_EXAMPLE = 12
#: How long a fuzz call may take; calls in WAITING may also get no reply in this time.
CALL_TIMEOUT = 2.0
#: How long a well-behaved client's GetDevices and Ping may take, at any time.
SERVE_TIMEOUT = 1.0
#: How long another client's Ping may take while one client floods the service.
FLOOD_PING_LIMIT = 2.0
MAX_FDS_PER_CALL = 8

PROPERTIES = "org.freedesktop.DBus.Properties"
PEER = "org.freedesktop.DBus.Peer"
INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"
STANDARD_ERROR = "org.freedesktop.DBus.Error."

SERVICE_ERRORS = frozenset(f"{ERROR}.{cls.name}" for cls in ALL_ERRORS)
STANDARD_ERRORS = frozenset(STANDARD_ERROR + name for name in (
    "UnknownMethod", "UnknownObject", "UnknownInterface", "UnknownProperty", "InvalidArgs", "InvalidSignature",
    "PropertyReadOnly", "AccessDenied", "LimitsExceeded", "NotSupported", "NoReply",
))
ALLOWED_ERRORS = SERVICE_ERRORS | STANDARD_ERRORS

#: Calls that may legitimately wait longer than CALL_TIMEOUT: for data mode (its holder
#: keeps it until it leaves), for the device lock, or while an image is written.
WAITING = frozenset({(MANAGER, "CreateDevice"), (SESSION, "LockDevice"), (ITEM, "Transfer")})

#: What must never appear in an error text: a traceback, or where the code lives.
LEAKS = (
    re.compile(r"Traceback \(most recent call last\)"),
    re.compile(r'File "'),
    re.compile(re.escape(str(REPO))),
    re.compile(r"site-packages"),
    re.compile(r"(?<!/org)/stillsvc/"),  # a source path; object paths are /org/stillsvc/...
    re.compile(r"\.py\b"),
)

MODES = ("status", "data", "both")
#: Session paths no fuzz client owns: the event monitor's (the first session) and one never opened.
FOREIGN_SESSIONS = (f"{SESSIONS_PATH}/1", f"{SESSIONS_PATH}/4294967295")
#: Where calls go; hypothesis favours the first entries a little, so the objects with the
#: most methods come first.
TARGETS = ("session", "item", "device", "root")
#: The slot of a call to the first client's first session (or its items), whoever calls.
FIRST_SESSION = -1

_repr = reprlib.Repr()
_repr.maxstring = 60
_repr.maxother = 60
_repr.maxlist = 4
_repr.maxdict = 4
_repr.maxlevel = 4


# -- the tally printed at the end -----------------------------------------------------

@dataclass
class Tally:
    calls: int = 0
    examples: int = 0
    failures: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    covered: set[tuple[str, str]] = field(default_factory=set)
    sweep_examples: int = 0
    sweep_calls: int = 0

    def summary(self, methods: list[Method]) -> str:
        lines = [f"fuzz: {self.calls} calls, {self.examples} examples, {self.failures} failures"]
        lines.append(f"  hypothesis: {self.calls - self.sweep_calls} calls in {self.examples - self.sweep_examples} "
                     f"examples; edge-value sweep: {self.sweep_calls} calls in {self.sweep_examples} examples")
        lines.append("  calls by kind: " + ", ".join(f"{kind} {n}" for kind, n in self.kinds.most_common()))
        lines.append("  replies:")
        for outcome, count in self.outcomes.most_common():
            lines.append(f"  {count:6d}  {outcome}")
        missed = sorted({f"{m.interface}.{m.name}" for m in methods} - {f"{i}.{n}" for i, n in self.covered})
        lines.append(f"  well-typed calls reached {len(methods) - len(missed)} of {len(methods)} methods"
                     + (f"; never: {', '.join(missed)}" if missed else ""))
        return "\n".join(lines)


TALLY = Tally()


# -- what the daemon exports, found by introspection -----------------------------------

@dataclass(frozen=True)
class Method:
    interface: str
    name: str
    in_signature: str
    out_signature: str


@dataclass(frozen=True)
class Prop:
    interface: str
    name: str
    signature: str
    writable: bool


@dataclass
class Surface:
    methods: dict[str, list[Method]]
    properties: dict[str, list[Prop]]
    #: Item paths relative to their session: "items/Root", "items/Root/Flatbed", ...
    item_suffixes: list[str]
    #: Strings the service knows (modes, ids, names, values): random text rarely hits them.
    words: list[str]
    #: The simulator's state before the fuzz, restored after every example.
    simulator: dict[str, Any]

    def all_methods(self) -> list[Method]:
        return sorted({m for methods in self.methods.values() for m in methods}, key=lambda m: (m.interface, m.name))


#: Methods that end what later calls of an example would use.
ENDINGS = frozenset({"Close", "Unplug", "HandOver"})


def _service_first(member: Method | Prop) -> tuple[bool, bool, str, str]:
    """The service's own interfaces before the standard ones (which every object has),
    and methods that end a session or the device last."""
    return (not member.interface.startswith(IFACE + "."), member.name in ENDINGS, member.interface, member.name)


async def introspect(bus, path: str) -> Node:
    (xml,) = await call(bus, path, INTROSPECTABLE, "Introspect")
    return Node.parse(xml)


async def discover(address: str) -> Surface:
    bus = await connect(address)
    try:
        session = await create_session(bus)
        items = [await get_property(bus, session, SESSION, "RootItem")]
        for item in items:  # grows while it is walked: breadth first
            items += await get_property(bus, item, ITEM, "Children")
        paths = {"root": [ROOT], "device": [SIM0], "session": [session], "item": items}
        methods: dict[str, list[Method]] = {}
        properties: dict[str, list[Prop]] = {}
        for target, target_paths in paths.items():
            found_methods: set[Method] = set()
            found_properties: set[Prop] = set()
            for path in target_paths:
                for interface in (await introspect(bus, path)).interfaces:
                    for m in interface.methods:
                        found_methods.add(Method(interface.name, m.name, "".join(a.signature for a in m.in_args),
                                                 "".join(a.signature for a in m.out_args)))
                    for p in interface.properties:
                        found_properties.add(Prop(interface.name, p.name, p.signature, p.access.writable()))
            methods[target] = sorted(found_methods, key=_service_first)
            properties[target] = sorted(found_properties, key=_service_first)

        words = {"", "sim0", "sim1", *MODES, "wait_ms", "uid", "scan", "copy", "email", "raw", "pnm", "png", "tiff",
                 "jpeg", "pdf", "id:sim0", "vendor:stillsvc", "model:x", "system:app", "user:0:app", "app", "%d",
                 "%e", "%n", "%p", "%%", "%", "%z", ROOT, SIM0, session, *FOREIGN_SESSIONS}
        for props in properties.values():
            words |= {p.name for p in props} | {p.interface for p in props}
        for ms in methods.values():
            words |= {m.name for m in ms} | {m.interface for m in ms}
        device = await get_all(bus, SIM0, DEVICE)
        words |= set(device["EventNames"]) | set(device["Capabilities"])
        for item in items:
            (values,) = await call(bus, item, ITEM, "ReadProperties")
            words |= set(values) | {v.value for v in values.values() if isinstance(v.value, str)}
            (attributes,) = await call(bus, item, ITEM, "GetPropertyAttributes")
            for attribute in attributes.values():
                valid = attribute.get("valid")
                listed = valid.value.get("values") if valid is not None else None
                if listed is not None and isinstance(listed.value, list):
                    words |= {v for v in listed.value if isinstance(v, str)}
        words.discard("system")  # never ask for a system-wide registration: the service would run its command
        simulator = await get_all(bus, SIM0, SIMULATOR)
        await call(bus, session, SESSION, "Close")
        return Surface(methods, properties, [item[len(session) + 1:] for item in items], sorted(words), simulator)
    finally:
        bus.disconnect()


# -- values of D-Bus types --------------------------------------------------------------

FD_KINDS = ("pipe read end", "pipe write end", "/dev/null read-only", "closed after send")


class FdArg(int):
    """A file descriptor to open when the call is made: the body holds its index."""

    def __new__(cls, kind: str) -> FdArg:
        self = super().__new__(cls, 0)
        self.kind = kind
        return self

    def __repr__(self) -> str:
        return f"<fd: {self.kind}>"


CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
ELEMENT = st.from_regex(r"[A-Za-z0-9_]{1,12}", fullmatch=True)
MEMBER = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,30}", fullmatch=True)
INTERFACE_NAME = st.one_of(
    st.sampled_from([f"{IFACE}.Nope", f"{IFACE}.Error", "org.freedesktop.DBus.Nope", "org.freedesktop.DBus"]),
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}(\.[A-Za-z_][A-Za-z0-9_]{0,10}){1,3}", fullmatch=True),
)
INTEGERS = {"y": (0, 2**8 - 1), "n": (-(2**15), 2**15 - 1), "q": (0, 2**16 - 1), "i": (-(2**31), 2**31 - 1),
            "u": (0, 2**32 - 1), "x": (-(2**63), 2**63 - 1), "t": (0, 2**64 - 1)}
BASIC = "ybnqiuxtdsogh"
#: Huge strings: one character repeated to about this many bytes.
HUGE_SIZES = (4_097, 65_536, 1_000_000)
BIG_ARRAY = 10_000


def complete_types(depth: int) -> st.SearchStrategy[str]:
    """One complete D-Bus type, containers nested at most ``depth`` deep."""
    leaf = st.sampled_from(BASIC + "v")
    if depth == 0:
        return leaf
    inner = complete_types(depth - 1)
    return st.one_of(
        leaf,
        inner.map(lambda s: "a" + s),
        st.tuples(st.sampled_from(BASIC), inner).map(lambda kv: "a{%s%s}" % kv),
        st.lists(inner, min_size=1, max_size=3).map(lambda xs: "(" + "".join(xs) + ")"),
    )


#: Containers nested 20 to 32 deep: the most the D-Bus specification allows.
DEEP_TYPES = st.one_of(st.integers(20, 32).map(lambda k: "a" * k + "y"),
                       st.integers(20, 32).map(lambda k: "(" * k + "s" + ")" * k))
SIGNATURES = st.one_of(st.lists(complete_types(2), max_size=4).map("".join), DEEP_TYPES)
SINGLE_TYPES = complete_types(2)


class Values:
    """Hypothesis strategies for values of any D-Bus type, built from its signature tree."""

    def __init__(self, words: list[str], paths: list[str]) -> None:
        text = st.text(CHARS, max_size=40)
        huge = st.tuples(st.sampled_from(["x", "é", "\U0001F5A8", "%d", "/"]), st.sampled_from(HUGE_SIZES)).map(
            lambda t: t[0] * (t[1] // len(t[0].encode())))
        known = st.sampled_from(words)
        # One string in 40 is huge; the rest are words the service knows or random text.
        self.strings = st.integers(0, 39).flatmap(lambda n: huge if n == 0 else known if n < 16 else text)
        self.short_strings = st.one_of(known, st.text(CHARS, max_size=8))
        self.paths = st.one_of(st.sampled_from(sorted(set(paths))), st.just("/"),
                               st.lists(ELEMENT, min_size=1, max_size=6).map(lambda xs: "/" + "/".join(xs)))
        self.signatures = SIGNATURES.filter(lambda s: len(s) <= 255)
        self.bytes = st.integers(0, 39).flatmap(
            lambda n: st.binary(min_size=1, max_size=4).map(lambda b: (b * HUGE_SIZES[-1])[:HUGE_SIZES[-1]])
            if n == 0 else st.binary(max_size=64))

    def of_signature(self, signature: str) -> st.SearchStrategy[list[Any]]:
        """A whole message body for ``signature``."""
        return st.tuples(*(self.of(t.signature, 0) for t in get_signature_tree(signature).types)).map(list)

    @functools.lru_cache(maxsize=None)
    def of(self, signature: str, depth: int) -> st.SearchStrategy[Any]:
        t: SignatureType = get_signature_tree(signature).types[0]
        token = t.token
        if token in INTEGERS:
            return st.integers(*INTEGERS[token])
        if token == "b":
            return st.booleans()
        if token == "d":
            return st.floats(allow_nan=True, allow_infinity=True)
        if token == "s":
            return self.strings if depth < 3 else self.short_strings
        if token == "o":
            return self.paths
        if token == "g":
            return self.signatures
        if token == "h":
            return st.sampled_from(FD_KINDS).map(FdArg)
        if token == "v":
            return self.variants(depth)
        if token == "(":
            return st.tuples(*(self.of(c.signature, depth + 1) for c in t.children)).map(list)
        assert token == "a", signature
        child = t.children[0]
        small = 3 if depth < 2 else 1
        if child.token == "{":
            key, value = child.children
            return st.dictionaries(self.of(key.signature, depth + 2), self.of(value.signature, depth + 2),
                                   max_size=small)
        if child.token == "y":
            return self.bytes
        elements = self.of(child.signature, depth + 1)
        lists = st.lists(elements, max_size=small)
        if depth < 2 and child.token in BASIC and child.token != "h":
            # One array in ten has 10 000 elements (a few drawn ones, repeated).
            cheap = self.short_strings if child.token == "s" else elements
            big = st.lists(cheap, min_size=1, max_size=3).map(lambda xs: (xs * BIG_ARRAY)[:BIG_ARRAY])
            return st.integers(0, 9).flatmap(lambda n: big if n == 0 else lists)
        return lists

    def variants(self, depth: int) -> st.SearchStrategy[Variant]:
        inner = SINGLE_TYPES if depth < 2 else st.sampled_from(BASIC)
        plain = inner.flatmap(lambda sig: self.of(sig, depth + 1).map(lambda value: Variant(sig, value)))
        if depth > 2:
            return plain
        # Variants in variants, 30 to 48 deep (the whole message must stay under 64 levels).
        deep = st.tuples(st.integers(30, 48), st.sampled_from("sub"), st.integers(0, 255)).map(
            lambda t: _nest(Variant(t[1], {"s": "deep", "u": t[2], "b": True}[t[1]]), t[0]))
        return st.integers(0, 7).flatmap(lambda n: deep if n == 0 else plain)


def _nest(variant: Variant, depth: int) -> Variant:
    for _ in range(depth):
        variant = Variant("v", variant)
    return variant


# -- the calls ------------------------------------------------------------------------------

class Call:
    """One drawn call: to whom, on which object, what, and whether a reply is wanted."""

    def __init__(self, client: int, target: str, slot: int, path: str, kind: str, interface: str | None,
                 member: str, signature: str, body: list[Any], expect: str | None, no_reply: bool) -> None:
        self.client = client
        self.target = target
        self.slot = slot
        self.path = path  # for target "path" only
        self.kind = kind
        self.interface = interface
        self.member = member
        self.signature = signature
        self.body = body
        self.expect = expect
        self.no_reply = no_reply

    @property
    def waits(self) -> bool:
        return (self.interface, self.member) in WAITING or (self.interface is None and any(
            member == self.member for _, member in WAITING))

    def __repr__(self) -> str:
        where = self.path if self.target == "path" else f"{self.target}[{self.slot}]"
        flags = ", NO_REPLY" if self.no_reply else ""
        return (f"<client {self.client} -> {where}: {self.kind} {self.interface}.{self.member}"
                f"({self.signature!r}: {_repr.repr(self.body)}){flags}>")


def call_strategy(surface: Surface, values: Values) -> st.SearchStrategy[Call]:
    everything = surface.all_methods()
    every_prop = sorted({p for props in surface.properties.values() for p in props}, key=lambda p: (p.interface, p.name))

    @functools.lru_cache(maxsize=None)
    def on(target: str) -> st.SearchStrategy[tuple]:
        methods = surface.methods.get(target) or everything
        props = surface.properties.get(target) or every_prop
        interfaces = sorted({m.interface for m in methods} | {p.interface for p in props})
        known_names = {m.name for m in methods}

        def with_body(kind: str, interface: str | None, member: str, signature: str, expect: str | None):
            return values.of_signature(signature).map(lambda body: (kind, interface, member, signature, body, expect))

        well_typed = st.sampled_from(methods).flatmap(
            lambda m: with_body("method", m.interface, m.name, m.in_signature, m.out_signature))
        wrong_signature = st.tuples(st.sampled_from(methods), values.signatures).filter(
            lambda ms: ms[1] != ms[0].in_signature).flatmap(
            lambda ms: with_body("wrong signature", ms[0].interface, ms[0].name, ms[1], None))
        unknown_method = st.tuples(st.sampled_from(interfaces), MEMBER.filter(lambda n: n not in known_names),
                                   values.signatures).flatmap(
            lambda t: with_body("unknown method", t[0], t[1], t[2], None))
        unknown_interface = st.tuples(INTERFACE_NAME, st.sampled_from(methods)).flatmap(
            lambda t: with_body("unknown interface", t[0], t[1].name, t[1].in_signature, None))
        no_interface = st.sampled_from(methods).flatmap(
            lambda m: with_body("no interface", None, m.name, m.in_signature, None))

        prop_interface = st.one_of(st.sampled_from(interfaces), INTERFACE_NAME, values.strings)
        prop_name = st.one_of(st.sampled_from([p.name for p in props]), MEMBER, values.strings)
        get = st.tuples(prop_interface, prop_name).map(lambda t: ("property", PROPERTIES, "Get", "ss", list(t), "v"))
        get_all_ = prop_interface.map(lambda i: ("property", PROPERTIES, "GetAll", "s", [i], "a{sv}"))
        set_typed = st.sampled_from(props).flatmap(lambda p: values.of(p.signature, 1).map(
            lambda v: ("property", PROPERTIES, "Set", "ssv", [p.interface, p.name, Variant(p.signature, v)], "")))
        set_random = st.tuples(prop_interface, prop_name, values.variants(0)).map(
            lambda t: ("property", PROPERTIES, "Set", "ssv", list(t), ""))

        kinds = {"method": well_typed, "wrong signature": wrong_signature, "unknown method": unknown_method,
                 "unknown interface": unknown_interface, "no interface": no_interface, "get": get,
                 "get all": get_all_, "set typed": set_typed, "set random": set_random}
        weights = ["method"] * 8 + ["wrong signature"] * 2 + ["unknown method", "unknown interface", "no interface",
                                                              "get", "get all", "set typed", "set random"]
        return st.sampled_from(weights).flatmap(lambda k: kinds[k])

    def build(client: int, target: str, slot: int, path: str, spec: tuple, no_reply: int) -> Call:
        kind, interface, member, signature, body, expect = spec
        if member == "RegisterLaunchApplication" and body and isinstance(body[-1], dict):
            body[-1].pop("system", None)  # a system-wide registration would run its command
        return Call(client, target, slot, path, kind, interface, member, signature, body, expect, no_reply == 5)

    target = st.sampled_from(TARGETS + TARGETS + ("path",))
    return target.flatmap(lambda t: st.builds(
        build, st.integers(0, CLIENTS - 1), st.just(t), st.integers(0, 15), values.paths,
        on(t) if t != "path" else st.sampled_from(TARGETS).flatmap(on),
        st.integers(0, 7)))


# -- running calls ------------------------------------------------------------------------------

class Descriptors:
    """The file descriptors of one example: opened for a call, closed after it; drained
    pipes are read (and discarded) on the event loop until the example ends."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.drained: list[int] = []

    def open(self, kind: str) -> tuple[int, list[int], list[int]]:
        """(fd to send, fds to close once sent, fds to close after the reply)."""
        if kind == "/dev/null read-only":
            fd = os.open(os.devnull, os.O_RDONLY)
            return fd, [], [fd]
        r, w = os.pipe()
        if kind == "pipe read end":
            return r, [], [r, w]
        if kind == "closed after send":
            return w, [r, w], []
        os.set_blocking(r, False)
        self.loop.add_reader(r, self._drain, r)
        self.drained.append(r)
        return w, [], [w]

    def _drain(self, fd: int) -> None:
        try:
            if os.read(fd, 1 << 20):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self._forget(fd)

    def _forget(self, fd: int) -> None:
        if fd in self.drained:
            self.drained.remove(fd)
            self.loop.remove_reader(fd)
            os.close(fd)

    def close(self) -> None:
        for fd in list(self.drained):
            self._forget(fd)


class Prepared:
    """A call's body with its descriptors opened and their indexes in place."""

    def __init__(self, descriptors: Descriptors, body: list[Any]) -> None:
        self.descriptors = descriptors
        self.unix_fds: list[int] = []
        self.after_send: list[int] = []
        self.after_reply: list[int] = []
        self.strings: list[str] = []
        self.body = self._resolve(body)

    def _resolve(self, value: Any) -> Any:
        if isinstance(value, FdArg):
            if len(self.unix_fds) >= MAX_FDS_PER_CALL:
                return len(self.unix_fds) - 1  # the same descriptor again
            fd, after_send, after_reply = self.descriptors.open(value.kind)
            self.unix_fds.append(fd)
            self.after_send += after_send
            self.after_reply += after_reply
            return len(self.unix_fds) - 1
        if isinstance(value, str):
            self.strings.append(value)
            return value
        if isinstance(value, Variant):
            return Variant(value.signature, self._resolve(value.value))
        if isinstance(value, list):
            if value and isinstance(value[0], (int, float, str)) and len(value) > 100:
                self.strings += [v for v in value[:3] if isinstance(v, str)]
                return list(value)  # a big array of basic values: no descriptors in it
            return [self._resolve(v) for v in value]
        if isinstance(value, dict):
            return {self._resolve(k): self._resolve(v) for k, v in value.items()}
        return value

    @staticmethod
    def close(fds: list[int]) -> None:
        for fd in fds:
            try:
                os.close(fd)
            except OSError as e:
                assert e.errno == errno.EBADF


class FuzzClient:
    """A connection that sends raw messages and keeps every descriptor it is given."""

    def __init__(self, bus, descriptors: Descriptors) -> None:
        self.bus = bus
        self.descriptors = descriptors
        self.pending: dict[int, asyncio.Future[Message]] = {}
        self.received_fds: list[int] = []
        bus.add_message_handler(self._on_message)

    def _on_message(self, msg: Message) -> None:
        if msg.message_type in (MessageType.METHOD_RETURN, MessageType.ERROR):
            # Handed-over lock files and the like: closed when the example ends, so no
            # descriptor outlives it, whether or not the reply came in time.
            self.received_fds += msg.unix_fds
            future = self.pending.pop(msg.reply_serial, None)
            if future is not None and not future.done():
                future.set_result(msg)
        return None

    async def send(self, path: str, interface: str | None, member: str, signature: str, body: list[Any],
                   no_reply: bool = False) -> tuple[Message | None, Prepared]:
        """Send a call; the reply, or None for NO_REPLY_EXPECTED. Raises TimeoutError."""
        assert self.bus.connected, "a fuzz client was disconnected by the bus: the test sent an invalid message"
        prepared = Prepared(self.descriptors, body)
        try:
            msg = Message(destination="org.stillsvc.StillImage1", path=path, interface=interface, member=member,
                          signature=signature, body=prepared.body, unix_fds=prepared.unix_fds,
                          flags=MessageFlag.NO_REPLY_EXPECTED if no_reply else MessageFlag.NONE)
            msg.serial = self.bus.next_serial()
            future = asyncio.get_running_loop().create_future()
            if not no_reply:
                self.pending[msg.serial] = future
            try:
                await asyncio.wait_for(self.bus.send(msg), CALL_TIMEOUT)
            finally:
                Prepared.close(prepared.after_send)
                prepared.after_send = []
            if no_reply:
                return None, prepared
            try:
                return await asyncio.wait_for(future, CALL_TIMEOUT), prepared
            finally:
                self.pending.pop(msg.serial, None)
        finally:
            Prepared.close(prepared.after_send + prepared.after_reply)

    def close(self) -> None:
        self.bus.disconnect()
        Prepared.close(self.received_fds)
        self.received_fds = []


def check_reply(what: str, reply: Message, expect: str | None, inputs: list[str]) -> str:
    """Check one reply; returns how it is counted."""
    if reply.message_type is MessageType.METHOD_RETURN:
        if expect is not None:
            assert reply.signature == expect, f"{what}: returned {reply.signature!r}, introspection says {expect!r}"
        return "method return"
    assert reply.message_type is MessageType.ERROR, f"{what}: a reply of type {reply.message_type}"
    name = reply.error_name
    text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
    assert name in ALLOWED_ERRORS, f"{what}: error {name}: {text[:500]}"
    assert reply.signature in ("", "s"), f"{what}: error {name} with a body of signature {reply.signature!r}"
    for leak in LEAKS:
        found = leak.search(text)
        if found and not any(found.group(0) in s for s in inputs):
            raise AssertionError(f"{what}: error text of {name} shows {found.group(0)!r}: {text[:2000]}")
    return name


# -- the daemon under the fuzz -------------------------------------------------------------------

class Service:
    """The daemon under the fuzz, what it exports, and the strategy for calls to it."""

    def __init__(self, daemon: Daemon, surface: Surface) -> None:
        self.daemon = daemon
        self.surface = surface
        self.calls: st.SearchStrategy[Call] = st.nothing()

    def __repr__(self) -> str:
        return f"<stillsvc daemon at {self.address}>"

    @property
    def address(self) -> str:
        return self.daemon.address

    @property
    def proc(self):
        return self.daemon.proc


async def ready(address: str, proc) -> None:
    probe = await connect(address)
    try:
        await wait_for_name(probe, proc=proc)
    finally:
        probe.disconnect()


def start(config: str, prefix: str) -> tuple[DBusDaemon, Daemon]:
    bus = DBusDaemon()
    daemon = Daemon(bus.address, "--config", config, workdir=tempfile.mkdtemp(prefix=prefix))
    proc = daemon.start()
    asyncio.run(ready(bus.address, proc))
    return bus, daemon


def stop(bus: DBusDaemon, daemon: Daemon) -> None:
    code = daemon.stop()
    bus.stop()
    assert code == 0, f"the daemon exited with {code}"


@pytest.fixture(scope="module")
def fuzz_service() -> Iterator[Service]:
    bus, daemon = start("tests/data/fuzz-service.toml", "stillsvc-fuzz-")
    surface = asyncio.run(discover(daemon.address))
    service = Service(daemon, surface)
    session_paths = [f"{SESSIONS_PATH}/{n}" for n in (1, 2, 3, 99)]
    paths = [ROOT, SIM0, f"{ROOT}/devices", f"{ROOT}/agents/a", *session_paths,
             *(f"{s}/{suffix}" for s in session_paths[:2] for suffix in surface.item_suffixes)]
    service.calls = call_strategy(surface, Values(surface.words, paths))
    try:
        yield service
    finally:
        print("\n" + TALLY.summary(surface.all_methods()))
        stop(bus, daemon)


async def check_serving(service: Service, when: str) -> None:
    """A well-behaved client is answered within SERVE_TIMEOUT, and the daemon lives."""
    assert service.proc.poll() is None, f"{when}: the daemon exited with {service.proc.returncode}"
    bus = await asyncio.wait_for(connect(service.address), 5)
    try:
        for interface, member in ((MANAGER, "GetDevices"), (PEER, "Ping")):
            try:
                await call(bus, ROOT, interface, member, timeout=SERVE_TIMEOUT)
            except TimeoutError:
                raise AssertionError(f"{when}: a well-behaved {member} got no answer in {SERVE_TIMEOUT} s") from None
    finally:
        bus.disconnect()
    assert service.proc.poll() is None, f"{when}: the daemon exited with {service.proc.returncode}"


async def restore_device(service: Service) -> None:
    """Undo what the simulator calls changed (Unplug, AttachFeeder, Jam), then check that
    the device is free: its users have all left."""
    initial = service.surface.simulator
    bus = await connect(service.address)
    try:
        state = await get_all(bus, SIM0, SIMULATOR)
        if not state["Connected"]:
            await call(bus, SIM0, SIMULATOR, "Replug")
        if state["FeederAttached"] != initial["FeederAttached"]:
            await call(bus, SIM0, SIMULATOR, "AttachFeeder", "b", [initial["FeederAttached"]])

        async def present() -> bool:
            (devices,) = await call(bus, ROOT, MANAGER, "GetDevices")
            return SIM0 in devices

        await wait_until(present, timeout=5, what="sim0 back after Replug")

        async def free() -> bool:
            device = await get_all(bus, SIM0, DEVICE)
            return (device["State"] == "ready" and not device["DataModeHeld"] and device["LockWaiters"] == 0
                    and device["DataModeWaiters"] == 0)

        await wait_until(free, timeout=5, what="sim0 ready and free once the example's clients left")
        # Clears a jam, and one armed by Jam() that no transfer has reached yet.
        session = await create_session(bus)
        await call(bus, session, SESSION, "DeviceReset")
        await call(bus, session, SESSION, "Close")
    finally:
        bus.disconnect()


def target_path(call_: Call, sessions: list[list[str]], surface: Surface) -> str:
    """The object a call goes to; sessions (and their items) are mostly the caller's
    own, sometimes another client's, the event monitor's or one never opened."""
    if call_.target == "path":
        return call_.path
    if call_.target == "root":
        return ROOT
    if call_.target == "device":
        return SIM0
    own = sessions[call_.client]
    if call_.slot == FIRST_SESSION and sessions[0]:
        session = sessions[0][0]
    elif own and call_.slot < 10:
        session = own[call_.slot % len(own)]
    else:
        candidates = [s for mine in sessions for s in mine] + list(FOREIGN_SESSIONS)
        session = candidates[call_.slot % len(candidates)]
    if call_.target == "session":
        return session
    return f"{session}/{surface.item_suffixes[call_.slot % len(surface.item_suffixes)]}"


async def run_example(service: Service, modes: list[str], calls: list[Call]) -> None:
    descriptors = Descriptors()
    clients = [FuzzClient(await connect(service.address), descriptors) for _ in range(CLIENTS)]
    sessions: list[list[str]] = [[] for _ in clients]
    try:
        for client, mode, mine in zip(clients, modes, sessions):
            reply, _ = await client.send(ROOT, MANAGER, "CreateDevice", "ssa{sv}", ["sim0", mode, {}])
            check_reply(f"CreateDevice(sim0, {mode})", reply, "o", [])
            if reply.message_type is MessageType.METHOD_RETURN:
                mine.append(reply.body[0])
        for call_ in calls:
            path = target_path(call_, sessions, service.surface)
            what = f"{call_!r} at {path}"
            TALLY.calls += 1
            TALLY.kinds[f"{call_.kind} -> {call_.target}"] += 1
            if call_.kind == "method":
                TALLY.covered.add((call_.interface, call_.member))
            try:
                reply, prepared = await clients[call_.client].send(path, call_.interface, call_.member,
                                                                   call_.signature, call_.body, call_.no_reply)
            except TimeoutError:
                assert call_.waits, f"{what}: no reply within {CALL_TIMEOUT} s"
                TALLY.outcomes[f"no reply within {CALL_TIMEOUT:g} s (a call that waits)"] += 1
                continue
            if reply is None:
                TALLY.outcomes["sent with NO_REPLY_EXPECTED"] += 1
                continue
            TALLY.outcomes[check_reply(what, reply, call_.expect, prepared.strings)] += 1
            if (reply.message_type is MessageType.METHOD_RETURN and call_.member == "CreateDevice"
                    and reply.signature == "o"):
                sessions[call_.client].append(reply.body[0])
        await check_serving(service, "with the example's clients connected")
    finally:
        for client in clients:
            client.close()
        descriptors.close()
    await restore_device(service)
    await check_serving(service, "after the example's clients left")


@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_hostile_calls_get_proper_replies_and_the_service_keeps_serving(fuzz_service: Service, data) -> None:
    modes = data.draw(st.lists(st.sampled_from(MODES), min_size=CLIENTS, max_size=CLIENTS), label="session modes")
    calls = data.draw(st.lists(fuzz_service.calls, min_size=4, max_size=MAX_CALLS_PER_EXAMPLE), label="calls")
    TALLY.examples += 1
    try:
        asyncio.run(run_example(fuzz_service, modes, calls))
    except BaseException:
        TALLY.failures += 1
        raise


EDGE_FLAVOURS = ("least", "most", "unicode")


def edge_value(t: SignatureType, flavour: str, fd_kind: str, depth: int = 0) -> Any:
    """A value of type ``t`` at one end of its range: "least" (zeros, empty strings and
    arrays, the lowest integers), "most" (the highest integers, 1 MB strings, 10 000
    elements, variants 40 deep) or "unicode" (text from outside the BMP, control and
    right-to-left characters)."""
    token = t.token
    if token in INTEGERS:
        low, high = INTEGERS[token]
        return {"least": low, "most": high, "unicode": 0}[flavour]
    if token == "b":
        return flavour == "most"
    if token == "d":
        return {"least": float("-inf"), "most": float("nan"), "unicode": -0.0}[flavour]
    if token == "s":
        if flavour == "most":
            return "x" * (HUGE_SIZES[-1] if depth < 2 else 64)
        return "" if flavour == "least" else "\u202e\U0001F5A8\u00e9\u200b\x01\uffff"
    if token == "o":
        return {"least": "/", "most": "/" + "/".join(["a" * 60] * 30), "unicode": "/_/0"}[flavour]
    if token == "g":
        return {"least": "", "most": "a" * 32 + "y", "unicode": "a{sv}(h)"}[flavour]
    if token == "h":
        return FdArg(fd_kind)
    if token == "v":
        if flavour == "most" and depth < 2:
            return _nest(Variant("s", "deep"), 40)
        return Variant("s", edge_value(get_signature_tree("s").types[0], flavour, fd_kind, depth + 1))
    if token == "(":
        return [edge_value(c, flavour, fd_kind, depth + 1) for c in t.children]
    child = t.children[0]
    if child.token == "{":
        if flavour == "least":
            return {}
        key, value = child.children
        return {edge_value(key, flavour, fd_kind, depth + 2): edge_value(value, flavour, fd_kind, depth + 2)}
    if child.token == "y":
        return b"" if flavour == "least" else bytes(range(256)) * (4096 if flavour == "most" else 1)
    if flavour == "least":
        return []
    element = edge_value(child, flavour, fd_kind, 2)  # short strings in a long array
    return [element] * (BIG_ARRAY if flavour == "most" and child.token in BASIC and child.token != "h" else 1)


def sweep_calls(target: str, method: Method, items: int) -> list[Call]:
    """Calls of ``method`` once per flavour, and once per kind of file descriptor if it
    takes one; on every item of a session, and also from a client that does not own it."""
    types = get_signature_tree(method.in_signature).types
    cases = [(flavour, FD_KINDS[n % len(FD_KINDS)]) for n, flavour in enumerate(EDGE_FLAVOURS)]
    if "h" in method.in_signature:
        cases += [("least", kind) for kind in FD_KINDS]
    calls = []
    for flavour, fd_kind in cases:
        body = [edge_value(t, flavour, fd_kind) for t in types]
        if method.name == "RegisterLaunchApplication" and isinstance(body[-1], dict):
            body[-1].pop("system", None)
        callers = [(0, n) for n in range(items if target == "item" else 1)]
        callers += [(1, FIRST_SESSION)] if target in ("session", "item") else []
        for client, slot in callers:
            calls.append(Call(client, target, slot, "", "method", method.interface, method.name,
                              method.in_signature, body, method.out_signature, False))
    return calls


def test_every_method_answers_edge_values_properly(fuzz_service: Service) -> None:
    """Hypothesis favours some choices; this sweep calls every discovered method with the
    extremes of its argument types, from its owner and from another client."""
    for target in TARGETS:  # the device (Jam, Unplug) after the items' transfers
        for method in fuzz_service.surface.methods[target]:
            calls = sweep_calls(target, method, len(fuzz_service.surface.item_suffixes))
            TALLY.examples += 1
            TALLY.sweep_examples += 1
            TALLY.sweep_calls += len(calls)
            try:
                asyncio.run(run_example(fuzz_service, ["both", "status", "status"], calls))
            except BaseException:
                TALLY.failures += 1
                raise


#: How dbus-fast logs a refused call that was sent with NO_REPLY_EXPECTED: at ERROR, with
#: a traceback (see test_a_refused_call_without_reply_is_not_logged_as_an_error below).
NO_REPLY_TRACEBACK_HEADERS = (
    "logger=dbus_fast.aio.message_reader event='Unexpected error processing message'",
    "logger=dbus_fast.aio.message_bus event='unexpected exception in future'",
)


def tracebacks(log: str) -> tuple[list[str], list[str]]:
    """The tracebacks in a daemon log: (those of the known NO_REPLY defect, all others)."""
    known: list[str] = []
    others: list[str] = []
    lines = log.splitlines()
    for n, line in enumerate(lines):
        if "Traceback (most recent call last)" not in line:
            continue
        end = n + 1
        while end < len(lines) and lines[end][:1] in (" ", "\t"):
            end += 1
        header = lines[n - 1] if n else ""
        block = "\n".join(lines[max(n - 1, 0):end + 1])
        last = lines[end] if end < len(lines) else ""
        if (line.startswith("Traceback") and any(h in header for h in NO_REPLY_TRACEBACK_HEADERS)
                and last.startswith("dbus_fast.errors.DBusError: ")):
            known.append(block)
        else:
            others.append(block)
    return known, others


def test_the_fuzzed_daemon_logged_no_traceback(fuzz_service: Service) -> None:
    assert TALLY.examples > 0
    known, others = tracebacks(fuzz_service.daemon.log)
    print(f"\nfuzz: the daemon logged {len(known) + len(others)} tracebacks")
    assert not known and not others, "\n\n".join((known + others)[:10])


# -- floods from one client ------------------------------------------------------------------------

FLOOD_CONFIG = "tests/data/fuzz-flood.toml"
FLOOD_LIMITS = tomllib.loads((REPO / FLOOD_CONFIG).read_text())["service"]
#: As documented for Manager.RegisterAgent().
MAX_AGENTS_PER_USER = 16


@pytest.fixture(scope="module")
def flood_service() -> Iterator[Daemon]:
    """A daemon with small limits (tests/data/fuzz-flood.toml)."""
    bus, daemon = start(FLOOD_CONFIG, "stillsvc-flood-")
    try:
        yield daemon
    finally:
        stop(bus, daemon)


async def raw_call(bus, path: str, interface: str, member: str, signature: str = "",
                   body: list[Any] | None = None) -> Message:
    """A call that returns the reply message, error or not."""
    return await bus.call(Message(destination="org.stillsvc.StillImage1", path=path, interface=interface,
                                  member=member, signature=signature, body=body or []))


async def patient_connect(address: str):
    """A client for floods: when the bus stops reading from it, its sends wait for room
    instead of failing with EAGAIN (the service's own bus class does that)."""
    return await ServiceBus(bus_address=address).connect()


async def first_session(bus, mode: str = "status") -> str:
    """A session, once the sessions of the previous test's clients are gone."""
    async def opened() -> str | None:
        try:
            return await create_session(bus, mode=mode)
        except DBusError as e:
            assert e.type == f"{ERROR}.LimitExceeded", e
            return None

    return await wait_until(opened, timeout=5, what="a session under the service-wide limit")


async def served(address: str) -> None:
    bus = await connect(address)
    try:
        await call(bus, ROOT, MANAGER, "GetDevices", timeout=SERVE_TIMEOUT)
        await call(bus, ROOT, PEER, "Ping", timeout=SERVE_TIMEOUT)
    finally:
        bus.disconnect()


def test_a_session_flood_stops_at_the_limits_and_others_are_served(flood_service: Daemon) -> None:
    async def scenario() -> None:
        flooder = await patient_connect(flood_service.address)
        other, third = await connect(flood_service.address), await connect(flood_service.address)
        try:
            opened = []
            for _ in range(50):
                try:
                    opened.append(await create_session(flooder))
                except DBusError as e:
                    assert e.type == f"{ERROR}.LimitExceeded", e
                    break
            assert len(opened) == FLOOD_LIMITS["max_sessions_per_client"]
            assert FLOOD_LIMITS["max_sessions"] == len(opened) + 1  # what the rest of this scenario expects
            # The flood goes on, pipelined: every attempt is refused, none gets through.
            replies = await asyncio.gather(*(raw_call(flooder, ROOT, MANAGER, "CreateDevice", "ssa{sv}",
                                                      ["sim0", "status", {}]) for _ in range(500)))
            assert {r.error_name for r in replies} == {f"{ERROR}.LimitExceeded"}
            await served(flood_service.address)
            # The service-wide limit: another client gets the last session, a third none.
            await create_session(other)
            reply = await raw_call(third, ROOT, MANAGER, "CreateDevice", "ssa{sv}", ["sim0", "status", {}])
            assert reply.error_name == f"{ERROR}.LimitExceeded", reply
            await served(flood_service.address)
            # Once the flooder leaves, its sessions are gone and the third client gets one.
            flooder.disconnect()

            async def third_gets_one() -> bool:
                reply = await raw_call(third, ROOT, MANAGER, "CreateDevice", "ssa{sv}", ["sim0", "status", {}])
                return reply.message_type is MessageType.METHOD_RETURN

            await wait_until(third_gets_one, timeout=5, what="a session once the flooder left")
        finally:
            for bus in (flooder, other, third):
                bus.disconnect()

    asyncio.run(scenario())


def test_2000_pipelined_calls_leave_another_client_responsive(flood_service: Daemon) -> None:
    calls = 2000

    async def scenario() -> None:
        flooder, watcher = await patient_connect(flood_service.address), await connect(flood_service.address)
        loop = asyncio.get_running_loop()
        try:
            session = await first_session(flooder)
            flatbed = f"{await get_property(flooder, session, SESSION, 'RootItem')}/Flatbed"
            mix = [
                (ROOT, MANAGER, "GetDevices", "", []),
                (ROOT, MANAGER, "FindDevice", "s", ["sim0"]),
                (ROOT, MANAGER, "CreateDevice", "ssa{sv}", ["sim0", "status", {}]),
                (ROOT, MANAGER, "GetDriverItems", "s", ["sim0"]),
                (SIM0, PROPERTIES, "GetAll", "s", [DEVICE]),
                (ROOT, INTROSPECTABLE, "Introspect", "", []),
                (session, SESSION, "GetStatus", "", []),
                (session, SESSION, "Diagnostic", "", []),
                (flatbed, ITEM, "ReadProperties", "", []),
                (flatbed, ITEM, "WriteProperties", "a{sv}", [{"resolution": Variant("u", 300)}]),
                (ROOT, MANAGER, "NoSuchMethod", "", []),
                (SIM0, SESSION, "GetStatus", "", []),
            ]
            latencies: list[float] = []
            flooding = True

            async def watch() -> None:
                while flooding or not latencies:
                    started = loop.time()
                    await call(watcher, ROOT, PEER, "Ping", timeout=FLOOD_PING_LIMIT)
                    await call(watcher, ROOT, MANAGER, "GetDevices", timeout=FLOOD_PING_LIMIT)
                    latencies.append(loop.time() - started)
                    await asyncio.sleep(0.005)

            watching = asyncio.create_task(watch())
            await wait_until(lambda: latencies, what="the watcher's first answer")
            started = loop.time()
            replies = await asyncio.wait_for(asyncio.gather(
                *(raw_call(flooder, *mix[n % len(mix)]) for n in range(calls))), 60)
            elapsed = loop.time() - started
            flooding = False
            await watching

            assert len(replies) == calls
            outcomes = Counter("method return" if r.message_type is MessageType.METHOD_RETURN
                               else check_reply("flood", r, None, []) for r in replies)
            # The flooder's sessions stay within its limit whatever the flood asked for.
            assert outcomes[f"{ERROR}.LimitExceeded"] >= calls // len(mix) - 1
            assert max(latencies) < FLOOD_PING_LIMIT
            print(f"\nflood: {calls} pipelined calls answered in {elapsed:.2f} s ({dict(outcomes)}); "
                  f"another client's Ping+GetDevices: {len(latencies)} round trips meanwhile, "
                  f"max {max(latencies) * 1000:.0f} ms")
            await served(flood_service.address)
        finally:
            flooder.disconnect()
            watcher.disconnect()

    asyncio.run(scenario())


def test_registration_and_agent_floods_stop_at_their_limits(flood_service: Daemon) -> None:
    async def scenario() -> None:
        flooder = await connect(flood_service.address)
        try:
            registered = []
            for n in range(50):
                reply = await raw_call(flooder, ROOT, MANAGER, "RegisterLaunchApplication", "sasasasa{sv}",
                                       [f"flood{n}", ["true"], [], [], {}])
                if reply.message_type is MessageType.ERROR:
                    assert reply.error_name == f"{ERROR}.LimitExceeded", reply.body
                    break
                registered.append(f"flood{n}")
            assert len(registered) == FLOOD_LIMITS["max_registrations_per_user"]
            (listed,) = await call(flooder, ROOT, MANAGER, "ListLaunchApplications")
            assert len(listed) == len(registered)
            await served(flood_service.address)
            for name in registered:
                await call(flooder, ROOT, MANAGER, "UnregisterLaunchApplication", "sa{sv}", [name, {}])

            agents = 0
            for n in range(50):
                reply = await raw_call(flooder, ROOT, MANAGER, "RegisterAgent", "o", [f"/flood/agent{n}"])
                if reply.message_type is MessageType.ERROR:
                    assert reply.error_name == f"{ERROR}.LimitExceeded", reply.body
                    break
                agents += 1
            assert agents == MAX_AGENTS_PER_USER
            await served(flood_service.address)
        finally:
            flooder.disconnect()
        # The agents leave with their connection: another client of the same user may register.
        other = await connect(flood_service.address)
        try:
            async def registers() -> bool:
                reply = await raw_call(other, ROOT, MANAGER, "RegisterAgent", "o", ["/agent"])
                return reply.message_type is MessageType.METHOD_RETURN

            await wait_until(registers, timeout=5, what="an agent once the flooder left")
        finally:
            other.disconnect()

    asyncio.run(scenario())


def test_an_event_flood_is_bounded_by_the_queue_length(flood_service: Daemon) -> None:
    presses = 40
    queue_length = FLOOD_LIMITS["event_queue_length"]

    async def scenario() -> None:
        holder, presser = await connect(flood_service.address), await patient_connect(flood_service.address)
        try:
            session = await first_session(holder, mode="data")
            replies = await asyncio.gather(*(raw_call(presser, SIM0, SIMULATOR, "PressButton", "s", ["scan"])
                                             for _ in range(presses)))
            assert all(r.message_type is MessageType.METHOD_RETURN for r in replies), replies

            async def all_routed() -> bool:
                queued = await get_property(holder, session, SESSION, "QueuedEvents")
                dropped = await get_property(holder, session, SESSION, "DroppedEvents")
                return queued + dropped == presses and (queued, dropped)

            queued, dropped = await wait_until(all_routed, timeout=5, what="every event queued or dropped")
            assert queued == queue_length and dropped == presses - queue_length
            await served(flood_service.address)
        finally:
            holder.disconnect()
            presser.disconnect()

    asyncio.run(scenario())


def test_oversized_strings_are_refused(flood_service: Daemon) -> None:
    huge = "x" * 1_000_000

    async def scenario() -> None:
        bus = await connect(flood_service.address)
        try:
            for path, interface, member, signature, body in (
                (ROOT, MANAGER, "CreateDevice", "ssa{sv}", [huge, "status", {}]),
                (ROOT, MANAGER, "FindDevice", "s", [huge]),
                (ROOT, MANAGER, "GetDriverItems", "s", [huge]),
                (ROOT, MANAGER, "SetDefaultApplication", "sss", [huge, "scan-button", ""]),
                (ROOT, MANAGER, "RegisterLaunchApplication", "sasasasa{sv}", [huge, ["true"], [], [], {}]),
                (ROOT, MANAGER, "RegisterLaunchApplication", "sasasasa{sv}", ["big", ["true", huge], [], [], {}]),
                (SIM0, SIMULATOR, "PressButton", "s", [huge]),
            ):
                reply = await raw_call(bus, path, interface, member, signature, body)
                assert reply.error_name == f"{ERROR}.InvalidArgument", (member, reply.error_name)
                text = reply.body[0]
                assert len(text) < 1000, f"{member}: the refusal repeats the input ({len(text)} characters)"
            await served(flood_service.address)
        finally:
            bus.disconnect()

    asyncio.run(scenario())


# -- defects found by the fuzz, kept failing until fixed ---------------------------------------------

def _at_eof(fd: int) -> bool:
    """Whether every write end of the pipe whose read end is ``fd`` has been closed."""
    try:
        return os.read(fd, 1 << 16) == b""
    except BlockingIOError:
        return False


async def test_descriptors_of_refused_calls_are_closed(daemon, client) -> None:
    cases = (
        ("an unknown method", ROOT, MANAGER, "NoSuchMethod", "h", [0]),
        ("a wrong signature", ROOT, MANAGER, "GetDevices", "h", [0]),
        ("a refused Properties.Set", SIM0, PROPERTIES, "Set", "ssv", [DEVICE, "Id", Variant("h", 0)]),
        ("an 'h' in CreateDevice options", ROOT, MANAGER, "CreateDevice", "ssa{sv}",
         ["sim0", "status", {"fd": Variant("h", 0)}]),
        ("an unknown object", f"{ROOT}/nothing", MANAGER, "GetDevices", "h", [0]),
    )
    kept = []
    for what, path, interface, member, signature, body in cases:
        r, w = os.pipe()
        os.set_blocking(r, False)
        try:
            with pytest.raises(DBusError):
                await call(client, path, interface, member, signature, body, unix_fds=[w])
            os.close(w)
            try:
                await wait_until(lambda: _at_eof(r), timeout=1, what=f"the daemon's copy closed after {what}")
            except TimeoutError:
                kept.append(what)
        finally:
            os.close(r)
    assert not kept, f"the daemon keeps the descriptor of {', '.join(kept)}"


async def test_transfer_refuses_an_index_without_descriptors(daemon, client) -> None:
    session = await create_session(client, mode="data")
    flatbed = f"{await get_property(client, session, SESSION, 'RootItem')}/Flatbed"
    for index in sorted(int(fd) for fd in os.listdir(f"/proc/{daemon.proc.pid}/fd")):
        try:
            await call(client, flatbed, ITEM, "Transfer", "hsa{sv}", [index, "pnm", {}], timeout=5)
        except DBusError as e:
            assert e.type in (f"{STANDARD_ERROR}InvalidArgs", f"{ERROR}.InvalidArgument"), (index, e.type, e.text)
        else:
            raise AssertionError(f"a transfer into the daemon's own descriptor {index} succeeded")
        assert daemon.proc.poll() is None, f"the daemon exited after a transfer into its descriptor {index}"


async def test_transfer_refuses_an_index_past_the_descriptors(daemon, client) -> None:
    session = await create_session(client, mode="data")
    flatbed = f"{await get_property(client, session, SESSION, 'RootItem')}/Flatbed"
    r, w = os.pipe()
    try:
        with pytest.raises(DBusError) as refused:
            await call(client, flatbed, ITEM, "Transfer", "hsa{sv}", [1, "pnm", {}], unix_fds=[w])
    finally:
        os.close(r)
        os.close(w)
    assert refused.value.type in (f"{STANDARD_ERROR}InvalidArgs", f"{ERROR}.InvalidArgument"), refused.value
    assert "Traceback" not in daemon.log


@pytest.mark.parametrize("path, interface, member, signature, body", [
    (SIM0, PROPERTIES, "Set", "ssv", [DEVICE, "Id", Variant("s", "x")]),
    (SIM0, SIMULATOR, "PressButton", "s", ["no-such-button"]),
], ids=["Properties.Set of a read-only property", "Simulator.PressButton of an unknown button"])
async def test_a_refused_call_without_reply_is_not_logged_as_an_error(daemon, client, path, interface, member,
                                                                     signature, body) -> None:
    await client.send(Message(destination="org.stillsvc.StillImage1", path=path, interface=interface,
                              member=member, signature=signature, body=body, flags=MessageFlag.NO_REPLY_EXPECTED))
    await call(client, ROOT, PEER, "Ping")
    await asyncio.sleep(0.2)  # the async method's task ends after the Ping is answered
    assert "Traceback" not in daemon.log
    assert "level=ERROR" not in daemon.log and "level='error'" not in daemon.log
