"""The SANE network protocol, version 3, as libsane's ``net`` backend speaks it.

Encoding (``sanei_wire``): a *word* is 4 bytes, big-endian. A *pointer* is a word
that is 1 for NULL, else 0 followed by the value. An *array* is a length word
then its elements; a *string* is an array of bytes whose length counts the
trailing NUL (NULL is length 0, "" is length 1). Requests have no framing of
their own: a procedure number, then its arguments, so the decoder reads field
by field from the stream, and every length it reads is checked against a limit
before anything is allocated. A request that does not decode ends its
connection (:class:`ProtocolError`); nothing of it reaches the core.
"""

from __future__ import annotations

import asyncio
import enum
import struct
from dataclasses import dataclass

from stillsvc.common.sane import Action, Cap, Frame, Info, Status, Type, Unit, fixed, unfixed

_WORD = struct.Struct(">i")
_UWORD = struct.Struct(">I")

#: The version this server speaks: SANE 1.0, network protocol 3.
VERSION_MAJOR, VERSION_MINOR, PROTOCOL = 1, 0, 3
VERSION_CODE = VERSION_MAJOR << 24 | VERSION_MINOR << 16 | PROTOCOL

#: Limits on what one request may make the server read.
MAX_STRING = 64 * 1024
MAX_ARRAY = 1024 * 1024


class Proc(enum.IntEnum):
    INIT = 0
    GET_DEVICES = 1
    OPEN = 2
    CLOSE = 3
    GET_OPTION_DESCRIPTORS = 4
    CONTROL_OPTION = 5
    GET_PARAMETERS = 6
    START = 7
    CANCEL = 8
    AUTHORIZE = 9
    EXIT = 10


#: START's byte-order word: the data's 16-bit samples are big-endian.
BYTE_ORDER_BIG = 0x4321
BYTE_ORDER_LITTLE = 0x1234


class ProtocolError(Exception):
    """A request that does not decode: the connection is ended."""


#: Once a request has begun, the rest of it must arrive within this many seconds
#: (between requests a client may be silent for as long as it likes).
REQUEST_TIMEOUT = 30.0


class Reader:
    """Reads a request's fields from the control connection, with limits."""

    def __init__(self, stream: asyncio.StreamReader, timeout: float = REQUEST_TIMEOUT) -> None:
        self.stream = stream
        self.timeout = timeout

    async def next_request(self) -> int:
        """The procedure number of the next request, however long it takes to come."""
        return await self._word(None)

    async def word(self) -> int:
        return await self._word(self.timeout)

    async def _word(self, timeout: float | None) -> int:
        try:
            data = await asyncio.wait_for(self.stream.readexactly(4), timeout)
        except asyncio.IncompleteReadError as e:
            raise EOFError("the peer closed the connection") if not e.partial else \
                ProtocolError("the request ended inside a word") from None
        except TimeoutError:
            raise ProtocolError(f"the request stalled for {self.timeout:g} s") from None
        return _WORD.unpack(data)[0]

    async def length(self, limit: int, what: str) -> int:
        n = await self.word()
        if n < 0 or n > limit:
            raise ProtocolError(f"{what}: a length of {n} (at most {limit})")
        return n

    async def string(self, limit: int = MAX_STRING) -> str | None:
        n = await self.length(limit, "string")
        if n == 0:
            return None
        try:
            data = await asyncio.wait_for(self.stream.readexactly(n), self.timeout)
        except asyncio.IncompleteReadError:
            raise ProtocolError("the request ended inside a string") from None
        except TimeoutError:
            raise ProtocolError(f"the request stalled for {self.timeout:g} s") from None
        return data.split(b"\0", 1)[0].decode("utf-8", "replace")

    async def text(self, limit: int = MAX_STRING) -> str:
        return await self.string(limit) or ""

    async def raw(self, size: int) -> bytes:
        """``size`` bytes of an array of bytes whose length word was already read."""
        try:
            return await asyncio.wait_for(self.stream.readexactly(size), self.timeout)
        except asyncio.IncompleteReadError:
            raise ProtocolError("the request ended inside its value") from None
        except TimeoutError:
            raise ProtocolError(f"the request stalled for {self.timeout:g} s") from None

    async def words(self, limit: int) -> list[int]:
        n = await self.length(limit, "word array")
        return [await self.word() for _ in range(n)]


class Writer:
    """Builds one reply, sent in one write."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def word(self, value: int) -> Writer:
        self.parts.append(_UWORD.pack(value & 0xFFFFFFFF))
        return self

    def string(self, value: str | None) -> Writer:
        if value is None:
            return self.word(0)
        data = value.encode("utf-8") + b"\0"
        self.word(len(data))
        self.parts.append(data)
        return self

    def pointer(self, present: bool) -> Writer:
        return self.word(0 if present else 1)

    def words(self, values: list[int]) -> Writer:
        self.word(len(values))
        for v in values:
            self.word(v)
        return self

    def bytes(self) -> bytes:
        return b"".join(self.parts)


@dataclass
class Descriptor:
    """One option descriptor as SANE has it."""

    name: str
    title: str
    desc: str
    type: Type
    unit: Unit = Unit.NONE
    size: int = 4
    cap: Cap = Cap.SOFT_SELECT | Cap.SOFT_DETECT
    #: (min, max, quant) for a range; a list of words; a list of strings.
    range: tuple[int, int, int] | None = None
    word_list: list[int] | None = None
    string_list: list[str] | None = None

    def encode(self, w: Writer) -> None:
        w.pointer(True)
        w.string(self.name).string(self.title).string(self.desc)
        w.word(self.type).word(self.unit).word(self.size).word(self.cap)
        if self.range is not None:
            w.word(1).pointer(True).word(self.range[0]).word(self.range[1]).word(self.range[2])
        elif self.word_list is not None:
            w.word(2).words([len(self.word_list), *self.word_list])
        elif self.string_list is not None:
            w.word(3).word(len(self.string_list) + 1)
            for s in self.string_list:
                w.string(s)
            w.string(None)
        else:
            w.word(0)


@dataclass(frozen=True)
class Parameters:
    format: Frame
    last_frame: bool
    bytes_per_line: int
    pixels_per_line: int
    lines: int
    depth: int

    def encode(self, w: Writer) -> None:
        w.word(self.format).word(int(self.last_frame)).word(self.bytes_per_line)
        w.word(self.pixels_per_line).word(self.lines).word(self.depth)


__all__ = [
    "Action", "BYTE_ORDER_BIG", "BYTE_ORDER_LITTLE", "Cap", "Descriptor", "Frame", "Info", "MAX_ARRAY",
    "MAX_STRING", "PROTOCOL", "Parameters", "Proc", "ProtocolError", "Reader", "Status", "Type", "Unit",
    "VERSION_CODE", "Writer", "fixed", "unfixed",
]
