"""Prompt files: round trip, and a sentence naming the entry for every malformed one; prompt geometry."""

import json

import numpy as np
import pytest

from SegmentationMachineLib.prompts import geometry
from SegmentationMachineLib.prompts.geometry import PromptOutsideError
from SegmentationMachineLib.prompts.promptfile import (Prompt, PromptFileError, SegmentPrompts, load_prompt_file,
                                                       parse_prompts, prompts_to_json, save_prompt_file)

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
    with pytest.raises(FileExistsError):
        save_prompt_file(tmp_path / "p.json", [liver])  # never overwrites


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
