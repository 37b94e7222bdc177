"""The private parts of dbus-fast that stillsvc relies on, checked on the installed dbus-fast.

:class:`stillsvc.frontends.dbus.bus.ServiceBus` repairs dbus-fast by overriding
some of its private methods, and the service reads one of its private attributes.
A release that renames or reshapes one of them breaks nothing loudly: the override
is simply never called again, and the repair is gone. So every private name is
listed once, in :data:`INTERNALS` below, with the file of ours that uses it and
what to look at when it changed, and checked here:

* it exists, with the expected kind (method, staticmethod, attribute of a bus
  constructed without connecting, or a use inside dbus-fast's own source) and, for a
  method, the same parameter names;
* the library still calls each overridden method by that name (a recording
  subclass of the library's ``MessageBus``, driven without a bus daemon);
* the behaviour the descriptor bookkeeping (:class:`~stillsvc.frontends.dbus.bus._CallDescriptors`)
  depends on: an async method's Task is created *during* dispatch, in a copy of
  the dispatching context, and its first step runs before a callback scheduled
  right after dispatch;
* no code of ours uses a private dbus-fast name that is missing from the table.

``stillsvc/client/`` uses only dbus-fast's public API today (the last test keeps it so).

When one of these fails after a dbus-fast upgrade: read the message, look at the named
place in dbus-fast's source, adapt the user of ours, update the table, and only then
raise the upper bound on dbus-fast in ``pyproject.toml``.
"""

from __future__ import annotations

import ast
import asyncio
import contextvars
import importlib.metadata
import inspect
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import pytest
from dbus_fast import DBusError, Message, MessageFlag, MessageType
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface
from dbus_fast.service import method as dbus_method

REPO = Path(__file__).resolve().parent.parent
DBUS_FAST = importlib.metadata.version("dbus-fast")

BUS_PY = "stillsvc/frontends/dbus/bus.py"
SERVICE_PY = "stillsvc/frontends/dbus/service.py"

METHOD = "method"  # an instance method of MessageBus, with these parameter names
STATIC = "staticmethod"  # a staticmethod of MessageBus, with these parameter names
ATTRIBUTE = "attribute"  # set by MessageBus() (not connected), of this type
SOURCE = "source"  # not ours to touch, but dbus-fast's source must still use it so


@dataclass(frozen=True)
class Internal:
    name: str
    kind: str
    expected: Any  # parameter names (METHOD, STATIC), a type (ATTRIBUTE), None (SOURCE)
    user: str  # the file of ours that relies on it, and how
    check: str  # what to look at in dbus-fast when the check fails
    named: bool = True  # our code spells the name (False: it relies on what dbus-fast does with it)


