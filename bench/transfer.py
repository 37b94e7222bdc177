#!/usr/bin/env python3
"""Streaming throughput of Item.Transfer, relative to a plain pipe copy in the same run.

    python3 bench/transfer.py [--address ADDR] [--repeat N] [--resolution DPI] [--mode MODE]
                              [--format FMT] [--formats] [--pipe-size BYTES] [--device ID] [--json]

A ``data`` session is opened on the device (``sim0``), its Flatbed item is set to
``--resolution`` (600 dpi) and ``--mode`` (color), and the page is transferred
``--repeat`` times (5, after one untimed warm-up) into a pipe that a reader thread
empties as fast as it can (``os.read`` of 1 MiB). Each transfer is timed from the
call to end of file on the pipe.

The baseline, in the same run and interleaved with the transfers (transfer, copy,
transfer, copy, ...), pushes the same number of bytes through a plain pipe: one
thread writes 256 KiB slices of a buffer built beforehand, another reads 1 MiB at
a time, exactly like the transfer's reader. So the ratio transfer/copy is "what
fraction of a bare pipe's speed a scan reaches through the service".

``--formats`` adds a table of every format at 300 dpi: throughput in raw-equivalent
pixel bytes per second and the ratio to ``raw`` from the same run.

The session, the item and every transfer go through the client library
(:mod:`stillsvc.client`: ``open_session``, ``Session.items``, ``Item.write``,
``Item.transfer`` with the pipe's descriptor). A last line gives the library's
own cost per call in the same run (GetDevices through it against raw, on a
second, raw connection).

Without ``--address`` a private ``dbus-daemon --session`` and ``stillsvc --simulate``
are started for the run (as in ``bench/roundtrip.py``) and stopped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO, REPO / "tests", REPO / "bench"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from helpers import connect  # noqa: E402
from roundtrip import emit, library_cost, percentile, print_library_cost, service, table  # noqa: E402

from stillsvc.client import Client, Item, Session, TransferSummary  # noqa: E402

READ_SIZE = 1 << 20  # the reader's os.read size, for transfers and copies alike
WRITE_SIZE = 256 << 10  # the baseline writer's chunk
TARGET_RATIO = 0.5
FORMAT_TABLE = ("raw", "png", "tiff", "pdf", "pnm", "jpeg")
FORMAT_RESOLUTION = 300
CALL_TIMEOUT = 300.0
MB = 1e6
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)

clock = time.perf_counter


# -- the pipe's two ends --------------------------------------------------------

def make_pipe(size: int | None) -> tuple[int, int]:
    r, w = os.pipe()
    if size:
        fcntl.fcntl(w, F_SETPIPE_SZ, size)
    return r, w


def pipe_size(fd: int) -> int:
    try:
        return fcntl.fcntl(fd, F_GETPIPE_SZ)
    except OSError:
        return 0


class Reader(threading.Thread):
    """Reads a pipe to end of file as fast as it can; notes the first byte and the end."""

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True, name="reader")
        self.fd = fd
        self.bytes = 0
        self.head = b""
        self.t_first: float | None = None
        self.t_eof: float | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        read, fd = os.read, self.fd
        try:
            data = read(fd, READ_SIZE)
            if data:
                self.t_first = clock()
                self.head = data[:64]
            n = 0
            while data:
                n += len(data)
                data = read(fd, READ_SIZE)
            self.t_eof = clock()
            self.bytes = n
        except BaseException as e:  # reported by the caller
            self.error = e


@dataclass
class Run:
    seconds: float  # start to end of file
    first_byte: float  # start to the first byte read
    bytes: int
    reply: float = 0.0  # start to the reply (transfers only)
    summary: TransferSummary | None = None

    @property
    def mb_per_s(self) -> float:
        return self.bytes / MB / self.seconds


# -- one transfer, one copy -----------------------------------------------------

async def transfer_once(item: Item, fmt: str, size: int | None) -> Run:
    """Item.transfer into a pipe; our write end stays open until the reply is in."""
    r, w = make_pipe(size)
    reader = Reader(r)
    reader.start()
    loop = asyncio.get_running_loop()
    t0 = clock()
    try:
        # The descriptor stays ours; on a timeout the library cancels the transfer
        # in the service (Item.Cancel) and waits for it to end.
        summary = await asyncio.wait_for(item.transfer(w, fmt), CALL_TIMEOUT)
        t_reply = clock()
    finally:
        os.close(w)  # the service has closed its copy by the time it replies
        await loop.run_in_executor(None, reader.join, 60.0)
        if not reader.is_alive():
            os.close(r)
    if reader.error is not None:
        raise reader.error
    if reader.is_alive() or reader.t_eof is None:
        raise RuntimeError("the pipe did not reach end of file within 60 s of the reply")
    if summary.bytes != reader.bytes:
        raise RuntimeError(f"read {reader.bytes} bytes, the service reports {summary.bytes}")
    if fmt == "raw" and not reader.head.startswith(b"STIL"):
        raise RuntimeError("the raw stream does not start with its magic")
    first = (reader.t_first or reader.t_eof) - t0
    return Run(reader.t_eof - t0, first, reader.bytes, t_reply - t0, summary)


def copy_once(buffer: memoryview, size: int | None) -> Run:
    """The baseline: ``len(buffer)`` bytes through a plain pipe, written in 256 KiB slices."""
    r, w = make_pipe(size)
    reader = Reader(r)
    reader.start()
    failure: list[BaseException] = []

    def write() -> None:
        try:
            view, write_ = buffer, os.write
            for offset in range(0, len(view), WRITE_SIZE):
                chunk = view[offset:offset + WRITE_SIZE]
                while chunk:
                    chunk = chunk[write_(w, chunk):]
        except BaseException as e:
            failure.append(e)
        finally:
            os.close(w)

    writer = threading.Thread(target=write, daemon=True, name="writer")
    t0 = clock()
    writer.start()
    writer.join()
    reader.join()
    os.close(r)
    if failure:
        raise failure[0]
    if reader.error is not None:
        raise reader.error
    assert reader.t_eof is not None
    return Run(reader.t_eof - t0, (reader.t_first or reader.t_eof) - t0, reader.bytes)


# -- the session and its Flatbed item ----------------------------------------------

async def open_flatbed(client: Client, device: str) -> tuple[Session, Item]:
    session = await client.manager.open_session(device, "data")
    root = await session.root()
    for child in await root.children():
        if (await child.info()).kind == "flatbed":
            return session, child
    await session.close()
    raise RuntimeError(f"device {device} has no flatbed item")


async def configure(item: Item, resolution: int, mode: str) -> dict[str, Any]:
    settings: dict[str, Any] = {"resolution": resolution, "mode": mode}
    if mode == "lineart":
        settings["depth"] = 1
    await item.write(settings)  # each value with the type the item declares for it
    return await item.read()


def pixel_bytes(summary: TransferSummary) -> int:
    """Size of the page's pixels in the raw layout, whatever the format carried them."""
    width, height, mode, depth = summary.width, summary.height, summary.mode, summary.depth
    if mode == "lineart":
        return (width + 7) // 8 * height
    return width * (3 if mode == "color" else 1) * depth // 8 * height


