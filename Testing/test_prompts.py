"""Prompt files: round trip, and a sentence naming the entry for every malformed one; prompt geometry, also
through a volume's parent transform (real MRML transform nodes)."""

import dataclasses
import json

import numpy as np
import pytest

from SegmentationMachineLib.core import arrays
from SegmentationMachineLib.prompts import frames, geometry
from SegmentationMachineLib.prompts.geometry import PromptOutsideError
from SegmentationMachineLib.prompts.promptfile import (Prompt, PromptFileError, SegmentPrompts, load_prompt_file,
                                                       parse_prompts, prompts_to_json, save_prompt_file)
from SegmentationMachineLib.prompts.session import headless_editor, InteractiveSession, SegmentTarget
from SegmentationMachineLib.segment.presets import add_segment_from_mask
from transformed_volume import SHAPE, transformed_volume, voxel_centres, voxel_world

EXAMPLE = {"version": 1, "extra": "kept", "segments": [{"name": "liver", "colour": "ignored", "prompts": [
    {"type": "point", "ras": [1, 2, 3], "include": True},
    {"type": "box", "ras_min": [10, 0, 5], "ras_max": [0, 20, 5], "include": True},
    {"type": "scribble", "ras_points": [[0, 0, 0], [1, 1, 1]], "include": False},
    {"type": "lasso", "ras_points": [[0, 0, 0], [5, 0, 0], [5, 5, 0]]}]}]}


def test_round_trip_and_normalised_boxes(tmp_path):
    [liver] = parse_prompts(EXAMPLE)
    assert [p.kind for p in liver.prompts] == ["point", "box", "scribble", "lasso"]
    assert liver.prompts[1].ras_min == (0, 0, 5) and liver.prompts[1].ras_max == (10, 20, 5)  # 2D box in S=5
    assert liver.prompts[2].include is False and liver.prompts[3].include is True
    save_prompt_file(tmp_path / "p.json", [liver])
    assert load_prompt_file(tmp_path / "p.json")[0] == liver
    kidney = dataclasses.replace(liver, name="Kidney")
    save_prompt_file(tmp_path / "p.json", [kidney])  # Slicer's save dialog asked before choosing an existing file
    assert load_prompt_file(tmp_path / "p.json") == [kidney] and [p.name for p in tmp_path.iterdir()] == ["p.json"]


def test_to_json_matches_the_schema():
    data = prompts_to_json([SegmentPrompts("kidney", [Prompt("point", False, ras=(1.0, 2.0, 3.0))])])
    assert data == {"version": 1, "segments": [{"name": "kidney", "prompts": [
        {"type": "point", "ras": [1.0, 2.0, 3.0], "include": False}]}]}


@pytest.mark.parametrize("change, sentence", [
    (lambda d: d.pop("version"), "not a version 1 prompt file"),
    (lambda d: d.update(segments=[]), "no \"segments\" list"),
    (lambda d: d["segments"][0].pop("name"), "segments[0] needs a \"name\""),
    (lambda d: d["segments"][0]["prompts"][0].update(type="circle"), "segments[0].prompts[0] has type 'circle'"),
    (lambda d: d["segments"][0]["prompts"][0].update(ras=[1, 2]), "segments[0].prompts[0] (point) ras must be three numbers"),
    (lambda d: d["segments"][0]["prompts"][0].update(ras=[1, 2, float("nan")]), "prompts[0] (point) ras must be three numbers"),
    (lambda d: d["segments"][0]["prompts"][1].update(ras_max=[10, 0, 5]), "segments[0].prompts[1] (box) is flat along more than one axis"),
    (lambda d: d["segments"][0]["prompts"][2].update(ras_points=[[0, 0, 0]]), "prompts[2] (scribble) needs \"ras_points\""),
    (lambda d: d["segments"][0]["prompts"][3]["ras_points"].__setitem__(1, "x"), "prompts[3] (lasso) ras_points[1] must be three numbers"),
    (lambda d: d["segments"][0]["prompts"][3].update(include="yes"), "prompts[3] (lasso): \"include\" must be true or false"),
])
def test_malformed_entries_are_named(change, sentence):
    data = json.loads(json.dumps(EXAMPLE))
    change(data)
    with pytest.raises(PromptFileError) as error:
        parse_prompts(data)
    assert sentence in str(error.value) and "\n" not in str(error.value)


def test_unreadable_and_invalid_json(tmp_path):
    with pytest.raises(PromptFileError, match="Cannot read the prompt file"):
        load_prompt_file(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PromptFileError, match="is not valid JSON"):
        load_prompt_file(tmp_path / "bad.json")


def tilted(points_on_axial_plane, degrees):
    """Points of an axial (constant k) drawing, tilted about the j axis as on an oblique slice view."""
    angle = np.radians(degrees)
    rotation = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    centre = np.array([20.0, 20.0, 20.0])
    return (np.asarray(points_on_axial_plane, float) - centre) @ rotation.T + centre


