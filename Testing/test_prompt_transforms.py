"""AI prompts on a volume under a parent transform, against the real upstream nnInteractive server on CPU.

Slicer's views give world RAS; the volume sits under a registration (linear) or under the gantry-tilt
acquisition transform Slicer's DICOM module adds (a grid: non-linear); see transformed_volume.py. A prompt
placed at a voxel's world position must reach that voxel, and the segment must land on the volume's
voxels in world space, whether the segmentation is under the volume's transform (as presets make it) or
under none (as the Segment Editor leaves a new one). The test model makes a point a ball centred on its
voxel and a box exactly its voxels (nninteractive_model.py); world positions come from Slicer's own
TransformPointToWorld, never from the code under test.
"""

import numpy as np
import pytest
import vtk

pytest.importorskip("torch")  # the server's model: only in .venv (scripts/test.sh, step 2)
pytest.importorskip("nnInteractive")

from nninteractive_model import write_model_folder  # noqa: E402
from nninteractive_server import Server  # noqa: E402
from SegmentationMachineLib.core import arrays  # noqa: E402
from SegmentationMachineLib.core.scene import new_segmentation  # noqa: E402
from SegmentationMachineLib.pipeline import segment_with_prompts  # noqa: E402
from SegmentationMachineLib.prompts import frames, geometry  # noqa: E402
from SegmentationMachineLib.prompts.promptfile import Prompt, SegmentPrompts  # noqa: E402
from SegmentationMachineLib.prompts.session import headless_editor, InteractiveSession, SegmentTarget  # noqa: E402
from transformed_volume import segment_world, transformed_volume, voxel_world  # noqa: E402

KEY = "transform-test-key-0123"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = Server(write_model_folder(tmp_path_factory.mktemp("nni") / "model"), KEY).start()
    yield running
    running.stop()


@pytest.fixture(params=["linear-segmentation-under-it", "linear-segmentation-in-world",
                        "grid-segmentation-under-it", "grid-segmentation-in-world"])
def parts(request, ctx):
    """(volume under the transform, segmentation under the same transform or none, segment id, editor)."""
    kind, _, where = request.param.partition("-segmentation-")
    volume = transformed_volume(ctx.scene, kind)
    segmentation = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    segmentation.CreateDefaultDisplayNodes()
    if where == "under-it":
        segmentation.SetAndObserveTransformNodeID(volume.GetTransformNodeID())
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)  # as the module does
    segment = segmentation.GetSegmentation().AddEmptySegment("", "target")
    return volume, segmentation, segment, headless_editor(ctx.scene, ctx.app_logic, segmentation, volume)


@pytest.fixture
def session(server, parts):
    volume, segmentation, segment, editor = parts
    running = InteractiveSession(server.url, KEY)
    running.connect()
    running.set_volume(volume)
    running.select_segment(SegmentTarget(segmentation, segment, editor))
    yield running
    running.close()


def on_volume_grid(session):
    """The segment as the session reads it back on the volume's voxels (K, J, I)."""
    return session._segment_mask(session._target.segment_id)


def test_a_point_at_a_voxels_world_position_grows_around_that_voxel_in_world(session, parts):
    volume, segmentation, segment, _ = parts
    target = (20, 24, 28)
    session.add(Prompt("point", True, ras=voxel_world(volume, target)))
    got = on_volume_grid(session)
    assert got[target] and 20 <= got.sum() <= 60
    assert np.allclose(np.argwhere(got).mean(axis=0), target, atol=0.01)  # the ball centred on it
    # The segment's own voxels, in world: exactly the volume's voxels wherever the transform between the two
    # nodes is linear; across the grid transform the segmentation keeps its own grid: within half a voxel.
    points = segment_world(segmentation, segment)
    if volume.GetParentTransformNode().IsTransformToWorldLinear() or segmentation.GetTransformNodeID():
        expected = np.array([voxel_world(volume, kji) for kji in np.argwhere(got)])
        assert np.allclose(np.sort(points, axis=0), np.sort(expected, axis=0), atol=1e-3)
    else:
        assert abs(len(points) - got.sum()) <= 0.2 * got.sum()
        assert np.linalg.norm(points.mean(axis=0) - voxel_world(volume, target)) < 0.55
    session.add(Prompt("point", False, ras=voxel_world(volume, target)))
    assert not on_volume_grid(session).any() and not len(segment_world(segmentation, segment))


