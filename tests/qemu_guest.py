"""Run a command inside a small QEMU guest that has a real PTP responder on USB.

The guest is QEMU (TCG; KVM is not needed) with:

* QEMU's ``usb-mtp`` device on an xHCI controller: a PTP/MTP responder serving a
  folder of the host (``mtp_root``), interface class 06/01/01, ids
  ``MTP_VENDOR_ID:MTP_PRODUCT_ID`` (46f4:0004), optionally writing a
  usbmon-format capture of its traffic (``pcap``);
* the host's root filesystem shared **read-only** over virtio-9p (QEMU's
  ``readonly=on``: the guest cannot change a host file, even as root after a
  remount), so the guest runs the host's own python3, this checkout, libusb,
  pyusb, dbus-daemon, systemd-udevd...;
* **no network**: ``-nodefaults -nic none`` (the guest has only ``lo``);
* the distribution's kernel (``/boot/vmlinuz-<v>``, Debian ``linux-image-amd64``;
  its uncompressed ELF is cached and booted by the PVH entry point, 4 s faster
  under TCG) and a tiny initramfs made here from ``busybox-static`` and the
  kernel's own modules (``/lib/modules/<v>``, dependencies from ``modules.dep``).

The initramfs ``/init`` loads the virtio, 9p, overlay and xHCI modules, mounts the
host root (by default with a tmpfs overlay on top, so the guest may write anywhere
and nothing of it reaches the host; ``writable_root=False`` for the bare read-only
9p mount with tmpfs on ``/tmp`` and ``/var/tmp``), mounts proc, sysfs, devtmpfs,
devpts, a fresh tmpfs on ``/run`` and ``/dev/shm`` in it, waits for usb-mtp to
enumerate, and enters it with ``switch_root`` (a chroot that is the real root: PID 1
lives there too, so systemd's tools such as ``udevadm trigger`` do not refuse to
run "in a chroot"). PID 1 then runs the command as root, stdin ``/dev/null``,
stdout and stderr together on a virtio-serial port that the host reads line by
line, sends the exit status on a second port, and powers off (``poweroff -f``).
QEMU is killed when the run outlasts ``timeout``; should the host side be gone, the
guest powers itself off ``timeout`` + 5 s after the command started. ``modprobe`` works in the guest (the host's
kmod and ``/lib/modules`` are the guest kernel's), e.g. ``modprobe usbmon``.
``/run`` is empty but for the harness's ``/run/stillsvc-guest``: make ``/run/dbus``
before ``dbus-daemon --system``.

Use::

    from qemu_guest import Guest, unavailable_reason

    with Guest(mtp_root=tmp_path / "camera", pcap=tmp_path / "mtp.pcap") as guest:
        result = guest.run([sys.executable, "-c", "print('hi')"])
    assert result.returncode == 0 and result.output == "hi\\n"

    # Interacting with the guest while it runs:
    with Guest(mtp_root=folder) as guest:
        running = guest.start([sys.executable, "guest_script.py"])
        running.wait_for(r"^READY$", timeout=60)
        (folder / "new.jpg").write_bytes(b"...")   # usb-mtp sends ObjectAdded
        running.wait_for(r"^DONE")
        result = running.result()

Pass ``sys.executable`` rather than ``python3`` (which may be a pyenv shim). Each
:meth:`Guest.run` / :meth:`Guest.start` boots a fresh guest: about 5 s from starting
QEMU to the command on an idle machine, twice that when it is busy. Files reach the
guest read-only through the host root (a test's ``tmp_path`` is visible at the same
path with the default overlay; with ``writable_root=False`` the host's ``/tmp`` is
hidden by a tmpfs), or through PTP.

Generated files live in ``$STILLSVC_QEMU_DIR`` (default ``/var/tmp/stillsvc-qemu``):
the cached initramfs and vmlinux (66 MB), rebuilt when the kernel, busybox or this
file's scripts change, and each guest's work folder (sockets, console log, QEMU log,
the per-run initrd), removed when the :class:`Guest` is closed. ``$QEMU`` names
another ``qemu-system-x86_64``.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import lzma
import os
import re
import shlex
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

#: usb-mtp's USB ids (QEMU hw/usb/dev-mtp.c: vendor "QEMU", product "QEMU filesharing").
MTP_VENDOR_ID = 0x46F4
MTP_PRODUCT_ID = 0x0004

CACHE_DIR = Path(os.environ.get("STILLSVC_QEMU_DIR", "/var/tmp/stillsvc-qemu"))
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
#: Loaded by the initramfs, in this order (with their dependencies from modules.dep).
MODULES = ("virtio_pci", "virtio_console", "virtio_rng", "9pnet_virtio", "9p", "overlay", "xhci_pci")
#: The QEMU devices the harness uses (checked in ``-device help``).
QEMU_DEVICES = ("usb-mtp", "qemu-xhci", "virtio-9p-pci", "virtio-serial-pci", "virtserialport")
OUT_PORT = "org.stillsvc.out"
CTL_PORT = "org.stillsvc.ctl"
#: The checkout this file is in (the guest sees it at the same path).
DEFAULT_CWD = str(Path(__file__).resolve().parent.parent)
#: Bumped when the initramfs layout changes, to rebuild cached ones.
RECIPE_VERSION = 1

INIT_SCRIPT = r"""#!/bin/busybox sh
# /init of the stillsvc QEMU guest (made by tests/qemu_guest.py).
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
. /job/config

