"""``stillsvc``: the daemon.

    stillsvc --bus system|session|ADDRESS [--config PATH] [--simulate] [--no-udev] [--no-sane]

``--simulate`` adds the built-in simulated scanner ``sim0`` (no configuration
file needed): the embedded default for trying the service out and for tests.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import sys
from collections.abc import Callable

import structlog
from dbus_fast import BusType, RequestNameReply
from dbus_fast.constants import NameFlag

from stillsvc import __version__, notify
from stillsvc import drivers as driver_registry
from stillsvc import log as log_module
from stillsvc.activation import listening_sockets
from stillsvc.common.names import BUS_NAME
from stillsvc.core import config as config_module
from stillsvc.core.config import Config, ConfigError, EsclSettings, SanedSettings
from stillsvc.core.events import EventMonitor
from stillsvc.core.manager import DeviceManager
from stillsvc.core.registry import Registry
from stillsvc.discovery import Backend
from stillsvc.discovery.config import ConfigDiscovery
from stillsvc.discovery.sane import SaneDiscovery, own_server_rule
from stillsvc.discovery.simulate import SimulatedDiscovery
from stillsvc.discovery.udev import UdevDiscovery
from stillsvc.frontends.dbus.agents import AgentBridge
from stillsvc.frontends.dbus.bus import ServiceBus
from stillsvc.frontends.dbus.service import Service
from stillsvc.frontends.escl.mdns import Announcer
from stillsvc.frontends.escl.server import SOCKET_NAME as ESCL_SOCKET
from stillsvc.frontends.escl.server import EsclServer
from stillsvc.frontends.saned.server import SOCKET_NAME as SANED_SOCKET
from stillsvc.frontends.saned.server import SanedServer

log = structlog.get_logger("stillsvc")

EXIT_CONFIG = 2
EXIT_NAME_TAKEN = 3
EXIT_NO_BUS = 4


def _default_dir(kind: str, configured: str, default: str) -> str:
    """systemd's RUNTIME_DIRECTORY/STATE_DIRECTORY first, then the config file, and
    for a user who cannot write the system default, a per-user location."""
    env = os.environ.get(f"{kind.upper()}_DIRECTORY")
    if env:
        return env.split(":")[0]
    if configured != default or os.geteuid() == 0:
        return configured
    base = os.environ.get("XDG_RUNTIME_DIR" if kind == "runtime" else "XDG_STATE_HOME")
    if not base:
        base = f"/tmp/stillsvc-{os.geteuid()}" if kind == "runtime" else os.path.expanduser("~/.local/state")
        return base if kind == "runtime" else os.path.join(base, "stillsvc")
    return os.path.join(base, "stillsvc")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="stillsvc", description="The still-image service for Linux.")
    parser.add_argument("--bus", default="system",
                        help="'system', 'session' or a D-Bus address (default: system)")
    parser.add_argument("--config", metavar="PATH", help="configuration file (TOML)")
    parser.add_argument("--simulate", action="store_true", help="add the simulated scanner 'sim0'")
    parser.add_argument("--udev", action=argparse.BooleanOptionalAction, default=None,
                        help="serve USB devices as udev reports them (default: [udev] discover, true)")
    parser.add_argument("--sane", action=argparse.BooleanOptionalAction, default=None,
                        help="bridge the scanners libsane lists at start (default: [sane] discover, true)")
    parser.add_argument("--authorization", choices=["auto", "polkit", "none"], default="auto",
                        help="who may use the service: ask polkit, or trust every client of the bus "
                             "(default: polkit on the system bus, none on any other)")
    parser.add_argument("--runtime-dir", metavar="DIR", help="lock files live here (default /run/stillsvc)")
    parser.add_argument("--state-dir", metavar="DIR", help="saved registrations live here (default /var/lib/stillsvc)")
    parser.add_argument("--log-level", default=os.environ.get("STILLSVC_LOG_LEVEL", "info"),
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="auto", choices=["auto", "console", "plain", "journal", "json"])
    parser.add_argument("--version", action="version", version=f"stillsvc {__version__}")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> Config:
    cfg = config_module.load(args.config) if args.config else Config()
    return dataclasses.replace(
        cfg,
        runtime_dir=args.runtime_dir or _default_dir("runtime", cfg.runtime_dir, config_module.DEFAULT_RUNTIME_DIR),
        state_dir=args.state_dir or _default_dir("state", cfg.state_dir, config_module.DEFAULT_STATE_DIR),
    )


def discovery_backends(args: argparse.Namespace, cfg: Config, sane_rule: Callable[[str], str]) -> list[Backend]:
    """Where devices come from: the simulated scanner first (with --simulate), then
    the configured devices, then udev (unless --no-udev or [udev] discover = false),
    then libsane's list (unless --no-sane or [sane] discover = false)."""
    backends: list[Backend] = []
    if args.simulate:
        backends.append(SimulatedDiscovery(taken={device.id for device in cfg.devices}))
    backends.append(ConfigDiscovery(cfg.devices))
    udev = args.udev if args.udev is not None else cfg.udev_discover
    if udev:
        backends.append(UdevDiscovery())
    if args.sane if args.sane is not None else cfg.sane.discover:
        configured = frozenset(device.port for device in cfg.devices if device.driver == "sane")
        backends.append(SaneDiscovery(sane_rule, udev=udev, timeout=cfg.sane.timeout_ms / 1000,
                                      configured=configured))
    return backends


