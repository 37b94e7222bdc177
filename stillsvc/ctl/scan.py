"""stillctl subcommands for the item tree: ``scan``, ``items`` and ``props``.

Registered with :func:`stillsvc.ctl.command` when :mod:`stillsvc.ctl` loads.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from dbus_fast import Message, MessageType, Variant

from stillsvc.common.names import ITEM_IFACE, MANAGER_IFACE, ROOT_PATH, SESSION_IFACE
from stillsvc.ctl.base import Ctl, CtlError, arg, command, plain, print_json, print_table, show

EXTENSIONS = {
    ".png": "png", ".tif": "tiff", ".tiff": "tiff", ".jpg": "jpeg", ".jpeg": "jpeg", ".pdf": "pdf",
    ".pnm": "pnm", ".ppm": "pnm", ".pgm": "pnm", ".pbm": "pnm", ".raw": "raw",
}


async def open_session(ctl: Ctl, device: str, mode: str, wait: float = 0.0) -> str:
    options = {"wait_ms": Variant("u", int(wait * 1000))} if wait else {}
    (path,) = await ctl.call(ROOT_PATH, MANAGER_IFACE, "CreateDevice", "ssa{sv}", [device, mode, options],
                             timeout=wait + 30)
    return path


async def close_session(ctl: Ctl, session: str) -> None:
    try:
        await ctl.call(session, SESSION_IFACE, "Close")
    except CtlError:
        pass


async def item_tree(ctl: Ctl, path: str, depth: int = 0) -> list[tuple[int, str, dict[str, Any]]]:
    (props,) = await ctl.call(path, "org.freedesktop.DBus.Properties", "GetAll", "s", [ITEM_IFACE])
    props = plain(props)
    found = [(depth, path, props)]
    for child in props.get("Children", []):
        found += await item_tree(ctl, child, depth + 1)
    return found


def pick_item(tree: list[tuple[int, str, dict[str, Any]]], wanted: str) -> tuple[str, dict[str, Any]]:
    """An item by kind (flatbed, feeder), name or path (Root/Feeder), case-insensitive."""
    wanted = wanted.lower()
    for _depth, path, props in tree:
        names = {props["Kind"].lower(), props["Name"].lower(), props["ItemPath"].lower(),
                 props["ItemPath"].lower().removeprefix("root/")}
        if wanted in names:
            return path, props
    choices = ", ".join(p["ItemPath"] for _d, _p, p in tree)
    raise CtlError(f"no item {wanted!r} (items: {choices})")


@command("items", "show a device's item tree",
         arg("device", metavar="DEVICE", help="device id (e.g. sim0)"),
         description="Show the items of DEVICE (root, flatbed, feeder, ...), as a fresh session sees them.")
async def cmd_items(ctl: Ctl, args: argparse.Namespace) -> int:
    session = await open_session(ctl, args.device, "status")
    try:
        root = (await ctl.call(session, "org.freedesktop.DBus.Properties", "Get", "ss",
                               [SESSION_IFACE, "RootItem"]))[0].value
        tree = await item_tree(ctl, root)
        if ctl.json:
            print_json([{"depth": d, "path": p, **props} for d, p, props in tree])
        else:
            print_table(["ITEM", "KIND", "CONNECTED"],
                        [["  " * d + props["Name"], props["Kind"], props["Connected"]] for d, _p, props in tree])
    finally:
        await close_session(ctl, session)
    return 0


@command("props", "show an item's properties and their valid values",
         arg("item", metavar="ITEM", help="DEVICE/ITEM, e.g. sim0/Flatbed or sim0/Root/Feeder"),
         description="Show every property of ITEM with its value, type, access and valid values.")
async def cmd_props(ctl: Ctl, args: argparse.Namespace) -> int:
    device, _, wanted = args.item.partition("/")
    if not device or not wanted:
        raise CtlError(f"ITEM is DEVICE/ITEM, e.g. sim0/Flatbed, not {args.item!r}", code=2)
    session = await open_session(ctl, device, "status")
    try:
        root = (await ctl.call(session, "org.freedesktop.DBus.Properties", "Get", "ss",
                               [SESSION_IFACE, "RootItem"]))[0].value
        path, _props = pick_item(await item_tree(ctl, root), wanted)
        (values,) = await ctl.call(path, ITEM_IFACE, "ReadProperties")
        (attributes,) = await ctl.call(path, ITEM_IFACE, "GetPropertyAttributes")
        values, attributes = plain(values), plain(attributes)
        if ctl.json:
            print_json({name: {"value": values[name], **attributes.get(name, {})} for name in values})
        else:
            print_table(["PROPERTY", "VALUE", "TYPE", "ACCESS", "VALID"],
                        [[name, values[name], attributes[name]["type"], attributes[name]["access"],
                          describe_valid(attributes[name]["valid"])] for name in values])
    finally:
        await close_session(ctl, session)
    return 0


def describe_valid(valid: dict[str, Any]) -> str:
    kind = valid.get("kind")
    if kind == "range":
        step = valid["step"]
        return f"{valid['min']:g}..{valid['max']:g}" + (f" step {step:g}" if step not in (0, 1) else "")
    if kind in ("list", "flags"):
        return ", ".join(show(v) for v in valid["values"])
    return "-"


class _ProgressBar:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.shown = False

    def update(self, page: int, percent: int, written: int) -> None:
        if not self.enabled:
            return
        width = 30
        filled = width * percent // 100
        sys.stderr.write(f"\rpage {page} [{'#' * filled}{'.' * (width - filled)}] {percent:3d}%  "
                         f"{written / 1048576:7.1f} MiB")
        sys.stderr.flush()
        self.shown = True

    def done(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


@command("scan", "scan into a file",
         arg("device", metavar="DEVICE", help="device id (e.g. sim0)"),
         arg("-o", "--output", required=True, metavar="FILE", help="where to write the image ('-' for stdout)"),
         arg("--format", choices=["raw", "pnm", "png", "tiff", "jpeg", "pdf"],
             help="image format (default: from FILE's extension, else png)"),
         arg("--resolution", type=int, metavar="DPI", help="resolution in dots per inch"),
         arg("--mode", choices=["color", "gray", "lineart"], help="colour mode"),
         arg("--depth", type=int, choices=[8, 16], help="bits per sample"),
         arg("--source", choices=["flatbed", "feeder", "duplex"], default="flatbed", help="document source"),
         arg("--pages", type=int, metavar="N", help="pages from the feeder (default: until it is empty)"),
         arg("--set", action="append", default=[], metavar="NAME=VALUE",
             help="any other item property, e.g. --set brightness=10 (repeatable)"),
         arg("--wait", type=float, default=30.0, metavar="SECONDS",
             help="how long to wait for the device if another client holds it (default 30)"),
         description="Open DEVICE in data mode, set the scan properties and stream the image into FILE. "
                     "Multi-page formats (tiff, pdf, pnm, raw) take every page from the feeder; "
                     "png and jpeg take one page per scan.")
async def cmd_scan(ctl: Ctl, args: argparse.Namespace) -> int:
    fmt = args.format or EXTENSIONS.get(os.path.splitext(args.output)[1].lower(), "png")
    session = await open_session(ctl, args.device, "data", args.wait)
    fd = -1
    try:
        root = (await ctl.call(session, "org.freedesktop.DBus.Properties", "Get", "ss",
                               [SESSION_IFACE, "RootItem"]))[0].value
        path, props = pick_item(await item_tree(ctl, root), "feeder" if args.source == "duplex" else args.source)
        await ctl.call(path, ITEM_IFACE, "WriteProperties", "a{sv}", [scan_settings(args, fmt)])
        fd = sys.stdout.fileno() if args.output == "-" else os.open(
            args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        bar = _ProgressBar(sys.stderr.isatty() and not ctl.json)
        summary = await transfer(ctl, path, fd, fmt, bar)
        bar.done()
    finally:
        if fd >= 0 and args.output != "-":
            os.close(fd)
        await close_session(ctl, session)
    summary = plain(summary)
    if ctl.json:
        print_json({"output": args.output, **summary})
    else:
        pages = summary["pages"]
        print(f"{args.output}: {summary['format']}, {pages} page{'s' if pages != 1 else ''}, "
              f"{summary['width']}x{summary['height']} {summary['mode']} {summary['depth']}-bit at "
              f"{summary['resolution']} dpi, {summary['bytes']} bytes", file=sys.stderr)
    return 0


def scan_settings(args: argparse.Namespace, fmt: str) -> dict[str, Variant]:
    settings: dict[str, Variant] = {"format": Variant("s", fmt)}
    if args.resolution is not None:
        settings["resolution"] = Variant("u", args.resolution)
    if args.mode is not None:
        settings["mode"] = Variant("s", args.mode)
        if args.mode == "lineart":
            settings["depth"] = Variant("u", 1)
    if args.depth is not None:
        settings["depth"] = Variant("u", args.depth)
    if args.source == "duplex":
        settings["source"] = Variant("s", "duplex")
    if args.source in ("feeder", "duplex"):
        settings["pages"] = Variant("u", args.pages or 0)
    for assignment in args.set:
        name, sep, text = assignment.partition("=")
        if not sep:
            raise CtlError(f"--set takes NAME=VALUE, not {assignment!r}", code=2)
        settings[name] = _guess_variant(text)
    return settings


def _guess_variant(text: str) -> Variant:
    if text.lstrip("-").isdigit():
        return Variant("i" if text.startswith("-") else "u", int(text))
    if text in ("true", "false"):
        return Variant("b", text == "true")
    return Variant("s", text)


async def transfer(ctl: Ctl, item: str, fd: int, fmt: str, bar: _ProgressBar) -> dict[str, Any]:
    """Item.Transfer with our descriptor, progress shown, Ctrl-C turned into Cancel."""
    assert ctl.bus is not None
    bus = ctl.bus

    def on_signal(msg: Message) -> None:
        if msg.message_type is MessageType.SIGNAL and msg.member == "Progress" and msg.path == item:
            bar.update(*msg.body)

    bus.add_message_handler(on_signal)
    msg = Message(destination="org.stillsvc.StillImage1", path=item, interface=ITEM_IFACE, member="Transfer",
                  signature="hsa{sv}", body=[0, fmt, {}], unix_fds=[fd])
    call = asyncio.ensure_future(bus.call(msg))
    try:
        reply = await asyncio.shield(call)
    except asyncio.CancelledError:
        await ctl.call(item, ITEM_IFACE, "Cancel")
        raise
    finally:
        bus.remove_message_handler(on_signal)
    if reply.message_type is MessageType.ERROR:
        raise CtlError(ctl.error_text(reply.error_name or "", reply.body[0] if reply.body else ""),
                       error_name=reply.error_name)
    return reply.body[0]