#: Every private dbus-fast name stillsvc relies on, with its user. Keep this the only list.
INTERNALS: tuple[Internal, ...] = (
    Internal("_process_message", METHOD, ("self", "msg"),
             f"{BUS_PY}: ServiceBus._process_message overrides it (refuses bad 'h' indexes, hands the "
             "call's descriptors to the method wrapper) and calls super()._process_message(msg)",
             "that every received message still reaches bus._process_message(msg) (the reader callback "
             "installed in dbus_fast/aio/message_bus.py MessageBus.connect()) and that it dispatches a "
             "method call synchronously"),
    Internal("_future_exception_no_reply", METHOD, ("self", "fut"),
             f"{BUS_PY}: ServiceBus._future_exception_no_reply overrides it (a refused call that expects "
             "no reply is not logged as an error) and calls super()._future_exception_no_reply(fut)",
             "the done-callback that MessageBus._make_method_handler adds to an async method's future "
             "when the call has NO_REPLY_EXPECTED"),
    Internal("_create_socket_for_transport", STATIC, ("transport", "options"),
             f"{BUS_PY}: ServiceBus._create_socket_for_transport wraps the socket in a PatientSocket "
             "(EAGAIN is not fatal) and calls MessageBus._create_socket_for_transport(transport, options)",
             "how MessageBus.connect() creates its socket: it must call "
             "self._create_socket_for_transport(transport, options) and use the returned "
             "(sock, stream, address)"),
    Internal("_emit_interface_added", METHOD, ("self", "path", "interface"),
             f"{BUS_PY}: ServiceBus._emit_interface_added overrides it with a no-op ({SERVICE_PY} sends "
             "InterfacesAdded itself, from the ObjectManager's path)",
             "that BaseMessageBus.export() still emits ObjectManager.InterfacesAdded through "
             "self._emit_interface_added(path, interface)"),
    Internal("_emit_interface_removed", METHOD, ("self", "path", "removed_interfaces"),
             f"{BUS_PY}: ServiceBus._emit_interface_removed overrides it with a no-op ({SERVICE_PY} sends "
             "InterfacesRemoved itself, from the ObjectManager's path)",
             "that BaseMessageBus.unexport() still emits ObjectManager.InterfacesRemoved through "
             "self._emit_interface_removed(path, removed_interfaces)"),
    Internal("_introspect_export_path", METHOD, ("self", "path"),
             f"{BUS_PY}: ServiceBus._introspect_export_path overrides it and drops ObjectManager from the "
             "node's .interfaces except at the manager's path",
             "that the default Introspect handler builds its answer with self._introspect_export_path(path)"
             ".tostring() and that the node it returns has a .interfaces list of objects with a .name"),
    Internal("_make_method_handler", METHOD, ("self", "interface", "method"),
             f"{BUS_PY}: method()'s async wrapper claims the call's descriptors in its first step, and "
             "ServiceBus._process_message closes unclaimed ones in a call_soon callback after dispatch",
             "that the async branch of MessageBus._make_method_handler still starts the coroutine with "
             "asyncio.ensure_future()/create_task() while dispatching (not later, not in another context)",
             named=False),
    Internal("_path_exports", ATTRIBUTE, dict,
             f"{SERVICE_PY}: Service._handle tests `msg.path not in self.bus._path_exports` to answer "
             "Error.NotFound for a closed session or a device that went away",
             "BaseMessageBus.__init__/export()/unexport(): a dict {path: {interface name: ServiceInterface}} "
             "from which a path disappears when its last interface is unexported"),
    Internal("_pending_futures", ATTRIBUTE, set,
             f"{BUS_PY}: ServiceBus._future_exception_no_reply calls self._pending_futures.discard(fut)",
             "MessageBus.__init__ and _make_method_handler: the set that holds an async method's future "
             "until it is done"),
    Internal("_sock", SOURCE, None,
             f"{BUS_PY}: PatientSocket only helps if dbus-fast sends through the very socket object "
             "_create_socket_for_transport returned",
             "dbus_fast/aio/message_bus.py: connect() must store that socket as self._sock, and "
             "_MessageWriter must write with its .send()/.sendmsg() (not os.write() on the descriptor)",
             named=False),
)

BY_NAME = {internal.name: internal for internal in INTERNALS}


def explain(internal: Internal, problem: str) -> str:
    return (f"dbus-fast {DBUS_FAST}: private {internal.kind} {internal.name!r} {problem}.\n"
            f"  Used by {internal.user}.\n"
            f"  Check in dbus-fast: {internal.check}.\n"
            f"  Until this is fixed, keep dbus-fast below this version in pyproject.toml.")


# -- dbus-fast's source ------------------------------------------------------------------


def module_source(module: ModuleType) -> str:
    """The Python source of a dbus-fast module. The compiled wheels ship each
    module's ``.py`` next to its extension, which inspect does not find."""
    try:
        return inspect.getsource(module)
    except (OSError, TypeError):
        pass
    origin = Path(module.__file__ or "")
    candidate = origin.parent / (module.__name__.rsplit(".", 1)[-1] + ".py")
    if not candidate.exists():
        pytest.fail(f"dbus-fast {DBUS_FAST}: cannot find the source of {module.__name__} (looked for "
                    f"{candidate}); the source checks in {Path(__file__).name} need it")
    return candidate.read_text()


def defining_class(name: str) -> type:
    for cls in MessageBus.__mro__:
        if name in cls.__dict__:
            return cls
    pytest.fail(f"dbus-fast {DBUS_FAST}: MessageBus has no {name!r} any more; see INTERNALS in {Path(__file__).name}")


def method_source(name: str) -> ast.FunctionDef | ast.AsyncFunctionDef:
    """The definition of MessageBus.<name> (or of the base class that defines it)."""
    cls = defining_class(name)
    tree = ast.parse(module_source(sys.modules[cls.__module__]))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name == name:
                    return item
    pytest.fail(f"dbus-fast {DBUS_FAST}: no `def {name}` in class {cls.__name__} of {cls.__module__}'s source")


