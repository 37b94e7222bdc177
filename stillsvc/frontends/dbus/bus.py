"""The bus connection, with the library's three gaps closed once, here.

1. *Who is calling.* dbus-fast does not tell method handlers the caller. A message
   handler that runs before dispatch stores the sender's unique name in a
   :class:`contextvars.ContextVar`; sync handlers and the tasks created for async
   ones read it with :func:`caller`.
2. *Errors.* :func:`method` wraps every exported method: core
   :class:`~stillsvc.common.errors.StillError` subclasses become
   ``org.stillsvc.StillImage1.Error.<Name>`` replies; anything else is logged with
   its traceback and answered with ``Error.Failed`` and a fixed text, so no
   traceback or internal detail ever crosses the bus.
3. *EAGAIN.* When the bus socket's send buffer fills (a burst of signals while the
   bus daemon is slow), the library treats ``BlockingIOError`` as fatal and drops
   the connection. :class:`PatientSocket` reports "0 bytes sent" instead, so the
   library waits for the socket to become writable and carries on.

4. *Descriptors.* Neither library closes a received file descriptor. Here a
   descriptor belongs to a method only once the method has accepted it
   (:func:`take_fd`); every other one is closed, whether the method ran or not
   (see :class:`_CallDescriptors`).

Also here: unicast signals (a signal with a destination, for event notifications
that must reach one client only) and the ObjectManager signals, which dbus-fast
would otherwise send from the child's path instead of the manager's.
"""

from __future__ import annotations

import asyncio
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
from dbus_fast.aio import MessageBus
from dbus_fast.service import method as _dbus_method
from dbus_fast.signature import get_signature_tree

from stillsvc.common.errors import StillError, dbus_error_name
from stillsvc.common.names import ERROR_PREFIX
from stillsvc.frontends.dbus.authority import OWNER, PUBLIC, rule_for

log = structlog.get_logger(__name__)

_caller: contextvars.ContextVar[str | None] = contextvars.ContextVar("stillsvc_caller", default=None)

#: The descriptors of the method call being dispatched (None if it brought none).
_descriptors: contextvars.ContextVar[_CallDescriptors | None] = contextvars.ContextVar(
    "stillsvc_descriptors", default=None)

#: How long a blocked send with file descriptors may wait for the socket (seconds).
_FD_SEND_WAIT = 5.0


def caller() -> str | None:
    """The unique bus name of the client whose method call is being handled."""
    return _caller.get()


def error_name(name: str) -> str:
    return f"{ERROR_PREFIX}.{name}"


def to_dbus_error(error: StillError) -> DBusError:
    return DBusError(dbus_error_name(error), error.message)


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


class _CallDescriptors:
    """The descriptors one method call brought, until its method takes them.

    Whoever received a descriptor must close it, and a client may attach
    descriptors to any call. So: the method wrapper that starts for the call
    *claims* the descriptors (first thing, before any await); the method takes the
    ones it accepts with :func:`take_fd`; when the wrapper ends, the rest are
    closed. If no wrapper ever claims them — a message handler refused the call,
    no method matched, the library answered it itself — :meth:`close_unclaimed`
    closes them all after dispatch. (Descriptors that no ``h`` argument refers to
    never get here: they are closed before dispatch.)
    """

    __slots__ = ("fds", "claimed")

    def __init__(self, fds: list[int]) -> None:
        self.fds = fds
        self.claimed = False

    def claim(self) -> bool:
        """True for the first wrapper to start (the call's method); False for any
        other (a method called from within it, or too late)."""
        if self.claimed:
            return False
        self.claimed = True
        return True

    def take(self, fd: int) -> int:
        try:
            self.fds.remove(fd)
        except ValueError:
            # Taken already, or closed: the number may now be another file's.
            raise RuntimeError(f"descriptor {fd} is not one this call brought and still holds") from None
        return fd

    def close(self) -> None:
        fds, self.fds = self.fds, []
        close_fds(fds)

    def close_unclaimed(self) -> None:
        if self.claim():
            self.close()


