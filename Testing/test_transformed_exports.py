"""Exports of a segmentation made on a volume under a parent transform (transformed_volume.py): the DICOM SEG
holds the segment voxel for voxel of its series, meshes lie in world RAS, and a non-linear transform on the
segmentation is one sentence."""

import numpy as np
import pytest

from conftest import UNCOMPRESSED_SERIES
from SegmentationMachineLib.core import arrays
from SegmentationMachineLib.core.errors import ExportError
from SegmentationMachineLib.dicom.volumes import load_input
from SegmentationMachineLib.mesh.export import ExportOptions, export_segmentation
from SegmentationMachineLib.mesh.surfaces import meshes_from, read_segments, SurfaceOptions
from SegmentationMachineLib.segment.presets import add_segment_from_mask
from test_formats import highdicom_voxels, mask_voxels, needs_highdicom
from transformed_volume import TRANSFORMS, voxel_world


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


def test_a_segmentation_under_a_non_linear_transform_is_one_sentence(ctx, shared_data):
    node = segmented(ctx, "grid", True)[1]
    with pytest.raises(ExportError, match=r"^Segmentation 'tilted' is under a non-linear transform \(such as the "
                                          r"acquisition transform Slicer puts on a gantry-tilted series\): harden "
                                          r"the transform \(Data module\) and export again\.$"):
        read_segments(node)