#: How long connecting and authenticating to the bus may take before the daemon gives up.
CONNECT_TIMEOUT = 30.0


async def connect(bus: str) -> ServiceBus:
    if bus == "system":
        service_bus = ServiceBus(bus_type=BusType.SYSTEM, auth_timeout=CONNECT_TIMEOUT)
    elif bus == "session":
        service_bus = ServiceBus(bus_type=BusType.SESSION, auth_timeout=CONNECT_TIMEOUT)
    else:
        service_bus = ServiceBus(bus, auth_timeout=CONNECT_TIMEOUT)
    return await asyncio.wait_for(service_bus.connect(), CONNECT_TIMEOUT)


async def run(args: argparse.Namespace, cfg: Config) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    try:
        bus = await connect(args.bus)
    except Exception as e:
        reason = "no answer" if isinstance(e, TimeoutError) else str(e) or type(e).__name__
        print(f"stillsvc: cannot connect to the {args.bus} bus: {reason}", file=sys.stderr)
        return EXIT_NO_BUS

    manager = DeviceManager(cfg, drivers=driver_registry.discover())
    authorization = args.authorization
    if authorization == "auto":
        authorization = "polkit" if args.bus == "system" else "none"
    service = Service(bus, manager, authorization)
    registry = Registry(cfg.state_dir, cfg.limits)
    registry.load()
    monitor = EventMonitor(manager, registry, bus=args.bus)
    AgentBridge(service, monitor)
    await service.start()
    monitor.start()
    saned = None
    # On when configured, or when systemd passes its socket (stillsvc-saned.socket enabled).
    passed = listening_sockets(SANED_SOCKET)
    if cfg.saned is not None or passed:
        saned = SanedServer(manager, cfg.saned or SanedSettings(), passed)
        try:
            await saned.start()
        except OSError as e:
            print(f"stillsvc: the SANE network server cannot listen: {e}", file=sys.stderr)
            await manager.stop()
            bus.disconnect()
            return EXIT_CONFIG
    escl = announcer = None
    passed = listening_sockets(ESCL_SOCKET)
    if cfg.escl is not None or passed:
        escl = EsclServer(manager, cfg.escl or EsclSettings(), passed)
        try:
            await escl.start()
        except OSError as e:  # ssl.SSLError too: an unusable certificate
            print(f"stillsvc: the eSCL server cannot start: {e}", file=sys.stderr)
            if saned is not None:
                await saned.stop()
            await manager.stop()
            bus.disconnect()
            return EXIT_CONFIG
    # Devices before the name, so a client that sees the name sees the devices; a
    # device that fails or hangs while starting is logged and left out.
    # The SANE bridge never bridges the service's own servers (the rule also sees
    # the mDNS names announced later on).
    announced: list[Announcer] = []
    sane_rule = own_server_rule(cfg, lambda: {name for a in announced for name in a.instance_names()})
    sane_driver = manager.drivers.get("sane")
    configure = getattr(sane_driver, "configure", None)
    if callable(configure):
        configure(cfg.sane.timeout_ms / 1000, sane_rule)
    await manager.start(discovery_backends(args, cfg, sane_rule))
    reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
    if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
        print(f"stillsvc: the name {BUS_NAME} is already taken on this bus: another stillsvc is running",
              file=sys.stderr)
        await manager.stop()
        bus.disconnect()
        return EXIT_NAME_TAKEN
    if escl is not None and escl.config.mdns:
        # After the devices: each exported one is announced as it is added.
        announcer = Announcer(escl)
        announced.append(announcer)
        await announcer.start()
    log.info("service ready", bus=args.bus, unique_name=bus.unique_name, devices=len(manager.devices),
             runtime_dir=cfg.runtime_dir, version=__version__)
    notify.notify(f"READY=1\nSTATUS=Serving {len(manager.devices)} device(s)")
    watchdog = None
    interval = notify.watchdog_interval()
    if interval:
        watchdog = loop.create_task(notify.watchdog_loop(interval))

    disconnected = loop.create_task(bus.wait_for_disconnect())
    stopping = loop.create_task(stop.wait())
    await asyncio.wait({disconnected, stopping}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if disconnected.done():
        log.error("lost the bus connection")
        code = 1
    notify.notify("STOPPING=1")
    log.info("service stopping")
    for task in (watchdog, stopping, disconnected):
        if task is not None:
            task.cancel()
    if escl is not None:
        await escl.stop()
    if announcer is not None:
        await announcer.stop()
    if saned is not None:
        await saned.stop()
    service.stop()
    monitor.stop()
    await manager.stop()
    if bus.connected:
        bus.disconnect()
    log.info("service stopped")
    return code


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    log_module.setup(args.log_level, args.log_format)
    try:
        cfg = build_config(args)
    except ConfigError as e:
        print(f"stillsvc: bad configuration: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    try:
        sys.exit(asyncio.run(run(args, cfg)))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