def take_fd(fd: int) -> int:
    """Accept ``fd``, an ``h`` argument of the current call: from now on the method
    owns it and must see that it is closed. Call it once the method has decided to
    keep the descriptor (after every check that may still refuse the call); a
    descriptor not taken is closed by the method wrapper when the method ends.

    Raises RuntimeError for a descriptor the call does not hold (any more): its
    number may already be another file's, so it must not be used."""
    box = _descriptors.get()
    if box is None:
        raise RuntimeError(f"descriptor {fd} is not one the current call brought")
    return box.take(fd)


def _claim_descriptors() -> _CallDescriptors | None:
    box = _descriptors.get()
    return box if box is not None and box.claim() else None


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
                descriptors = _claim_descriptors()  # before any await: see ServiceBus._process_message
                try:
                    with _errors_mapped(fn):
                        authority = _authority(args[0])
                        if authority is not None:
                            await authority.check(caller(), args[0].name, member)
                        return await fn(*args)
                finally:
                    if descriptors is not None:
                        descriptors.close()

        else:

            @functools.wraps(fn)
            def wrapper(*args: Any) -> Any:
                descriptors = _claim_descriptors()
                try:
                    with _errors_mapped(fn):
                        authority = _authority(args[0])
                        if authority is not None:
                            # Methods that need polkit are coroutines; these need no check.
                            rule = rule_for(args[0].name, member)
                            if rule not in (PUBLIC, OWNER) and authority.mode != "none":
                                raise RuntimeError(f"{member} needs {rule} but is not a coroutine")
                        return fn(*args)
                finally:
                    if descriptors is not None:
                        descriptors.close()

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
                # poll(), not select(): the descriptor limit may be above FD_SETSIZE.
                poller = select.poll()
                poller.register(self, select.POLLOUT)
                if not poller.poll(_FD_SEND_WAIT * 1000):
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

    Descriptors: a method owns a descriptor of its call only once it has taken
    it with :func:`take_fd`; all others are closed (see :class:`_CallDescriptors`).
    A ``h`` index with no descriptor behind it is refused before dispatch, so it
    can never be mistaken for one of the service's own descriptors.
    """

    def __init__(self, bus_address: str | None = None, **kwargs: Any) -> None:
        super().__init__(bus_address=bus_address, negotiate_unix_fd=True, **kwargs)
        #: The one path that answers ObjectManager calls (see Service).
        self.object_manager_path = "/"
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
        # A descriptor no argument refers to can reach no method: close it now. The
        # others wait for the method; its wrapper finds them here, a sync method's
        # during dispatch, an async method's in its task (a copy of this context).
        referenced = set(indexes)
        close_fds([fd for i, fd in enumerate(fds) if i not in referenced])
        descriptors = _CallDescriptors([fds[i] for i in sorted(referenced)]) if referenced else None
        token = _descriptors.set(descriptors)
        try:
            super()._process_message(msg)
        except DBusError as e:
            # A refused call whose sender wants no reply: nothing to send, nothing to fear.
            if not msg.flags & MessageFlag.NO_REPLY_EXPECTED:
                raise
            log.debug("refused a call that expects no reply", member=msg.member, error=e.type)
        finally:
            _descriptors.reset(token)
            if descriptors is not None:
                # A sync method has run by now. An async method's task was created
                # during dispatch, and asyncio scheduled its first step (where the
                # wrapper claims the descriptors) then, so it runs before this callback.
                asyncio.get_running_loop().call_soon(descriptors.close_unclaimed)

    def _future_exception_no_reply(self, fut: Any) -> None:
        # An async method called without a reply expected: its refusal is no error.
        self._pending_futures.discard(fut)
        if not fut.cancelled() and isinstance(fut.exception(), DBusError):
            log.debug("refused a call that expects no reply", error=fut.exception().type)
            return
        super()._future_exception_no_reply(fut)

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