def is_self_attribute(node: ast.AST, attr: str) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == attr
            and isinstance(node.value, ast.Name) and node.value.id == "self")


AIO_SOURCE_MODULE = sys.modules[MessageBus.__module__]


# -- 1. every name exists, with its kind ---------------------------------------------------


def test_the_table_names_each_internal_once():
    assert len(BY_NAME) == len(INTERNALS)
    assert all(i.name.startswith("_") and not i.name.startswith("__") for i in INTERNALS)


@pytest.mark.parametrize("internal", [i for i in INTERNALS if i.kind in (METHOD, STATIC)], ids=lambda i: i.name)
def test_method_exists_with_the_same_parameters(internal: Internal):
    static = inspect.getattr_static(MessageBus, internal.name, None)
    if static is None:
        pytest.fail(explain(internal, "is gone from dbus_fast.aio.MessageBus (renamed or removed)"))
    if internal.kind == STATIC and not isinstance(static, staticmethod):
        pytest.fail(explain(internal, f"is no longer a staticmethod (it is a {type(static).__name__})"))
    if internal.kind == METHOD and isinstance(static, (staticmethod, classmethod, property)):
        pytest.fail(explain(internal, f"is no longer an instance method (it is a {type(static).__name__})"))
    function = getattr(MessageBus, internal.name)
    if not callable(function):
        pytest.fail(explain(internal, f"is no longer callable (it is a {type(function).__name__})"))
    try:
        parameters = tuple(inspect.signature(function).parameters)
    except (TypeError, ValueError) as e:
        pytest.fail(explain(internal, f"has no inspectable signature any more ({e})"))
    if parameters != internal.expected:
        pytest.fail(explain(internal, f"now takes {parameters}, not {internal.expected}: our override "
                                      "would be called with the wrong arguments"))


@pytest.mark.parametrize("internal", [i for i in INTERNALS if i.kind == ATTRIBUTE], ids=lambda i: i.name)
async def test_attribute_is_set_by_the_constructor(internal: Internal):
    bus = MessageBus(bus_address="unix:path=/nonexistent/stillsvc-internals-test")
    if not hasattr(bus, internal.name):
        pytest.fail(explain(internal, "is not set by MessageBus() any more (renamed or removed)"))
    value = getattr(bus, internal.name)
    if not isinstance(value, internal.expected):
        pytest.fail(explain(internal, f"is a {type(value).__name__} now, not a {internal.expected.__name__}"))


def test_process_message_is_the_reader_callback():
    internal = BY_NAME["_process_message"]
    connect = method_source("connect")
    if not any(is_self_attribute(node, "_process_message") for node in ast.walk(connect)):
        pytest.fail(explain(internal, "is no longer handed to the message reader in MessageBus.connect()"))


def test_connect_creates_its_socket_with_create_socket_for_transport_and_keeps_it_as_sock():
    connect = method_source("connect")
    calls = [node for node in ast.walk(connect) if isinstance(node, ast.Call)
             and is_self_attribute(node.func, "_create_socket_for_transport")]
    if not calls:
        pytest.fail(explain(BY_NAME["_create_socket_for_transport"], "is not called by MessageBus.connect()"))
    stored = [node for node in ast.walk(connect) if isinstance(node, ast.Assign)
              and any(is_self_attribute(target, "_sock") for target in node.targets)]
    if not stored:
        pytest.fail(explain(BY_NAME["_sock"], "is not assigned in MessageBus.connect()"))


def test_the_writer_sends_through_the_socket_object():
    internal = BY_NAME["_sock"]
    tree = ast.parse(module_source(AIO_SOURCE_MODULE))
    reads_sock = any(isinstance(node, ast.Attribute) and node.attr == "_sock" and isinstance(node.ctx, ast.Load)
                     for node in ast.walk(tree))
    sends = {node.func.attr for node in ast.walk(tree)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
             and node.func.attr in ("send", "sendmsg") and not (isinstance(node.func.value, ast.Name)
                                                                 and node.func.value.id == "self")}
    if not reads_sock or sends != {"send", "sendmsg"}:
        pytest.fail(explain(internal, f"no longer looks like the write path (reads ._sock: {reads_sock}; "
                                      f"socket calls found: {sorted(sends)}, expected send and sendmsg)"))


