"""The SANE standard's numbers (``sane.h``, SANE 1.0): statuses, option types,
units, capabilities, actions, info bits and frame formats.

Two parts of the service speak SANE: the SANE network server (a front-end,
:mod:`stillsvc.frontends.saned`) and the SANE bridge (a driver reaching libsane
through :mod:`stillsvc.driver.sane`). Both take the numbers from here.
"""

from __future__ import annotations

import enum


class Status(enum.IntEnum):
    GOOD = 0
    UNSUPPORTED = 1
    CANCELLED = 2
    DEVICE_BUSY = 3
    INVAL = 4
    EOF = 5
    JAMMED = 6
    NO_DOCS = 7
    COVER_OPEN = 8
    IO_ERROR = 9
    NO_MEM = 10
    ACCESS_DENIED = 11


class Type(enum.IntEnum):
    BOOL = 0
    INT = 1
    FIXED = 2
    STRING = 3
    BUTTON = 4
    GROUP = 5


class Unit(enum.IntEnum):
    NONE = 0
    PIXEL = 1
    BIT = 2
    MM = 3
    DPI = 4
    PERCENT = 5
    MICROSECOND = 6


class Cap(enum.IntFlag):
    SOFT_SELECT = 1
    HARD_SELECT = 2
    SOFT_DETECT = 4
    EMULATED = 8
    AUTOMATIC = 16
    INACTIVE = 32
    ADVANCED = 64


class Action(enum.IntEnum):
    GET = 0
    SET = 1
    AUTO = 2


class Info(enum.IntFlag):
    INEXACT = 1
    RELOAD_OPTIONS = 2
    RELOAD_PARAMS = 4


class Constraint(enum.IntEnum):
    NONE = 0
    RANGE = 1
    WORD_LIST = 2
    STRING_LIST = 3


class Frame(enum.IntEnum):
    GRAY = 0
    RGB = 1
    RED = 2
    GREEN = 3
    BLUE = 4


def fixed(value: float) -> int:
    """A number as SANE_Fixed (16.16)."""
    return int(round(value * 65536))


def unfixed(word: int) -> float:
    return word / 65536


__all__ = ["Action", "Cap", "Constraint", "Frame", "Info", "Status", "Type", "Unit", "fixed", "unfixed"]
