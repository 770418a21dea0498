"""CPU presets on the phantom (known truth) and on real CT against TotalSegmentator's bone labels."""

import numpy as np
import pytest

from scipy import ndimage

from conftest import BONE_LABELS, DATA, EXAMPLE_CT, EXAMPLE_LABELS, JPEG2000_SERIES, UNCOMPRESSED_SERIES
from SegmentationMachineLib.core import arrays
from SegmentationMachineLib.core.errors import SegmentationError
from SegmentationMachineLib.dicom.volumes import load_input, load_volume_file
from SegmentationMachineLib.segment.masks import PRESETS, body_mask, bone_mask
from SegmentationMachineLib.segment.presets import apply_preset, spacing_kji

DICOM_LABELS = JPEG2000_SERIES.parent / "example_seg_dicom.nii.gz"
AORTA, SPINAL_CORD, COSTAL_CARTILAGES = 52, 79, 117  # labels_total.json


def dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def labels_on_grid(labels_node, volume_node):
    """The labels at the centre of every voxel of volume_node (nearest neighbour, through both IJK->RAS)."""
    labels = arrays.volume_array(labels_node)
    shape = arrays.volume_array(volume_node).shape
    k, j, i = np.indices(shape).reshape(3, -1)
    voxel = np.linalg.inv(arrays.ijk_to_ras(labels_node)) @ arrays.ijk_to_ras(volume_node) @ np.stack([i, j, k, np.ones_like(i)])
    li, lj, lk = np.rint(voxel[:3]).astype(int)
    inside = (li >= 0) & (li < labels.shape[2]) & (lj >= 0) & (lj < labels.shape[1]) & (lk >= 0) & (lk < labels.shape[0])
    result = np.zeros(k.size, labels.dtype)
    result[inside] = labels[lk[inside], lj[inside], li[inside]]
    return result.reshape(shape)


def segment_mask(node, name, reference):
    segmentation = node.GetSegmentation()
    segment_id = segmentation.GetSegmentIdBySegmentName(name)
    labelmap = segmentation.GetSegment(segment_id).GetRepresentation("Binary labelmap")
    values = arrays.image_array(labelmap)
    extent = labelmap.GetExtent()
    full = np.zeros(reference.shape, bool)
    full[extent[4]:extent[5] + 1, extent[2]:extent[3] + 1, extent[0]:extent[1] + 1] = values == segmentation.GetSegment(segment_id).GetLabelValue()
    return full


def test_phantom_presets_match_its_truth_and_make_named_coloured_segments(ctx, phantom, phantom_dir):
    volume = load_input(ctx, phantom_dir).node
    node = apply_preset(ctx, volume, "bone")
    apply_preset(ctx, volume, "skin", node)
    segmentation = node.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(2)] == ["Bone", "Skin"]
    assert tuple(segmentation.GetNthSegment(0).GetColor()) == pytest.approx(PRESETS["bone"].color)
    assert dice(segment_mask(node, "Bone", phantom.hu), phantom.bone) > 0.93
    skin = segment_mask(node, "Skin", phantom.hu)
    assert dice(skin, phantom.body) > 0.99
    assert not skin[phantom.hu == -3024].any()  # scanner padding is never body


def test_bone_beats_a_plain_threshold_on_real_ct(ctx, shared_data):
    hu = arrays.volume_array(load_input(ctx, EXAMPLE_CT).node)
    truth = np.isin(arrays.volume_array(load_volume_file(ctx, EXAMPLE_LABELS, labelmap=True).node), BONE_LABELS)
    plain = dice(hu > 150, truth)
    ours = dice(bone_mask(hu, (3.0, 3.0, 3.0)), truth)
    assert plain == pytest.approx(0.72, abs=0.01)
    assert ours > 0.905 > plain


