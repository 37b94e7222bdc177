"""Loading plugins from an entry-point group: a broken plugin is logged and
skipped, never allowed to stop the service."""

from __future__ import annotations

from collections.abc import Iterator
from importlib.metadata import entry_points
from typing import Any

import structlog

log = structlog.get_logger(__name__)


def load(group: str) -> Iterator[tuple[str, Any]]:
    """``(entry point name, loaded object)`` for every plugin of ``group`` that loads."""
    for ep in entry_points(group=group):
        try:
            yield ep.name, ep.load()
        except Exception as e:  # a third-party plugin must not stop the service
            log.error("plugin failed to load", group=group, plugin=ep.name, error=str(e))
