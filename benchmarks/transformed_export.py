"""Meshes of all 61 labels of example_seg_fast_force_split: without a transform, and under a grid transform like
the acquisition transform Slicer's DICOM module puts on an unevenly tilted series (20 degree shear plus a 3 mm
wobble per slice), same run: seconds, watertight meshes, outward (positive volume), volume vs voxels.

Run: .venv/bin/python benchmarks/transformed_export.py [--repeat 5]
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Testing"))
from SegmentationMachineLib.core.scene import create_headless_scene  # noqa: E402
from SegmentationMachineLib.dicom.volumes import load_input  # noqa: E402
from SegmentationMachineLib.mesh.check import check_mesh  # noqa: E402
from SegmentationMachineLib.mesh.surfaces import SurfaceOptions, meshes_from, read_segments  # noqa: E402
from SegmentationMachineLib.segment.segmentations import load_segmentation  # noqa: E402
from transformed_volume import TILT, slice_grid  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "totalsegmentator"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    ctx = create_headless_scene()
    segmentation = load_segmentation(ctx, DATA / "example_seg_fast_force_split.nii.gz")
    volume = load_input(ctx, DATA / "example_ct.nii.gz").node
    slices, spacing = volume.GetImageData().GetDimensions()[2], volume.GetSpacing()
    shifts = [k * spacing[2] * TILT + 3.0 * np.sin(k / 5) for k in range(slices)]
    grid = slice_grid(ctx.scene, volume, np.array([[[[0.0, shift, 0.0]] * 2] * 2 for shift in shifts]))
    cases = {"no transform": None, "grid transform": grid.GetID()}
    times, meshes = {name: [] for name in cases}, {}
    for _ in range(args.repeat):  # interleaved, so both see the same machine load
        for name, transform_id in cases.items():
            segmentation.SetAndObserveTransformNodeID(transform_id)
            started = time.perf_counter()
            meshes[name] = meshes_from(read_segments(segmentation), SurfaceOptions(threads=2))[0]
            times[name].append(time.perf_counter() - started)
    for name in cases:
        checks = [check_mesh(m.points, m.triangles, m.normals) for m in meshes[name]]
        worst = max(abs(c.volume_ml / m.voxel_volume_ml - 1) for c, m in zip(checks, meshes[name]))
        print(f"{name}: median {np.median(times[name]):.3f} s; {sum(c.watertight for c in checks)}/{len(checks)} "
              f"watertight, {sum(c.volume_ml > 0 for c in checks)} outward, worst volume vs voxels {100 * worst:.1f}%")


if __name__ == "__main__":
    main()
