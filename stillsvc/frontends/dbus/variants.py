"""Converting between plain Python values and D-Bus variants (``a{sv}`` both ways)."""

from __future__ import annotations

from typing import Any

from dbus_fast import Variant

from stillsvc.common.errors import InvalidArgument, quote

_INT_SIGNATURES = frozenset("ynqiuxt")


def to_variant(value: Any) -> Variant:
    if isinstance(value, Variant):
        return value
    if isinstance(value, bool):
        return Variant("b", value)
    if isinstance(value, int):
        if -(2**31) <= value < 2**31:
            return Variant("i", value)
        if value >= 0:
            return Variant("t", value)
        return Variant("x", value)
    if isinstance(value, float):
        return Variant("d", value)
    if isinstance(value, str):
        return Variant("s", value)
    if isinstance(value, (bytes, bytearray)):
        return Variant("ay", bytes(value))
    if isinstance(value, dict):
        return Variant("a{sv}", to_vardict(value))
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, str) for v in value):
            return Variant("as", list(value))
        return Variant("av", [to_variant(v) for v in value])
    if value is None:
        return Variant("s", "")
    raise TypeError(f"no D-Bus variant for {type(value).__name__}")


def to_vardict(values: dict[str, Any]) -> dict[str, Variant]:
    return {str(k): to_variant(v) for k, v in values.items()}


def from_variant(variant: Variant) -> Any:
    """The plain value of a client's variant (``a{sv}`` and ``av`` become dicts and lists).

    A variant inside a variant is refused, not unwrapped: that would let a client
    pass ``v`` → ``v`` → ``u`` where ``u`` is asked for."""
    value = variant.value
    if isinstance(value, Variant):
        raise InvalidArgument(f"type '{variant.signature}' holding a variant: a variant inside a variant is not accepted")
    if variant.signature == "a{sv}":
        return {k: from_variant(v) for k, v in value.items()}
    if variant.signature == "av":
        return [from_variant(v) for v in value]
    return value


def integer_option(options: dict[str, Variant], key: str, default: int, minimum: int, maximum: int) -> int:
    """An integer from an ``a{sv}`` options argument, of any integer D-Bus type."""
    variant = options.get(key)
    if variant is None:
        return default
    if variant.signature not in _INT_SIGNATURES:
        raise InvalidArgument(f"option {key} must be an integer, not type '{variant.signature}'")
    if not minimum <= variant.value <= maximum:
        raise InvalidArgument(f"option {key} must be between {minimum} and {maximum}, not {variant.value}")
    return int(variant.value)


def check_options(options: dict[str, Variant], known: set[str]) -> None:
    unknown = set(options) - known
    if unknown:
        allowed = ", ".join(sorted(known)) or "none"
        raise InvalidArgument(f"unknown option {quote(sorted(unknown)[0])} (known options: {allowed})")