log() { echo "stillsvc-init: $*" > /dev/console; }
ctl() { [ -n "$CTL" ] && echo "$*" > "$CTL"; log "$*"; }
halt_now() { sync; poweroff -f; sleep 1; reboot -f; }
fail() { ctl "FAIL $*"; halt_now; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }

for m in $MODULES; do modprobe "$m" || log "modprobe $m failed"; done

find_port() {
    for p in /sys/class/virtio-ports/*; do
        [ "$(cat "$p/name" 2>/dev/null)" = "$1" ] && { echo "/dev/${p##*/}"; return 0; }
    done
    return 1
}
i=0
while :; do
    CTL=$(find_port "$CTL_PORT") && OUT=$(find_port "$OUT_PORT") && [ -c "$CTL" ] && [ -c "$OUT" ] && break
    i=$((i + 1)); [ $i -gt 200 ] && { CTL=; fail "virtio ports $CTL_PORT/$OUT_PORT not found"; }
    sleep 0.05
done
ctl "KERNEL $(uptime_s)"

R=/host
if [ "$ROOT" = overlay ]; then
    # The host root read-only below, the guest's changes in a tmpfs above it.
    mkdir -p /lower /rw
    mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=512000,cache=loose hostroot /lower \
        || fail "cannot mount the host root over 9p"
    mount -t tmpfs -o mode=755 tmpfs /rw && mkdir -p /rw/upper /rw/work || fail "tmpfs for the overlay"
    mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay $R \
        || fail "cannot mount the overlay on the host root"
    TMPFS="/run"
else
    mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=512000,cache=loose hostroot $R \
        || fail "cannot mount the host root over 9p"
    TMPFS="/run /tmp /var/tmp"
fi
mount -t proc proc $R/proc || fail "mount proc"
mount -t sysfs sysfs $R/sys || fail "mount sysfs"
mount -t devtmpfs devtmpfs $R/dev || fail "mount devtmpfs"
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
for d in $TMPFS; do
    mode=1777; [ $d = /run ] && mode=755
    mount -t tmpfs -o mode=$mode tmpfs $R$d || fail "tmpfs on $d"
done
mkdir -p $R/run/lock $R/run/stillsvc-guest
chmod 1777 $R/run/lock
cp /job/run.sh $R/run/stillsvc-guest/run.sh || fail "copy the job"

# Wait for the USB devices the host asked for (vendor:product, lowercase hex), interfaces included.
usb_present() {
    for d in /sys/bus/usb/devices/*; do
        [ -f "$d/idVendor" ] || continue
        [ "$(cat "$d/idVendor"):$(cat "$d/idProduct")" = "$1" ] && [ -d "$d/${d##*/}:1.0" ] && return 0
    done
    return 1
}
for want in $WAIT_USB; do
    i=0
    until usb_present "$want"; do
        i=$((i + 1)); [ $i -gt 300 ] && fail "USB device $want did not appear"
        sleep 0.05
    done
