"""Values a client should not send: refused with a proper error, and a short one.

A variant inside a variant is refused as the wrong type rather than unwrapped (a
client could otherwise hide a value's real type behind layers). And no refusal
repeats a client's value in full: a 1 MB argument must not come back as a 1 MB
error message (to the caller, and into every log that records replies).
"""

from __future__ import annotations

import os

from dbus_fast import Variant
from helpers import ITEM, MANAGER, ROOT, SESSION, call, create_session, expect_error, get_property

HUGE = "x" * 1_000_000
SHORT = 300


async def flatbed(bus) -> str:
    session = await create_session(bus, mode="data")
    return f"{await get_property(bus, session, SESSION, 'RootItem')}/Flatbed"


async def resolution(bus, item: str) -> int:
    (values,) = await call(bus, item, ITEM, "ReadProperties")
    return values["resolution"].value


async def test_a_variant_inside_a_variant_is_refused_as_the_wrong_type(daemon, client) -> None:
    item = await flatbed(client)
    before = await resolution(client, item)
    wanted = 300 if before != 300 else 150
    for nested in (Variant("v", Variant("u", wanted)), Variant("v", Variant("v", Variant("u", wanted)))):
        refused = await expect_error("InvalidArgument", call(client, item, ITEM, "WriteProperties", "a{sv}",
                                                             [{"resolution": nested}]))
        assert "resolution" in refused.text and "a variant inside a variant is not accepted" in refused.text, \
            refused.text
        assert await resolution(client, item) == before
    # The same value, sent plainly, is taken.
    await call(client, item, ITEM, "WriteProperties", "a{sv}", [{"resolution": Variant("u", wanted)}])
    assert await resolution(client, item) == wanted


def assert_short(text: str) -> None:
    assert len(text) < SHORT, f"the refusal repeats the input ({len(text)} characters)"
    assert "x" * 100 not in text, text


async def test_a_huge_application_name_gets_a_short_refusal(daemon, client) -> None:
    refused = await expect_error("NotFound", call(client, ROOT, MANAGER, "SetDefaultApplication", "sss",
                                                  ["sim0", "scan-button", HUGE]))
    assert_short(refused.text)


async def test_a_huge_property_value_gets_a_short_refusal(daemon, client) -> None:
    item = await flatbed(client)
    refused = await expect_error("InvalidArgument", call(client, item, ITEM, "WriteProperties", "a{sv}",
                                                         [{"mode": Variant("s", HUGE)}]))
    assert "mode" in refused.text
    assert_short(refused.text)


async def test_a_huge_transfer_format_gets_a_short_refusal(daemon, client) -> None:
    item = await flatbed(client)
    fd = os.open(os.devnull, os.O_WRONLY)
    try:
        refused = await expect_error("InvalidArgument", call(client, item, ITEM, "Transfer", "hsa{sv}",
                                                             [0, HUGE, {}], unix_fds=[fd]))
    finally:
        os.close(fd)
    assert "format" in refused.text
    assert_short(refused.text)
