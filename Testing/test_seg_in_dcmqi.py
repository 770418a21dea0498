"""Our DICOM SEG as 3D Slicer 5.10 loads it: Slicer's core has no SEG reader; its QuantitativeReporting extension
loads a SEG with dcmqi's segimage2itkimage (the `dcmqi` wheel on PyPI is that program). Every segment dcmqi reads
back must hold, in physical space, exactly the voxels we wrote; dcmqi takes the slice spacing from the SEG's declared
SpacingBetweenSlices (else SliceThickness), not from the frames' positions."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import JPEG2000_SERIES
from test_formats import dcmqi_segmentation, grid_voxels, needs_highdicom, segment_voxels
from test_tilted_series import TILT_DEGREES, tilted_copy
from SegmentationMachineLib.core import arrays
from SegmentationMachineLib.dicom.volumes import load_input, load_volume_file
from SegmentationMachineLib.mesh.export import ExportOptions, export_segmentation
from SegmentationMachineLib.segment.presets import add_segment_from_mask, apply_preset

SEGIMAGE2ITKIMAGE = shutil.which("segimage2itkimage", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                                            os.environ.get("PATH", "")]))
pytestmark = [needs_highdicom, pytest.mark.skipif(SEGIMAGE2ITKIMAGE is None, reason="pip install dcmqi (the test extra)")]


def dcmqi_read(ctx, seg_path, folder) -> dict:
    """{segment label: its voxels' RAS centres (N, 3)} as dcmqi's segimage2itkimage writes them out, read back with
    Slicer's own volume reader."""
    folder.mkdir()
    ran = subprocess.run([SEGIMAGE2ITKIMAGE, "--inputDICOM", str(seg_path), "--outputDirectory", str(folder),
                          "-t", "nrrd"], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    meta = json.loads((folder / "meta.json").read_text())
    read = {}
    for group in meta["segmentAttributes"]:
        for attributes in group:
            labelmap = load_volume_file(ctx, folder / f"{attributes['labelID']}.nrrd", labelmap=True).node
            k, j, i = np.nonzero(arrays.volume_array(labelmap))
            read[attributes["SegmentLabel"]] = (arrays.ijk_to_ras(labelmap) @ np.c_[i, j, k, np.ones(len(i))].T)[:3].T
    return read


def test_slicer_reads_every_segment_of_our_seg_voxel_for_voxel(ctx, shared_data, tmp_path):
    volume, node = dcmqi_segmentation(ctx)  # liver, spine, heart on the GE series, overlapping
    folder = export_segmentation(node, tmp_path / "out", ExportOptions(formats=("seg",))).folder
    read = dcmqi_read(ctx, folder / "segmentation.dcm", tmp_path / "dcmqi")
    assert list(read) == ["Liver", "spine", "Heart"]
    for index, name in enumerate(read):
        assert grid_voxels(read[name], volume) == segment_voxels(node, index, volume), name


def test_slicer_reads_a_seg_of_a_gantry_tilted_series_with_every_slice_at_its_spacing(ctx, shared_data, tmp_path):
    """highdicom declares no SpacingBetweenSlices for a tilted stack, and dcmqi took the 3 mm SliceThickness for the
    2 mm spacing: 14 slices instead of 20. dcmqi builds an orthogonal grid, so it leaves out the tilt's shear (a
    limit of dcmqi, which the README says): each slice holds its voxels, at its height."""
    tilted_copy(JPEG2000_SERIES, tmp_path / "tilted", TILT_DEGREES)
    volume = load_input(ctx, tmp_path / "tilted").node
    segmentation = apply_preset(ctx, volume, "bone")
    folder = export_segmentation(segmentation, tmp_path / "out", ExportOptions(formats=("seg",))).folder
    (read,) = dcmqi_read(ctx, folder / "segmentation.dcm", tmp_path / "dcmqi").values()
    ours = segment_voxels(segmentation, 0, volume)
    heights = np.unique(np.round(read[:, 2], 3))
    ours_by_slice = np.bincount([k for _, _, k in ours], minlength=arrays.volume_array(volume).shape[0])
    assert len(heights) == np.count_nonzero(ours_by_slice)
    assert np.allclose(np.diff(heights), 2.0, atol=1e-3)  # the series' slice spacing
    assert np.array_equal(np.unique(np.round(read[:, 2], 3), return_counts=True)[1],
                          ours_by_slice[ours_by_slice > 0])


def test_slicer_shows_segment_names_beyond_ascii_and_64_characters(ctx, shared_data, tmp_path):
    """A segment label is a LO (64 bytes, as validators count them in UTF-8) in the character set the SEG declares:
    highdicom copies the GE series' (none: ASCII), and wrote 'Müller' as a Latin-1 byte and Japanese as '?'. Names
    that only the cut makes alike stay apart."""
    volume, node = dcmqi_segmentation(ctx)
    long = "Arteria carotis communis sinistra with the bifurcation and the bulb"
    names = ["Läsion Müller – links", "腫瘍", "腫瘍" * 40, f"{long}, left", f"{long}, right"]
    mask = np.zeros(arrays.volume_array(volume).shape, bool)
    for index, name in enumerate(names):
        mask[:, 100 + 20 * index:110 + 20 * index, 100:110] = True
        add_segment_from_mask(node, mask.copy(), arrays.ijk_to_ras(volume), name, (0.5, 0.5, 0.5))
        mask[:] = False
    folder = export_segmentation(node, tmp_path / "out", ExportOptions(formats=("seg",))).folder
    labels = list(dcmqi_read(ctx, folder / "segmentation.dcm", tmp_path / "dcmqi"))[3:]
    assert labels[:2] == names[:2] and len(set(labels)) == len(names)
    for label, name in zip(labels[2:], names[2:]):
        assert len(label.encode()) <= 64 and name.startswith(label.removesuffix(" (2)")), label
    if shutil.which("dciodvfy"):  # Debian's dicom3tools: the DICOM validator found the long label and the stray byte
        said = subprocess.run(["dciodvfy", str(folder / "segmentation.dcm")], capture_output=True, text=True)
        assert not [line for line in (said.stdout + said.stderr).splitlines() if line.startswith("Error")], said.stderr
