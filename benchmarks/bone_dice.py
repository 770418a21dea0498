"""Bone preset vs TotalSegmentator's bone labels on example_ct (Dice), against a plain 150 HU threshold.

Run: .venv/bin/python benchmarks/bone_dice.py
"""

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from SegmentationMachineLib.core import arrays  # noqa: E402
from SegmentationMachineLib.core.scene import create_headless_scene  # noqa: E402
from SegmentationMachineLib.dicom.volumes import load_volume_file  # noqa: E402
from SegmentationMachineLib.segment.presets import bone_mask, spacing_kji  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "totalsegmentator"
BONE_LABELS = [*range(25, 51), *range(69, 79), *range(91, 117)]


def dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def main():
    ctx = create_headless_scene()
    volume = load_volume_file(ctx, DATA / "example_ct.nii.gz").node
    hu = arrays.volume_array(volume)
    truth = np.isin(arrays.volume_array(load_volume_file(ctx, DATA / "example_seg_fast_force_split.nii.gz", labelmap=True).node), BONE_LABELS)
    started = time.perf_counter()
    ours = bone_mask(hu, spacing_kji(volume))
    seconds = time.perf_counter() - started
    print("| method | Dice | seconds |\n|---|---|---|")
    print(f"| plain threshold > 150 HU | {dice(hu > 150, truth):.3f} | - |")
    print(f"| `bone` preset | {dice(ours, truth):.3f} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
