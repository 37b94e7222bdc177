"""The USB transport drivers share: one interface of one device, through pyusb.

:class:`UsbPort` finds the device at a port (``usb:BBB:DDD``, as udev discovery
gives it), picks the interface (by class triple, else the first with the
endpoints asked for), finds its bulk-in, bulk-out and interrupt-in endpoints and
claims it. Another program holding the interface (gvfs, gphoto2, a second
service) is :class:`~stillsvc.common.errors.Busy` "claimed by another program";
no permission is ``AccessDenied``; a device that has gone is ``Disconnected``;
a timeout is ``Timeout``. A stalled endpoint is cleared and reported
(:class:`Stalled`). Writes whose length is a multiple of the endpoint's packet
size end with a zero-length packet, as bulk-only protocols such as PTP want.

Every call blocks and belongs on the device's worker thread (or a thread of the
driver's own, such as one waiting on the interrupt endpoint); pyusb's libusb1
backend may be used from several threads on different endpoints. ``backend``
is pyusb's: the real libusb1 one by default, a simulated device in unit tests.
"""

from __future__ import annotations

import errno
from array import array
from collections.abc import Callable
from typing import Any

import usb.core
import usb.util

from stillsvc.common.errors import AccessDenied, Busy, Disconnected, Failed, NotFound, StillError, Timeout


class Stalled(Failed):
    """The device stalled an endpoint (cleared again before this is raised)."""


def parse_port(port: str) -> tuple[int, int]:
    """``usb:BBB:DDD`` as (bus, address)."""
    try:
        scheme, bus, address = port.split(":")
        if scheme != "usb":
            raise ValueError
        return int(bus, 10), int(address, 10)
    except ValueError:
        raise NotFound(f"not a USB port: {port!r} (expected usb:BUS:ADDRESS, e.g. usb:001:004)") from None


def usb_error(e: Exception, what: str) -> StillError:
    """The service's error for a pyusb error during ``what``."""
    if isinstance(e, usb.core.USBTimeoutError):
        return Timeout(f"the USB device did not answer in time ({what})")
    code = getattr(e, "errno", None)
    if code in (errno.ENODEV, errno.ESHUTDOWN) or getattr(e, "backend_error_code", None) == -4:
        return Disconnected(f"the USB device has gone ({what})")
    if code == errno.EBUSY or getattr(e, "backend_error_code", None) == -6:
        return Busy(f"the USB device is claimed by another program ({what})")
    if code in (errno.EACCES, errno.EPERM) or getattr(e, "backend_error_code", None) == -3:
        return AccessDenied(f"no permission to use the USB device ({what})")
    if code == errno.EPIPE or getattr(e, "backend_error_code", None) == -9:
        return Stalled(f"the USB device stalled ({what})")
    return Failed(f"USB error during {what}: {e}")


