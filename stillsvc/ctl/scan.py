"""stillctl subcommands for the item tree: ``scan``, ``get``, ``delete``, ``capture``, ``items`` and ``props``.

Registered with :func:`stillsvc.ctl.command` when :mod:`stillsvc.ctl` loads.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from stillsvc.client import ItemInfo, Progress, Session
from stillsvc.ctl.base import Ctl, CtlError, arg, command, print_json, print_table, show

EXTENSIONS = {
    ".png": "png", ".tif": "tiff", ".tiff": "tiff", ".jpg": "jpeg", ".jpeg": "jpeg", ".pdf": "pdf",
    ".pnm": "pnm", ".ppm": "pnm", ".pgm": "pnm", ".pbm": "pnm", ".raw": "raw",
}


def pick_item(tree: list[ItemInfo], wanted: str) -> ItemInfo:
    """An item by kind (flatbed, feeder), name or path (Root/Feeder), case-insensitive."""
    wanted = wanted.lower()
    for info in tree:
        names = {info.kind.lower(), info.name.lower(), info.item_path.lower(),
                 info.item_path.lower().removeprefix("root/")}
        if wanted in names:
            return info
    choices = ", ".join(info.item_path for info in tree)
    raise CtlError(f"no item {wanted!r} (items: {choices})")


@command("items", "show a device's item tree",
         arg("device", metavar="DEVICE", help="device id (e.g. sim0)"),
         description="Show the items of DEVICE (root, flatbed, feeder, ...), as a fresh session sees them.")
async def cmd_items(ctl: Ctl, args: argparse.Namespace) -> int:
    async with await ctl.client.manager.open_session(args.device, "status") as session:
        tree = await session.items()
    if ctl.json:
        print_json([{"depth": i.depth, "path": i.path, **i.as_dict()} for i in tree])
    else:
        print_table(["ITEM", "KIND", "CONNECTED"], [["  " * i.depth + i.name, i.kind, i.connected] for i in tree])
    return 0


@command("props", "show an item's properties and their valid values",
         arg("item", metavar="ITEM", help="DEVICE/ITEM, e.g. sim0/Flatbed or sim0/Root/Feeder"),
         description="Show every property of ITEM with its value, type, access and valid values.")
async def cmd_props(ctl: Ctl, args: argparse.Namespace) -> int:
    device, _, wanted = args.item.partition("/")
    if not device or not wanted:
        raise CtlError(f"ITEM is DEVICE/ITEM, e.g. sim0/Flatbed, not {args.item!r}", code=2)
    async with await ctl.client.manager.open_session(device, "status") as session:
        item = await session.item(pick_item(await session.items(), wanted).path)
        values = await item.read()
        attributes = {name: a.as_dict() for name, a in (await item.attributes()).items()}
    if ctl.json:
        print_json({name: {"value": values[name], **attributes.get(name, {})} for name in values})
    else:
        print_table(["PROPERTY", "VALUE", "TYPE", "ACCESS", "VALID"],
                    [[name, values[name], attributes[name]["type"],
                      attributes[name]["access"] + (" (inactive)" if attributes[name].get("inactive") else ""),
                      describe_valid(attributes[name]["valid"])] for name in values])
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

    def update(self, progress: Progress) -> None:
        if not self.enabled:
            return
        width = 30
        filled = width * progress.percent // 100
        sys.stderr.write(f"\rpage {progress.page} [{'#' * filled}{'.' * (width - filled)}] "
                         f"{progress.percent:3d}%  {progress.bytes / 1048576:7.1f} MiB")
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
    session = await ctl.client.manager.open_session(args.device, "data", wait=args.wait)
    async with session:
        summary = await scan_into(ctl, session, args, fmt)
    if ctl.json:
        print_json({"output": args.output, **summary})
    else:
        pages = summary["pages"]
        print(f"{args.output}: {summary['format']}, {pages} page{'s' if pages != 1 else ''}, "
              f"{summary['width']}x{summary['height']} {summary['mode']} {summary['depth']}-bit at "
              f"{summary['resolution']} dpi, {summary['bytes']} bytes", file=sys.stderr)
    return 0


async def scan_into(ctl: Ctl, session: Session, args: argparse.Namespace, fmt: str) -> dict[str, Any]:
    """Set the item's properties, then stream its image into the output (Ctrl-C cancels it)."""
    wanted = "feeder" if args.source == "duplex" else args.source
    item = await session.item(pick_item(await session.items(), wanted).path)
    await item.write(scan_settings(args, fmt))
    bar = _ProgressBar(sys.stderr.isatty() and not ctl.json)
    target = sys.stdout.fileno() if args.output == "-" else args.output
    summary = await item.transfer(target, fmt, progress=bar.update)
    bar.done()
    return summary.as_dict()


