"""CPU presets on the phantom (known truth) and on real CT against TotalSegmentator's bone labels."""

import numpy as np
import pytest

from conftest import BONE_LABELS, EXAMPLE_CT, EXAMPLE_LABELS
from SegmentationMachineLib.core import arrays
from SegmentationMachineLib.core.errors import SegmentationError
from SegmentationMachineLib.dicom.volumes import load_input, load_volume_file
from SegmentationMachineLib.segment.presets import apply_preset, bone_mask, PRESETS


def dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


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
    assert ours > 0.88 > plain


def test_padding_is_ignored_and_marrow_filled():
    hu = np.full((20, 40, 40), -3024, np.int16)
    hu[:, 10:30, 10:30] = 40
    hu[5:15, 15:25, 15:25] = 900  # a bone block...
    hu[7:13, 17:23, 17:23] = 20  # ...with marrow inside
    mask = bone_mask(hu, (1.0, 1.0, 1.0))
    assert mask[7:13, 17:23, 17:23].all() and not mask[hu == -3024].any()


def test_a_volume_without_bone_gets_a_sentence(ctx):
    volume = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "MR")
    arrays.set_volume_array(volume, np.zeros((8, 16, 16), np.int16), np.eye(4))
    with pytest.raises(SegmentationError, match="found nothing in 'MR'.*AI prompt tools"):
        apply_preset(ctx, volume, "bone")
    with pytest.raises(SegmentationError, match="no preset 'lungs'"):
        apply_preset(ctx, volume, "lungs")
