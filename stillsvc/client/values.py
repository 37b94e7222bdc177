"""Plain Python values to and from D-Bus values.

Callers of the library never see a :class:`dbus_fast.Variant`: replies are
unwrapped into plain values (:func:`plain`), and values to send are wrapped with
the D-Bus type the service declares for them when there is one
(:func:`to_variant`) — an item's ``resolution`` is ``u``, so ``300`` goes as
``u``, not as whatever a guess from the Python type would give.
"""

from __future__ import annotations

from typing import Any

from dbus_fast import Variant

_INTEGER_RANGES = {
    "y": (0, 2**8 - 1),
    "n": (-(2**15), 2**15 - 1),
    "q": (0, 2**16 - 1),
    "i": (-(2**31), 2**31 - 1),
    "u": (0, 2**32 - 1),
    "x": (-(2**63), 2**63 - 1),
    "t": (0, 2**64 - 1),
}


def plain(value: Any) -> Any:
    """A reply's value with its variants unwrapped, dicts and lists all the way down
    (``ay`` stays ``bytes``)."""
    if isinstance(value, Variant):
        return plain(value.value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _fits(signature: str, value: Any) -> bool:
    if signature in _INTEGER_RANGES:
        low, high = _INTEGER_RANGES[signature]
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    if signature == "b":
        return isinstance(value, bool)
    if signature == "d":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if signature in ("s", "o", "g"):
        return isinstance(value, str)
    if signature == "ay":
        return isinstance(value, (bytes, bytearray))
    if signature == "as":
        return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    return False


def guess_variant(value: Any) -> Variant:
    """A variant for a value whose D-Bus type nobody declared, from its Python type."""
    if isinstance(value, Variant):
        return value
    if isinstance(value, bool):
        return Variant("b", value)
    if isinstance(value, int):
        for signature in ("u", "i", "t", "x"):
            if _fits(signature, value):
                return Variant(signature, value)
        raise ValueError(f"{value} does not fit a D-Bus integer")
    if isinstance(value, float):
        return Variant("d", value)
    if isinstance(value, str):
        return Variant("s", value)
    if isinstance(value, (bytes, bytearray)):
        return Variant("ay", bytes(value))
    if isinstance(value, dict):
        return Variant("a{sv}", vardict(value))
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, str) for v in value):
            return Variant("as", list(value))
        return Variant("av", [guess_variant(v) for v in value])
    raise TypeError(f"no D-Bus value for {type(value).__name__}")


def to_variant(value: Any, signature: str | None = None) -> Variant:
    """``value`` as a variant of the declared ``signature`` when it fits that type.

    When it does not fit (a string for an integer property, say) it is sent with
    the type its Python type suggests, so that the service — the one place that
    validates — refuses it with a message naming the property and what is valid,
    rather than this library inventing a second wording.
    """
    if isinstance(value, Variant):
        return value
    if signature is not None and _fits(signature, value):
        if signature == "d":
            value = float(value)
        elif signature == "ay":
            value = bytes(value)
        elif signature == "as":
            value = list(value)
        return Variant(signature, value)
    return guess_variant(value)


def vardict(values: dict[str, Any], signatures: dict[str, str] | None = None) -> dict[str, Variant]:
    """An ``a{sv}`` from plain values, typed by ``signatures`` where given."""
    signatures = signatures or {}
    return {str(k): to_variant(v, signatures.get(str(k))) for k, v in values.items()}