def _split_item(text: str) -> tuple[str, str]:
    device, _, wanted = text.partition("/")
    if not device or not wanted:
        raise CtlError(f"ITEM is DEVICE/ITEM, e.g. camera/Root/store-00010001/DCIM/IMG_0001.JPG, not {text!r}", code=2)
    return device, wanted


@command("get", "copy a camera's picture (or any file item) out",
         arg("item", metavar="ITEM", help="DEVICE/ITEM, e.g. camera/Root/store-00010001/DCIM/IMG_0001.JPG"),
         arg("-o", "--output", metavar="FILE", help="where to write it (default: its own name here; '-' for stdout)"),
         arg("--thumbnail", action="store_true", help="the camera's thumbnail of it instead"),
         arg("--offset", type=int, metavar="BYTES", help="only from this byte on (to resume a copy)"),
         arg("--length", type=int, metavar="BYTES", help="only this many bytes"),
         arg("--wait", type=float, default=30.0, metavar="SECONDS",
             help="how long to wait for the device if another client holds it (default 30)"),
         description="Open the device in data mode and copy ITEM's bytes, unchanged, into FILE.")
async def cmd_get(ctl: Ctl, args: argparse.Namespace) -> int:
    device, wanted = _split_item(args.item)
    session = await ctl.client.manager.open_session(device, "data", wait=args.wait)
    async with session:
        info = pick_item(await session.items(), wanted)
        item = await session.item(info.path)
        output = args.output or (("thumb-" if args.thumbnail else "") + info.name)
        bar = _ProgressBar(sys.stderr.isatty() and not ctl.json)
        target = sys.stdout.fileno() if output == "-" else output
        summary = await item.transfer(target, "thumbnail" if args.thumbnail else "native", progress=bar.update,
                                      offset=args.offset, length=args.length)
        bar.done()
    if ctl.json:
        print_json({"output": output, **summary.as_dict()})
    else:
        print(f"{output}: {summary.content_type}, {summary.bytes} bytes", file=sys.stderr)
    return 0


@command("delete", "delete a camera's picture",
         arg("item", metavar="ITEM", help="DEVICE/ITEM, e.g. camera/Root/store-00010001/DCIM/IMG_0001.JPG"),
         arg("--wait", type=float, default=30.0, metavar="SECONDS",
             help="how long to wait for the device if another client holds it (default 30)"),
         description="Open the device in data mode and remove ITEM from it (and from its item tree).")
async def cmd_delete(ctl: Ctl, args: argparse.Namespace) -> int:
    device, wanted = _split_item(args.item)
    session = await ctl.client.manager.open_session(device, "data", wait=args.wait)
    async with session:
        info = pick_item(await session.items(), wanted)
        await (await session.item(info.path)).delete()
    if not ctl.json:
        print(f"deleted {info.item_path}", file=sys.stderr)
    return 0


@command("capture", "make a camera take a picture",
         arg("device", metavar="DEVICE", help="the camera's device id"),
         arg("--wait", type=float, default=30.0, metavar="SECONDS",
             help="how long to wait for the device if another client holds it (default 30)"),
         description="Open the camera in data mode and have it take a picture; the picture comes as a "
                     "new-picture event (see 'stillctl events', 'stillctl register').")
async def cmd_capture(ctl: Ctl, args: argparse.Namespace) -> int:
    session = await ctl.client.manager.open_session(args.device, "data", wait=args.wait)
    async with session:
        await (await session.root()).capture()
    if not ctl.json:
        print(f"{args.device}: picture taken", file=sys.stderr)
    return 0


def scan_settings(args: argparse.Namespace, fmt: str) -> dict[str, Any]:
    """The item properties to write, as plain values (the client library types them)."""
    settings: dict[str, Any] = {"format": fmt}
    if args.resolution is not None:
        settings["resolution"] = args.resolution
    if args.mode is not None:
        settings["mode"] = args.mode
        if args.mode == "lineart":
            settings["depth"] = 1
    if args.depth is not None:
        settings["depth"] = args.depth
    if args.source == "duplex":
        settings["source"] = "duplex"
    if args.source in ("feeder", "duplex"):
        settings["pages"] = args.pages or 0
    for assignment in args.set:
        name, sep, text = assignment.partition("=")
        if not sep:
            raise CtlError(f"--set takes NAME=VALUE, not {assignment!r}", code=2)
        settings[name] = _guess_value(text)
    return settings


def _guess_value(text: str) -> int | bool | str:
    """``--set`` values: integers, true/false, else text."""
    if text.lstrip("-").isdigit():
        return int(text)
    if text in ("true", "false"):
        return text == "true"
    return text