@pytest.mark.parametrize("degrees", [0, 20, 40])
def test_scribbles_and_lassos_on_oblique_slices_reach_the_model_on_one_voxel_plane(degrees):
    """The model expects one axial, coronal or sagittal plane: an oblique drawing is projected onto the nearest."""
    identity, shape = np.eye(4), (40, 40, 40)
    square = tilted([(20, 10, 10), (20, 10, 30), (20, 30, 30), (20, 30, 10)], degrees)  # (k, j, i)
    ras = square[:, ::-1]  # identity IJK → RAS: RAS = (i, j, k)
    lasso, box = geometry.lasso_mask(identity, shape, ras)
    filled = np.argwhere(lasso) + [lo for lo, _ in box]
    assert set(filled[:, 0]) == {20}  # one axial slice, the drawing's mean
    assert len(filled) > 0.7 * 20 * 20 * np.cos(np.radians(degrees))  # the projected outline, filled
    line = tilted([(20, 20, 8), (20, 20, 32)], degrees)[:, ::-1]
    scribble, box = geometry.scribble_mask(identity, shape, line, (1, 1, 1))
    painted = np.argwhere(scribble) + [lo for lo, _ in box]
    assert any(len(set(painted[:, axis])) == 1 for axis in range(3))  # on one slice of the axis it spans least


@pytest.mark.parametrize("end", [(30, 10, 20), (30, 20, 20)])
def test_a_scribble_is_as_thick_as_the_model_prefers_across_the_stroke_and_one_slice_deep(end):
    """The official weights prefer 2-voxel scribbles: a stroke along a voxel axis (two points in a prompt file, a
    ruler-straight drag) was once 1 voxel wide."""
    scribble, _ = geometry.scribble_mask(np.eye(4), (40, 48, 56), [(10, 10, 20), end], (2.0, 2.0, 2.0))
    k, j, i = (scribble.any(axis=tuple(b for b in range(3) if b != a)).sum() for a in range(3))
    assert k == 1 and j >= 2 and i >= 21
    assert scribble.sum() >= 2 * 21  # no voxel along the stroke only one wide


def test_a_drawing_reaching_absurdly_far_is_refused_and_one_leaving_the_image_is_clipped_to_it():
    """A scribble 2e12 mm long once tried to allocate terabytes: geometry is bounded by the image."""
    identity, shape = np.eye(4), (40, 40, 40)  # RAS = (i, j, k)
    for kind, points in (("scribble", [(20, 20, 20), (2e12, 20, 20)]),
                         ("lasso", [(20, 20, 20), (30, 20, 20), (20, -2e12, 20)])):
        draw = geometry.scribble_mask if kind == "scribble" else geometry.lasso_mask
        with pytest.raises(PromptOutsideError, match=f"^The {kind} reaches far beyond the image"):
            draw(identity, shape, points, *([(1, 1, 1)] if kind == "scribble" else []))
    mask, box = geometry.scribble_mask(identity, shape, [(10, 20, 20), (60, 20, 20)], (1, 1, 1))
    painted = np.argwhere(mask) + [lo for lo, _ in box]
    assert mask.size <= np.prod(shape) and set(painted[:, 2]) == set(range(10, 40))  # i up to the image's edge


@pytest.mark.parametrize("kind", ["linear", "grid"])
def test_prompts_in_world_reach_the_voxels_under_them_through_the_volumes_parent_transform(ctx, kind):
    """Slicer's views give world RAS; the voxels lie under the volume's transform (a registration, or the
    gantry-tilt grid Slicer's DICOM module adds): each point is mapped through it, a box by its corners."""
    volume = transformed_volume(ctx.scene, kind)
    matrix, to_local = arrays.ijk_to_ras(volume), frames.world_to_local(volume)
    for kji in ((8, 30, 20), (38, 45, 50)):  # the second lies outside the image's untransformed place
        assert geometry.point_voxel(matrix, SHAPE, voxel_world(volume, kji), to_local) == kji
    centre = np.array(voxel_world(volume, (18, 15, 20)))
    box = geometry.box_voxels(matrix, SHAPE, centre - [5, 4, 0], centre + [5, 4, 0], to_local)  # an axial view's
    assert box[0] == [18, 19] and box[1][0] <= 15 < box[1][1] and box[2][0] <= 20 < box[2][1]
    assert abs(sum(box[1]) / 2 - 15.5) <= 1 and abs(sum(box[2]) / 2 - 20.5) <= 1  # centred on it
    line = [voxel_world(volume, (22, 10, i)) for i in (10, 30)]
    mask, crop = geometry.scribble_mask(matrix, SHAPE, line, (1, 1, 1), to_local)
    assert {tuple(v) for v in np.argwhere(mask) + [lo for lo, _ in crop]} == {(22, 10, i) for i in range(10, 31)}
    square = [voxel_world(volume, (30, j, i)) for j, i in ((5, 5), (5, 20), (20, 20), (20, 5))]
    mask, crop = geometry.lasso_mask(matrix, SHAPE, square, to_local)
    lassoed = np.zeros(SHAPE, bool)
    lassoed[tuple(slice(lo, hi) for lo, hi in crop)] = mask
    assert lassoed[30, 6:20, 6:20].all() and lassoed.sum() == lassoed[30, 5:21, 5:21].sum()


