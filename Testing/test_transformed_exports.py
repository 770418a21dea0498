"""Exports of a segmentation made on a volume under a parent transform (transformed_volume.py): the DICOM SEG
holds the segment voxel for voxel of its series, its frames where the series' images are (a gantry tilt's sheared
positions), and meshes lie in world RAS, through non-linear transforms too: watertight, facing outward, their
volume compared with their voxels' in the same frame, and a transform that folds a segment inside out said."""

import shutil
import subprocess
from dataclasses import replace

import numpy as np
import pytest

from conftest import UNCOMPRESSED_SERIES
from slicer_standins import DicomDatabase
from SegmentationMachineLib.core import arrays
from SegmentationMachineLib.core.errors import ExportError
from SegmentationMachineLib.dicom.volumes import load_input
from SegmentationMachineLib.mesh.check import check_mesh
from SegmentationMachineLib.mesh.export import ExportOptions, export_segmentation, prepare_export, write_export
from SegmentationMachineLib.mesh.surfaces import meshes_from, read_segments, SurfaceOptions
from SegmentationMachineLib.prompts.frames import world_to_local
from SegmentationMachineLib.segment.presets import add_segment_from_mask
from test_formats import highdicom_voxels, mask_voxels, needs_highdicom
from transformed_volume import (GRID, SHAPE, TRANSFORMS, load_as_dicom_module, slice_grid, tilted_series,
                                transformed_volume, voxel_world)


def segmented(ctx, kind: str, under_it: bool):
    """The 3-slice CT series under a transform of kind, and a segmentation of a box of its voxels, under the same
    transform (as presets and prompt files make it) or in world (as the Segment Editor leaves a new one)."""
    volume = load_input(ctx, UNCOMPRESSED_SERIES).node
    volume.SetAndObserveTransformNodeID(TRANSFORMS[kind](ctx.scene, volume).GetID())
    mask = np.zeros((3, 512, 512), bool)
    mask[0:2, 100:140, 300:380] = True
    node = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "tilted")
    if under_it:
        node.SetAndObserveTransformNodeID(volume.GetTransformNodeID())
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)  # the volume's grid as the segmentation sees it
    add_segment_from_mask(node, mask, segmentation_grid(volume, under_it), "Tumour", (0.9, 0.1, 0.1))
    return volume, node, mask


def segmentation_grid(volume, under_it: bool) -> np.ndarray:
    """The volume's grid in the segmentation's RAS, as Slicer's reference geometry has it: across a non-linear
    transform, the volume's own grid, placed in world unchanged."""
    transform = volume.GetParentTransformNode()
    if under_it or not transform.IsTransformToWorldLinear():
        return arrays.ijk_to_ras(volume)
    return arrays.matrix_to_array(transform.GetMatrixTransformToParent()) @ arrays.ijk_to_ras(volume)


def nearest_voxels(volume, mask, grid) -> set:
    """The series voxels (i, j, k) whose centre, in world, is nearest to a voxel of mask on grid (in world): what
    resampling the segment onto the series must give."""
    to_grid, found = np.linalg.inv(grid), set()
    for kji in np.ndindex(3, 60, 100):
        kji = np.add(kji, (0, 90, 290))  # around the box
        i, j, k = np.rint(to_grid @ [*voxel_world(volume, kji), 1.0])[:3].astype(int)
        if mask[k, j, i]:
            found.add(tuple(int(v) for v in kji[::-1]))
    return found


@needs_highdicom
@pytest.mark.parametrize("kind, under_it", [("linear", True), ("linear", False), ("grid", False)])
def test_the_seg_holds_the_segment_on_its_series_voxels_whatever_the_transforms(ctx, shared_data, tmp_path, kind,
                                                                                 under_it):
    import highdicom

    volume, node, mask = segmented(ctx, kind, under_it)
    result = export_segmentation(node, tmp_path, ExportOptions(formats=("seg",)))
    read_back = highdicom_voxels(highdicom.seg.segread(result.folder / "segmentation.dcm"), volume)
    if kind == "linear":  # the segment is on the series' voxels
        assert read_back == {"Tumour": mask_voxels(mask, arrays.ijk_to_ras(volume), volume)}
    else:  # the segment is on a grid in world; the series' voxels lie through the acquisition transform
        expected = nearest_voxels(volume, mask, segmentation_grid(volume, under_it))
        assert read_back == {"Tumour": expected} and expected != mask_voxels(mask, arrays.ijk_to_ras(volume), volume)


@pytest.mark.parametrize("under_it", [True, False])
def test_meshes_lie_where_the_voxels_are_in_world(ctx, shared_data, under_it):
    volume, node, mask = segmented(ctx, "linear", under_it)
    (mesh,), empty = meshes_from(read_segments(node), SurfaceOptions(smoothing=0))
    corners = [voxel_world(volume, kji) for kji in ((0, 100, 300), (1, 139, 379))]  # the box's voxel corners
    assert np.allclose(mesh.points.mean(axis=0), np.mean(corners, axis=0), atol=0.05)