def test_a_box_drawn_in_an_axial_view_covers_the_voxels_under_it(session, parts):
    volume, segmentation, segment, _ = parts
    centre = np.array(voxel_world(volume, (18, 15, 20)))
    session.add(Prompt("box", True, ras_min=tuple(centre - [5, 4, 0]), ras_max=tuple(centre + [5, 4, 0])))
    got = on_volume_grid(session)
    assert set(np.argwhere(got)[:, 0]) == {18}  # one slice: K is the voxel axis across the axial plane
    assert got[18, 15, 20] and got.sum() > 40
    assert np.allclose(np.argwhere(got)[:, 1:].mean(axis=0), (15, 20), atol=1.0)  # centred under the box
    assert np.linalg.norm(segment_world(segmentation, segment).mean(axis=0) - centre) < 1.5
    session.undo()
    assert not on_volume_grid(session).any()


def test_a_scribble_and_a_lasso_reach_the_voxels_they_were_drawn_over(session, parts):
    volume = parts[0]
    line = [voxel_world(volume, (22, 10, i)) for i in (10, 20, 30)]
    session.add(Prompt("scribble", True, ras_points=tuple(line)))
    scribbled = on_volume_grid(session)
    assert scribbled[22, 10, 10:31].all() and set(np.argwhere(scribbled)[:, 0]) == {22}
    square = [voxel_world(volume, (30, j, i)) for j, i in ((5, 5), (5, 20), (20, 20), (20, 5))]
    session.add(Prompt("lasso", True, ras_points=tuple(square)))
    lassoed = on_volume_grid(session)
    assert lassoed[30, 6:20, 6:20].all() and not lassoed[30, 25:, 25:].any() and lassoed[22, 10, 10:31].all()


def test_a_prompt_file_replayed_on_a_transformed_volume_makes_a_segmentation_on_its_voxels(server, ctx):
    """The CLI's replay (pipeline.segment_with_prompts) puts the new segmentation under the volume's transform, as
    presets do: its segment is the volume's voxels, not a resampled copy."""
    volume = transformed_volume(ctx.scene, "grid")
    session = InteractiveSession(server.url, KEY)
    session.connect()
    try:
        node = segment_with_prompts(ctx, volume, [SegmentPrompts("organ", [
            Prompt("point", True, ras=voxel_world(volume, (20, 24, 28)))])], session)
    finally:
        session.close()
    assert node.GetTransformNodeID() == volume.GetTransformNodeID()
    labelmap = node.GetSegmentation().GetNthSegment(0).GetRepresentation("Binary labelmap")
    matrix = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    assert np.allclose(arrays.matrix_to_array(matrix), arrays.ijk_to_ras(volume))  # the volume's own grid
    extent = labelmap.GetExtent()
    kji = np.argwhere(arrays.image_array(labelmap) > 0) + [extent[4], extent[2], extent[0]]
    assert 20 <= len(kji) <= 60 and np.allclose(kji.mean(axis=0), (20, 24, 28), atol=0.01)  # centred on its voxel


def test_saved_prompts_are_in_the_volumes_own_frame_so_the_cli_replays_them_on_the_same_voxels(session, parts):
    """The module saves prompts for the CLI, which loads the series with no transform: a point is its voxel's
    own RAS, and a box drawn flat in a view is still flat and covers the same voxels when replayed there."""
    volume, segmentation, segment, _ = parts
    own_ras = arrays.ijk_to_ras(volume)
    point = (20, 24, 28)
    session.add(Prompt("point", True, ras=voxel_world(volume, point)))
    centre = np.array(voxel_world(volume, (18, 15, 20)))
    drawn = Prompt("box", True, ras_min=tuple(centre - [5, 4, 0]), ras_max=tuple(centre + [5, 4, 0]))
    session.add(drawn)
    saved_point, saved_box = session.prompts_of(segment)
    assert np.allclose(saved_point.ras, (own_ras @ [*point[::-1], 1])[:3], atol=1e-3)
    assert sum(a == b for a, b in zip(saved_box.ras_min, saved_box.ras_max)) == 1  # a 2D box, as drawn
    to_local = frames.world_to_local(volume)
    shape = arrays.volume_array(volume).shape
    assert (geometry.box_voxels(own_ras, shape, saved_box.ras_min, saved_box.ras_max)
            == geometry.box_voxels(own_ras, shape, drawn.ras_min, drawn.ras_max, to_local))