@pytest.mark.parametrize("kind", ["linear", "grid"])
def test_a_result_on_the_volumes_grid_lands_on_its_voxels_in_a_segmentation_in_world(ctx, kind):
    """The Segment Editor leaves a new segmentation in world: a result is placed on the volume's grid as the
    segmentation sees it (linear), or resampled through the grid transform onto its reference grid and back."""
    volume = transformed_volume(ctx.scene, kind)
    segmentation = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    ijk_to_ras = arrays.ijk_to_ras(volume)
    grid, between = frames.volume_in_segmentation(volume, segmentation, ijk_to_ras)
    assert (between is None) == (kind == "linear")
    cube = np.zeros((5, 5, 5), bool)
    cube[1:4, 1:4, 1:4] = True  # voxels (19-21, 23-25, 27-29), centred on (20, 24, 28)
    image = arrays.labelmap_from_array(cube, grid, (18, 22, 26))
    if between is not None:
        image = frames.resample(image, frames.reference_grid(segmentation, ijk_to_ras), between)
    placed = voxel_centres(image)  # in world: the segmentation has no transform
    off = np.linalg.norm(placed.mean(axis=0) - voxel_world(volume, (20, 24, 28)))
    if between is None:
        assert len(placed) == 27 and off < 1e-6
    else:  # on the segmentation's own grid: within half a voxel; read back onto the volume's, as the session does
        assert off < 0.55
        back = frames.resample(image, ijk_to_ras, frames.inverse(between), (26, 30, 22, 26, 18, 22))
        assert np.array_equal(arrays.image_array(back) > 0, cube)


def test_a_segment_across_the_grid_transform_is_read_back_onto_the_volumes_voxels(ctx):
    """What the session seeds the server with and keeps for undo: a segment kept in world, on the lattice Slicer's
    reference geometry gives it there, read onto the tilted volume's voxels where they lie in world, nearest
    neighbour, resampling only where the segment has voxels."""
    volume = transformed_volume(ctx.scene, "grid")
    segmentation = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    lattice = frames.reference_grid(segmentation, None)
    cube = np.zeros(SHAPE, bool)
    cube[20:23, 10:18, 30:36] = True  # on the world lattice
    segment = add_segment_from_mask(segmentation, cube, lattice, "organ", (1, 0, 0))
    editor = headless_editor(ctx.scene, ctx.app_logic, segmentation, volume)
    session = InteractiveSession("http://127.0.0.1:9", "key")  # never connected: reading needs no server
    session.stage_volume(volume)
    session.select_segment(SegmentTarget(segmentation, segment, editor))
    read = session._segment_mask(segment)
    expected = np.zeros(SHAPE, bool)
    for kji in np.ndindex(SHAPE[0], SHAPE[1], 16):  # every voxel the cube's columns (i 30-35) may reach
        kji = (kji[0], kji[1], kji[2] + 25)
        i, j, k = np.rint(np.linalg.inv(lattice) @ [*voxel_world(volume, kji), 1.0])[:3].astype(int)
        expected[kji] = 0 <= j < SHAPE[1] and 0 <= i < SHAPE[2] and cube[k, j, i]
    assert read.sum() == cube.sum() and np.array_equal(read, expected)
    assert not np.array_equal(read, cube)  # the tilt moved it on the volume's voxels


def test_only_a_result_reaching_a_face_that_cuts_the_volume_with_new_voxels_is_cut_there():
    from SegmentationMachineLib.prompts.region import cut_faces

    shape, region = (100, 20, 20), np.array([[10, 0, 0], [50, 20, 20]])  # slices 10-49 of 100, all of each slice
    box = np.array([[0, 0, 0], [40, 20, 20]])  # the changed box: all of the region
    before, after = np.zeros((40, 20, 20), bool), np.zeros((40, 20, 20), np.uint8)
    after[0:5, 0:3, 5:8] = 1  # on the region's first slice (a cut: slice 10 of the volume) and its J edge (the volume's)
    assert cut_faces(region, shape, box, after, before).tolist() == [[True, False, False], [False, False, False]]
    before[0, 0:3, 5:8] = True  # there before this result: not the result running on
    assert not cut_faces(region, shape, box, after, before).any()
    after[39, 10, 10] = 1  # on its last slice: cut (slice 49 of 100)...
    assert cut_faces(region, shape, box, after, before).tolist() == [[False, False, False], [True, False, False]]
    inner = np.array([[0, 0, 0], [39, 20, 20]])  # ...unless the changed box ends before the face
    assert not cut_faces(region, shape, inner, after[:39], before[:39]).any()
    whole = np.array([[0, 0, 0], [40, 20, 20]])  # a region of all slices has no cut faces
    assert not cut_faces(whole, (40, 20, 20), box, after, np.zeros_like(before)).any()
