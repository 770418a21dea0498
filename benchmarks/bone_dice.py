"""Bone preset vs TotalSegmentator's bone labels (Dice, in physical space), against a plain 150 HU threshold,
on the non-contrast example_ct (NIfTI) and the contrast-enhanced example_ct_dicom series (JPEG 2000 DICOM),
also with both masks on a 3 mm grid, and as surface Dice within 3 mm: TotalSegmentator made both references on
one (run --fast) and brought the contrast series' back to 0.98 mm voxels, which caps what a 0.98 mm mask can
score against it (the "cap" row), but not its surface Dice;
as a third scanner (not used for tuning), how much of dcmqi's spine label on ct-3slice the preset covers;
and the preset's seconds on a 512x512x300 volume (the contrast series stacked 15 times).

Run: .venv/bin/python benchmarks/bone_dice.py
"""

import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from SegmentationMachineLib.core import arrays  # noqa: E402
from SegmentationMachineLib.core.scene import create_headless_scene  # noqa: E402
from SegmentationMachineLib.dicom.volumes import load_input, load_volume_file  # noqa: E402
from SegmentationMachineLib.segment.masks import preset_mask  # noqa: E402
from SegmentationMachineLib.segment.presets import spacing_kji  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BONE_LABELS = [*range(25, 51), *range(69, 79), *range(91, 117)]
SCANS = [("example_ct (no contrast, 3 mm)", "totalsegmentator/example_ct.nii.gz",
          "totalsegmentator/example_seg_fast_force_split.nii.gz"),
         ("example_ct_dicom (contrast, 0.98x0.98x2 mm)", "totalsegmentator/example_ct_dicom",
          "totalsegmentator/example_seg_dicom.nii.gz")]
SPINE = ("dcmqi ct-3slice (GE, 0.81x0.81x1 mm, 3 slices)", "dcmqi/ct-3slice", "dcmqi/spine_seg.nrrd")
REFERENCE_GRID_MM = 3.0  # TotalSegmentator --fast's grid: the contrast reference is exactly its 0.98 mm resampling
SURFACE_TOLERANCE_MM = 3.0  # one voxel of the references' grid: how far their edges can be from the true edge
STACKED = 15  # copies of the 20-slice contrast series: 300 slices, a real scan's length


def labels_on_grid(labels, labels_ijk_to_ras, shape, ijk_to_ras):
    """Nearest-neighbour labels at the centre of every voxel of the grid (K, J, I) that ijk_to_ras describes."""
    k, j, i = np.indices(shape).reshape(3, -1)
    voxel = np.linalg.inv(labels_ijk_to_ras) @ ijk_to_ras @ np.stack([i, j, k, np.ones_like(i)])
    li, lj, lk = np.rint(voxel[:3]).astype(int)
    inside = (li >= 0) & (li < labels.shape[2]) & (lj >= 0) & (lj < labels.shape[1]) & (lk >= 0) & (lk < labels.shape[0])
    result = np.zeros(k.size, labels.dtype)
    result[inside] = labels[lk[inside], lj[inside], li[inside]]
    return result.reshape(shape)


def dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def surface_dice(mask, truth, spacing, tolerance_mm=SURFACE_TOLERANCE_MM):
    """Normalised surface Dice (Nikolov et al. 2021), on voxels: the share of both masks' surface voxels that lie
    within tolerance_mm of the other mask's surface. The scan's own ends are no surface: both masks are cut there."""
    ours, theirs = (m & ~ndimage.binary_erosion(m, border_value=1) for m in (mask, truth))
    near_theirs = ndimage.distance_transform_edt(~theirs, sampling=spacing) <= tolerance_mm
    near_ours = ndimage.distance_transform_edt(~ours, sampling=spacing) <= tolerance_mm
    return ((ours & near_theirs).sum() + (theirs & near_ours).sum()) / (ours.sum() + theirs.sum())