def test_bone_on_a_contrast_ct_leaves_out_the_table_vessels_cartilage_and_canal(ctx, shared_data):
    volume = load_input(ctx, JPEG2000_SERIES).node
    hu, spacing = arrays.volume_array(volume), spacing_kji(volume)
    labels = labels_on_grid(load_volume_file(ctx, DICOM_LABELS, labelmap=True).node, volume)
    truth, aorta = np.isin(labels, BONE_LABELS), labels == AORTA
    ours = bone_mask(hu, spacing)
    body = body_mask(hu, spacing)
    voxel_ml = float(np.prod(spacing)) / 1000
    assert ((hu > 150) & ~body).sum() * voxel_ml > 100  # the scanner table is there, dense enough to pass a threshold...
    assert not (ours & ~body).any()  # ...and none of it is bone
    assert (ours & aorta).sum() < 0.2 * aorta.sum()  # the contrast-filled aorta is mostly left out (its calcified wall stays)
    assert (ours & (labels == COSTAL_CARTILAGES)).sum() < 0.4 * (labels == COSTAL_CARTILAGES).sum()
    assert (ours & (labels == SPINAL_CORD)).sum() < 0.01 * (labels == SPINAL_CORD).sum()  # the canal stays open
    assert dice(hu > 150, truth) < 0.55 < 0.77 < dice(ours, truth)


def test_an_arterial_phase_aorta_is_not_bone_either(ctx, shared_data):
    """The contrast series with its blood brightened as an angiogram's (the aorta's median from 151 to ~590 HU,
    noise and partial-volume edges kept): above the 500 HU where cortex-like densities start."""
    volume = load_input(ctx, JPEG2000_SERIES).node
    hu, spacing = arrays.volume_array(volume).astype(float), spacing_kji(volume)
    labels = labels_on_grid(load_volume_file(ctx, DICOM_LABELS, labelmap=True).node, volume)
    aorta, vessels = labels == AORTA, np.isin(labels, [AORTA, 63, 64])  # with the vena cava and the portal vein
    enhancement = np.clip((ndimage.gaussian_filter(hu, (0, 1.5, 1.5)) - 40) / 110, 0, 1.2)  # blood's share of a voxel
    brighter = np.where(vessels & (hu > 110) & (hu < 260), 450 * enhancement, 0)
    hu += ndimage.gaussian_filter(brighter, (0, 0.7, 0.7))
    assert np.median(hu[aorta]) > 550
    ours = bone_mask(hu, spacing)
    assert (ours & aorta).sum() < 0.1 * aorta.sum()
    assert dice(ours, np.isin(labels, BONE_LABELS)) > 0.75


def test_bone_covers_the_spine_of_a_third_scanner(ctx, shared_data):
    """dcmqi's GE series (3 slices, 0.81 mm) with its spine label, never used to choose the preset's parameters."""
    volume = load_input(ctx, UNCOMPRESSED_SERIES).node
    spine = labels_on_grid(load_volume_file(ctx, DATA / "dcmqi" / "spine_seg.nrrd", labelmap=True).node, volume) > 0
    ours = bone_mask(arrays.volume_array(volume), spacing_kji(volume))
    assert (ours & spine).sum() > 0.87 * spine.sum()


@pytest.mark.parametrize("lumen_hu", [250, 550])  # a portal-venous phase; an angiogram's arteries
def test_cortex_marrow_kept_contrast_tube_and_table_dropped_arms_kept(lumen_hu):
    """1 mm voxels: a body ellipse with a bone (1 mm cortex at 1000 HU around trabecular 80-320 HU), a
    contrast-filled tube (lumen_hu +- 15 HU) against it, a 4 mm table slab (400 HU) below, and two arms beside it in air."""
    rng = np.random.default_rng(0)
    k, j, i = np.indices((24, 120, 200))
    hu = np.full(k.shape, -1000.0)
    body = ((j - 55) / 40) ** 2 + ((i - 100) / 55) ** 2 <= 1
    arms = ((j - 55) ** 2 + (i - 18) ** 2 <= 16 ** 2) | ((j - 55) ** 2 + (i - 182) ** 2 <= 16 ** 2)
    hu[body | arms] = 40
    bone_radius = np.hypot(j - 65, i - 85)
    hu[bone_radius <= 12] = rng.uniform(80, 320, k.shape)[bone_radius <= 12]
    hu[(bone_radius > 11) & (bone_radius <= 12)] = 1000
    tube = np.hypot(j - 65, i - 106) <= 8  # touching the bone: only the vessel rule can tell them apart
    hu[tube] = rng.normal(lumen_hu, 15, k.shape)[tube]
    table = (j >= 100) & (j < 104)
    hu[table] = 400
    mask = bone_mask(hu, (1.0, 1.0, 1.0))
    assert np.array_equal(mask, bone_radius <= 12)
    skin = body_mask(hu, (1.0, 1.0, 1.0))
    assert not (skin & table).any() and (skin & arms).sum() == arms.sum()
    assert (body & ~skin).sum() == 4 * 24  # only the ellipse's four one-voxel tips are opened away


