"""``make install`` into a staging root, the units through systemd-analyze, and the udev rules.

The layout is the one a distribution package has: vendor files below /usr, nothing in
/etc, every file 0644. The udev rules are parsed key by key (``udevadm verify`` only
exists from systemd 253 on, Debian 12 has 252) and run through a small evaluator on
typical devices, so a typo in a key or a glob shows up here rather than on a machine.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import REPO

BUS_NAME = "org.stillsvc.StillImage1"
RULES = REPO / "udev" / "70-stillsvc.rules"
POLICY = REPO / "policy" / f"{BUS_NAME}.policy"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def make(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["make", "--no-print-directory", "-C", str(REPO), *args],
                          capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, f"make {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}"
    return proc


def expected_layout() -> dict[str, Path]:
    """Installed path (below DESTDIR) → the source file it is a copy of."""
    layout = {
        "usr/lib/systemd/system/stillsvc.service": REPO / "systemd/stillsvc.service",
        "usr/lib/systemd/system/stillsvc-saned.socket": REPO / "systemd/stillsvc-saned.socket",
        "usr/lib/systemd/system/stillsvc-escl.socket": REPO / "systemd/stillsvc-escl.socket",
        "usr/lib/systemd/user/stillsvc-agent.service": REPO / "systemd/stillsvc-agent.service",
        "usr/lib/sysusers.d/stillsvc.conf": REPO / "systemd/stillsvc.sysusers",
        f"usr/share/dbus-1/system.d/{BUS_NAME}.conf": REPO / f"dbus/{BUS_NAME}.conf",
        f"usr/share/dbus-1/system-services/{BUS_NAME}.service": REPO / f"dbus/{BUS_NAME}.service",
        "usr/lib/udev/rules.d/70-stillsvc.rules": RULES,
    }
    for xml in sorted((REPO / "dbus").glob(f"{BUS_NAME}.*.xml")):
        layout[f"usr/share/dbus-1/interfaces/{xml.name}"] = xml
    if POLICY.exists():
        layout[f"usr/share/polkit-1/actions/{POLICY.name}"] = POLICY
    return layout


def files_below(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir()}


def test_install_layout_and_uninstall(tmp_path: Path) -> None:
    root = tmp_path / "root"
    old_umask = os.umask(0o077)  # modes must not depend on the installer's umask
    try:
        make("install", f"DESTDIR={root}")
    finally:
        os.umask(old_umask)
    layout = expected_layout()
    assert files_below(root) == set(layout)
    for rel, source in layout.items():
        installed = root / rel
        assert stat.S_IMODE(installed.stat().st_mode) == 0o644, rel
        # With the default paths the units are installed unchanged.
        assert installed.read_bytes() == source.read_bytes(), rel
    for d in (p for p in root.rglob("*") if p.is_dir()):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755, d

    make("uninstall", f"DESTDIR={root}")
    assert files_below(root) == set()


def test_install_paths_follow_prefix_and_sysconfdir(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make("install", f"DESTDIR={root}", "PREFIX=/opt/stillsvc", "sysconfdir=/opt/stillsvc/etc")
    unit = root / "opt/stillsvc/lib/systemd/system/stillsvc.service"
    text = unit.read_text()
    assert re.search(r"^ExecStart=/opt/stillsvc/bin/stillsvc ", text, re.M)
    assert "/opt/stillsvc/etc/stillsvc/stillsvc.toml" in text and "/etc/stillsvc/" not in text.replace(
        "/opt/stillsvc/etc/stillsvc/", "")
    assert re.search(r"^ExecStart=/opt/stillsvc/bin/stillctl ",
                     (root / "opt/stillsvc/lib/systemd/user/stillsvc-agent.service").read_text(), re.M)
    assert (root / f"opt/stillsvc/share/dbus-1/system.d/{BUS_NAME}.conf").exists()
    assert not (root / "usr").exists() and not (root / "etc").exists()
    make("uninstall", f"DESTDIR={root}", "PREFIX=/opt/stillsvc", "sysconfdir=/opt/stillsvc/etc")
    assert files_below(root) == set()


def test_installed_files_agree_with_each_other() -> None:
    """Bus name, unit name and user are spelled the same in every file that names them."""
    unit = (REPO / "systemd/stillsvc.service").read_text()
    activation = (REPO / f"dbus/{BUS_NAME}.service").read_text()
    policy = (REPO / f"dbus/{BUS_NAME}.conf").read_text()
    sysusers = (REPO / "systemd/stillsvc.sysusers").read_text()
    assert f"BusName={BUS_NAME}\n" in unit
    assert f"Name={BUS_NAME}\n" in activation
    assert "SystemdService=stillsvc.service\n" in activation
    assert "User=stillsvc\n" in unit and "User=stillsvc\n" in activation
    assert '<policy user="stillsvc">' in policy and f'<allow own="{BUS_NAME}"/>' in policy
    assert re.search(r"^u stillsvc ", sysusers, re.M)
    # polkit answers the service's checks about its clients only if each action
    # names the service's user as an owner
    actions = re.findall(r"<action id=.*?</action>", POLICY.read_text(), re.S)
    assert actions and all(
        '<annotate key="org.freedesktop.policykit.owner">unix-user:stillsvc</annotate>' in a for a in actions)


needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze (Debian package systemd) is not installed")


@needs_analyze
def test_check_units() -> None:
    proc = make("check-units")
    assert "units OK" in proc.stdout
    print(proc.stdout)


@needs_analyze
def test_check_units_fails_on_a_warning(tmp_path: Path) -> None:
    """verify exits 0 on an unknown key: check-units must not."""
    bad = tmp_path / "stillsvc.service"
    bad.write_text((REPO / "systemd/stillsvc.service").read_text()
                   .replace("\n[Service]\n", "\n[Service]\nProtectSytem=strict\n", 1))
    proc = make("check-units", f"SYSTEM_UNITS={bad}", check=False)
    assert proc.returncode != 0
    assert "ProtectSytem" in proc.stdout + proc.stderr


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers is not installed")
def test_sysusers_creates_the_user_and_its_groups(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(REPO / "systemd/stillsvc.sysusers")],
                   check=True, capture_output=True, timeout=30)
    passwd = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/group").read_text().splitlines()}
    user = passwd["stillsvc"]
    assert user[5] == "/var/lib/stillsvc" and user[6].endswith("nologin")
    assert groups["stillsvc"][2] == user[3]  # its own primary group, which the udev rules name
    for group in ("scanner", "lp", "dialout"):
        assert "stillsvc" in groups[group][3].split(","), group


# --- udev rules ---------------------------------------------------------------------------

MATCH = ("==", "!=")
# Operators each key takes (udev(7)); ``True`` in the second field: the key needs {attr}.
KEYS: dict[str, tuple[tuple[str, ...], bool | None]] = {
    "ACTION": (MATCH, False), "DEVPATH": (MATCH, False), "KERNEL": (MATCH, False),
    "KERNELS": (MATCH, False), "SUBSYSTEM": (MATCH, False), "SUBSYSTEMS": (MATCH, False),
    "DRIVER": (MATCH, False), "DRIVERS": (MATCH, False), "TAGS": (MATCH, False),
    "RESULT": (MATCH, False), "ATTRS": (MATCH, True), "CONST": (MATCH, True),
    "TEST": (MATCH, None), "PROGRAM": (("=", "=="), False),
    "NAME": (MATCH + ("=", ":="), False), "SYMLINK": (MATCH + ("=", "+=", "-=", ":="), False),
    "TAG": (MATCH + ("=", "+=", "-="), False), "ENV": (MATCH + ("=", "+=", ":="), True),
    "ATTR": (MATCH + ("=",), True), "SYSCTL": (MATCH + ("=",), True),
    "OWNER": (("=", ":="), False), "GROUP": (("=", ":="), False), "MODE": (("=", ":="), False),
    "SECLABEL": (("=", "+=", ":="), True), "RUN": (("=", "+=", ":="), None),
    "IMPORT": (("=",), True), "OPTIONS": (("=", "+="), False),
    "LABEL": (("=",), False), "GOTO": (("=",), False),
}
TOKEN = re.compile(r'\s*(?P<key>[A-Z_]+)(?:\{(?P<attr>[^}]*)\})?\s*(?P<op>==|!=|\+=|-=|:=|=)\s*'
                   r'"(?P<value>(?:[^"\\]|\\.)*)"\s*(?:,|$)')
COMMENTED_RULE = re.compile(r'^#\s*([A-Z_]+(\{[^}]*\})?\s*(==|!=|\+=|-=|:=|=)\s*")')


@dataclass(frozen=True)
class Token:
    key: str
    attr: str | None
    op: str
    value: str


def parse_rule(line: str) -> list[Token]:
    tokens: list[Token] = []
    pos = 0
    while pos < len(line):
        m = TOKEN.match(line, pos)
        assert m, f"cannot parse at column {pos + 1}: {line[pos:]!r}"
        tokens.append(Token(m["key"], m["attr"], m["op"], m["value"]))
        pos = m.end()
    return tokens


def rule_lines(text: str, commented: bool = True) -> list[tuple[int, str, bool]]:
    """(line number, rule, is a commented-out example): continuation lines joined."""
    rules = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if not line:
            continue
        if line.startswith("#"):
            if commented and COMMENTED_RULE.match(line):
                rules.append((start, line.lstrip("#").strip(), True))
            continue
        rules.append((start, line, False))
    return rules


def check_token(t: Token) -> None:
    assert t.key in KEYS, f"unknown key {t.key}"
    ops, needs_attr = KEYS[t.key]
    assert t.op in ops, f"{t.key} does not take {t.op}"
    if needs_attr is True:
        assert t.attr, f"{t.key} needs {{attribute}}"
    elif needs_attr is False:
        assert t.attr is None, f"{t.key} takes no {{attribute}}"


def test_udev_rules_parse() -> None:
    text = RULES.read_text()
    rules = rule_lines(text)
    assert rules
    labels = {t.value for _, line, _ in rules for t in parse_rule(line) if t.key == "LABEL"}
    sysusers = (REPO / "systemd/stillsvc.sysusers").read_text()
    units = {p.name for p in (REPO / "systemd").glob("*.service")}
    for number, line, _example in rules:
        where = f"{RULES.name}:{number}"
        try:
            tokens = parse_rule(line)
            for t in tokens:
                check_token(t)
        except AssertionError as e:
            raise AssertionError(f"{where}: {e}") from None
        # A rule of match keys only does nothing (and a misplaced = makes one).
        assert any(t.op not in MATCH for t in tokens), f"{where}: no assignment"
        for t in tokens:
            if t.key == "GOTO":
                assert t.value in labels, f"{where}: GOTO to undefined label {t.value}"
            if t.key == "GROUP":
                assert re.search(rf"^[ug] {re.escape(t.value)} ", sysusers, re.M), \
                    f"{where}: group {t.value} is not created by stillsvc.sysusers"
            if t.key == "MODE":
                assert re.fullmatch(r"0[0-7]{3}", t.value), f"{where}: MODE {t.value}"
            if t.key == "ENV" and t.attr == "SYSTEMD_WANTS":
                assert t.value in units, f"{where}: {t.value} is not one of our units"
    assert any(t.key == "TAG" and t.op == "+=" and t.value == "systemd"
               for _, line, ex in rules if not ex for t in parse_rule(line))


def test_udev_rule_parser_catches_mistakes() -> None:
    """The check above is only worth something if it fails on what a typo produces."""
    for bad in ('SUBSYTEM=="usb", GROUP="x"',          # unknown key
                'GROUP=="stillsvc"',                   # match on an assign-only key
                'ENV="1"',                             # ENV without {attribute}
                'ATTRS{idVendor}="04a9"',              # assignment to a match-only key
                'SUBSYSTEM=="usb" GROUP="x"',          # missing comma
                'SUBSYSTEM==usb, GROUP="x"'):          # unquoted value
        with pytest.raises(AssertionError):
            for t in parse_rule(bad):
                check_token(t)


@pytest.mark.skipif(shutil.which("udevadm") is None
                    or subprocess.run(["udevadm", "verify", "--help"], capture_output=True).returncode != 0,
                    reason="udevadm verify needs systemd >= 253")
def test_udevadm_verify() -> None:  # pragma: no cover - not on Debian 12
    subprocess.run(["udevadm", "verify", "--resolve-names=never", str(RULES)], check=True, timeout=30)


@dataclass
class UsbDevice:
    """What udev knows of a device when it reaches our rules (after 50-udev-default.rules)."""
    interfaces: str
    env: dict[str, str] = field(default_factory=dict)
    action: str = "add"
    subsystem: str = "usb"
    devtype: str = "usb_device"
    attrs: dict[str, str] = field(default_factory=dict)
    group: str = "root"
    mode: str = "0664"
    tags: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.env = {"DEVTYPE": self.devtype, "ID_USB_INTERFACES": self.interfaces, **self.env}


def glob_match(value: str, pattern: str) -> bool:
    return any(fnmatch.fnmatchcase(value, alt) for alt in pattern.split("|"))


def run_rules(device: UsbDevice, text: str) -> UsbDevice:
    """A small evaluator for the keys our rules use (GOTO, LABEL, matches, =, +=)."""
    rules = [parse_rule(line) for _, line, _ in rule_lines(text, commented=False)]
    i, skip_to = 0, None
    while i < len(rules):
        tokens = rules[i]
        i += 1
        if skip_to is not None:
            if any(t.key == "LABEL" and t.value == skip_to for t in tokens):
                skip_to = None
            continue
        values = {"ACTION": device.action, "SUBSYSTEM": device.subsystem}
        matched = True
        for t in (t for t in tokens if t.op in MATCH):
            if t.key == "ENV":
                actual = device.env.get(t.attr or "", "")
            elif t.key == "ATTR":
                actual = device.attrs.get(t.attr or "", "")
            else:
                actual = values[t.key]
            if glob_match(actual, t.value) != (t.op == "=="):
                matched = False
                break
        if not matched:
            continue
        for t in (t for t in tokens if t.op not in MATCH):
            if t.key == "GOTO":
                skip_to = t.value
            elif t.key == "GROUP":
                device.group = t.value
            elif t.key == "MODE":
                device.mode = t.value
            elif t.key == "TAG":
                device.tags.add(t.value)
            elif t.key == "ENV" and t.op == "+=" and device.env.get(t.attr or ""):
                device.env[t.attr or ""] += " " + t.value
            elif t.key == "ENV":
                device.env[t.attr or ""] = t.value
            elif t.key != "LABEL":
                raise AssertionError(f"the evaluator does not know {t.key}{t.op}")
    return device


def owned_and_started(d: UsbDevice) -> tuple[str, str, bool]:
    return d.group, d.mode, "systemd" in d.tags and "stillsvc.service" in d.env.get("SYSTEMD_WANTS", "").split()


@pytest.mark.parametrize(("device", "expected"), [
    pytest.param(UsbDevice(":060101:"), ("stillsvc", "0660", True), id="ptp-camera"),
    pytest.param(UsbDevice(":080650:060101:"), ("stillsvc", "0660", True), id="camera-with-storage"),
    pytest.param(UsbDevice(":ff0000:", env={"ID_STILLSVC": "1"}), ("stillsvc", "0660", True),
                 id="scanner-listed-in-hwdb"),
    pytest.param(UsbDevice(":060101:", env={"ID_STILLSVC": "0"}), ("root", "0664", False), id="opted-out"),
    pytest.param(UsbDevice(":0701ff:060101:", group="lp"), ("lp", "0664", True), id="multifunction-printer"),
    pytest.param(UsbDevice(":080650:"), ("root", "0664", False), id="usb-stick"),
    pytest.param(UsbDevice(":ff0000:"), ("root", "0664", False), id="unknown-vendor-class"),
    pytest.param(UsbDevice(":060101:", devtype="usb_interface"), ("root", "0664", False), id="interface"),
    pytest.param(UsbDevice(":060101:", action="remove"), ("root", "0664", False), id="remove"),
    pytest.param(UsbDevice(":060101:", env={"SYSTEMD_WANTS": "other.service"}), ("stillsvc", "0660", True),
                 id="other-wants-kept"),
])
def test_udev_rules_on_devices(device: UsbDevice, expected: tuple[str, str, bool]) -> None:
    wanted_before = device.env.get("SYSTEMD_WANTS", "").split()
    result = run_rules(device, RULES.read_text())
    assert owned_and_started(result) == expected
    assert set(wanted_before) <= set(result.env.get("SYSTEMD_WANTS", "").split())  # appended, not replaced


def test_udev_commented_example_works_when_enabled() -> None:
    """The disabled vendor/product example line does what it says once uncommented."""
    text = RULES.read_text()
    example = next(line for _, line, ex in rule_lines(text) if ex)
    enabled = text.replace(f"#{example}", example)
    assert enabled != text
    device = UsbDevice(":ff0000:", attrs={"idVendor": "04a9", "idProduct": "190a"})
    assert owned_and_started(run_rules(device, enabled)) == ("stillsvc", "0660", True)
