"""stillctl's entry point: the parser built from every registered subcommand, and main()."""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

from stillsvc import __version__
from stillsvc.client import Client, ClientError, StillError

# Every subcommand module registers its commands on import.
from stillsvc.ctl import devices, events, scan  # noqa: F401  (each registers its subcommands)
from stillsvc.ctl.base import COMMANDS, PROG, Ctl, CtlError, bus_argument, silence_stdout, warn


def add_global_options(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--bus", default=default, metavar="BUS",
                        help="'system', 'session' or a D-Bus address (default: $STILLSVC_BUS, else system)")
    parser.add_argument("--json", action="store_true", default=default,
                        help="machine-readable output (JSON; JSON lines for monitor)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Control and inspect stillsvc, the still-image service: devices, events, locks.")
    add_global_options(parser, None)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND", required=True)
    parser.subcommand_parsers = {}  # type: ignore[attr-defined]
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description or cmd.help, epilog=cmd.epilog,
                           usage=cmd.usage)
        # The global options are accepted after the subcommand too.
        parser.subcommand_parsers[cmd.name] = p  # type: ignore[attr-defined]
        add_global_options(p, argparse.SUPPRESS)
        for names, options in cmd.arguments:
            p.add_argument(*names, **options)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.json = bool(args.json)
    check = COMMANDS[args.subcommand].check
    problem = check(args) if check else None
    if problem:
        parser.subcommand_parsers[args.subcommand].error(problem)  # type: ignore[attr-defined]
    if args.bus is None:
        args.bus = os.environ.get("STILLSVC_BUS") or "system"
        source = "STILLSVC_BUS"
    else:
        source = "--bus"
    try:
        args.bus = bus_argument(args.bus)
    except argparse.ArgumentTypeError as e:
        parser.error(f"{source}: {e}")
    return args


async def run(args: argparse.Namespace) -> int:
    client = Client(args.bus)
    try:
        await client.connect()
        return await COMMANDS[args.subcommand].run(Ctl(client, json=args.json), args)
    finally:
        client.disconnect()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(run(args))
    except CtlError as e:
        warn(e.message)
        return e.code
    except (StillError, ClientError) as e:
        # The service's answer, or the bus's failure: its message says it all.
        warn(e.message)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (stillctl ... | head): no complaint, like other tools.
        silence_stdout()
        return 0
