"""Export all 61 labels of example_seg_fast_force_split to STL: ours vs Slicer's own exporter, same run.

Run: .venv/bin/python benchmarks/export_speed.py [--repeat 3]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import vtk
from vtkmodules.util import numpy_support

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from SegmentationMachineLib.core.scene import create_headless_scene  # noqa: E402
from SegmentationMachineLib.mesh.check import check_mesh  # noqa: E402
from SegmentationMachineLib.mesh.export import export_segmentation, ExportOptions  # noqa: E402
from SegmentationMachineLib.segment.segmentations import load_segmentation  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "totalsegmentator"


def watertight_stls(folder: Path) -> tuple:
    count = total = 0
    for path in folder.glob("*.stl"):
        reader = vtk.vtkSTLReader()  # merges coincident points, as printers' slicers do
        reader.SetFileName(str(path))
        reader.Update()
        mesh = reader.GetOutput()
        triangles = numpy_support.vtk_to_numpy(mesh.GetPolys().GetConnectivityArray()).reshape(-1, 3)
        points = numpy_support.vtk_to_numpy(mesh.GetPoints().GetData()).astype(float)
        count += check_mesh(points, triangles.astype(np.int64)).watertight
        total += 1
    return count, total


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    ctx = create_headless_scene()
    segmentation = load_segmentation(ctx, DATA / "example_seg_fast_force_split.nii.gz")
    exporters = [
        ("SegmentationMachine (flying edges, smoothing 0.5, 2 threads)",
         lambda out: export_segmentation(segmentation, out, ExportOptions(formats=("stl",))).folder),
        ("Slicer ExportSegmentsClosedSurfaceRepresentationToFiles (defaults)",
         lambda out: (ctx.segmentations_logic.ExportSegmentsClosedSurfaceRepresentationToFiles(
             str(out), segmentation, None, "STL", True, 1.0, False), Path(out))[1]),
    ]
    times = {name: [] for name, _ in exporters}
    folders = {}
    for _ in range(args.repeat):  # interleaved, so both see the same machine load
        for name, run in exporters:
            # Slicer caches closed surfaces in the segmentation: drop them so every run converts.
            segmentation.GetSegmentation().RemoveRepresentation("Closed surface")
            started = time.perf_counter()
            folders[name] = run(Path(tempfile.mkdtemp()))
            times[name].append(time.perf_counter() - started)
    print("| exporter | best s | median s | watertight STLs |\n|---|---|---|---|")
    for name, _ in exporters:
        ok, total = watertight_stls(folders[name])
        print(f"| {name} | {min(times[name]):.3f} | {np.median(times[name]):.3f} | {ok}/{total} |")
    ours, theirs = (np.median(times[name]) for name, _ in exporters)
    print(f"\nSpeed-up (median/median, {args.repeat} interleaved runs): {theirs / ours:.1f}x")

if __name__ == "__main__":
    main()