def on_reference_grid(mask, spacing):
    """mask resampled to REFERENCE_GRID_MM voxels as TotalSegmentator resamples (scipy zoom, linear, half)."""
    return ndimage.zoom(mask.astype(np.float32), np.divide(spacing, REFERENCE_GRID_MM), order=1) > 0.5


def back_from_reference_grid(mask, spacing):
    """mask through the reference's grid and back (nearest): what a perfect mask becomes on it."""
    coarse = on_reference_grid(mask, spacing)
    return ndimage.zoom(coarse.astype(np.uint8), np.divide(mask.shape, coarse.shape), order=0).astype(bool)


def load(ctx, image, reference):
    """(hu, spacing, reference labels on hu's grid, hu's IJK to RAS) of a scan and its label file."""
    volume = load_input(ctx, DATA / image).node
    hu, ijk_to_ras = arrays.volume_array(volume), arrays.ijk_to_ras(volume)
    labels = load_volume_file(ctx, DATA / reference, labelmap=True).node
    return hu, spacing_kji(volume), labels_on_grid(arrays.volume_array(labels), arrays.ijk_to_ras(labels), hu.shape,
                                                   ijk_to_ras), ijk_to_ras


def timed_bone(hu, spacing, ijk_to_ras):
    """The bone preset as the CLI and the module run it (seen as an axial series, whatever the scan's axes)."""
    started = time.perf_counter()
    mask = preset_mask("bone", hu, spacing, "benchmark", ijk_to_ras=ijk_to_ras)
    return mask, f"{time.perf_counter() - started:.2f}"


def main():
    ctx = create_headless_scene()
    print(f"| scan | method | score | on a 3 mm grid | surface Dice, {SURFACE_TOLERANCE_MM:g} mm | mL ours | "
          "mL reference | seconds |\n|---|---|---|---|---|---|---|---|")
    for title, image, reference in SCANS:
        hu, spacing, labels, ijk_to_ras = load(ctx, image, reference)
        truth, voxel_ml = np.isin(labels, BONE_LABELS), float(np.prod(spacing)) / 1000.0
        ours, seconds = timed_bone(hu, spacing, ijk_to_ras)
        for method, mask, took in [("plain threshold > 150 HU", hu > 150, "-"), ("`bone` preset", ours, seconds)]:
            coarse = dice(on_reference_grid(mask, spacing), on_reference_grid(truth, spacing))
            print(f"| {title} | {method} | Dice {dice(mask, truth):.3f} | Dice {coarse:.3f} | "
                  f"{surface_dice(mask, truth, spacing):.3f} | {mask.sum() * voxel_ml:.0f} | "
                  f"{truth.sum() * voxel_ml:.0f} | {took} |")
        through = back_from_reference_grid(ours, spacing)
        print(f"| {title} | cap: the preset's mask against itself through a 3 mm grid | "
              f"Dice {dice(ours, through):.3f} | - | {surface_dice(ours, through, spacing):.3f} | - | - | - |")
    title, image, reference = SPINE
    hu, spacing, labels, ijk_to_ras = load(ctx, image, reference)
    spine, voxel_ml = labels > 0, float(np.prod(spacing)) / 1000.0
    ours, seconds = timed_bone(hu, spacing, ijk_to_ras)
    print(f"| {title} | `bone` preset | spine recall {(ours & spine).sum() / spine.sum():.3f} | - | - | "
          f"{ours.sum() * voxel_ml:.1f} | {spine.sum() * voxel_ml:.1f} (spine) | {seconds} |")
    hu, spacing, _, ijk_to_ras = load(ctx, *SCANS[1][1:])
    ours, seconds = timed_bone(np.concatenate([hu] * STACKED), spacing, ijk_to_ras)
    print(f"| example_ct_dicom stacked {STACKED} times (512x512x{len(hu) * STACKED}) | `bone` preset | - | - | - | "
          f"{ours.sum() * float(np.prod(spacing)) / 1000.0:.0f} | - | {seconds} |")


if __name__ == "__main__":
    main()
