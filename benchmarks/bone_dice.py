"""Bone preset vs TotalSegmentator's bone labels (Dice, in physical space), against a plain 150 HU threshold,
on the non-contrast example_ct (NIfTI) and the contrast-enhanced example_ct_dicom series (JPEG 2000 DICOM).

Run: .venv/bin/python benchmarks/bone_dice.py
"""

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from SegmentationMachineLib.core import arrays  # noqa: E402
from SegmentationMachineLib.core.scene import create_headless_scene  # noqa: E402
from SegmentationMachineLib.dicom.volumes import load_input, load_volume_file  # noqa: E402
from SegmentationMachineLib.segment.presets import bone_mask, spacing_kji  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "totalsegmentator"
BONE_LABELS = [*range(25, 51), *range(69, 79), *range(91, 117)]
SCANS = [("example_ct (no contrast, 3 mm)", "example_ct.nii.gz", "example_seg_fast_force_split.nii.gz"),
         ("example_ct_dicom (contrast, 0.98x0.98x2 mm)", "example_ct_dicom", "example_seg_dicom.nii.gz")]


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


def main():
    ctx = create_headless_scene()
    print("| scan | method | Dice | mL ours | mL reference | seconds |\n|---|---|---|---|---|---|")
    for title, image, reference in SCANS:
        volume = load_input(ctx, DATA / image).node
        hu, ijk_to_ras = arrays.volume_array(volume), arrays.ijk_to_ras(volume)
        labels = load_volume_file(ctx, DATA / reference, labelmap=True).node
        truth = np.isin(labels_on_grid(arrays.volume_array(labels), arrays.ijk_to_ras(labels), hu.shape, ijk_to_ras),
                        BONE_LABELS)
        voxel_ml = float(np.prod(spacing_kji(volume))) / 1000.0
        started = time.perf_counter()
        ours = bone_mask(hu, spacing_kji(volume))
        seconds = time.perf_counter() - started
        for method, mask, took in [("plain threshold > 150 HU", hu > 150, "-"), ("`bone` preset", ours, f"{seconds:.2f}")]:
            print(f"| {title} | {method} | {dice(mask, truth):.3f} | {mask.sum() * voxel_ml:.0f} | "
                  f"{truth.sum() * voxel_ml:.0f} | {took} |")


if __name__ == "__main__":
    main()