# -- 2. the library calls our overrides by these names ----------------------------------------

_probe_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("stillsvc_internals_probe", default=None)


class Probe(ServiceInterface):
    def __init__(self, order: list[str]) -> None:
        super().__init__("org.stillsvc.InternalsProbe")
        self.order = order

    @dbus_method()
    def Now(self) -> "s":  # noqa: F821, UP037 (a D-Bus signature)
        self.order.append(f"sync method ran, saw {_probe_var.get()}")
        return "now"

    @dbus_method()
    async def Later(self) -> "s":  # noqa: F821, UP037 (a D-Bus signature)
        self.order.append(f"first step of the async method, saw {_probe_var.get()}")
        await asyncio.sleep(0)
        return "later"

    @dbus_method()
    async def Refuse(self) -> "s":  # noqa: F821, UP037 (a D-Bus signature)
        raise DBusError("org.stillsvc.Test.Refused", "no")


class RecordingBus(MessageBus):
    """The library's MessageBus, never connected: what it sends is kept, and each
    overridden private method records its call and then does what the library does."""

    sockets: ClassVar[list[tuple[str, dict[str, str]]]] = []

    def __init__(self) -> None:
        super().__init__(bus_address="unix:path=/nonexistent/stillsvc-internals-test", negotiate_unix_fd=True)
        self.sent: list[Message] = []
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def send(self, msg: Message) -> asyncio.Future:  # type: ignore[override]
        self.sent.append(msg)
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def _emit_interface_added(self, path: str, interface: Any) -> None:
        self.calls.append(("_emit_interface_added", (path, interface)))
        super()._emit_interface_added(path, interface)

    def _emit_interface_removed(self, path: str, removed_interfaces: list[str]) -> None:
        self.calls.append(("_emit_interface_removed", (path, list(removed_interfaces))))
        super()._emit_interface_removed(path, removed_interfaces)

    def _introspect_export_path(self, path: str) -> Any:
        self.calls.append(("_introspect_export_path", (path,)))
        return super()._introspect_export_path(path)

    def _future_exception_no_reply(self, fut: Any) -> None:
        self.calls.append(("_future_exception_no_reply", (fut,)))
        super()._future_exception_no_reply(fut)

    @staticmethod
    def _create_socket_for_transport(transport: str, options: dict[str, str]) -> Any:
        RecordingBus.sockets.append((transport, dict(options)))
        return MessageBus._create_socket_for_transport(transport, options)

    def called(self, name: str) -> list[tuple[Any, ...]]:
        return [args for called, args in self.calls if called == name]


PATH = "/org/stillsvc/InternalsProbe"


def call(member: str, *, interface: str = "org.stillsvc.InternalsProbe", no_reply: bool = False) -> Message:
    return Message(path=PATH, interface=interface, member=member, sender=":1.42", serial=7,
                   flags=MessageFlag.NO_REPLY_EXPECTED if no_reply else MessageFlag.NONE)


async def settle(bus: RecordingBus, rounds: int = 10) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


async def test_export_and_unexport_go_through_the_emit_hooks_and_path_exports():
    bus = RecordingBus()
    probe = Probe([])
    bus.export(PATH, probe)
    if bus.called("_emit_interface_added") != [(PATH, probe)]:
        pytest.fail(explain(BY_NAME["_emit_interface_added"], "was not called by export(); the override "
                                                              "that keeps InterfacesAdded off child paths is dead"))
    exports = bus._path_exports
    if not (PATH in exports and exports[PATH].get(probe.name) is probe):
        pytest.fail(explain(BY_NAME["_path_exports"], f"does not map the exported path to its interfaces "
                                                      f"({exports!r})"))
    bus.unexport(PATH, probe)
    if bus.called("_emit_interface_removed") != [(PATH, [probe.name])]:
        pytest.fail(explain(BY_NAME["_emit_interface_removed"], "was not called by unexport() with the path "
                                                                "and the removed interface names"))
    if PATH in bus._path_exports:
        pytest.fail(explain(BY_NAME["_path_exports"], "keeps a path whose last interface was unexported: "
                                                      "calls to it would no longer get Error.NotFound"))


