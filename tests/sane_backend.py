"""libsane's ``test`` backend for the tests of the SANE bridge.

:class:`TestBackendConfig` is a private ``SANE_CONFIG_DIR`` whose ``dll.conf``
enables only ``test`` (the stock configuration enables backends that broadcast
on the network) and whose ``test.conf`` raises ``geometry_max`` to 300 mm, so an
A4 page fits. Give its :attr:`~TestBackendConfig.env` to the daemon (the
bridge's worker processes inherit it) and to every ``scanimage`` a test runs.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

SYSTEM_TEST_CONF = Path("/etc/sane.d/test.conf")


def test_backend_unavailable_reason() -> str | None:
    """Why the SANE bridge tests cannot run here, or None."""
    if shutil.which("scanimage") is None:
        return "scanimage is not installed (Debian package sane-utils)"
    for folder in ("/usr/lib/x86_64-linux-gnu/sane", "/usr/lib/aarch64-linux-gnu/sane", "/usr/lib/sane"):
        if any(Path(folder).glob("libsane-test.so*")):
            return None
    return "libsane's test backend is not installed (Debian package libsane1)"


class TestBackendConfig:
    """A private SANE configuration with only the ``test`` backend."""

    __test__ = False  # not a pytest test class

    def __init__(self, folder: Path, geometry_max: float = 300.0, extra: str = "") -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "dll.conf").write_text("test\n")
        stock = SYSTEM_TEST_CONF.read_text() if SYSTEM_TEST_CONF.exists() else ""
        text = re.sub(r"(?m)^geometry_max.*$", f"geometry_max {geometry_max}", stock)
        if "geometry_max" not in text:
            text += f"\ngeometry_max {geometry_max}\n"
        (self.folder / "test.conf").write_text(text + extra)

    @property
    def env(self) -> dict[str, str]:
        """The environment for the daemon or a SANE program: the private folder only."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SANE_")}
        # No trailing colon: with one, libsane would read the system folders as well.
        env["SANE_CONFIG_DIR"] = str(self.folder)
        return env

    def daemon_env(self, sensors_file: Path | None = None) -> dict[str, str]:
        """:attr:`env`, plus (``sensors_file``) the bridge's simulated sensors: read-only
        options added by the worker whose values are the JSON object in that file."""
        env = {"SANE_CONFIG_DIR": str(self.folder)}
        if sensors_file is not None:
            env["STILLSVC_SANE_FAKE_SENSORS"] = str(sensors_file)
        return env


__all__ = ["TestBackendConfig", "test_backend_unavailable_reason"]
