"""Running system-wide applications: as ``nobody`` when the service runs as root,
as the service's own user otherwise, with a minimal environment, bounded in number."""

from __future__ import annotations

import asyncio
import os
import pwd
from typing import Any

import structlog

from stillsvc.common.errors import LimitExceeded

log = structlog.get_logger(__name__)

#: System-wide applications the service lets run at once; further events are not delivered.
MAX_RUNNING = 32
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class SystemLauncher:
    """Runs system-wide applications: as ``user`` (default ``nobody``) when the
    service is root, as the service's own user otherwise."""

    def __init__(self, user: str = "nobody") -> None:
        self.as_root = os.geteuid() == 0
        entry = pwd.getpwnam(user) if self.as_root else pwd.getpwuid(os.geteuid())
        self.user = entry.pw_name
        self.uid = entry.pw_uid
        self.gid = entry.pw_gid
        self.home = entry.pw_dir if entry.pw_dir and os.path.isdir(entry.pw_dir) else "/"
        self.running: set[asyncio.subprocess.Process] = set()
        self._waits: set[asyncio.Task[Any]] = set()

    def environment(self) -> dict[str, str]:
        return {"PATH": SYSTEM_PATH, "HOME": self.home, "USER": self.user, "LOGNAME": self.user,
                "LANG": os.environ.get("LANG", "C.UTF-8")}

    async def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> int:
        if len(self.running) >= MAX_RUNNING:
            raise LimitExceeded(f"{len(self.running)} system-wide applications are still running")
        credentials: dict[str, Any] = {}
        if self.as_root:
            credentials = {"user": self.uid, "group": self.gid, "extra_groups": []}
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=2, stderr=2, cwd="/", env={**self.environment(), **env},
            start_new_session=True, umask=0o022, close_fds=True, **credentials)
        self.running.add(proc)
        task = asyncio.get_running_loop().create_task(self._wait(name, proc))
        self._waits.add(task)
        task.add_done_callback(self._waits.discard)
        return proc.pid

    async def _wait(self, name: str, proc: asyncio.subprocess.Process) -> None:
        try:
            code = await proc.wait()
            log.info("system-wide application ended", application=name, pid=proc.pid, status=code)
        finally:
            self.running.discard(proc)


__all__ = ["MAX_RUNNING", "SystemLauncher"]
