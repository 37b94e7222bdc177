"""stillctl scan, items and props against the real daemon."""

from __future__ import annotations

import json
import re

from helpers import SIM0, SIMULATOR, call
from PIL import Image
from test_ctl import stillctl

from stillsvc.drivers.sim.pattern import pattern_page
from stillsvc.imaging import ImageInfo, parse_raw


async def test_items_shows_the_tree(daemon):
    r = await stillctl(daemon.address, "items", "sim0")
    assert r.code == 0, r
    lines = r.out.splitlines()
    assert lines[0].split() == ["ITEM", "KIND", "CONNECTED"]
    assert [line.split()[:2] for line in lines[1:]] == [["Root", "device"], ["Flatbed", "flatbed"],
                                                        ["Feeder", "feeder"]]
    r = await stillctl(daemon.address, "--json", "items", "sim0")
    assert [item["ItemPath"] for item in json.loads(r.out)] == ["Root", "Root/Flatbed", "Root/Feeder"]


async def test_props_shows_values_and_valid_values(daemon):
    r = await stillctl(daemon.address, "--json", "props", "sim0/Flatbed")
    assert r.code == 0, r
    props = json.loads(r.out)
    assert props["resolution"]["value"] == 150
    assert props["resolution"]["valid"] == {"kind": "list", "values": [75, 100, 150, 200, 300, 600]}
    assert props["max_width"]["access"] == "r"
    r = await stillctl(daemon.address, "props", "sim0/Nothing")
    assert r.code == 1 and "no item 'nothing'" in r.err
    r = await stillctl(daemon.address, "props", "sim0")
    assert r.code == 2 and "DEVICE/ITEM" in r.err


async def test_scan_writes_the_pattern_into_a_file(daemon, tmp_path):
    out = tmp_path / "page.raw"
    r = await stillctl(daemon.address, "scan", "sim0", "-o", str(out), "--resolution", "75", "--mode", "gray")
    assert r.code == 0, r
    assert "raw, 1 page, 637x876 gray 8-bit at 75 dpi" in r.err
    ((info, page, rows),) = parse_raw(out.read_bytes())
    assert info == ImageInfo(637, 876, "gray", 8, 75)
    assert rows == pattern_page(info, page)


async def test_scan_from_the_feeder_into_one_pdf_and_png_per_page(daemon, client, tmp_path):
    await call(client, SIM0, SIMULATOR, "LoadPages", "u", [3])
    r = await stillctl(daemon.address, "scan", "sim0", "-o", str(tmp_path / "one.png"), "--source", "feeder",
                       "--resolution", "75")
    assert r.code == 0, r
    assert Image.open(tmp_path / "one.png").size == (637, 876)
    r = await stillctl(daemon.address, "--json", "scan", "sim0", "-o", str(tmp_path / "rest.pdf"),
                       "--source", "feeder", "--resolution", "75", "--mode", "lineart")
    assert r.code == 0, r
    summary = json.loads(r.out)
    assert summary["pages"] == 2 and summary["format"] == "pdf" and summary["depth"] == 1
    pdf = (tmp_path / "rest.pdf").read_bytes()
    assert pdf.startswith(b"%PDF-") and re.search(rb"/Count 2\b", pdf)
    r = await stillctl(daemon.address, "scan", "sim0", "-o", str(tmp_path / "none.png"), "--source", "feeder")
    assert r.code == 1 and "feeder is empty" in r.err


async def test_scan_errors_are_clear(daemon, client, tmp_path):
    r = await stillctl(daemon.address, "scan", "sim0", "-o", str(tmp_path / "x.png"), "--resolution", "123")
    assert r.code == 1 and "resolution" in r.err and "75, 100" in r.err
    r = await stillctl(daemon.address, "scan", "nope", "-o", str(tmp_path / "x.png"))
    assert r.code == 1 and "no device 'nope'" in r.err
    r = await stillctl(daemon.address, "scan", "sim0", "-o", str(tmp_path / "x.png"), "--set", "loudness=3")
    assert r.code == 1 and "no property 'loudness'" in r.err