def test_skin_leaves_out_a_table_a_centimetre_thick_and_keeps_arms():
    """1 mm voxels: the body, two arms (16 mm radius) beside it in air, and below it a 12 mm table top at 400 HU. A
    limb holds a 15 mm deep point, a table or a board under the patient does not, however dense."""
    k, j, i = np.indices((16, 120, 200))
    hu = np.full(k.shape, -1000.0)
    body = ((j - 55) / 40) ** 2 + ((i - 100) / 55) ** 2 <= 1
    arms = ((j - 55) ** 2 + (i - 18) ** 2 <= 16 ** 2) | ((j - 55) ** 2 + (i - 182) ** 2 <= 16 ** 2)
    table = (j >= 100) & (j < 112)
    hu[body | arms] = 40
    hu[table] = 400
    skin = body_mask(hu, (1.0, 1.0, 1.0))
    assert not (skin & table).any() and (skin & arms).sum() == arms.sum() and (skin & body).sum() > 0.99 * body.sum()

def test_a_disc_space_between_two_vertebrae_stays_out():
    """1 mm voxels: two vertebral bodies (1 mm cortex at 700 HU around cancellous 80-320 HU) with a 4 mm disc
    (80 HU) between them; a closing in 3D would bridge it."""
    rng = np.random.default_rng(0)
    k, j, i = np.indices((40, 80, 80))
    radius = np.hypot(j - 40, i - 40)
    hu = np.where(radius <= 36, 40.0, -1000.0)
    bodies = (radius <= 15) & (((k >= 5) & (k < 18)) | ((k >= 22) & (k < 35)))
    hu[bodies] = rng.uniform(80, 320, k.shape)[bodies]
    hu[bodies & ~ndimage.binary_erosion(bodies, border_value=1)] = 700
    hu[(radius <= 15) & (k >= 18) & (k < 22)] = 80
    assert np.array_equal(bone_mask(hu, (1.0, 1.0, 1.0)), bodies)


def test_an_osteoporotic_vertebral_body_with_homogeneous_marrow_is_solid():
    """1 mm voxels: a vertebral body (1 mm cortex at 700 HU) whose marrow is homogeneous (200 +- 12 HU) as
    contrast-filled blood is, with discs (80 HU) above and below: soft tissue in its shell as round a vessel.
    The bone encloses it, so it is marrow, not a lumen: the body is not hollow."""
    rng = np.random.default_rng(0)
    k, j, i = np.indices((40, 80, 80))
    radius = np.hypot(j - 40, i - 40)
    hu = np.where(radius <= 36, 40.0, -1000.0)
    body = (radius <= 15) & (k >= 8) & (k < 32)
    hu[body] = rng.normal(200, 12, k.shape)[body]
    hu[body & ~ndimage.binary_erosion(body, border_value=1)] = 700
    hu[(radius <= 15) & ~body] = 80
    assert np.array_equal(bone_mask(hu, (1.0, 1.0, 1.0)), body)


