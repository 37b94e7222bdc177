"""Driver items and their properties: what a minidriver builds its item tree from.

A device's *driver item tree* (root = the device; children such as Flatbed and
Feeder, or a camera's storages, folders and pictures) is built by the minidriver
and shared by every client. A driver item's reference count follows the rules of
the WIA minidriver model to the letter:

* added to the tree: +1; removed from the tree (unplug, deletion, synchronize found
  it gone): -1, and the item is marked *removed* so it can never touch the device
  again;
* an application item linked to it: +1; that application item released: -1;
* at zero the driver item is destroyed — the root included.

Properties have a D-Bus type signature, an access and valid values (a range with
a step, a list, or flags); the core checks client writes against them before the
driver's own validation. Application items, the clients' side, are in
:mod:`stillsvc.core.items`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from stillsvc.common.errors import Disconnected, Failed, InvalidArgument, quote


class Access(enum.Enum):
    READ = "r"
    READ_WRITE = "rw"


@dataclass(frozen=True)
class Range:
    """Valid numeric values: ``minimum`` to ``maximum`` in steps of ``step`` from minimum."""

    minimum: float
    maximum: float
    step: float = 1

    def check(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if not self.minimum <= value <= self.maximum:
            return False
        if self.step:
            steps = (value - self.minimum) / self.step
            return abs(steps - round(steps)) < 1e-9
        return True

    def describe(self) -> str:
        return f"{self.minimum:g}..{self.maximum:g} step {self.step:g}"

    def as_dict(self) -> dict[str, Any]:
        return {"kind": "range", "min": self.minimum, "max": self.maximum, "step": self.step}


@dataclass(frozen=True)
class ValueList:
    """Valid values: exactly one of ``values``."""

    values: tuple[Any, ...]

    def check(self, value: Any) -> bool:
        return any(type(value) is type(v) and value == v for v in self.values)

    def describe(self) -> str:
        return "one of " + ", ".join(map(str, self.values))

    def as_dict(self) -> dict[str, Any]:
        return {"kind": "list", "values": list(self.values)}


@dataclass(frozen=True)
class Flags:
    """Valid values: any bitwise OR of ``values``."""

    values: tuple[int, ...]

    def check(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return False
        allowed = 0
        for v in self.values:
            allowed |= v
        return value & ~allowed == 0

    def describe(self) -> str:
        return "flags from " + ", ".join(hex(v) for v in self.values)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": "flags", "values": list(self.values)}


Valid = Range | ValueList | Flags | None

_INTEGER_RANGES: dict[str, tuple[int, int]] = {
    "y": (0, 2**8 - 1), "n": (-(2**15), 2**15 - 1), "q": (0, 2**16 - 1), "i": (-(2**31), 2**31 - 1),
    "u": (0, 2**32 - 1), "x": (-(2**63), 2**63 - 1), "t": (0, 2**64 - 1),
}

_PYTHON_TYPES: dict[str, tuple[type, ...]] = {
    "i": (int,), "u": (int,), "x": (int,), "t": (int,), "d": (float, int), "s": (str,), "b": (bool,),
}


@dataclass(frozen=True)
class PropertySpec:
    """One item property: its D-Bus type, who may write it and which values are valid."""

    name: str
    signature: str
    default: Any
    access: Access = Access.READ_WRITE
    valid: Valid = None
    description: str = ""

    def check_type(self, value: Any) -> Any:
        """Return ``value`` in the property's type, or raise InvalidArgument."""
        kinds = _PYTHON_TYPES[self.signature]
        if isinstance(value, bool) and self.signature != "b":
            raise InvalidArgument(f"property {self.name} takes type '{self.signature}', not a boolean")
        if not isinstance(value, kinds):
            raise InvalidArgument(f"property {self.name} takes type '{self.signature}', not {type(value).__name__}")
        if self.signature in _INTEGER_RANGES:
            low, high = _INTEGER_RANGES[self.signature]
            if not low <= value <= high:
                raise InvalidArgument(f"property {self.name} takes type '{self.signature}': "
                                      f"{quote(value)} is out of its range")
        if self.signature == "d":
            value = float(value)
        return value

    def check(self, value: Any) -> Any:
        value = self.check_type(value)
        if self.valid is not None and not self.valid.check(value):
            raise InvalidArgument(f"invalid value {quote(value)} for property {self.name}: valid is {self.valid.describe()}")
        return value


class DriverItem:
    """A global item of a device's driver tree.

    The reference count is kept by :meth:`add_child`/:meth:`remove` (tree links) and
    :meth:`link`/:meth:`unlink` (application items). ``on_destroyed`` is called once,
    when it reaches zero.
    """

    def __init__(self, name: str, kind: str, specs: list[PropertySpec] | tuple[PropertySpec, ...] = ()) -> None:
        self.name = name
        self.kind = kind
        self.specs: dict[str, PropertySpec] = {spec.name: spec for spec in specs}
        self.values: dict[str, Any] = {spec.name: spec.default for spec in specs}
        self.parent: DriverItem | None = None
        self.children: list[DriverItem] = []
        self.refcount = 0
        self.removed = False
        self.destroyed = False
        self.on_destroyed: Callable[[DriverItem], None] | None = None

    # -- tree ---------------------------------------------------------------
    @property
    def path(self) -> str:
        """The item's name path from the root, e.g. ``Root/Feeder``."""
        names = []
        item: DriverItem | None = self
        while item is not None:
            names.append(item.name)
            item = item.parent
        return "/".join(reversed(names))

    def add_to_tree(self) -> None:
        """Count this item (the root) as part of its device's tree."""
        self._check_alive()
        self.refcount += 1

    def add_child(self, child: DriverItem) -> DriverItem:
        self._check_alive()
        if child.parent is not None or child.removed:
            raise Failed(f"item {child.name} is already in a tree")
        child.parent = self
        self.children.append(child)
        child.refcount += 1
        return child

    def remove(self) -> None:
        """Take this item (and its subtree) out of the tree: -1 each, marked removed."""
        if self.removed:
            return
        for child in list(self.children):
            child.remove()
        if self.parent is not None and self in self.parent.children:
            self.parent.children.remove(self)
        self.removed = True
        self._release()

    def walk(self) -> Iterator[DriverItem]:
        yield self
        for child in self.children:
            yield from child.walk()

    def find(self, path: str) -> DriverItem | None:
        for item in self.walk():
            if item.path == path:
                return item
        return None

    # -- application links --------------------------------------------------
    def link(self) -> None:
        self._check_alive()
        self.refcount += 1

    def unlink(self) -> None:
        self._release()

    def check_device_access(self) -> None:
        """Raise Disconnected if this item may no longer touch the device."""
        if self.removed or self.destroyed:
            raise Disconnected(f"item {self.path} is no longer connected to its device")

    def _release(self) -> None:
        if self.refcount <= 0:
            raise Failed(f"reference count of item {self.name} would go below zero")
        self.refcount -= 1
        if self.refcount == 0:
            self.destroyed = True
            if self.on_destroyed is not None:
                self.on_destroyed(self)

    def _check_alive(self) -> None:
        if self.destroyed:
            raise Disconnected(f"item {self.name} has been destroyed")

    def __repr__(self) -> str:
        state = "destroyed" if self.destroyed else "removed" if self.removed else "live"
        return f"<DriverItem {self.path} refs={self.refcount} {state}>"


