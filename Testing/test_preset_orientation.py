"""The presets on a series acquired sagittally or coronally (or a reformat): the same anatomy, the same voxels.

The bone preset closes, fills marrow and outlines axial slices; run on a sagittal series' own slices it bridged the
disc spaces and lost the femoral marrow, without a word. The phantom is written as real DICOM in each plane, on one
voxel grid, so the segments must agree voxel for voxel, mapped through each volume's own IJK->RAS matrix.
"""

import numpy as np
import pytest

from conftest import JPEG2000_SERIES
from SegmentationMachineLib.core import arrays
from SegmentationMachineLib.core.grids import AxialView
from SegmentationMachineLib.dicom.phantom import make_phantom, write_ct_series, write_phantom
from SegmentationMachineLib.dicom.volumes import load_input
from SegmentationMachineLib.panels.presets import PresetsPanel
from SegmentationMachineLib.segment.masks import preset_mask
from SegmentationMachineLib.segment.presets import apply_preset, spacing_kji

# Isotropic voxels: a sagittal or coronal slice's rows are the axial series' slices.
SPACING = 1.5


@pytest.fixture(scope="module")
def anatomy():
    return make_phantom((48, 128, 128), pixel_spacing=SPACING, slice_spacing=SPACING)


def write_in_plane(folder, phantom, plane: str, description: str = None) -> list:
    """The phantom (isotropic voxels) as a scanner writes a sagittal (slices from right to left, rows from head to
    foot, columns from front to back) or coronal (slices from front to back, rows from head to foot, columns from
    right to left) series, every voxel where the axial series has it (LPS millimetres); its files."""
    spacing = phantom.pixel_spacing
    assert phantom.slice_spacing == spacing
    slices, rows, cols = phantom.hu.shape
    x0, y0 = -(cols - 1) / 2 * spacing, -(rows - 1) / 2 * spacing
    top = (slices - 1) / 2 * spacing
    if plane == "sagittal":
        planes = phantom.hu.transpose(2, 0, 1)[:, ::-1, :]
        positions = [(x0 + i * spacing, y0, top) for i in range(cols)]
        orientation = (0, 1, 0, 0, 0, -1)
    else:
        planes = phantom.hu.transpose(1, 0, 2)[:, ::-1, :]
        positions = [(x0, y0 + j * spacing, top) for j in range(rows)]
        orientation = (1, 0, 0, 0, 0, -1)
    return write_ct_series(folder, np.ascontiguousarray(planes), spacing, positions, description or f"phantom {plane}",
                           orientation)


@pytest.fixture(scope="module")
def series(anatomy, tmp_path_factory):
    """Each plane's series folder."""
    root = tmp_path_factory.mktemp("planes")
    write_phantom(root / "axial", anatomy)
    for plane in ("sagittal", "coronal"):
        write_in_plane(root / plane, anatomy, plane)
    return {plane: root / plane for plane in ("axial", "sagittal", "coronal")}


def on_axial_grid(mask, ijk_to_ras, axial_ijk_to_ras, shape):
    """mask (on the grid ijk_to_ras describes) at the centre of every voxel of the axial grid."""
    k, j, i = np.indices(shape).reshape(3, -1)
    ijk = np.linalg.inv(ijk_to_ras) @ axial_ijk_to_ras @ np.stack([i, j, k, np.ones_like(i)])
    mi, mj, mk = np.rint(ijk[:3]).astype(int)
    assert np.abs(ijk[:3] - np.rint(ijk[:3])).max() < 1e-3  # one voxel grid in every plane
    return mask[mk, mj, mi].reshape(shape)


def segment_mask(segmentation_node, name, shape):
    """A segment's voxels on its volume's K, J, I grid (shape)."""
    segmentation = segmentation_node.GetSegmentation()
    segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(name))
    labelmap = segment.GetRepresentation("Binary labelmap")
    e = labelmap.GetExtent()
    full = np.zeros(shape, bool)
    full[e[4]:e[5] + 1, e[2]:e[3] + 1, e[0]:e[1] + 1] = arrays.image_array(labelmap) == segment.GetLabelValue()
    return full


def presets_by_cli_path(ctx, volume):
    """segment.presets.apply_preset: what `segmentation-machine model --preset bone,skin` runs."""
    node = apply_preset(ctx, volume, "bone")
    return apply_preset(ctx, volume, "skin", node)


def presets_by_module_path(ctx, volume):
    """The module's Apply: the Presets panel runs each preset in its child process and adds the cropped mask."""
    node = None
    for preset in ("bone", "skin"):
        panel = PresetsPanel(preset=preset)
        panel.start(volume, node)
        assert panel.task.wait(300)
        node = panel.finish(ctx)
        assert node is not None, panel.status
    return node