def test_the_spinal_canal_stays_open_where_its_arch_closes_and_fatty_marrow_is_filled():
    """1 mm voxels: a vertebral body (1.5 mm cortex at 700 HU around fatty marrow at 20 HU, below any bone
    threshold) and behind it the canal (CSF, 10 HU), closed by its arch (700 HU) except at the level of the
    foramina (k 12-19), where it opens sideways into the soft tissue; in the arch's slices both are 2D holes."""
    k, j, i = np.indices((32, 90, 90))
    hu = np.where(np.hypot(j - 45, i - 45) <= 44, 40.0, -1000.0)
    body, canal = np.hypot(j - 33, i - 45) <= 14, np.hypot(j - 60, i - 45) <= 8
    arch = (np.hypot(j - 60, i - 45) <= 11) & ~canal & ~body & ((k < 12) | (k >= 20))
    hu[body] = 700
    hu[np.hypot(j - 33, i - 45) <= 12.5] = 20
    hu[arch] = 700
    hu[canal] = 10
    ours = bone_mask(hu, (1.0, 1.0, 1.0))
    assert ours[body].all() and not ours[canal].any()
    assert dice(ours, body | arch) > 0.98


def test_a_blurred_thin_cortex_is_outlined_inside_the_130_hu_halo():
    """0.5 mm pixels: a rib-like tube (5 mm radius, 1 mm cortex at 1200 HU, marrow 100 HU) blurred by a 0.8 mm
    point spread: its brightness spills a millimetre and more into the soft tissue above 130 HU."""
    rng = np.random.default_rng(0)
    k, j, i = np.indices((12, 100, 100))
    radius = np.hypot(j - 50, i - 50) * 0.5
    tube = radius <= 5
    sharp = np.where(radius <= 30, 40.0, -1000.0)
    sharp[tube] = np.where(radius[tube] > 4, 1200, 100)
    hu = ndimage.gaussian_filter(sharp, (0, 1.6, 1.6)) + rng.normal(0, 10, k.shape)
    halo = np.stack([ndimage.binary_fill_holes(part) for part in hu > 130]) & (radius < 20)
    ours = bone_mask(hu, (1.0, 0.5, 0.5))
    assert dice(ours, tube) > dice(halo, tube) + 0.03 and (ours & tube).sum() == tube.sum()


def test_padding_is_ignored_and_marrow_filled():
    hu = np.full((20, 40, 40), -3024, np.int16)
    hu[:, 10:30, 10:30] = 40
    hu[5:15, 15:25, 15:25] = 900  # a bone block...
    hu[7:13, 17:23, 17:23] = 20  # ...with marrow inside
    mask = bone_mask(hu, (1.0, 1.0, 1.0))
    assert mask[7:13, 17:23, 17:23].all() and not mask[hu == -3024].any()


def test_marrow_is_filled_by_its_area_in_the_slice_whatever_the_slice_thickness():
    """0.5 mm pixels, 5 mm slices: a femur-like tube (2 mm cortex at 1000 HU, 18 mm of fatty marrow at -50 HU, 10 cm2
    in each slice, under the 20 cm2 that is filled). Its area once took the slice thickness for a pixel's side: ten
    times too large, and the marrow stayed hollow."""
    k, j, i = np.indices((6, 120, 120))
    radius = np.hypot(j - 59.5, i - 59.5) * 0.5
    hu = np.where(radius <= 29, 40.0, -1000.0)
    hu[radius <= 20] = 1000
    hu[radius <= 18] = -50
    assert np.array_equal(bone_mask(hu, (5.0, 0.5, 0.5)), radius <= 20)

def test_a_volume_without_bone_gets_a_sentence(ctx):
    volume = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Soft tissue")
    hu = np.full((8, 16, 16), -1000, np.int16)
    hu[2:6, 4:12, 4:12] = 40
    arrays.set_volume_array(volume, hu, np.eye(4))
    with pytest.raises(SegmentationError, match="found nothing in 'Soft tissue'.*AI prompt tools"):
        apply_preset(ctx, volume, "bone")
    with pytest.raises(SegmentationError, match="no preset 'lungs'"):
        apply_preset(ctx, volume, "lungs")
