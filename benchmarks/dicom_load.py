"""DICOM load speed through Slicer's reader: scan (pydicom headers) + decode, slices/s and cores used.

Run: .venv/bin/python benchmarks/dicom_load.py [--repeat 5]
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from SegmentationMachineLib.core.scene import create_headless_scene  # noqa: E402
from SegmentationMachineLib.dicom.phantom import make_phantom, write_phantom  # noqa: E402
from SegmentationMachineLib.dicom.series import choose_series, scan_folder  # noqa: E402
from SegmentationMachineLib.dicom.volumes import load_series  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def measure(folder: Path, repeat: int):
    best = None
    for _ in range(repeat):
        ctx = create_headless_scene()
        wall, cpu = time.perf_counter(), time.process_time()
        series = choose_series(scan_folder(folder))
        scanned = time.perf_counter()
        load_series(ctx, series)
        row = (len(series.files), scanned - wall, time.perf_counter() - scanned,
               time.perf_counter() - wall, (time.process_time() - cpu) / (time.perf_counter() - wall))
        best = row if best is None or row[3] < best[3] else best
    return best


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    phantom = Path(tempfile.mkdtemp()) / "phantom"
    write_phantom(phantom, make_phantom(shape=(200, 512, 512), pixel_spacing=0.4))
    print(f"{os.cpu_count()} cores\n")
    print("| series | slices | scan s | decode s | total s | slices/s | cores busy |\n|---|---|---|---|---|---|---|")
    for name, folder in [("JPEG 2000 lossless 512x512 (example_ct_dicom)", DATA / "totalsegmentator" / "example_ct_dicom"),
                         ("uncompressed 512x512 (dcmqi ct-3slice)", DATA / "dcmqi" / "ct-3slice"),
                         ("uncompressed 512x512 (our phantom)", phantom)]:
        slices, scan, decode, total, busy = measure(folder, args.repeat)
        print(f"| {name} | {slices} | {scan:.3f} | {decode:.3f} | {total:.3f} | {slices / total:.0f} | {busy:.2f} |")


if __name__ == "__main__":
    main()
