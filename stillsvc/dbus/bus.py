"""The bus connection, with the library's three gaps closed once, here.

1. *Who is calling.* dbus-fast does not tell method handlers the caller. A message
   handler that runs before dispatch stores the sender's unique name in a
   :class:`contextvars.ContextVar`; sync handlers and the tasks created for async
   ones read it with :func:`caller`.
2. *Errors.* :func:`method` wraps every exported method: core
   :class:`~stillsvc.errors.StillError` subclasses become
   ``org.stillsvc.StillImage1.Error.<Name>`` replies; anything else is logged with
   its traceback and answered with ``Error.Failed`` and a fixed text, so no
   traceback or internal detail ever crosses the bus.
3. *EAGAIN.* When the bus socket's send buffer fills (a burst of signals while the
   bus daemon is slow), the library treats ``BlockingIOError`` as fatal and drops
   the connection. :class:`PatientSocket` reports "0 bytes sent" instead, so the
   library waits for the socket to become writable and carries on.

Also here: unicast signals (a signal with a destination, for event notifications
that must reach one client only) and the ObjectManager signals, which dbus-fast
would otherwise send from the child's path instead of the manager's.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import os
import select
import socket
from collections.abc import Callable, Iterator
from typing import Any

import structlog
from dbus_fast import DBusError, Message, MessageFlag, MessageType
from dbus_fast.signature import get_signature_tree
from dbus_fast.aio import MessageBus
from dbus_fast.service import method as _dbus_method

from ..errors import StillError
from ..names import ERROR_PREFIX
from .authority import OWNER, PUBLIC, rule_for

log = structlog.get_logger(__name__)

_caller: contextvars.ContextVar[str | None] = contextvars.ContextVar("stillsvc_caller", default=None)

#: How long a blocked send with file descriptors may wait for the socket (seconds).
_FD_SEND_WAIT = 5.0


def caller() -> str | None:
    """The unique bus name of the client whose method call is being handled."""
    return _caller.get()


def error_name(name: str) -> str:
    return f"{ERROR_PREFIX}.{name}"


def to_dbus_error(error: StillError) -> DBusError:
    return DBusError(error_name(error.name), error.message)


def _internal_error(fn: Callable[..., Any], e: Exception) -> DBusError:
    log.error("method failed unexpectedly", method=fn.__qualname__, client=caller(), exc_info=e)
    return DBusError(error_name("Failed"), "internal error in the service; the details are in its log")


@contextlib.contextmanager
def _errors_mapped(fn: Callable[..., Any]) -> Iterator[None]:
    """What a method raises, as the D-Bus error its caller gets: StillError as
    its own name, DBusError as it is, anything else as Error.Failed (logged)."""
    try:
        yield
    except StillError as e:
        raise to_dbus_error(e) from None
    except DBusError:
        raise
    except Exception as e:
        raise _internal_error(fn, e) from None


def _authority(interface: Any) -> Any:
    return getattr(getattr(interface, "service", None), "authority", None)


def method(name: str | None = None) -> Callable[[Callable[..., Any]], Any]:
    """Export a method like ``dbus_fast.service.method`` with the error mapping
    above, behind the authorization gate (:mod:`.authority`)."""

    def decorate(fn: Callable[..., Any]) -> Any:
        member = name or fn.__name__
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def wrapper(*args: Any) -> Any:
                with _errors_mapped(fn):
                    authority = _authority(args[0])
                    if authority is not None:
                        await authority.check(caller(), args[0].name, member)
                    return await fn(*args)

        else:

            @functools.wraps(fn)
            def wrapper(*args: Any) -> Any:
                with _errors_mapped(fn):
                    authority = _authority(args[0])
                    if authority is not None:
                        # Methods that need polkit are coroutines; these need no check.
                        rule = rule_for(args[0].name, member)
                        if rule not in (PUBLIC, OWNER) and authority.mode != "none":
                            raise RuntimeError(f"{member} needs {rule} but is not a coroutine")
                    return fn(*args)

        return _dbus_method(name=name)(wrapper)

    return decorate


class PatientSocket(socket.socket):
    """A socket whose sends report "nothing sent yet" instead of raising EAGAIN."""

    def send(self, data: Any, flags: int = 0) -> int:  # type: ignore[override]
        try:
            return super().send(data, flags)
        except BlockingIOError:
            return 0

    def sendmsg(self, buffers: Any, ancdata: Any = (), flags: int = 0, address: Any = None) -> int:  # type: ignore[override]
        # The library forgets the file descriptors after the first sendmsg() of a
        # message, so a message carrying descriptors must go out in that call: wait
        # (briefly, rarely) for room rather than report a partial send.
        while True:
            try:
                if address is None:
                    return super().sendmsg(buffers, ancdata, flags)
                return super().sendmsg(buffers, ancdata, flags, address)
            except BlockingIOError:
                if not ancdata:
                    return 0
                _, writable, _ = select.select([], [self], [], _FD_SEND_WAIT)
                if not writable:
                    raise


def _fd_indexes(signature: str, body: list[Any]) -> list[int]:
    """Every ``h`` value (an index into the message's descriptors) in a body."""
    found: list[int] = []

    def walk(kind: Any, value: Any) -> None:
        token = kind.token
        if token == "h":
            found.append(value)
        elif token == "v":
            walk(get_signature_tree(value.signature).types[0], value.value)
        elif token.startswith("a{"):
            key_kind, value_kind = kind.children[0].children
            for k, v in value.items():
                walk(key_kind, k)
                walk(value_kind, v)
        elif token.startswith("a"):
            for item in value:
                walk(kind.children[0], item)
        elif token.startswith("("):
            for child, item in zip(kind.children, value):
                walk(child, item)

    if "h" in signature:
        for kind, value in zip(get_signature_tree(signature).types, body):
            walk(kind, value)
    return found


def close_fds(fds: list[int]) -> None:
    """Close descriptors that are ours to close, ignoring ones already gone."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class ServiceBus(MessageBus):
    """A MessageBus with the repairs described in this module's docstring.

    Descriptors: a call that carries file descriptors hands them to its method
    only if the method is registered in :attr:`fd_consumers` (and then the method
    owns and closes them); for every other call — refused, unknown, or one that
    simply takes no descriptor — they are closed once the call is dispatched.
    A ``h`` index with no descriptor behind it is refused before dispatch, so it
    can never be mistaken for one of the service's own descriptors.
    """

    def __init__(self, bus_address: str | None = None, **kwargs: Any) -> None:
        super().__init__(bus_address=bus_address, negotiate_unix_fd=True, **kwargs)
        #: The one path that answers ObjectManager calls (see Service).
        self.object_manager_path = "/"
        #: (interface, member, signature) of methods that take ownership of descriptors.
        self.fd_consumers: set[tuple[str, str, str]] = set()
        self.add_message_handler(self._remember_caller)

    def _process_message(self, msg: Message) -> None:
        if msg.message_type is not MessageType.METHOD_CALL:
            super()._process_message(msg)
            return
        fds = list(msg.unix_fds)
        try:
            indexes = _fd_indexes(msg.signature, msg.body)
        except Exception:
            indexes = [-1]
        if any(not isinstance(i, int) or not 0 <= i < len(fds) for i in indexes):
            close_fds(fds)
            if not msg.flags & MessageFlag.NO_REPLY_EXPECTED:
                self.send(Message.new_error(msg, "org.freedesktop.DBus.Error.InvalidArgs",
                                            "a file descriptor argument refers to no descriptor in the message"))
            return
        consumed = bool(indexes) and (msg.interface, msg.member, msg.signature) in self.fd_consumers
        try:
            super()._process_message(msg)
        except DBusError as e:
            # A refused call whose sender wants no reply: nothing to send, nothing to fear.
            if not msg.flags & MessageFlag.NO_REPLY_EXPECTED:
                raise
            log.debug("refused a call that expects no reply", member=msg.member, error=e.type)
        finally:
            if fds and not consumed:
                close_fds(fds)

    def _future_exception_no_reply(self, fut: Any) -> None:
        # An async method called without a reply expected: its refusal is no error.
        self._pending_futures.discard(fut)
        if not fut.cancelled() and isinstance(fut.exception(), DBusError):
            log.debug("refused a call that expects no reply", error=fut.exception().type)
            return
        super()._future_exception_no_reply(fut)
        self.add_message_handler(self._remember_caller)

    @staticmethod
    def _create_socket_for_transport(transport: str, options: dict[str, str]) -> Any:
        sock, stream, address = MessageBus._create_socket_for_transport(transport, options)
        patient = PatientSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
        stream.close()
        return patient, patient.makefile("rwb"), address

    @staticmethod
    def _remember_caller(msg: Message) -> None:
        if msg.message_type is MessageType.METHOD_CALL:
            _caller.set(msg.sender)
        return None

    # The library sends these from the child object's path; the service sends its
    # own from the manager's path (see ObjectTree).
    def _emit_interface_added(self, path: str, interface: Any) -> None:
        return None

    def _emit_interface_removed(self, path: str, removed_interfaces: list[str]) -> None:
        return None

    def _introspect_export_path(self, path: str) -> Any:
        # The library lists ObjectManager on every object; only the root is one.
        node = super()._introspect_export_path(path)
        if path != self.object_manager_path:
            node.interfaces = [i for i in node.interfaces if i.name != "org.freedesktop.DBus.ObjectManager"]
        return node

    def unicast_signal(self, destination: str, path: str, interface: str, member: str,
                       signature: str, body: list[Any]) -> None:
        """Send a signal to one connection only (never broadcast)."""
        self.send(Message(
            message_type=MessageType.SIGNAL,
            destination=destination,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=body,
        ))

    def broadcast_signal(self, path: str, interface: str, member: str, signature: str, body: list[Any]) -> None:
        self.send(Message.new_signal(path, interface, member, signature, body))