class UsbPort:
    """One claimed USB interface and its bulk-in, bulk-out and interrupt-in endpoints."""

    def __init__(self, port: str, interface: tuple[int, int, int] | None = None, *, backend: Any = None,
                 accept: Callable[[Any], bool] | None = None) -> None:
        self.port = port
        self.wanted = interface
        self.backend = backend
        #: Another test for an interface that is not of class ``interface`` (an MTP phone's vendor class).
        self.accept = accept
        self.device: Any = None
        self.interface_number = -1
        self.bulk_in: Any = None
        self.bulk_out: Any = None
        self.interrupt_in: Any = None
        self.claimed = False

    # -- open and close -------------------------------------------------------------------
    def open(self) -> None:
        bus, address = parse_port(self.port)
        try:
            found = list(usb.core.find(find_all=True, backend=self.backend,
                                       custom_match=lambda d: d.bus == bus and d.address == address) or ())
        except usb.core.NoBackendError:
            raise Failed("pyusb has no USB backend here (Debian package libusb-1.0-0)") from None
        except usb.core.USBError as e:
            raise usb_error(e, "looking for the device") from None
        if not found:
            raise Disconnected(f"no USB device at {self.port}")
        self.device = device = found[0]
        try:
            try:
                config = device.get_active_configuration()
            except usb.core.USBError:
                device.set_configuration()
                config = device.get_active_configuration()
            interface = self._pick(config)
            self.interface_number = interface.bInterfaceNumber
            for endpoint in interface:
                direction = usb.util.endpoint_direction(endpoint.bEndpointAddress)
                kind = usb.util.endpoint_type(endpoint.bmAttributes)
                if kind == usb.util.ENDPOINT_TYPE_BULK and direction == usb.util.ENDPOINT_IN:
                    self.bulk_in = self.bulk_in or endpoint
                elif kind == usb.util.ENDPOINT_TYPE_BULK and direction == usb.util.ENDPOINT_OUT:
                    self.bulk_out = self.bulk_out or endpoint
                elif kind == usb.util.ENDPOINT_TYPE_INTR and direction == usb.util.ENDPOINT_IN:
                    self.interrupt_in = self.interrupt_in or endpoint
            if self.bulk_in is None or self.bulk_out is None:
                raise Failed(f"interface {self.interface_number} of the USB device at {self.port} has no bulk "
                             "endpoints in both directions")
            self._detach_kernel_driver()
            usb.util.claim_interface(device, self.interface_number)
            self.claimed = True
        except usb.core.USBError as e:
            error = usb_error(e, f"claiming interface {self.interface_number}")
            if isinstance(error, Busy):
                error = Busy(f"the USB device at {self.port} is claimed by another program (gvfs, gphoto2, "
                             "a file manager's camera import?): close it, or let the service have the device")
            self.close()
            raise error from None
        except BaseException:
            self.close()
            raise

    def _pick(self, config: Any) -> Any:
        interfaces = list(config)
        if self.wanted is not None:
            for interface in interfaces:
                triple = (interface.bInterfaceClass, interface.bInterfaceSubClass, interface.bInterfaceProtocol)
                if triple == self.wanted:
                    return interface
        if self.accept is not None:
            for interface in interfaces:
                if self.accept(interface):
                    return interface
        raise NotFound(f"the USB device at {self.port} has no interface of class "
                       f"{'%02x/%02x/%02x' % self.wanted if self.wanted else 'wanted'}")

    def _detach_kernel_driver(self) -> None:
        try:
            if self.device.is_kernel_driver_active(self.interface_number):
                self.device.detach_kernel_driver(self.interface_number)
        except (NotImplementedError, usb.core.USBError, AttributeError):
            pass  # no kernel driver (the usual case for a still-image interface), or a simulated device

    def close(self) -> None:
        """Release the interface and every resource; safe to call twice, and after an unplug."""
        device, self.device = self.device, None
        if device is None:
            return
        if self.claimed:
            self.claimed = False
            try:
                usb.util.release_interface(device, self.interface_number)
            except (usb.core.USBError, NotImplementedError):
                pass
        try:
            usb.util.dispose_resources(device)
        except (usb.core.USBError, NotImplementedError):
            pass

    @property
    def packet_size(self) -> int:
        return int(self.bulk_in.wMaxPacketSize) if self.bulk_in is not None else 512

    # -- transfers ------------------------------------------------------------------------
    def _device(self) -> Any:
        if self.device is None:
            raise Disconnected(f"the USB device at {self.port} is not open")
        return self.device

    def write(self, data: bytes | bytearray | memoryview, timeout_ms: int, *, zlp: bool = True) -> None:
        """Write ``data`` to bulk-out; a zero-length packet follows a length that is a
        multiple of the packet size (``zlp``)."""
        device = self._device()
        address = self.bulk_out.bEndpointAddress
        try:
            written = device.write(address, data, timeout_ms)
            if written != len(data):
                raise Failed(f"the USB device took {written} of {len(data)} bytes")
            if zlp and len(data) and len(data) % int(self.bulk_out.wMaxPacketSize) == 0:
                device.write(address, b"", timeout_ms)
        except usb.core.USBError as e:
            raise self._failure(e, "a bulk write", address) from None

    def read_into(self, buffer: array[int], timeout_ms: int) -> int:
        """One bulk-in read into ``buffer`` (an ``array('B')``); returns how many bytes
        came (a short packet ends a read; 0 is a zero-length packet)."""
        device = self._device()
        address = self.bulk_in.bEndpointAddress
        try:
            return int(device.read(address, buffer, timeout_ms))
        except usb.core.USBError as e:
            raise self._failure(e, "a bulk read", address) from None

    def read_interrupt(self, size: int, timeout_ms: int) -> bytes | None:
        """One interrupt-in read; None when nothing came within ``timeout_ms``."""
        device = self._device()
        if self.interrupt_in is None:
            return None
        address = self.interrupt_in.bEndpointAddress
        try:
            return bytes(device.read(address, size, timeout_ms))
        except usb.core.USBTimeoutError:
            return None
        except usb.core.USBError as e:
            raise self._failure(e, "an interrupt read", address) from None

    def control(self, request_type: int, request: int, value: int, data_or_length: Any, timeout_ms: int) -> Any:
        """A control request to the interface (``wIndex`` = its number), e.g. a class request."""
        device = self._device()
        try:
            return device.ctrl_transfer(request_type, request, value, self.interface_number, data_or_length,
                                        timeout_ms)
        except usb.core.USBError as e:
            raise usb_error(e, f"control request 0x{request:02x}") from None

    def clear_halt(self, endpoint: Any = None) -> None:
        for ep in ([endpoint] if endpoint is not None else [self.bulk_in, self.bulk_out]):
            if ep is None or self.device is None:
                continue
            try:
                self.device.clear_halt(ep.bEndpointAddress if hasattr(ep, "bEndpointAddress") else ep)
            except usb.core.USBError:
                pass

    def _failure(self, e: Exception, what: str, address: int) -> StillError:
        error = usb_error(e, what)
        if isinstance(error, Stalled):
            self.clear_halt(address)
        return error


__all__ = ["Stalled", "UsbPort", "parse_port", "usb_error"]
