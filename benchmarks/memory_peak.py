"""Peak memory of `segmentation-machine model` against the scan's size: what core/memory.py's FIXED_BYTES and
BYTES_PER_VOXEL are set from.

The real 20-slice CT series (shared data, 512x512, 0.98 x 0.98 x 2 mm) is tiled along its axis, mirrored every
other time so that the anatomy runs on, to each size; each runs in the real CLI (bone and skin presets, every
format: the most a run does) under /usr/bin/time -v, whose maximum resident set size is the process's peak.
A line through the peaks gives the fixed start-up cost and the cost per voxel.

Run: .venv/bin/python benchmarks/memory_peak.py [SLICES ...]   (default 20 160 320 640; 640 takes minutes)
"""

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parents[1]
SERIES = REPO.parent / "shared" / "data" / "totalsegmentator" / "example_ct_dicom"
CLI = Path(sys.executable).parent / "segmentation-machine"


def tiled_series(slices: int, folder: Path) -> int:
    """Writes the real series tiled to `slices` uncompressed slices into folder; returns its voxel count."""
    source = sorted((pydicom.dcmread(path) for path in SERIES.iterdir()),
                    key=lambda ds: float(ds.ImagePositionPatient[2]))
    pixels = [ds.pixel_array for ds in source]  # JPEG 2000: decoded once
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    bottom = float(source[0].ImagePositionPatient[2])
    for number in range(slices):
        cycle, index = divmod(number, len(source))
        index = index if cycle % 2 == 0 else len(source) - 1 - index
        ds = source[index].copy()
        ds.PixelData = pixels[index].tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], bottom + 2.0 * number]
        ds.InstanceNumber = number + 1
        ds.save_as(folder / f"{number:04d}.dcm", enforce_file_format=True)
    return int(source[0].Rows) * int(source[0].Columns) * slices


def peak_bytes(folder: Path, out: Path) -> int:
    done = subprocess.run(["/usr/bin/time", "-v", str(CLI), "model", str(folder), "--preset", "bone,skin",
                           "--format", "stl,obj,3mf,glb,seg", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, check=True)
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) * 1024


def main(sizes):
    rows = []
    print("| slices | voxels (millions) | peak GiB | bytes per voxel |")
    print("|---|---|---|---|")
    for slices in sizes:
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch) / "series"
            folder.mkdir()
            voxels = tiled_series(slices, folder)
            peak = peak_bytes(folder, Path(scratch) / "out")
        rows.append((voxels, peak))
        print(f"| {slices} | {voxels / 1e6:.1f} | {peak / 2**30:.2f} | {peak / voxels:.0f} |", flush=True)
    if len(rows) > 1:
        per_voxel, fixed = np.polyfit(*np.array(rows, float).T, 1)
        print(f"\npeak = {fixed / 2**20:.0f} MiB + {per_voxel:.1f} bytes per voxel (least squares)")


if __name__ == "__main__":
    main([int(size) for size in sys.argv[1:]] or [20, 160, 320, 640])