@pytest.mark.parametrize("path", [presets_by_cli_path, presets_by_module_path], ids=["cli", "module"])
def test_a_sagittal_or_coronal_series_gives_the_axial_series_bone_and_skin(ctx, anatomy, series, path):
    axial = load_input(ctx, series["axial"]).node
    shape, axial_grid = anatomy.hu.shape, arrays.ijk_to_ras(axial)
    reference = path(ctx, axial)
    expected = {name: segment_mask(reference, name, shape) for name in ("Bone", "Skin")}
    # The axial result is the anatomy's: every vertebra and femoral shaft with its marrow, no table, no air.
    assert (expected["Bone"] & anatomy.bone).sum() > 0.97 * anatomy.bone.sum()
    assert (expected["Bone"] & ~anatomy.bone).sum() < 0.03 * anatomy.bone.sum()
    assert (expected["Skin"] ^ anatomy.body).sum() < 0.01 * anatomy.body.sum()
    for plane in ("sagittal", "coronal"):
        volume = load_input(ctx, series[plane]).node
        own_shape, grid = arrays.volume_array(volume).shape, arrays.ijk_to_ras(volume)
        assert own_shape != shape and AxialView.of(grid) != AxialView()  # its slices are not axial
        assert np.array_equal(on_axial_grid(arrays.volume_array(volume), grid, axial_grid, shape), anatomy.hu)
        segmentation = path(ctx, volume)
        for name, axial_mask in expected.items():
            mask = on_axial_grid(segment_mask(segmentation, name, own_shape), grid, axial_grid, shape)
            assert (mask ^ axial_mask).sum() == 0, f"{plane} {name}: {(mask & ~axial_mask).sum()} voxels more, " \
                                                   f"{(axial_mask & ~mask).sum()} fewer than the axial series'"


@pytest.mark.parametrize("columns, expected", [
    # LPS direction cosines of I, J, K (DICOM's row, column and slice directions)
    (((1, 0, 0), (0, 1, 0), (0, 0, 1)), AxialView()),  # axial, as scanners write it
    (((0, 1, 0), (0, 0, -1), (1, 0, 0)), AxialView((1, 2, 0), (True, False, False))),  # sagittal
    (((1, 0, 0), (0, 0, -1), (0, 1, 0)), AxialView((1, 0, 2), (True, False, False))),  # coronal
    (((-1, 0, 0), (0, -1, 0), (0, 0, -1)), AxialView((0, 1, 2), (True, True, True))),  # axial, every axis reversed
    # 20° about S, and a 15° gantry tilt (columns leaning towards S): still axial, as they are
    (((0.94, 0.342, 0), (-0.342, 0.94, 0), (0, 0, 1)), AxialView()),
    (((1, 0, 0), (0, 0.966, 0.259), (0, 0, 1)), AxialView()),
    # 48° about L-R: closer to coronal, its columns the superior axis (though its slices are 3.5 times as thick)
    (((1, 0, 0), (0, 0.669, 0.743), (0, -0.743, 0.669)), AxialView((1, 0, 2), (False, True, False))),
])
def test_the_axial_view_of_each_plane(columns, expected):
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = lps_to_ras @ np.array(columns, float).T * [0.7, 0.7, 2.5]  # spacing does not matter
    assert AxialView.of(ijk_to_ras) == expected
    hu = np.arange(24).reshape(2, 3, 4)
    assert np.array_equal(expected.back(expected.view(hu)), hu)
    # The view's spacing is the distance between two neighbouring voxels of the view along each of its axes
    k, j, i = np.indices(hu.shape)
    ras = np.stack([expected.view(ijk_to_ras[row, 0] * i + ijk_to_ras[row, 1] * j + ijk_to_ras[row, 2] * k)
                    for row in range(3)], axis=-1)
    steps = [np.linalg.norm(np.diff(ras, axis=axis), axis=-1).max() for axis in range(3)]
    assert np.allclose(expected.spacing(np.linalg.norm(ijk_to_ras[:3, :3], axis=0)[::-1]), steps)


def test_a_real_series_read_with_its_rows_and_columns_reversed_gives_the_same_bone(ctx, shared_data):
    """A prone patient's series, or a NIfTI stored right to left: the presets' coarse grids (every 2nd voxel of this
    0.98 mm scan) would sample other voxels read backwards, and its bone would differ by about 1%."""
    volume = load_input(ctx, JPEG2000_SERIES).node
    hu, spacing, grid = arrays.volume_array(volume), spacing_kji(volume), arrays.ijk_to_ras(volume)
    rows, cols = hu.shape[1:]
    reversed_grid = grid @ [[-1, 0, 0, cols - 1], [0, -1, 0, rows - 1], [0, 0, 1, 0], [0, 0, 0, 1]]
    expected = preset_mask("bone", hu, spacing, "as stored", ijk_to_ras=grid)
    reversed_mask = preset_mask("bone", hu[:, ::-1, ::-1], spacing, "reversed", ijk_to_ras=reversed_grid)
    assert np.array_equal(reversed_mask[:, ::-1, ::-1], expected)
