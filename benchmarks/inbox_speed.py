"""Inbox: idle CPU on a tree of 10,000 delivered files, delivery latency, and a 1,000-file series.

Run: .venv/bin/python benchmarks/inbox_speed.py [--idle-seconds 60] [--files 10000]
The watcher is polled every 0.5 s, as `segmentation-machine watch` does.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from SegmentationMachineLib.dicom.phantom import write_ct_series  # noqa: E402
from SegmentationMachineLib.inbox.watcher import Inbox, InboxOptions  # noqa: E402

TICK = 0.5


def write_series(folder: Path, slices: int, name: str, size: int = 16):
    hu = np.random.default_rng(0).integers(-1000, 1000, (slices, size, size)).astype(np.int16)
    write_ct_series(folder, hu, 1.0, [(0.0, 0.0, float(k)) for k in range(slices)], name)


def deliver_all(inbox: Inbox, want: int, limit: float = 600) -> float:
    """Polls until want series were delivered (and acknowledged); returns when the last one came."""
    got, deadline = 0, time.monotonic() + limit
    while got < want and time.monotonic() < deadline:
        for delivery in inbox.poll():
            inbox.acknowledge(delivery, True)
            got += 1
        time.sleep(0.05)
    assert got == want, f"only {got} of {want} series delivered"
    return time.monotonic()


def idle_cpu(root: Path, files: int, seconds: float, polling: bool) -> float:
    inbox = Inbox(InboxOptions(folder=root / "inbox", state_folder=root / f"state-{polling}", settle_seconds=1,
                               polling=polling))
    inbox.start()
    deliver_all(inbox, files // 1000)
    cpu, wall = time.process_time(), time.monotonic()
    while time.monotonic() - wall < seconds:
        assert inbox.poll() == []
        time.sleep(TICK)
    share = (time.process_time() - cpu) / (time.monotonic() - wall)
    inbox.stop()
    return share


def latency(root: Path, slices: int, settle: float) -> tuple:
    inbox = Inbox(InboxOptions(folder=root / "inbox", state_folder=root / f"state-latency-{slices}", settle_seconds=settle))
    inbox.start()
    deliver_all(inbox, len(list((root / "inbox").iterdir())))  # what is already there
    written = time.monotonic()
    write_series(root / "inbox" / f"new{slices}", slices, f"new {slices}")
    last_write = time.monotonic()
    delivered = deliver_all(inbox, 1)
    inbox.stop()
    return last_write - written, delivered - last_write


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--idle-seconds", type=float, default=60)
    parser.add_argument("--files", type=int, default=10000)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    for index in range(args.files // 1000):
        write_series(root / "inbox" / f"study{index}", 1000, f"series {index}")
    print("| measurement | value | target |\n|---|---|---|")
    for polling in (False, True):
        share = idle_cpu(root, args.files, args.idle_seconds, polling)
        mode = "polling folders every 2 s" if polling else "file events"
        print(f"| idle CPU, {args.files} delivered files, {mode}, over {args.idle_seconds:g} s | "
              f"{share * 100:.2f}% of a core | < 1% |")
    for slices in (20, 1000):
        writing, delay = latency(root, slices, settle=5.0)
        print(f"| {slices}-file series: last file written → delivered (settle 5 s; writing took {writing:.1f} s) | "
              f"{delay:.2f} s | ≤ 6 s |")


if __name__ == "__main__":
    main()
