"""A gantry-tilted CT (its slices shifted along the column direction in proportion to their height) loads as Slicer
5.10 loads it, on a sheared voxel grid with every slice where it was acquired, and its meshes are the untilted
scan's meshes sheared the same way: not refused, not distorted."""

import json

import numpy as np
import pydicom
import pytest
import vtk
from pydicom.uid import generate_uid
from vtkmodules.util import numpy_support

from conftest import JPEG2000_SERIES
from test_formats import needs_highdicom, segment_voxels
from SegmentationMachineLib.core import arrays
from SegmentationMachineLib.core.errors import InputError
from SegmentationMachineLib.dicom.phantom import make_phantom, write_ct_series
from SegmentationMachineLib.dicom.volumes import load_input
from SegmentationMachineLib.mesh.export import export_segmentation, ExportOptions
from SegmentationMachineLib.segment.dicomseg import load_dicom_seg
from SegmentationMachineLib.segment.presets import apply_preset

TILT_DEGREES = 15.0
LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def tilted_copy(source, folder, degrees: float):
    """The real axial series as a gantry tilted by degrees acquires it: each slice moved along LPS y by
    tan(degrees) times its height above the lowest slice. Pixel data (JPEG 2000) is copied as it is; the study and
    series UIDs and the instance UID its anonymiser blanked are given back, as a scanner writes them."""
    folder.mkdir()
    datasets = [pydicom.dcmread(path) for path in sorted(source.iterdir())]
    lowest = min(float(d.ImagePositionPatient[2]) for d in datasets)
    study, series = generate_uid(), generate_uid()
    for index, dataset in enumerate(datasets):
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, series
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID
        x, y, z = map(float, dataset.ImagePositionPatient)
        dataset.ImagePositionPatient = [f"{v:.4f}" for v in (x, y + np.tan(np.radians(degrees)) * (z - lowest), z)]
        dataset.save_as(folder / f"{index:03d}.dcm")
    return lowest


def test_every_slice_of_a_tilted_series_lies_where_it_was_acquired(ctx, shared_data, tmp_path):
    tilted_copy(JPEG2000_SERIES, tmp_path / "tilted", TILT_DEGREES)
    loaded = load_input(ctx, tmp_path / "tilted")
    straight = load_input(ctx, JPEG2000_SERIES)
    matrix = arrays.ijk_to_ras(loaded.node)
    for k, path in enumerate(loaded.series.files):
        acquired = np.array(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient, float) * LPS_TO_RAS
        assert np.allclose((matrix @ [0, 0, k, 1])[:3], acquired, atol=0.01)
    assert np.array_equal(arrays.volume_array(loaded.node), arrays.volume_array(straight.node))
    assert any(f"gantry tilt of {TILT_DEGREES:.1f}°" in note for note in loaded.notes)


def test_the_meshes_of_a_tilted_series_are_the_straight_ones_sheared(ctx, shared_data, tmp_path):
    lowest = tilted_copy(JPEG2000_SERIES, tmp_path / "tilted", TILT_DEGREES)
    meshes = {}
    for name, source in (("straight", JPEG2000_SERIES), ("tilted", tmp_path / "tilted")):
        segmentation = apply_preset(ctx, load_input(ctx, source).node, "bone")
        folder = export_segmentation(segmentation, tmp_path / name, ExportOptions(formats=("stl",))).folder
        reader = vtk.vtkSTLReader()
        reader.SetFileName(str(folder / "Bone.stl"))
        reader.Update()
        points = numpy_support.vtk_to_numpy(reader.GetOutput().GetPoints().GetData()).astype(float)
        meshes[name] = points, json.loads((folder / "report.json").read_text())["meshes"][0]
    (straight, straight_report), (tilted, tilted_report) = meshes["straight"], meshes["tilted"]
    sheared = straight + np.outer(np.tan(np.radians(TILT_DEGREES)) * (straight[:, 2] - lowest), [0, 1, 0])  # LPS
    assert np.abs(tilted.min(axis=0) - sheared.min(axis=0)).max() < 0.5
    assert np.abs(tilted.max(axis=0) - sheared.max(axis=0)).max() < 0.5
    assert abs(tilted.mean(axis=0) - sheared.mean(axis=0)).max() < 0.5
    # A shear keeps volumes: the bone is as large in both (the preset's millimetre-sized steps fall on 2.07 mm
    # voxel steps along the tilted stack instead of 2 mm, which moves its mask by about 1%).
    assert tilted_report["volume_ml"] == pytest.approx(straight_report["volume_ml"], rel=0.02)
    assert tilted_report["watertight"]


def test_a_stack_leaning_more_than_a_gantry_tilts_is_one_sentence(ctx, tmp_path):
    phantom = make_phantom(shape=(6, 32, 32))
    lean = 2.0 * np.tan(np.radians(35))  # per 2 mm slice: 35°, past the 30° a gantry tilts
    write_ct_series(tmp_path, phantom.hu, 1.5, [(0.0, k * lean, k * 2.0) for k in range(6)], "leaning")
    with pytest.raises(InputError, match=r"lean 35\.0° from their normal, more than a CT gantry tilts \(30°\)"):
        load_input(ctx, tmp_path)


@needs_highdicom
def test_a_seg_of_a_tilted_series_puts_each_frame_on_its_image(ctx, shared_data, tmp_path):
    import highdicom

    tilted_copy(JPEG2000_SERIES, tmp_path / "tilted", TILT_DEGREES)
    volume = load_input(ctx, tmp_path / "tilted").node
    segmentation = apply_preset(ctx, volume, "bone")
    folder = export_segmentation(segmentation, tmp_path / "out", ExportOptions(formats=("seg",))).folder
    seg = highdicom.seg.segread(folder / "segmentation.dcm")
    sources = {str(d.SOPInstanceUID): d for d in (pydicom.dcmread(path, stop_before_pixels=True)
                                                  for path in (tmp_path / "tilted").iterdir())}
    assert seg.NumberOfFrames > 10
    for frame in seg.PerFrameFunctionalGroupsSequence:
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert np.allclose(np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, float),
                           np.asarray(sources[uid].ImagePositionPatient, float), atol=1e-3)
    # and `export` reads it back on the sheared grid, every voxel in place
    again = load_dicom_seg(ctx, folder / "segmentation.dcm")
    assert segment_voxels(again, 0, volume) == segment_voxels(segmentation, 0, volume)