# In-plane shifts (mm) of the 3 slices of ct-3slice along their columns: a tilt whose slices are sheared unevenly,
# which Slicer's DICOM module puts under an acquisition transform (an even shear stays in the volume's matrix).
UNEVEN_TILT_MM = (0.0, 0.5, 1.8)
BOX = (slice(0, 3), slice(100, 140), slice(300, 380))  # K, J, I


def tilted_segmentation(ctx, tmp_path):
    """ct-3slice tilted unevenly, loaded as Slicer's DICOM module loads it (under its acquisition transform), its
    files, and a segmentation of a box of its voxels under the volume's transform, as presets make it."""
    files = tilted_series(sorted(UNCOMPRESSED_SERIES.glob("*.dcm")), tmp_path, UNEVEN_TILT_MM)
    volume = load_as_dicom_module(ctx, files)
    assert not volume.GetParentTransformNode().IsTransformToWorldLinear()
    mask = np.zeros((3, 512, 512), bool)
    mask[BOX] = True
    node = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "tilted")
    node.SetAndObserveTransformNodeID(volume.GetTransformNodeID())
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    add_segment_from_mask(node, mask, arrays.ijk_to_ras(volume), "Tumour", (0.9, 0.1, 0.1))
    return volume, node, mask, files


@needs_highdicom
def test_a_seg_of_a_tilted_series_puts_each_frame_where_its_source_image_is(ctx, shared_data, tmp_path):
    import highdicom
    import pydicom

    volume, node, mask, files = tilted_segmentation(ctx, tmp_path)
    database = DicomDatabase(files)
    options = ExportOptions(formats=("seg",))
    result = write_export(prepare_export(node, options, ctx=replace(ctx, dicom_database=database)), tmp_path, options)
    seg = highdicom.seg.segread(result.folder / "segmentation.dcm")
    sources = {str(d.SOPInstanceUID): d for d in (pydicom.dcmread(path, stop_before_pixels=True) for path in files)}
    uids = volume.GetAttribute("DICOM.instanceUIDs").split()  # in slice order
    assert seg.NumberOfFrames == 3
    for frame, pixels in zip(seg.PerFrameFunctionalGroupsSequence, seg.pixel_array):
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, float)
        assert np.allclose(position, np.asarray(sources[uid].ImagePositionPatient, float), atol=1e-4)
        assert np.array_equal(pixels > 0, mask[uids.index(uid)])
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert np.allclose(shared.PlaneOrientationSequence[0].ImageOrientationPatient,
                       sources[uids[0]].ImageOrientationPatient)
    assert float(shared.PixelMeasuresSequence[0].SliceThickness) == float(sources[uids[0]].SliceThickness)
    if shutil.which("dciodvfy"):  # Debian's dicom3tools: David Clunie's validator of DICOM's IODs
        said = subprocess.run(["dciodvfy", str(result.folder / "segmentation.dcm")], capture_output=True, text=True)
        assert not [line for line in (said.stdout + said.stderr).splitlines() if line.startswith("Error")], said.stderr


def grid_coordinates(volume, node, points: np.ndarray) -> np.ndarray:
    """(N, 3) world points as (i, j, k) of the volume's grid, back through the segmentation's transform."""
    local = world_to_local(node)(points)
    return (np.linalg.inv(arrays.ijk_to_ras(volume)) @ np.c_[local, np.ones(len(local))].T)[:3].T


def test_meshes_under_the_acquisition_transform_lie_where_slicer_shows_the_voxels(ctx, shared_data, tmp_path):
    """Unsmoothed, a box's mesh runs along its voxels' faces: mapped back from world through the acquisition
    transform, every vertex lies on one of the box's six faces in the series' grid."""
    volume, node, mask, files = tilted_segmentation(ctx, tmp_path)
    result = export_segmentation(node, tmp_path, ExportOptions(formats=("stl",),
                                                               surface=SurfaceOptions(smoothing=0)))
    (entry,) = result.report["meshes"]
    assert entry["watertight"] and entry["volume_ml"] > 0
    (mesh,), _ = meshes_from(read_segments(node), SurfaceOptions(smoothing=0))
    ijk = grid_coordinates(volume, node, mesh.points)
    low = np.array([BOX[2].start, BOX[1].start, BOX[0].start]) - 0.5
    high = np.array([BOX[2].stop, BOX[1].stop, BOX[0].stop]) - 0.5
    assert (ijk > low - 0.01).all() and (ijk < high + 0.01).all()
    assert (np.minimum(np.abs(ijk - low), np.abs(ijk - high)).min(axis=1) < 0.01).all()
    assert np.abs(world_to_local(node)(mesh.points) - mesh.points).max() > 0.3  # the transform moved them
    # The acquisition transform shifts slices within their planes: the volume is what the voxels hold.
    assert entry["volume_difference_percent"] == pytest.approx(
        100 * (entry["volume_ml"] / (mask.sum() * abs(np.linalg.det(arrays.ijk_to_ras(volume)[:3, :3])) / 1000) - 1),
        abs=0.1)