done

# Stage 2 runs as PID 1 in the host root (switch_root, not chroot: systemd's tools
# refuse to work "in a chroot"), with busybox and the job on the /run tmpfs.
G=$R/run/stillsvc-guest
cp /bin/busybox /stage2 $G/ || fail "copy stage 2"
printf 'CTL=%s\nOUT=%s\nWATCHDOG=%s\n' "$CTL" "$OUT" "$WATCHDOG" > $G/env
exec switch_root $R /run/stillsvc-guest/busybox sh /run/stillsvc-guest/stage2
fail "switch_root failed"
"""

STAGE2_SCRIPT = r"""# Stage 2 of the stillsvc QEMU guest: PID 1 in the host root; runs the job, powers off.
B=/run/stillsvc-guest/busybox
. /run/stillsvc-guest/env
ctl() { echo "$*" > "$CTL"; echo "stillsvc-init: $*" > /dev/console; }
halt_now() { $B sync; $B poweroff -f; $B sleep 1; $B reboot -f; }
uptime_s() { $B cut -d' ' -f1 /proc/uptime; }

# If the host side is gone (QEMU orphaned), the guest still ends by itself.
if [ -n "$WATCHDOG" ]; then
    ( $B sleep "$WATCHDOG"; ctl "FAIL guest watchdog: still running after $WATCHDOG s"; halt_now ) &
fi

ctl "READY $(uptime_s)"
/bin/sh /run/stillsvc-guest/run.sh < /dev/null > "$OUT" 2>&1
ctl "EXIT $? $(uptime_s)"
halt_now
"""


# --------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class Kernel:
    version: str
    image: Path
    modules: Path  # /lib/modules/<version>


def find_kernel() -> Kernel | None:
    """The newest ``/boot/vmlinuz-<v>`` that is readable and has ``/lib/modules/<v>/modules.dep``."""
    found = []
    for image in Path("/boot").glob("vmlinuz-*"):
        version = image.name[len("vmlinuz-"):]
        modules = Path("/lib/modules") / version
        if os.access(image, os.R_OK) and (modules / "modules.dep").is_file():
            found.append(Kernel(version, image, modules))
    if not found:
        return None
    return max(found, key=lambda k: _version_key(k.version))


def _version_key(version: str) -> list[tuple[int, object]]:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-+~]", version)]


def _is_static_elf(path: str) -> bool:
    """True for an ELF executable without a program interpreter (statically linked)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:  # ELF64 only
                return False
            endian = "<" if head[5] == 1 else ">"
            phoff, = struct.unpack_from(endian + "Q", head, 32)
            phentsize, phnum = struct.unpack_from(endian + "HH", head, 54)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    return all(struct.unpack_from(endian + "I", table, i * phentsize)[0] != 3  # PT_INTERP
               for i in range(phnum))


def find_busybox() -> str | None:
    for candidate in BUSYBOX_CANDIDATES:
        if os.path.isfile(candidate) and _is_static_elf(candidate):
            return candidate
    return None


def qemu_binary() -> str | None:
    return shutil.which(os.environ.get("QEMU", "qemu-system-x86_64"))


