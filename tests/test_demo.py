"""The quick start's check for "already installed": demo.sh installs unless every
command it runs is on PATH and the package imports from outside the source tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import REPO


def installed(path: str) -> int:
    """Run demo.sh's own ``installed`` function with ``path`` as PATH, from the repository root."""
    script = f"source <(sed -n '/^installed()/,/^}}/p' {REPO / 'demo.sh'}); installed"
    return subprocess.run(["bash", "-c", script], cwd=REPO, env={**os.environ, "PATH": path},
                          timeout=60).returncode


def bin_with(tmp_path: Path, names: list[str]) -> str:
    """A PATH of one folder holding only ``names`` (and this Python as python3)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "python3").symlink_to(sys.executable)
    for name in names:
        found = shutil.which(name)
        assert found, f"{name} is not installed"
        (folder / name).symlink_to(found)
    return f"{folder}:/usr/bin:/bin" if names else str(folder)


def test_everything_in_place_counts_as_installed() -> None:
    assert installed(os.environ["PATH"]) == 0


def test_without_the_commands_the_demo_installs(tmp_path: Path) -> None:
    # dbus-daemon, pytest and hypothesis present, the source tree importable from
    # here, but no stillctl on PATH: the demo must not skip the install.
    path = bin_with(tmp_path, ["dbus-daemon", "busctl", "flock", "bash", "sed"])
    assert shutil.which("stillctl", path=path) is None
    assert installed(path) == 1