def test_the_segment_editors_intensity_range_holds_on_the_volumes_voxels(session, parts):
    """The Segment Editor checks the range on its copy of the source volume on the segmentation's reference grid,
    and refuses a result on another grid: each result reaches it on that grid."""
    volume, segmentation, _, editor = parts
    centre = np.array(voxel_world(volume, (18, 15, 20)))
    box = Prompt("box", True, ras_min=tuple(centre - [5, 4, 0]), ras_max=tuple(centre + [5, 4, 0]))
    session.add(box)
    boxed = on_volume_grid(session)
    session.undo()
    editor.GetSegmentEditorNode().SetSourceVolumeIntensityMask(True)
    editor.GetSegmentEditorNode().SetSourceVolumeIntensityMaskRange(-50, 1000)
    session.add(box)
    got = on_volume_grid(session)
    in_range = (arrays.volume_array(volume) >= -50) & (arrays.volume_array(volume) <= 1000)
    if volume.GetParentTransformNode().IsTransformToWorldLinear() or segmentation.GetTransformNodeID():
        assert np.array_equal(got, boxed & in_range) and 0 < got.sum() < boxed.sum()
    else:  # the editor's copy is interpolated onto its lattice in world: the range is checked there
        assert not (got & ~boxed).any() and 0 < got.sum() < boxed.sum()


def cube_volume(ctx, name, spacing, size):
    node = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    matrix = np.diag([spacing, spacing, spacing, 1.0])
    arrays.set_volume_array(node, np.random.default_rng(2).normal(0, 100, (size,) * 3).astype(np.int16), matrix)
    return node, matrix


def test_a_segmentation_without_a_grid_takes_the_volumes_and_one_with_its_own_keeps_it(ctx):
    """As the Segment Editor does; the module set the source volume's grid on every segmentation chosen."""
    (fine, _), (coarse, _) = cube_volume(ctx, "1 mm", 1.0, 48), cube_volume(ctx, "2 mm", 2.0, 24)
    bare = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "bare")
    own = new_segmentation(fine, "own")
    fine_grid = frames.reference_geometry(own)
    session = InteractiveSession("http://127.0.0.1:1", KEY)
    session.stage_volume(coarse)
    for segmentation in (bare, own):
        segment = segmentation.GetSegmentation().AddEmptySegment("", "s")
        session.select_segment(SegmentTarget(segmentation, segment, None))
    assert frames.reference_grid(bare, None) == pytest.approx(arrays.ijk_to_ras(coarse))
    assert frames.reference_geometry(own) == fine_grid


def test_a_prompt_on_a_coarser_series_keeps_the_segmentations_grid_and_its_other_segments(server, ctx):
    """A segmentation made on a 1 mm series, prompted on a 2 mm series of the same patient (the inbox makes each new
    series the source volume): the prompt's result was written on the 2 mm grid, and Slicer resampled the whole
    shared labelmap to it, so every other segment lost its fine detail."""
    (fine, fine_matrix), (coarse, _) = cube_volume(ctx, "1 mm", 1.0, 48), cube_volume(ctx, "2 mm", 2.0, 24)
    segmentation = new_segmentation(fine, "seg")
    detail = segmentation.GetSegmentation().AddEmptySegment("", "detail")
    k, j, i = np.mgrid[:48, :48, :48]
    ball = (k - 30) ** 2 + (j - 30) ** 2 + (i - 30) ** 2 <= 9  # radius 3 mm: thinner than two coarse voxels
    editor = headless_editor(ctx.scene, ctx.app_logic, segmentation, fine)
    editor.ModifySegmentByLabelmap(segmentation, detail, arrays.labelmap_from_array(ball, fine_matrix),
                                   editor.ModificationModeAdd, [0, 47, 0, 47, 0, 47], False, True)
    prompted = segmentation.GetSegmentation().AddEmptySegment("", "prompted")
    session = InteractiveSession(server.url, KEY)
    session.connect()
    try:
        session.set_volume(coarse)
        session.select_segment(SegmentTarget(segmentation, prompted, headless_editor(ctx.scene, ctx.app_logic,
                                                                                     segmentation, coarse)))
        session.add(Prompt("point", True, ras=(20.0, 20.0, 20.0)))  # coarse voxel (10, 10, 10), away from the ball
    finally:
        session.close()
    labelmap = segmentation.GetSegmentation().GetSegment(detail).GetRepresentation("Binary labelmap")
    assert labelmap.GetSpacing() == (1.0, 1.0, 1.0)
    kept = frames.resample(labelmap, fine_matrix, None, [0, 47, 0, 47, 0, 47])
    label = segmentation.GetSegmentation().GetSegment(detail).GetLabelValue()
    assert np.array_equal(arrays.image_array(kept) == label, ball)
    assert 2 <= session._segment_mask(prompted).sum()  # the prompt's ball, read back on the 2 mm grid
