"""What intensities the official model sees through our regions, against what upstream's own clients show it.

Upstream's server z-scores every uploaded image with the mean and standard deviation of its nonzero bounding box
(nnInteractive 2.6 inference_session.py, set_image). Its clients upload the whole volume; ours uploads a region (the
body's box, as many slices as one request carries; grown or moved for prompts elsewhere: prompts/region.py), whose
statistics differ. The weights cannot be downloaded here, so this measures the shift, not its effect on masks.

Run: .venv/bin/python benchmarks/region_normalization.py   (under a minute)
Columns: the region sent (K x J x I voxels), its mean and SD against the whole volume's, and where soft tissue
(60 HU) and bone (400 HU) land in SDs, as the model sees them through the region / through the whole volume.
"""

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from SegmentationMachineLib.core import arrays  # noqa: E402
from SegmentationMachineLib.core.scene import create_headless_scene  # noqa: E402
from SegmentationMachineLib.dicom.volumes import load_input  # noqa: E402
from SegmentationMachineLib.prompts.region import Limits, Planner, size, slices  # noqa: E402
from SegmentationMachineLib.prompts.remote import pack_image  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def server_statistics(image: np.ndarray) -> tuple:
    """(mean, SD) as upstream's set_image takes them: over the bounding box of the nonzero voxels."""
    where = [np.flatnonzero(image.any(axis=tuple(b for b in range(3) if b != a))) for a in range(3)]
    crop = image[tuple(slice(w[0], w[-1] + 1) for w in where)].astype(np.float64)
    return crop.mean(), crop.std()


def main():
    ctx = create_headless_scene()
    def voxels(path):
        return arrays.volume_array(load_input(ctx, DATA / path).node)

    real = voxels("dcmqi/ct-3slice")
    volumes = {
        "example_ct (3 mm, abdomen)": voxels("totalsegmentator/example_ct.nii.gz"),
        "example_ct_dicom (20 slices, contrast)": voxels("totalsegmentator/example_ct_dicom"),
        "ct-3slice repeated to 300": np.resize(real, (300, *real.shape[1:])),
        "ct-3slice repeated to 1000": np.resize(real, (1000, *real.shape[1:])),
    }
    print("| volume | region | shape sent | mean / SD sent | mean / SD whole | 60 HU: sent / whole "
          "| 400 HU: sent / whole |")
    print("|---|---|---|---|---|---|---|")
    for name, volume in volumes.items():
        whole = server_statistics(volume)
        planner = Planner(volume, Limits(), pack_image)
        first = planner.first()
        far = np.array([[volume.shape[0] - 2, volume.shape[1] // 2, volume.shape[2] // 2]] * 2) + [[0] * 3, [1] * 3]
        rows = [("first", first), ("after a prompt at the last slice", planner.toward(first, far))]
        for label, region in rows:
            mean, sd = server_statistics(volume[slices(region)])
            seen = [f"{(hu - mean) / sd:+.2f} / {(hu - whole[0]) / whole[1]:+.2f}" for hu in (60, 400)]
            print(f"| {name} | {label} | {'x'.join(map(str, size(region)))} | {mean:.0f} / {sd:.0f} | "
                  f"{whole[0]:.0f} / {whole[1]:.0f} | {seen[0]} | {seen[1]} |")


if __name__ == "__main__":
    main()