def stretched(ctx, stretch: float, fold_at: int = None):
    """The synthetic volume under a grid transform that moves slice k along the slice axis by (stretch - 1) k
    slices (a mirror where stretch < 0), then from slice fold_at on back the way it came (a fold), and a
    segmentation of a box of slices 10..20 under it."""
    volume = transformed_volume(ctx.scene, "linear")
    volume.SetAndObserveTransformNodeID(None)
    steps = np.arange(SHAPE[0], dtype=float)
    if fold_at is not None:
        steps = np.where(steps > fold_at, 2 * fold_at - steps, steps)
    axis = GRID[:3, 2]
    shifts = [(stretch * step - k) * axis for k, step in enumerate(steps)]
    transform = slice_grid(ctx.scene, volume, np.array([[[shift] * 2] * 2 for shift in shifts]))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    mask = np.zeros(SHAPE, bool)
    mask[10:21, 12:30, 20:40] = True
    node = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "stretched")
    node.SetAndObserveTransformNodeID(transform.GetID())
    add_segment_from_mask(node, mask, GRID, "Box", (0.2, 0.7, 0.3))
    return node, mask


@pytest.mark.parametrize("stretch", [1.5, -1.5])
def test_a_mesh_through_a_non_linear_transform_faces_outward_and_compares_volumes_in_one_frame(ctx, stretch, tmp_path):
    """A transform that stretches the box 1.5 times along its slices (mirrored or not) makes a mesh 1.5 times its
    volume in the segmentation's frame, facing outward, beside voxels 1.5 times theirs."""
    node, mask = stretched(ctx, stretch)
    (mesh,), _ = meshes_from(read_segments(node), SurfaceOptions())
    transform_id = node.GetTransformNodeID()
    node.SetAndObserveTransformNodeID(None)  # the same segment in its own frame
    (local,), _ = meshes_from(read_segments(node), SurfaceOptions())
    node.SetAndObserveTransformNodeID(transform_id)
    check, unmapped = check_mesh(mesh.points, mesh.triangles, mesh.normals), check_mesh(local.points, local.triangles)
    assert check.watertight and check.volume_ml == pytest.approx(1.5 * unmapped.volume_ml, rel=1e-3)
    voxel_ml = mask.sum() * abs(np.linalg.det(GRID[:3, :3])) / 1000
    assert local.voxel_volume_ml == pytest.approx(voxel_ml)
    assert mesh.voxel_volume_ml == pytest.approx(1.5 * voxel_ml, rel=1e-3)
    entry = export_segmentation(node, tmp_path, ExportOptions(formats=("stl",))).report["meshes"][0]
    assert entry["watertight"] and abs(entry["volume_difference_percent"]) < 5


def test_a_transform_that_folds_a_segment_inside_out_is_one_sentence(ctx):
    node, _ = stretched(ctx, 1.0, fold_at=15)
    with pytest.raises(ExportError, match=r"^Segment 'Box' lies where its segmentation's non-linear transform folds "
                                          r"space over itself, which would turn its mesh inside out there: correct "
                                          r"the transform, or harden it \(Data module\), and export again\.$"):
        meshes_from(read_segments(node), SurfaceOptions())


def test_an_export_prepared_before_close_scene_needs_nothing_of_the_scene(ctx, tmp_path):
    """The module's export runs on a worker thread while Close Scene (vtkMRMLScene::Clear) removes and deletes the
    nodes: what it meshes from was copied on the main thread, and the non-linear transform its points go through is
    VTK's own copy of the scene's transforms, kept alive by it. The meshes written after the scene is gone are those
    of an export made with the scene there."""
    import gc

    node, _ = stretched(ctx, 1.5)
    options = ExportOptions(formats=("stl",))
    with_the_scene = export_segmentation(node, tmp_path / "open", options)
    prepared = prepare_export(node, options)
    ctx.scene.Clear(False)  # File > Close Scene
    del node
    gc.collect()
    assert ctx.scene.GetNumberOfNodesByClass("vtkMRMLTransformNode") == 0
    after = write_export(prepared, tmp_path / "closed", options)
    assert (after.folder / "Box.stl").read_bytes() == (with_the_scene.folder / "Box.stl").read_bytes()
