"""Mesh volume against voxel volume for thin bones on a real 3 mm CT (the ribs and T11 of
example_seg_fast_force_split): iso-level 0.5, as before, against the volume-matched level and sigma.

Run: .venv/bin/python benchmarks/mesh_volume.py [--smoothing 0.5]
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from SegmentationMachineLib.core.scene import create_headless_scene  # noqa: E402
from SegmentationMachineLib.mesh import surfaces  # noqa: E402
from SegmentationMachineLib.mesh.check import check_mesh  # noqa: E402
from SegmentationMachineLib.segment.segmentations import load_segmentation  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "totalsegmentator"


def volumes(segmentation, ids, options) -> dict:
    meshes, _ = surfaces.meshes_from(surfaces.read_segments(segmentation, ids, options), options)
    return {m.name: (m.voxel_volume_ml, check_mesh(m.points, m.triangles).volume_ml, m.iso_level, m.sigma_voxels)
            for m in meshes}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoothing", type=float, default=0.5)
    args = parser.parse_args()
    names = {int(k): v for k, v in json.loads((DATA / "labels_total.json").read_text()).items()}
    ctx = create_headless_scene()
    segmentation = load_segmentation(ctx, DATA / "example_seg_fast_force_split.nii.gz", names)
    table = segmentation.GetSegmentation()
    ids = [table.GetNthSegmentID(i) for i in range(table.GetNumberOfSegments())
           if table.GetNthSegment(i).GetName().startswith(("rib_", "vertebrae_T11"))]
    options = surfaces.SurfaceOptions(smoothing=args.smoothing)
    matched = volumes(segmentation, ids, options)
    surfaces.VOLUME_TOLERANCE = float("inf")  # never leaves iso-level 0.5: the behaviour before
    before = volumes(segmentation, ids, options)
    print(f"| segment (smoothing {args.smoothing}) | voxels mL | level 0.5 mL | diff | matched mL | diff | level | sigma (voxels) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in sorted(matched, key=lambda n: before.get(n, (1, 0))[1] / matched[n][0]):
        voxels, new, level, sigma = matched[name]
        old = before[name][1] if name in before else 0.0  # no mesh at all: it vanished
        print(f"| {name} | {voxels:.2f} | {old:.2f} | {100 * (old - voxels) / voxels:+.0f}% | {new:.2f} | "
              f"{100 * (new - voxels) / voxels:+.1f}% | {level:.2f} | {sigma:.2f} |")


if __name__ == "__main__":
    main()
