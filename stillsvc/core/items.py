"""Application items: each client's own view of the driver item tree.

Clients never hold driver items (:mod:`stillsvc.driver.items`) directly: each
gets *application items* linked to them, with its own copy of the properties. A
client can still read its item's properties after the device is gone, while
everything that needs the device fails with ``Disconnected``. Here too: building
a client's tree, attaching items that synchronize added, the rules of the tree
when a device's items change, and the checks of a client's property writes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from stillsvc.common.errors import Disconnected, InvalidArgument, quote
from stillsvc.driver.items import Access, DriverItem, PropertySpec, Valid

__all__ = [
    "AppItem", "PropertyDump", "attach_new_items", "build_app_tree", "check_dependent", "check_writes", "defaults",
    "describe_property", "refresh_read_only", "synchronize_tree",
]


def defaults(specs: Mapping[str, PropertySpec]) -> dict[str, Any]:
    return {name: spec.default for name, spec in specs.items()}


@dataclass
class PropertyDump:
    """Everything a client needs to present one property: value plus attributes."""

    spec: PropertySpec
    value: Any
    extra: dict[str, Any] = field(default_factory=dict)


class AppItem:
    """A client's application item: linked to one driver item, with its own properties.

    Writing changes this copy only; the values reach the device when a transfer
    from this item starts. After the driver item left the tree (unplug, deletion,
    synchronize) the properties can still be read, while every operation that
    needs the device fails with ``Disconnected``.
    """

    def __init__(self, driver_item: DriverItem, parent: AppItem | None = None) -> None:
        driver_item.link()
        self.driver_item = driver_item
        self.parent = parent
        self.name = driver_item.name
        self.kind = driver_item.kind
        self.path = driver_item.path
        self.specs = dict(driver_item.specs)
        self.values = dict(driver_item.values)
        self.children: list[AppItem] = []
        #: Children replaced by synchronize (their driver item was removed and a
        #: new one took its place): still linked until this item is released.
        self.retired: list[AppItem] = []
        self.released = False

    @property
    def connected(self) -> bool:
        return not (self.released or self.driver_item.removed or self.driver_item.destroyed)

    def walk(self) -> Iterator[AppItem]:
        yield self
        for child in self.children:
            yield from child.walk()

    def release(self) -> None:
        """Sever the link (and the children's): the driver item's count drops by one each."""
        for child in self.children + self.retired:
            child.release()
        if not self.released:
            self.released = True
            self.driver_item.unlink()

    def check_device_access(self) -> None:
        if self.released:
            raise Disconnected(f"item {self.path} has been released")
        self.driver_item.check_device_access()


def scan_sources(root: AppItem) -> list[tuple[AppItem, Any]]:
    """Every source of every scanning item under ``root``, as (item, source value):
    an item scans when it has a ``resolution`` and a ``source`` (each of the
    source's valid values is a source, e.g. a feeder's "feeder" and "duplex")."""
    found = []
    for item in root.walk():
        spec = item.specs.get("source")
        if spec is None or "resolution" not in item.specs:
            continue
        for value in getattr(spec.valid, "values", None) or (item.values["source"],):
            found.append((item, value))
    return found


def build_app_tree(driver_root: DriverItem) -> AppItem:
    """Application items for every live driver item under ``driver_root``."""

    def build(item: DriverItem, parent: AppItem | None) -> AppItem:
        app = AppItem(item, parent)
        app.children = [build(child, app) for child in item.children if not child.removed]
        return app

    return build(driver_root, None)


def refresh_read_only(app_root: AppItem, updated: dict[DriverItem, set[str]]) -> None:
    """Application items take the read-only values the device changed (``updated``,
    from :func:`synchronize_tree`: a picture's size, a storage's free space); what a
    client set, and what depends on it, stays."""
    if not updated:
        return
    for app in app_root.walk():
        names = updated.get(app.driver_item)
        if names and app.connected:
            for name in names:
                app.values[name] = app.driver_item.values[name]


def attach_new_items(app_root: AppItem, added: list[DriverItem]) -> list[AppItem]:
    """Give a session application items for driver items that synchronize added."""
    by_path = {app.path: app for app in app_root.walk()}
    created: list[AppItem] = []
    for item in added:  # parents come before their children
        parent = by_path.get(item.parent.path) if item.parent else None
        if parent is None:
            continue
        old = by_path.get(item.path)
        if old is not None:
            if old.connected:
                continue
            # The same place, a new driver item (detached and attached again).
            parent.children.remove(old)
            parent.retired.append(old)
        app = AppItem(item, parent)
        parent.children.append(app)
        by_path[app.path] = app
        created.append(app)
    return created


def synchronize_tree(old_root: DriverItem, new_root: DriverItem,
                     updated: dict[DriverItem, set[str]] | None = None) -> tuple[list[DriverItem], list[DriverItem]]:
    """Bring the tree under ``old_root`` in line with a freshly built ``new_root``.

    Items whose path is in both trees stay (with their links) and take the fresh
    tree's values (what the device says now: a picture's size, a storage's free
    space); items only in the old tree are removed (-1, marked); items only in the
    new tree are added (+1). Returns (added, removed); ``updated`` (if given) gets
    the kept items whose read-only values changed, with their names. ``new_root``
    itself is discarded.
    """
    added: list[DriverItem] = []
    removed: list[DriverItem] = []
    if updated is None:
        updated = {}

    def merge(old: DriverItem, new: DriverItem) -> None:
        if new.specs.keys() == old.specs.keys() and new.values != old.values:
            changed = {name for name, spec in old.specs.items()
                       if spec.access is Access.READ and old.values.get(name) != new.values.get(name)}
            if changed:
                updated[old] = changed
            old.values = new.values
        new_by_name = {child.name: child for child in new.children}
        for child in list(old.children):
            replacement = new_by_name.pop(child.name, None)
            if replacement is None:
                removed.extend(i for i in child.walk())
                child.remove()
            else:
                merge(child, replacement)
        for child in new_by_name.values():
            child.parent = None
            new.children.remove(child)
            _detach_counts(child)
            old.add_child(child)
            for sub in child.walk():
                added.append(sub)

    merge(old_root, new_root)
    return added, removed


def _detach_counts(item: DriverItem) -> None:
    """A subtree moved from a scratch tree into the live one: its tree counts move with it.
    (Children keep their +1 from the scratch tree; the subtree root gets its +1 anew.)"""
    item.refcount -= 1


def check_writes(app: AppItem, writes: Mapping[str, Any], dependent: set[str]) -> dict[str, Any]:
    """Check a client's writes against the item's specs: known, writable, right type,
    and valid — except for ``dependent`` properties, whose valid values depend on
    others and are checked on the final values (:func:`check_dependent`).
    Returns the checked values; raises InvalidArgument naming the property."""
    checked: dict[str, Any] = {}
    for name, value in writes.items():
        spec = app.specs.get(name)
        if spec is None:
            known = ", ".join(sorted(app.specs))
            raise InvalidArgument(f"item {app.name} has no property {quote(name)} (properties: {known})")
        if spec.access is Access.READ:
            raise InvalidArgument(f"property {name} of item {app.name} is read-only")
        checked[name] = spec.check_type(value) if name in dependent else spec.check(value)
    return checked


def check_dependent(values: Mapping[str, Any], valid: Mapping[str, Valid]) -> None:
    for name, allowed in valid.items():
        if allowed is not None and name in values and not allowed.check(values[name]):
            raise InvalidArgument(f"invalid value {quote(values[name])} for property {name}: "
                                  f"valid is {allowed.describe()}")


def describe_property(spec: PropertySpec, valid: Valid, inactive: bool = False) -> dict[str, Any]:
    """A property's attributes as plain values: type, access, valid values,
    description, and whether it has no effect now (``inactive``)."""
    info: dict[str, Any] = {"type": spec.signature, "access": spec.access.value, "description": spec.description,
                            "inactive": inactive}
    if valid is not None:
        info["valid"] = valid.as_dict()
    else:
        info["valid"] = {"kind": "none"}
    return info