# -- statistics -----------------------------------------------------------------

def describe(runs: list[Run]) -> dict[str, Any]:
    rates = sorted(r.mb_per_s for r in runs)
    seconds = sorted(r.seconds for r in runs)
    out = {
        "n": len(runs),
        "bytes": runs[0].bytes,
        "median_mb_s": statistics.median(rates),
        "min_mb_s": rates[0],
        "max_mb_s": rates[-1],
        "median_s": statistics.median(seconds),
        "p99_s": percentile(seconds, 99) if len(runs) >= 100 else None,
        "median_first_byte_ms": statistics.median(r.first_byte for r in runs) * 1000,
        "runs_mb_s": [r.mb_per_s for r in runs],
    }
    if any(r.reply for r in runs):
        out["median_reply_s"] = statistics.median(r.reply for r in runs)
    return out


# -- the benchmark ------------------------------------------------------------------

async def bench(address: str, device: str, repeat: int, resolution: int, mode: str, fmt: str,
                formats: bool, size: int | None) -> dict[str, Any]:
    client = await Client(address).connect()
    session = None
    try:
        session, item = await open_flatbed(client, device)
        values = await configure(item, resolution, mode)

        warm = await transfer_once(item, fmt, size)  # untimed: first page plan, buffers
        total = warm.bytes
        pattern = bytes(range(256))
        buffer = memoryview((pattern * (total // 256 + 1))[:total])
        copy_once(buffer, size)  # untimed
        transfers: list[Run] = []
        copies: list[Run] = []
        for _ in range(repeat):
            transfers.append(await transfer_once(item, fmt, size))
            copies.append(copy_once(buffer, size))
        del buffer

        t, c = describe(transfers), describe(copies)
        per_pair = sorted(a.mb_per_s / b.mb_per_s for a, b in zip(transfers, copies))
        ratio = t["median_mb_s"] / c["median_mb_s"]
        s = warm.summary
        assert s is not None
        r, w = make_pipe(size)
        actual_pipe = pipe_size(w)
        os.close(r)
        os.close(w)
        report: dict[str, Any] = {
            "device": device,
            "item": item.path,
            "format": fmt,
            "page": {"width": s.width, "height": s.height, "mode": s.mode, "depth": s.depth,
                     "resolution": s.resolution, "bytes": total, "pixel_bytes": pixel_bytes(s)},
            "settings": {k: values[k] for k in ("resolution", "mode", "depth", "width", "height")},
            "repeat": repeat,
            "pipe_size": actual_pipe,
            "read_size": READ_SIZE,
            "write_size": WRITE_SIZE,
            "transfer": t,
            "copy": c,
            "ratio": ratio,
            "ratio_per_pair": {"min": per_pair[0], "median": statistics.median(per_pair), "max": per_pair[-1]},
            "target": {"what": f"transfer >= {TARGET_RATIO}x plain pipe copy (median MB/s)", "ratio": ratio,
                       "met": ratio >= TARGET_RATIO},
        }
        if formats:
            report["formats"] = await format_table(item, repeat, mode, size)
        # What the library adds to one call, in this run: the transfer is one call.
        raw = await connect(address)
        try:
            report["library_cost"] = await library_cost(client, raw)
        finally:
            raw.disconnect()
        return report
    finally:
        if session is not None:
            async with session:  # closes it; gone already is fine
                pass
        client.disconnect()


async def format_table(item: Item, repeat: int, mode: str, size: int | None) -> dict[str, Any]:
    """Every format at 300 dpi, in rounds whose order rotates, so drift lands on all alike."""
    await configure(item, FORMAT_RESOLUTION, mode)
    names = list(FORMAT_TABLE)
    for name in names:
        await transfer_once(item, name, size)  # untimed
    runs: dict[str, list[Run]] = {name: [] for name in names}
    for k in range(repeat):
        order = names[k % len(names):] + names[:k % len(names)]
        for name in order[::-1] if k % 2 else order:
            runs[name].append(await transfer_once(item, name, size))
    rows = []
    for name in names:
        summary = runs[name][0].summary
        assert summary is not None
        pixels = pixel_bytes(summary)
        rates = sorted(pixels / MB / r.seconds for r in runs[name])
        rows.append({
            "format": name,
            "n": len(rates),
            "stream_bytes": statistics.median(r.bytes for r in runs[name]),
            "pixel_bytes": pixels,
            "median_pixel_mb_s": statistics.median(rates),
            "min_pixel_mb_s": rates[0],
            "max_pixel_mb_s": rates[-1],
            "median_first_byte_ms": statistics.median(r.first_byte for r in runs[name]) * 1000,
        })
    raw = rows[0]["median_pixel_mb_s"]
    for row in rows:
        row["ratio_to_raw"] = row["median_pixel_mb_s"] / raw
    s = runs["raw"][0].summary
    assert s is not None
    return {"resolution": FORMAT_RESOLUTION, "width": s.width, "height": s.height, "mode": s.mode,
            "depth": s.depth, "rows": rows}


# -- output ---------------------------------------------------------------------

def print_report(report: dict[str, Any]) -> None:
    p = report["page"]
    print(f"{report['device']} Flatbed: {p['width']}x{p['height']} {p['mode']} {p['depth']}-bit at "
          f"{p['resolution']} dpi, format {report['format']}, {p['bytes']:,} bytes per transfer")
    print(f"{report['repeat']} timed runs of each after 1 warm-up, interleaved transfer/copy; "
          f"pipe buffer {report['pipe_size']:,} bytes, reads of {report['read_size'] >> 20} MiB, "
          f"copy writes of {report['write_size'] >> 10} KiB; MB = 10^6 bytes\n")
    many = report["repeat"] >= 100
    headers = ["", "median MB/s", "min MB/s", "max MB/s", "median s"]
    headers += ["p99 s"] if many else []
    headers += ["first byte ms (median)"]
    rows = []
    for label, key in ((f"Item.Transfer ({report['format']})", "transfer"), ("plain pipe copy", "copy")):
        d = report[key]
        row = [label, f"{d['median_mb_s']:.1f}", f"{d['min_mb_s']:.1f}", f"{d['max_mb_s']:.1f}",
               f"{d['median_s']:.3f}"]
        row += [f"{d['p99_s']:.3f}"] if many else []
        row += [f"{d['median_first_byte_ms']:.2f}"]
        rows.append(row)
    table(headers, rows)
    t = report["transfer"]
    if "median_reply_s" in t:
        print(f"\nTransfer reply after {t['median_reply_s']:.3f} s (median); end of file follows it.")
    pp = report["ratio_per_pair"]
    print(f"transfer/copy per pair: min {pp['min']:.2f}, median {pp['median']:.2f}, max {pp['max']:.2f}")
    target = report["target"]
    print(f"transfer/copy median MB/s ratio: {report['ratio']:.2f}")
    print(f"Target ≥ {TARGET_RATIO}× plain pipe copy: {'met' if target['met'] else 'not met'} "
          f"({target['ratio']:.2f})")
    if "formats" in report:
        f = report["formats"]
        print(f"\nFormats at {f['resolution']} dpi ({f['width']}x{f['height']} {f['mode']} {f['depth']}-bit), "
              f"MB/s of raw-equivalent pixels ({f['rows'][0]['pixel_bytes']:,} bytes), same run:")
        table(["format", "n", "stream bytes", "median MB/s", "min MB/s", "max MB/s", "first byte ms", "×raw"],
              [[r["format"], str(r["n"]), f"{r['stream_bytes']:,.0f}", f"{r['median_pixel_mb_s']:.1f}",
                f"{r['min_pixel_mb_s']:.1f}", f"{r['max_pixel_mb_s']:.1f}",
                f"{r['median_first_byte_ms']:.1f}", f"{r['ratio_to_raw']:.2f}"] for r in f["rows"]])
    print()
    print_library_cost(report["library_cost"])


# -- main -----------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Item.Transfer throughput relative to a plain pipe copy.")
    parser.add_argument("--address", help="D-Bus address of a bus where stillsvc runs (default: start a private one)")
    parser.add_argument("--device", default="sim0", help="device to scan from (default sim0)")
    parser.add_argument("--repeat", type=int, default=5, help="timed transfers and copies (default 5)")
    parser.add_argument("--resolution", type=int, default=600, metavar="DPI", help="resolution (default 600)")
    parser.add_argument("--mode", default="color", choices=["color", "gray", "lineart"],
                        help="colour mode (default color)")
    parser.add_argument("--format", default="raw", help="transfer format for the main figures (default raw)")
    parser.add_argument("--formats", action="store_true",
                        help=f"also a table of every format at {FORMAT_RESOLUTION} dpi, relative to raw")
    parser.add_argument("--pipe-size", type=int, metavar="BYTES",
                        help="set both pipes' buffer size with F_SETPIPE_SZ (default: the system's)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    with service(args.address, name="transfer") as address:
        report = asyncio.run(bench(address, args.device, args.repeat, args.resolution, args.mode, args.format,
                                   args.formats, args.pipe_size))
    emit(report, args.address is None, args.json, print_report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