@functools.cache
def _qemu_devices(qemu: str) -> str:
    try:
        out = subprocess.run([qemu, "-nodefaults", "-machine", "none", "-device", "help"],
                             check=False, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"!{e}"
    return out.stdout + out.stderr


def _module_closure(kernel: Kernel, names: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """The .ko paths (relative to /lib/modules/<v>) of ``names`` and their dependencies.

    Returns the paths in load order and the modules.dep lines for them.
    """
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (kernel.modules / "modules.dep").read_text().splitlines():
        target, _, rest = line.partition(":")
        deps[target] = rest.split()
        by_name[_module_name(target)] = target
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in reversed(deps[path]):  # modules.dep lists the deepest last
            visit(dep)
        order.append(path)

    for name in names:
        path = by_name.get(name.replace("-", "_"))
        if path is None:
            builtin = kernel.modules / "modules.builtin"
            if builtin.is_file() and any(_module_name(p) == name.replace("-", "_")
                                         for p in builtin.read_text().split()):
                continue  # built into the kernel
            raise LookupError(f"kernel module {name} not found in {kernel.modules}/modules.dep")
        visit(path)
    return order, {p: deps[p] for p in order}


def _module_name(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    name = re.sub(r"\.ko(\.(xz|gz|zst))?$", "", name)
    return name.replace("-", "_")


def unavailable_reason() -> str | None:
    """Why the guest cannot run here (a sentence naming what to install), or None."""
    qemu = qemu_binary()
    if qemu is None:
        return "no qemu-system-x86_64 (Debian package qemu-system-x86)"
    devices = _qemu_devices(qemu)
    missing = [d for d in QEMU_DEVICES if f'"{d}"' not in devices]
    if missing:
        return f"{qemu} lacks the devices {', '.join(missing)}"
    kernel = find_kernel()
    if kernel is None:
        return ("no readable kernel /boot/vmlinuz-<v> with /lib/modules/<v>/modules.dep "
                "(Debian package linux-image-amd64)")
    try:
        _module_closure(kernel, MODULES)
    except LookupError as e:
        return str(e)
    if find_busybox() is None:
        return "no statically linked busybox (Debian package busybox-static)"
    return None


# --------------------------------------------------------------------------- initramfs


class _Cpio:
    """A cpio archive in the "newc" format, as the kernel unpacks it."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name_b = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_b), 0)
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08X" % v for v in fields) + name_b)
        self._pad()
        self.buf.write(data)
        self._pad()

    def _pad(self) -> None:
        self.buf.write(b"\0" * (-self.buf.tell() % 4))

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def base_initramfs() -> Path:
    """The cached initramfs (gzip cpio) for the installed kernel, built if needed."""
    kernel = find_kernel()
    busybox = find_busybox()
    if kernel is None or busybox is None:
        raise RuntimeError(unavailable_reason() or "no kernel or busybox")
    order, dep_lines = _module_closure(kernel, MODULES)
    key = hashlib.sha256()
    for part in (str(RECIPE_VERSION), INIT_SCRIPT, STAGE2_SCRIPT, kernel.version, " ".join(MODULES)):
        key.update(part.encode() + b"\0")
    for path in [kernel.image, Path(busybox), kernel.modules / "modules.dep"]:
        st = path.stat()
        key.update(f"{path}:{st.st_size}:{st.st_mtime_ns}\0".encode())
    target = CACHE_DIR / f"initramfs-{kernel.version}-{key.hexdigest()[:16]}.cpio.gz"
    if target.is_file():
        return target
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    archive = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "host", "job", "lib", "lib/modules",
              f"lib/modules/{kernel.version}"):
        archive.dir(d)
    archive.chardev("dev/console", 5, 1)
    archive.chardev("dev/null", 1, 3, 0o666)
    archive.file("bin/busybox", Path(busybox).read_bytes(), 0o755)
    archive.file("init", INIT_SCRIPT.encode(), 0o755)
    archive.file("stage2", STAGE2_SCRIPT.encode(), 0o755)
    made = set()
    for rel in order:
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = f"lib/modules/{kernel.version}/" + "/".join(parts[:i])
            if d not in made:
                archive.dir(d)
                made.add(d)
        archive.file(f"lib/modules/{kernel.version}/{rel}", (kernel.modules / rel).read_bytes())
    archive.file(f"lib/modules/{kernel.version}/modules.dep",
                 "".join(f"{p}: {' '.join(d)}\n".replace(": \n", ":\n") for p, d in dep_lines.items()).encode())
    _write_atomically(target, gzip.compress(archive.finish(), compresslevel=6))
    for old in CACHE_DIR.glob("initramfs-*.cpio.gz"):  # other kernels or recipes
        if old != target:
            old.unlink(missing_ok=True)
    return target


def boot_image(kernel: Kernel) -> Path:
    """What QEMU boots: the kernel's uncompressed ELF ``vmlinux`` (cached), else the bzImage.

    A ``CONFIG_PVH`` kernel boots from its ELF image by the PVH entry point, without
    firmware real-mode setup and without decompressing itself, which under TCG takes
    about 4 s of the boot. Debian's ``vmlinuz`` holds the ELF compressed with xz.
    """
    config = Path("/boot") / f"config-{kernel.version}"
    try:
        if "\nCONFIG_PVH=y\n" not in config.read_text():
            return kernel.image
    except OSError:
        return kernel.image
    st = kernel.image.stat()
    tag = hashlib.sha256(f"{kernel.image}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = CACHE_DIR / f"vmlinux-{kernel.version}-{tag}"
    if target.is_file():
        return target
    data = kernel.image.read_bytes()
    start = data.find(b"\xfd7zXZ\x00")
    while start >= 0:
        try:
            elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:])
        except lzma.LZMAError:
            elf = b""
        if elf[:4] == b"\x7fELF":
            break
        start = data.find(b"\xfd7zXZ\x00", start + 1)
    else:
        return kernel.image
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    _write_atomically(target, elf)
    for old in CACHE_DIR.glob("vmlinux-*"):
        if old != target:
            old.unlink(missing_ok=True)
    return target


def _write_atomically(target: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def _job_archive(script: str, config: dict[str, str]) -> bytes:
    archive = _Cpio()
    archive.dir("job")
    archive.file("job/run.sh", script.encode(), 0o755)
    archive.file("job/config", "".join(f"{k}={shlex.quote(v)}\n" for k, v in config.items()).encode())
    return gzip.compress(archive.finish(), compresslevel=1)


def _job_script(argv: Sequence[str], env: dict[str, str], cwd: str) -> str:
    assignments = " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())
    return (f"cd {shlex.quote(cwd)} || exit 127\n"
            f"exec env -i {assignments} {' '.join(shlex.quote(a) for a in argv)}\n")


def default_env() -> dict[str, str]:
    """The environment a command gets unless told otherwise (``env`` adds to it)."""
    path = [os.path.dirname(sys.executable), "/usr/local/sbin", "/usr/local/bin",
            "/usr/sbin", "/usr/bin", "/sbin", "/bin"]
    return {"PATH": ":".join(dict.fromkeys(path)), "HOME": "/root", "LANG": "C.UTF-8",
            "TERM": "dumb", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}


# --------------------------------------------------------------------------- running


class GuestError(RuntimeError):
    """The guest did not get to run the command, or ended before a wait_for matched."""


@dataclass
class GuestResult:
    """How a guest run ended.

    ``returncode`` is the command's exit status (None when the guest never ran it
    to the end: a timeout or a failure before it started, see ``error``).
    ``output`` is stdout and stderr together, as the command wrote them.
    ``boot_seconds``: from starting QEMU to the command starting; ``run_seconds``:
    from starting QEMU to QEMU's exit. ``console`` is the serial console (kernel
    and init messages), for diagnosis.
    """

    returncode: int | None
    output: str
    output_bytes: bytes
    timed_out: bool
    boot_seconds: float | None
    run_seconds: float
    console: str
    qemu_log: str
    error: str | None = None
    guest_uptime: dict[str, float] = field(default_factory=dict)

    def check(self) -> GuestResult:
        """Raise GuestError unless the command ran and exited 0; returns self."""
        if self.returncode != 0:
            raise GuestError(f"guest command failed: {self.describe()}")
        return self

    def describe(self) -> str:
        why = self.error or ("timed out" if self.timed_out else f"exit status {self.returncode}")
        return (f"{why}\n--- output ---\n{self.output[-4000:]}\n--- console ---\n{self.console[-3000:]}"
                f"\n--- qemu ---\n{self.qemu_log[-2000:]}")


class RunningGuest:
    """A guest running a command: its output line by line while it runs, then its result."""

    def __init__(self, qemu_args: list[str], initrd: Path, workdir: Path, timeout: float,
                 on_line: Callable[[str], None] | None) -> None:
        self.workdir = workdir
        self.timeout = timeout
        self._on_line = on_line
        self._cond = threading.Condition()
        self._lines: list[str] = []
        self._cursor = 0
        self._raw = bytearray()
        self._out_done = False
        self._ctl: dict[str, str] = {}
        self._result: GuestResult | None = None
        self._callback_error: BaseException | None = None
        self._console = workdir / "console.log"
        self._qemu_log = workdir / "qemu.log"
        listeners = {}
        for name in ("out", "ctl"):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(str(workdir / f"{name}.sock"))
            s.listen(1)
            listeners[name] = s
        self._t0 = time.monotonic()
        self._ready_at: float | None = None
        try:
            with open(self._qemu_log, "wb") as log:
                self.proc = subprocess.Popen(qemu_args + ["-initrd", str(initrd)], stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=subprocess.STDOUT)
        except BaseException:
            for s in listeners.values():
                s.close()
            raise
        self._threads = [threading.Thread(target=self._read_out, args=(listeners["out"],), daemon=True),
                         threading.Thread(target=self._read_ctl, args=(listeners["ctl"],), daemon=True)]
        for t in self._threads:
            t.start()
        self._deadline = self._t0 + timeout

    # -- readers (threads)

    def _accept(self, listener: socket.socket) -> socket.socket | None:
        listener.settimeout(0.2)
        try:
            while self.proc.poll() is None and time.monotonic() < self._t0 + self.timeout:
                try:
                    conn, _ = listener.accept()
                    conn.settimeout(None)
                    return conn
                except TimeoutError:
                    continue
            return None
        finally:
            listener.close()

    def _read_out(self, listener: socket.socket) -> None:
        conn = self._accept(listener)
        pending = b""
        try:
            while conn is not None:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                pending += chunk
                with self._cond:
                    self._raw += chunk
                *complete, pending = pending.split(b"\n")
                for line in complete:
                    self._add_line(line)
            if pending:
                self._add_line(pending)
        except OSError:
            pass
        finally:
            if conn is not None:
                conn.close()
            with self._cond:
                self._out_done = True
                self._cond.notify_all()

    def _add_line(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        with self._cond:
            self._lines.append(line)
            self._cond.notify_all()
        if self._on_line is not None and self._callback_error is None:
            try:
                self._on_line(line)
            except Exception as e:  # noqa: BLE001 -- re-raised by result(); reading goes on
                self._callback_error = e

    def _read_ctl(self, listener: socket.socket) -> None:
        conn = self._accept(listener)
        if conn is None:
            return
        with conn, conn.makefile("rb") as f:
            for raw in f:
                word, _, rest = raw.decode("utf-8", "replace").strip().partition(" ")
                with self._cond:
                    self._ctl[word] = rest
                    if word == "READY":
                        self._ready_at = time.monotonic()
                    self._cond.notify_all()

    # -- the API

    def lines(self, timeout: float | None = None) -> Iterator[str]:
        """The command's output lines not consumed yet, as they arrive, until it ends.

        ``timeout`` (seconds, default: until the run's own timeout) bounds the wait
        for each line; TimeoutError when it passes.
        """
        while True:
            with self._cond:
                limit = None if timeout is None else time.monotonic() + timeout
                while self._cursor >= len(self._lines) and not self._out_done:
                    left = self._deadline - time.monotonic() if limit is None else limit - time.monotonic()
                    if left <= 0:
                        raise TimeoutError("no output line from the guest in time")
                    self._cond.wait(min(left, 0.5))
                if self._cursor >= len(self._lines):
                    return
                line = self._lines[self._cursor]
                self._cursor += 1
            yield line

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 60.0) -> re.Match[str]:
        """Consume output lines until one matches ``pattern`` (``re.search``); its match.

        TimeoutError after ``timeout`` seconds, GuestError if the output ends first.
        """
        regex = re.compile(pattern)
        limit = time.monotonic() + timeout
        with self._cond:
            while True:
                while self._cursor < len(self._lines):
                    line = self._lines[self._cursor]
                    self._cursor += 1
                    match = regex.search(line)
                    if match:
                        return match
                if self._out_done:
                    break
                left = limit - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"guest printed no line matching {regex.pattern!r} in {timeout} s; "
                                       f"last lines: {self._lines[-10:]}")
                self._cond.wait(min(left, 0.5))
        result = self.result()
        raise GuestError(f"guest output ended without a line matching {regex.pattern!r}: {result.describe()}")

    @property
    def output(self) -> str:
        """All output so far."""
        with self._cond:
            return bytes(self._raw).decode("utf-8", "replace")

    def result(self, timeout: float | None = None) -> GuestResult:
        """Wait for the guest to power off (killing it at the run's timeout); how it ended.

        ``timeout`` waits less than the run's timeout, raising TimeoutError (the guest
        keeps running).
        """
        if self._result is None:
            self._result = self._finish(timeout)
        if self._callback_error is not None:
            raise GuestError(f"on_line raised {self._callback_error!r}") from self._callback_error
        return self._result

    def _finish(self, timeout: float | None) -> GuestResult:
        left = self._deadline - time.monotonic()
        timed_out = False
        try:
            self.proc.wait(max(0.0, left if timeout is None else min(left, timeout)))
        except subprocess.TimeoutExpired:
            if timeout is not None and timeout < left:
                raise TimeoutError("the guest is still running") from None
            timed_out = True
            self.kill()
        end = time.monotonic()
        for t in self._threads:
            t.join(5)
        with self._cond:
            ctl = dict(self._ctl)
            raw = bytes(self._raw)
        uptime: dict[str, float] = {}
        for word in ("KERNEL", "READY", "EXIT"):
            if word in ctl:
                try:
                    uptime[word.lower()] = float(ctl[word].split()[-1])
                except (ValueError, IndexError):
                    pass
        returncode = None
        if "EXIT" in ctl:
            returncode = int(ctl["EXIT"].split()[0])
        error = None
        if timed_out:
            error = f"timed out after {self.timeout} s (QEMU killed)"
        elif "FAIL" in ctl:
            error = f"guest init failed: {ctl['FAIL']}"
        elif returncode is None:
            error = f"QEMU exited (status {self.proc.returncode}) before the command's end"
        return GuestResult(
            returncode=returncode, output=raw.decode("utf-8", "replace"), output_bytes=raw,
            timed_out=timed_out,
            boot_seconds=None if self._ready_at is None else self._ready_at - self._t0,
            run_seconds=end - self._t0, console=_read_text(self._console), qemu_log=_read_text(self._qemu_log),
            error=error, guest_uptime=uptime)

    def kill(self) -> None:
        """Kill QEMU now (the guest's output so far stays readable)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    @property
    def running(self) -> bool:
        return self.proc.poll() is None


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", "replace")
    except OSError:
        return ""


def _qemu_value(value: object) -> str:
    """A value for a QEMU ``key=value,...`` option (commas doubled)."""
    return str(value).replace(",", ",,")


class Guest:
    """A QEMU guest configuration; each ``run``/``start`` boots it afresh.

    ``mtp_root``: the folder usb-mtp serves (None: no usb-mtp device);
    ``mtp_readonly``: True to refuse the initiator's DeleteObject and writes in it;
    ``pcap``: where usb-mtp writes a usbmon-format capture of its traffic;
    ``memory_mb``, ``smp``: the guest's RAM (the overlay's and tmpfs' writes live
    there) and CPUs; ``timeout``: seconds from starting QEMU to killing it (a
    ``run``/``start`` may give its own); ``writable_root``: the tmpfs overlay on the
    host root (see the module's doc); ``extra_qemu_args``: appended to QEMU's command
    line (e.g. more devices); ``kernel_args``: added to the kernel's.
    Use it as a context manager: leaving it kills a guest still running and
    removes its work folder (console and QEMU logs included: take ``result()``
    inside).
    """

    def __init__(self, mtp_root: Path | str | None = None, *, pcap: Path | str | None = None,
                 mtp_readonly: bool = False, memory_mb: int = 1024, smp: int = 1, timeout: float = 120.0,
                 writable_root: bool = True, extra_qemu_args: Sequence[str] = (),
                 kernel_args: Sequence[str] = ()) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise GuestError(reason)
        self.mtp_root = None if mtp_root is None else Path(mtp_root).resolve()
        self.pcap = None if pcap is None else Path(pcap).resolve()
        if self.mtp_root is not None and not self.mtp_root.is_dir():
            raise ValueError(f"mtp_root {self.mtp_root} is not a folder")
        if self.pcap is not None and self.mtp_root is None:
            raise ValueError("pcap needs an mtp_root: it captures usb-mtp's traffic")
        self.mtp_readonly = mtp_readonly
        self.writable_root = writable_root
        self.memory_mb = memory_mb
        self.smp = smp
        self.timeout = timeout
        self.extra_qemu_args = list(extra_qemu_args)
        self.kernel_args = list(kernel_args)
        self.kernel = find_kernel()
        assert self.kernel is not None
        self._running: list[RunningGuest] = []
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        self._workdir = Path(tempfile.mkdtemp(prefix="guest-", dir=CACHE_DIR))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for running in self._running:
            running.kill()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def qemu_args(self, workdir: Path) -> list[str]:
        """QEMU's command line for one boot (without ``-initrd``)."""
        assert self.kernel is not None
        qemu = qemu_binary()
        assert qemu is not None
        cmdline = ["console=ttyS0", "quiet", "loglevel=4", "panic=-1", "random.trust_cpu=on",
                   "8250.nr_uarts=1", *self.kernel_args]
        args = [qemu, "-nodefaults", "-no-user-config", "-accel", "tcg", "-machine", "pc",
                "-m", str(self.memory_mb), "-smp", str(self.smp),
                "-display", "none", "-vga", "none", "-monitor", "none", "-no-reboot",
                "-nic", "none",
                "-kernel", str(boot_image(self.kernel)), "-append", " ".join(cmdline),
                "-chardev", f"file,id=console,path={_qemu_value(workdir / 'console.log')}",
                "-serial", "chardev:console",
                "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
                "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
                "-device", "virtio-rng-pci",
                "-device", "virtio-serial-pci,id=vser",
                "-chardev", f"socket,id=out,path={_qemu_value(workdir / 'out.sock')}",
                "-device", f"virtserialport,bus=vser.0,chardev=out,name={OUT_PORT}",
                "-chardev", f"socket,id=ctl,path={_qemu_value(workdir / 'ctl.sock')}",
                "-device", f"virtserialport,bus=vser.0,chardev=ctl,name={CTL_PORT}",
                "-device", "qemu-xhci,id=xhci"]
        if self.mtp_root is not None:
            mtp = (f"usb-mtp,bus=xhci.0,rootdir={_qemu_value(self.mtp_root)},"
                   f"readonly={'on' if self.mtp_readonly else 'off'}")
            if self.pcap is not None:
                mtp += f",pcap={_qemu_value(self.pcap)}"
            args += ["-device", mtp]
        return args + self.extra_qemu_args

    def start(self, argv: Sequence[str], env: dict[str, str] | None = None, cwd: str = DEFAULT_CWD, *,
              on_line: Callable[[str], None] | None = None, timeout: float | None = None) -> RunningGuest:
        """Boot the guest and start ``argv`` in it (as root, in the host's root, in ``cwd``).

        ``env`` is added to :func:`default_env`. ``on_line`` is called (from a reader
        thread) with each output line as it arrives. Returns at once; use the handle's
        ``wait_for``/``lines``/``result``.
        """
        if not argv:
            raise ValueError("empty argv")
        initrd_base = base_initramfs()
        workdir = Path(tempfile.mkdtemp(prefix="boot-", dir=self._workdir))
        config = {"MODULES": " ".join(MODULES), "ROOT": "overlay" if self.writable_root else "ro",
                  "OUT_PORT": OUT_PORT, "CTL_PORT": CTL_PORT,
                  "WAIT_USB": f"{MTP_VENDOR_ID:04x}:{MTP_PRODUCT_ID:04x}" if self.mtp_root is not None else ""}
        limit = self.timeout if timeout is None else timeout
        config["WATCHDOG"] = str(int(limit) + 5)
        initrd = workdir / "initrd.img"
        # The kernel unpacks concatenated cpio archives in order: the cached base, then the job.
        with open(initrd, "wb") as f:
            f.write(initrd_base.read_bytes())
            f.write(_job_archive(_job_script(argv, {**default_env(), **(env or {})}, cwd), config))
        running = RunningGuest(self.qemu_args(workdir), initrd, workdir, limit, on_line)
        self._running.append(running)
        return running

    def run(self, argv: Sequence[str], env: dict[str, str] | None = None, cwd: str = DEFAULT_CWD, *,
            on_line: Callable[[str], None] | None = None, timeout: float | None = None) -> GuestResult:
        """Boot the guest, run ``argv`` in it to the end, power it off; how it went."""
        return self.start(argv, env, cwd, on_line=on_line, timeout=timeout).result()