async def test_introspect_is_answered_from_introspect_export_path_and_its_node_can_be_filtered():
    internal = BY_NAME["_introspect_export_path"]
    bus = RecordingBus()
    bus.export(PATH, Probe([]))
    bus._process_message(call("Introspect", interface="org.freedesktop.DBus.Introspectable"))
    if bus.called("_introspect_export_path") != [(PATH,)]:
        pytest.fail(explain(internal, "was not called to answer Introspect"))
    node = MessageBus._introspect_export_path(bus, PATH)
    names = [i.name for i in node.interfaces]
    if "org.stillsvc.InternalsProbe" not in names:
        pytest.fail(explain(internal, f"returns a node whose .interfaces names are {names}"))
    node.interfaces = [i for i in node.interfaces if i.name != "org.stillsvc.InternalsProbe"]
    if "org.stillsvc.InternalsProbe" in node.tostring():
        pytest.fail(explain(internal, "returns a node whose .interfaces, once replaced, is not what "
                                      "tostring() writes"))


async def test_create_socket_for_transport_is_how_connect_makes_its_socket():
    internal = BY_NAME["_create_socket_for_transport"]
    RecordingBus.sockets.clear()
    bus = RecordingBus()
    with pytest.raises(OSError):
        await bus.connect()
    if RecordingBus.sockets != [("unix", {"path": "/nonexistent/stillsvc-internals-test"})]:
        pytest.fail(explain(internal, f"was not called by connect() as expected: {RecordingBus.sockets}"))
    sock, stream, address = MessageBus._create_socket_for_transport("unix", {"path": "/nonexistent/x"})
    try:
        if not isinstance(sock, socket.socket) or not hasattr(stream, "close") or address != "/nonexistent/x":
            pytest.fail(explain(internal, f"returns {(sock, stream, address)!r}, not (socket, stream, address)"))
    finally:
        stream.close()
        sock.close()


async def test_a_refused_async_call_without_reply_goes_to_future_exception_no_reply():
    internal = BY_NAME["_future_exception_no_reply"]
    bus = RecordingBus()
    bus.export(PATH, Probe([]))
    bus._process_message(call("Refuse", no_reply=True))
    pending = set(bus._pending_futures)
    await settle(bus)
    if len(bus.called("_future_exception_no_reply")) != 1:
        pytest.fail(explain(internal, "was not the done-callback of a no-reply async call"))
    (fut,) = bus.called("_future_exception_no_reply")[0]
    if fut not in pending:
        pytest.fail(explain(BY_NAME["_pending_futures"], "did not hold the future of the async call"))
    assert [m for m in bus.sent if m.message_type != MessageType.SIGNAL] == []  # no reply was expected


# -- 3. the behaviour the descriptor bookkeeping depends on ------------------------------------


def test_make_method_handler_starts_async_methods_with_ensure_future_or_create_task():
    """Source check: the async branch creates the Task itself, from the coroutine it starts."""
    internal = BY_NAME["_make_method_handler"]
    handler = method_source("_make_method_handler")
    starts = [node for node in ast.walk(handler) if isinstance(node, ast.Call)
              and isinstance(node.func, (ast.Attribute, ast.Name))
              and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
              in ("ensure_future", "create_task")
              and node.args and isinstance(node.args[0], ast.Call)]
    if not starts:
        pytest.fail(explain(internal, "no longer starts the coroutine with asyncio.ensure_future()/"
                                      "create_task() in its source"))
    if not any(is_self_attribute(node, "_future_exception_no_reply") for node in ast.walk(handler)):
        pytest.fail(explain(BY_NAME["_future_exception_no_reply"], "is not referenced as "
                                                                   "self._future_exception_no_reply in _make_method_handler"))
    if not any(is_self_attribute(node, "_pending_futures") for node in ast.walk(handler)):
        pytest.fail(explain(BY_NAME["_pending_futures"], "is not used by _make_method_handler"))


