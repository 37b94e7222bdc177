"""Finding minidrivers (the ``stillsvc.drivers`` entry-point group), and the
matcher that picks the driver for a discovered candidate."""

from __future__ import annotations

import structlog

from stillsvc.common import plugins
from stillsvc.driver import Minidriver, match

log = structlog.get_logger(__name__)

GROUP = "stillsvc.drivers"


def discover() -> dict[str, type[Minidriver]]:
    """Every installed driver class by name. A broken plugin is logged and skipped."""
    found: dict[str, type[Minidriver]] = {}
    for name, cls in plugins.load(GROUP):
        if not (isinstance(cls, type) and issubclass(cls, Minidriver)):
            log.error("driver plugin is not a Minidriver subclass", plugin=name)
            continue
        found[cls.name or name] = cls
    if "sim" not in found:  # running from a source tree without installed metadata
        from stillsvc.drivers.sim import SimulatedScanner

        found["sim"] = SimulatedScanner
    return found


__all__ = ["GROUP", "discover", "match"]
