"""Peak memory of `model` (load, bone preset, export) per voxel, on the real scans: the factor
pipeline.PEAK_BYTES_PER_VOXEL is set from. Each scan runs in its own process (ru_maxrss is a peak).

Run: .venv/bin/python benchmarks/memory_peak.py
"""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "totalsegmentator"
SCANS = [DATA / "example_ct.nii.gz", DATA / "example_ct_dicom"]

CHILD = """
import resource, sys, tempfile
sys.path.insert(0, {repo!r})
from SegmentationMachineLib.core.scene import create_headless_scene
from SegmentationMachineLib.dicom.volumes import load_input
from SegmentationMachineLib.mesh.export import ExportOptions
from SegmentationMachineLib.pipeline import model_volume
ctx = create_headless_scene()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
node = load_input(ctx, {scan!r}).node
model_volume(ctx, node, ["bone"], tempfile.mkdtemp(), ExportOptions())
dims = node.GetImageData().GetDimensions()
print(dims[0] * dims[1] * dims[2], before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def main():
    print("| scan | voxels | peak above imports MiB | bytes per voxel |")
    print("|---|---|---|---|")
    for scan in SCANS:
        out = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO), scan=str(scan))],
                             capture_output=True, text=True, check=True).stdout.split()
        voxels, before, peak = (int(v) for v in out[-3:])
        grown = (peak - before) * 1024  # ru_maxrss is in KiB on Linux
        print(f"| {scan.name} | {voxels} | {grown / 2**20:.0f} | {grown / voxels:.0f} |")


if __name__ == "__main__":
    main()