async def test_an_async_method_task_is_created_during_dispatch_and_runs_before_a_later_callback():
    """What ServiceBus._process_message assumes: the Task exists when dispatch returns,
    it runs in a copy of the dispatching context (a ContextVar reset right after
    dispatch is still set for it), and its first step runs before a call_soon
    callback scheduled after dispatch (which is when unclaimed descriptors are closed)."""
    internal = BY_NAME["_make_method_handler"]
    order: list[str] = []
    bus = RecordingBus()
    bus.export(PATH, Probe(order))
    token = _probe_var.set("the dispatch context")
    try:
        bus._process_message(call("Later"))
        created = [fut for fut in bus._pending_futures if isinstance(fut, asyncio.Task)]
    finally:
        _probe_var.reset(token)
    asyncio.get_running_loop().call_soon(order.append, "callback scheduled after dispatch")
    await settle(bus)
    if len(created) != 1:
        pytest.fail(explain(internal, f"did not create a Task during dispatch (pending: {bus._pending_futures!r})"))
    expected = ["first step of the async method, saw the dispatch context", "callback scheduled after dispatch"]
    if order != expected:
        pytest.fail(explain(internal, f"ran the async method out of order or in another context: {order}; "
                                      f"expected {expected}. Unclaimed-descriptor closing would race the method"))
    replies = [m for m in bus.sent if m.message_type == MessageType.METHOD_RETURN]
    assert [m.body for m in replies] == [["later"]]
    assert not bus._pending_futures


async def test_a_sync_method_runs_during_dispatch():
    """ServiceBus._process_message: "A sync method has run by now"."""
    order: list[str] = []
    bus = RecordingBus()
    bus.export(PATH, Probe(order))
    token = _probe_var.set("the dispatch context")
    try:
        bus._process_message(call("Now"))
        ran = list(order)
    finally:
        _probe_var.reset(token)
    if ran != ["sync method ran, saw the dispatch context"]:
        pytest.fail(explain(BY_NAME["_process_message"], f"did not run a sync method during dispatch: {ran}"))
    assert [m.body for m in bus.sent if m.message_type == MessageType.METHOD_RETURN] == [["now"]]


# -- 4. no private dbus-fast name in our code that the table does not know -----------------------

#: Classes of dbus-fast whose private names count.
LIBRARY_CLASSES = (MessageBus, ServiceInterface, Message)
#: Our own classes that subclass one of them (their `self._x` may be dbus-fast's).
LIBRARY_BASES = {"MessageBus", "BaseMessageBus", "ServiceInterface", "ServiceBus"}


def library_private_names() -> set[str]:
    names: set[str] = set()
    for cls in LIBRARY_CLASSES:
        names.update(dir(cls))
        for klass in cls.__mro__:
            slots = klass.__dict__.get("__slots__", ())
            names.update((slots,) if isinstance(slots, str) else slots)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def our_uses(names: set[str]) -> dict[str, list[str]]:
    """name → ["file:line"] for every use of a dbus-fast private name in stillsvc/:
    accessed on anything but `self` of one of our own classes, or accessed on or
    defined in one of our subclasses of a dbus-fast class."""
    uses: dict[str, list[str]] = {}

    def visit(where: Path, node: ast.AST, in_library_subclass: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                subclass = any(ast.unparse(base).rsplit(".", 1)[-1] in LIBRARY_BASES for base in child.bases)
                if subclass:
                    for item in child.body:
                        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name in names:
                            uses.setdefault(item.name, []).append(f"{where}:{item.lineno}")
                visit(where, child, subclass)
                continue
            if isinstance(child, ast.Attribute) and child.attr in names:
                on_self = isinstance(child.value, ast.Name) and child.value.id == "self"
                if in_library_subclass or not on_self:
                    uses.setdefault(child.attr, []).append(f"{where}:{child.lineno}")
            visit(where, child, in_library_subclass)

    for path in sorted((REPO / "stillsvc").rglob("*.py")):
        source = path.read_text()
        if "dbus_fast" in source or "ServiceBus" in source:
            visit(path.relative_to(REPO), ast.parse(source), False)
    return uses


def test_every_private_dbus_fast_name_we_use_is_in_the_table():
    uses = our_uses(library_private_names())
    unknown = {name: places for name, places in uses.items() if name not in BY_NAME}
    assert not unknown, (
        f"stillsvc uses private dbus-fast names that INTERNALS in {Path(__file__).name} does not list: "
        f"{unknown}. Add each with its user and what to check (or use the public API instead).")
    stale = [i.name for i in INTERNALS if i.named and i.name not in uses]
    assert not stale, f"INTERNALS lists names stillsvc no longer uses: {stale}; remove them"
