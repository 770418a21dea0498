"""Undo and redo of AI prompts against the real upstream nnInteractive server on CPU (as test_interactive.py): many
levels deep, the server's own one level, only the voxels a prompt changed (hand edits and other segments' voxels
kept), steps in other segmentations and in deleted segments, a new series, the history's memory cap.
"""

import numpy as np
import pytest

from interactive_parts import connected_panel, KEY, mask_of, oblique_matrix, open_session, paint, ras, settle, SHAPE
from SegmentationMachineLib.core import arrays
from SegmentationMachineLib.prompts.promptfile import Prompt
from SegmentationMachineLib.prompts.session import headless_editor, InteractiveSession, SegmentTarget
from SegmentationMachineLib.segment.presets import add_segment_from_mask


def test_more_than_twenty_undo_levels_and_redo(server, scene_parts):
    session = open_session(server, scene_parts)
    spots = [(8 + 6 * (n % 5), 8 + 8 * (n // 5 % 4), 8 + 10 * (n // 20)) for n in range(22)]
    states = [mask_of(session)]
    for spot in spots:
        session.add(Prompt("point", True, ras=ras(spot)))
        states.append(mask_of(session))
    assert states[-1].sum() > states[1].sum() * 15
    for expected in reversed(states[:-1]):
        session.undo()
        assert np.array_equal(mask_of(session), expected)
    assert not session.can_undo
    for expected in states[1:4]:
        session.redo()
        assert np.array_equal(mask_of(session), expected)
    session.add(Prompt("point", True, ras=ras(spots[-1])))  # prompting after undo continues from here
    assert not session.can_redo and mask_of(session)[spots[-1]] and not mask_of(session)[spots[5]]
    assert [p.ras for p in session.prompts_of(session._target.segment_id)] == [ras(s) for s in spots[:3] + spots[-1:]]
    session.close()


def test_one_undo_is_the_servers_own_deeper_ones_re_seed_and_redo_in_between_costs_nothing(server, scene_parts):
    """The server's one level of undo keeps the model's memory of earlier prompts; a re-seed loses it."""
    session = open_session(server, scene_parts)
    a, b, c, d, e = (12, 12, 12), (12, 20, 20), (20, 14, 22), (24, 24, 14), (16, 26, 26)  # close: exact voxels
    for spot in (a, b, c):
        session.add(Prompt("point", True, ras=ras(spot)))

    def calls():
        return server.count('"POST /undo'), server.count('"POST /reset_interactions')

    undos, seeds = calls()
    session.undo()  # c, at once here; the server follows before the next prompt
    assert not mask_of(session)[c] and calls() == (undos, seeds)
    session.add(Prompt("point", True, ras=ras(d)))
    got = mask_of(session)
    assert calls() == (undos + 1, seeds) and got[a] and got[b] and got[d] and not got[c]
    session.undo()
    session.redo()  # back where the server still is: nothing to tell it
    session.add(Prompt("point", True, ras=ras(e)))
    assert calls() == (undos + 1, seeds) and mask_of(session)[d] and mask_of(session)[e]
    session.undo()
    session.undo()  # two steps back: deeper than the server's undo, so the next prompt re-seeds it
    session.add(Prompt("point", True, ras=ras(c)))
    got = mask_of(session)
    assert calls() == (undos + 1, seeds + 1) and got[a] and got[b] and got[c] and not got[d] and not got[e]
    session.close()


def test_undo_and_redo_of_a_prompt_leave_hand_edits_in_its_box_alone(server, scene_parts):
    """Undo and Redo set back only the voxels the prompt changed, not the whole box the server answered with."""
    session = open_session(server, scene_parts)
    session.add(Prompt("point", True, ras=ras((20, 24, 28))))
    session.add(Prompt("point", True, ras=ras((20, 24, 36))))
    block = (slice(30, 33), slice(5, 8), slice(5, 8))
    last_box = session._history.done[-1].box
    assert all(b.start <= s.start and s.stop <= b.stop for b, s in zip(last_box, block))  # in its box
    edited = mask_of(session)
    edited[block] = True
    paint(session, edited)
    session.undo()
    got = mask_of(session)
    assert got[block].all() and got[20, 24, 28] and not got[20, 24, 36]
    session.redo()
    got = mask_of(session)
    assert got[block].all() and got[20, 24, 28] and got[20, 24, 36]
    session.close()


def test_undo_gives_back_the_voxels_a_prompt_took_from_another_segment(server, scene_parts):
    """The Segment Editor's default overwrite setting has a prompt take its voxels from the other segments."""
    volume, segmentation, target, editor = scene_parts
    block = np.zeros(SHAPE, bool)
    block[15:25, 18:30, 22:34] = True
    add_segment_from_mask(segmentation, block.copy(), oblique_matrix(), "neighbour", (0, 0, 1))  # it keeps the copy
    session = open_session(server, scene_parts)
    session.add(Prompt("point", True, ras=ras((20, 24, 28))))
    ball = mask_of(session)
    assert ball[20, 24, 28] and np.array_equal(mask_of(session, "neighbour"), block & ~ball)
    session.undo()
    assert not mask_of(session).any() and np.array_equal(mask_of(session, "neighbour"), block)
    session.redo()
    assert np.array_equal(mask_of(session), ball) and np.array_equal(mask_of(session, "neighbour"), block & ~ball)
    session.close()


def test_the_undo_history_is_capped_in_bytes_and_says_when_it_drops_steps(server, scene_parts):
    said = []
    session = open_session(server, scene_parts, status=said.append)
    spots = [(12, 12, 12), (12, 20, 20), (20, 14, 22), (24, 24, 14)]
    session.add(Prompt("point", True, ras=ras(spots[0])))
    session.max_undo_bytes = 2 * session._history.done[0].nbytes
    for spot in spots[1:]:
        session.add(Prompt("point", True, ras=ras(spot)))
    kept = session._history.done
    assert 1 <= len(kept) < 4 and sum(step.nbytes for step in kept) <= session.max_undo_bytes
    assert said[-1].startswith("The undo history reached its 0 MB: the oldest ")
    while session.can_undo:
        session.undo()
    assert mask_of(session)[spots[0]]  # a dropped step stays done
    session.max_undo_bytes = 1  # any step is larger than the cap now
    session.reset()  # a step larger than the cap is still kept as the last one
    assert session.can_undo and not mask_of(session).any()
    session.undo()
    assert mask_of(session)[spots[0]]
    session.close()


def voxels_of(segmentation, segment_id) -> int:
    """A segment's voxels on its own labelmap, whatever segmentation the session prompts into."""
    segment = segmentation.GetSegmentation().GetSegment(segment_id)
    labelmap = segment.GetRepresentation("Binary labelmap")
    if labelmap is None or labelmap.GetPointData().GetScalars() is None:
        return 0
    return int((arrays.image_array(labelmap) == segment.GetLabelValue()).sum())


def test_undo_after_another_segmentation_was_chosen_or_its_segment_deleted(server, scene_parts, ctx):
    """Each step knows its segmentation: undone there, while prompts go on into the one chosen; a step whose segment
    is gone is dropped in one sentence, as is a prompt into a chosen segment deleted since."""
    volume, segmentation, target, editor = scene_parts
    panel = connected_panel(server, scene_parts)
    panel.submit("point", ras=ras((20, 24, 28)))
    settle(panel)
    prompted = voxels_of(segmentation, target)
    other = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "other")
    other.CreateDefaultDisplayNodes()
    other.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    elsewhere = other.GetSegmentation().AddEmptySegment("", "elsewhere")
    panel.choose(volume, SegmentTarget(other, elsewhere, headless_editor(ctx.scene, ctx.app_logic, other, volume)))
    settle(panel)
    panel.undo()
    settle(panel)
    assert panel.status == "Undo done." and voxels_of(segmentation, target) == 0
    panel.redo()
    settle(panel)
    assert panel.status == "Redo done." and voxels_of(segmentation, target) == prompted > 0
    panel.submit("point", ras=ras((10, 10, 10)))
    settle(panel)
    assert panel.session._segment_mask(elsewhere)[10, 10, 10] and voxels_of(segmentation, target) == prompted
    other.GetSegmentation().RemoveSegment(elsewhere)
    panel.undo()
    settle(panel)
    assert panel.status == "Nothing to undo: the segment that prompt changed was deleted."
    panel.submit("point", ras=ras((30, 30, 40)))
    settle(panel)
    assert panel.status == "The segment chosen for AI prompts was deleted: choose or add another segment."
    panel.choose(volume, SegmentTarget(segmentation, target, editor))
    settle(panel)
    panel.submit("point", ras=ras((30, 30, 40)))
    panel.tick()  # on the server
    segmentation.GetSegmentation().RemoveSegment(target)
    settle(panel)
    assert panel.status == ("The segment was deleted while the prompt ran; nothing was written: choose or add another "
                            "segment.")
    panel.undo()  # its first prompt's step
    settle(panel)
    assert panel.status == "Nothing to undo: the segment that prompt changed was deleted." and not panel.can_undo
    panel.session.close()


def test_undo_of_a_prompt_in_another_segment_leaves_prompting_in_the_chosen_one(server, scene_parts):
    volume, segmentation, target, editor = scene_parts
    second = segmentation.GetSegmentation().AddEmptySegment("", "second")
    panel = connected_panel(server, scene_parts)
    panel.submit("point", ras=ras((20, 24, 28)))
    settle(panel)
    panel.choose(volume, SegmentTarget(segmentation, second, editor))  # as the section's segment selector shows
    settle(panel)
    panel.undo()  # the prompt in the first segment
    settle(panel)
    panel.submit("point", ras=ras((10, 10, 10)))
    settle(panel)
    assert not panel.session._segment_mask(target).any() and panel.session._segment_mask(second)[10, 10, 10]
    panel.session.close()


def test_choosing_another_series_clears_the_undo_history(server, scene_parts):
    """The steps' boxes are on the first series' grid: undone on another, they would land on other voxels."""
    volume, segmentation, target, editor = scene_parts
    panel = connected_panel(server, scene_parts)
    panel.submit("point", ras=ras((20, 24, 28)))
    settle(panel)
    series = volume.GetScene().AddNewNodeByClass("vtkMRMLScalarVolumeNode", "second series")
    grid = np.diag([1.5, 1.5, 3.0, 1.0])
    grid[:3, 3] = [-40, -40, -10]
    arrays.set_volume_array(series, np.random.default_rng(2).normal(0, 100, (30, 50, 50)).astype(np.int16), grid)
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(series)  # as the section does
    panel.choose(series, SegmentTarget(segmentation, target, editor))
    settle(panel)
    before = panel.session._segment_mask(target)
    assert before.any() and not panel.can_undo
    panel.undo()
    settle(panel)
    assert panel.status == "Nothing to undo." and np.array_equal(panel.session._segment_mask(target), before)
    panel.session.close()


def test_the_history_counts_the_voxels_a_step_took_drops_every_step_of_a_deleted_segment_and_says_one_step(ctx):
    """The history alone, on real segments (no server): a step's voxels taken from other segments were left out of
    the memory cap, a deleted segment's older steps each said "deleted" again at the next undos, and one dropped step
    was said as "1 steps"."""
    from SegmentationMachineLib.prompts.errors import InteractiveError
    from SegmentationMachineLib.prompts.history import Step, UndoHistory

    node = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Parts")
    kept_id, deleted_id = (node.GetSegmentation().AddEmptySegment("", name) for name in ("Kept", "Deleted"))
    kept, deleted = SegmentTarget(node, kept_id, None), SegmentTarget(node, deleted_id, None)
    empty, full = np.zeros((8, 8, 8), bool), np.ones((8, 8, 8), bool)  # 64 bytes each, packed

    def step(target, taken=None):
        return Step(target, Prompt("point", True, ras=(0.0, 0.0, 0.0)), (0, 8, 0, 8, 0, 8), empty, full, taken)

    assert step(kept, {deleted_id: full}).nbytes == 3 * 64
    history = UndoHistory()
    assert history.remember(step(kept), 300) == ""
    assert history.remember(step(kept, {deleted_id: full}), 300) == (
        "The undo history reached its 0 MB: the oldest 1 step can no longer be undone.")
    history.clear()
    for target in (kept, deleted, deleted):
        history.remember(step(target), 1 << 20)
    node.GetSegmentation().RemoveSegment(deleted_id)
    with pytest.raises(InteractiveError, match="^Nothing to undo: the segment that prompt changed was deleted.$"):
        history.undo(lambda undone: None)
    restored = []
    history.undo(restored.append)  # the kept segment's step, at once
    assert [s.segment_id for s in restored] == [kept_id] and not history.can_undo


def test_a_prompt_that_changed_nothing_is_recorded_undone_and_redone_as_the_last_prompt_placed(server, scene_parts):
    """An exclude click on background changes no voxel, but the server keeps it and it shapes later results: it is a
    step of its own. Ctrl+Z takes it back (the segment stays as it is, the server's own undo follows before the next
    prompt, so the model forgets it too); Redo brings it back (the server still has it: nothing is sent)."""
    volume, segmentation, target, editor = scene_parts
    said = []
    session = open_session(server, scene_parts, status=said.append)
    near, far = (20, 24, 28), (20, 24, 31)  # three voxels apart: the exclude's ball takes much of the include's

    def calls():
        return server.count('"POST /undo'), server.count('"POST /reset_interactions')

    timing = session.add(Prompt("point", False, ras=ras(near)))
    assert not timing.changed and not mask_of(session).any()
    recorded = session.prompts_of(target)
    assert [(p.kind, p.include, p.ras) for p in recorded] == [("point", False, ras(near))] and session.can_undo
    undos, seeds = calls()
    session.undo()  # the last prompt placed, though it changed nothing
    assert session.prompts_of(target) == [] and not mask_of(session).any() and session.can_redo
    session.redo()  # before any prompt: the server still has it
    assert session.prompts_of(target) == recorded and calls() == (undos, seeds)
    session.add(Prompt("point", True, ras=ras(far)))
    cut = mask_of(session)
    assert cut.any() and calls() == (undos, seeds)
    session.undo()
    session.undo()  # the exclude too: deeper than the server's one level, so the next prompt re-seeds (empty)
    session.add(Prompt("point", True, ras=ras(far)))
    whole = mask_of(session)
    assert calls() == (undos, seeds + 1) and (cut <= whole).all() and whole.sum() > cut.sum() * 2  # the exclude cut it
    session.undo()  # one level: the server's own undo, sent with the next prompt
    session.add(Prompt("point", False, ras=ras(near)))
    session.undo()  # the server's own undo takes it back before the next prompt: the model forgets it
    session.add(Prompt("point", True, ras=ras(far)))
    assert np.array_equal(mask_of(session), whole) and calls() == (undos + 2, seeds + 1)
    assert [p.include for p in session.prompts_of(target)] == [True]
    session.close()


def test_a_prompt_answered_with_no_box_is_recorded_as_one_that_changed_nothing(server, scene_parts, monkeypatch):
    """A server answering a prompt with no box at all (the upstream one answers with the whole box it predicted, but
    the client allows none) has kept the prompt all the same: it is recorded, and Undo sends the server's own undo
    with the next prompt."""
    from SegmentationMachineLib.prompts.session import PendingPrompt

    volume, segmentation, target, editor = scene_parts
    session = open_session(server, scene_parts)
    run = PendingPrompt.run
    monkeypatch.setattr(PendingPrompt, "run", lambda pending: (run(pending), None)[1])  # predicted, answered no box
    timing = session.add(Prompt("point", False, ras=ras((20, 24, 28))))
    assert not timing.changed and [(p.kind, p.include) for p in session.prompts_of(target)] == [("point", False)]
    monkeypatch.undo()
    undos = server.count('"POST /undo')
    session.undo()
    assert session.prompts_of(target) == [] and session.can_redo and not mask_of(session).any()
    session.add(Prompt("point", True, ras=ras((20, 24, 31))))
    assert server.count('"POST /undo') == undos + 1 and mask_of(session).any()
    session.close()


def test_a_prompt_file_saved_with_a_prompt_that_changed_nothing_replays_the_segment_made(server, scene_parts, ctx,
                                                                                        tmp_path):
    """Save prompts writes the prompt that changed nothing: replayed (as the CLI's model command does), the file gives
    the segment the user made; without it, another one."""
    from SegmentationMachineLib.pipeline import segment_with_prompts
    from SegmentationMachineLib.prompts.promptfile import load_prompt_file, save_prompt_file, SegmentPrompts

    volume, segmentation, target, editor = scene_parts
    session = open_session(server, scene_parts)
    session.add(Prompt("point", True, ras=ras((12, 14, 16))))
    session.add(Prompt("point", True, ras=ras((12, 14, 16))))  # inside what it made already: changes nothing
    session.add(Prompt("point", False, ras=ras((20, 24, 28))))  # on background: changes nothing
    session.add(Prompt("point", True, ras=ras((20, 24, 31))))
    made = mask_of(session)
    session.close()
    save_prompt_file(tmp_path / "prompts.json", [SegmentPrompts("made", session.prompts_of(target))])
    saved = load_prompt_file(tmp_path / "prompts.json")
    assert [(p.include, p.ras) for p in saved[0].prompts] == [
        (True, ras((12, 14, 16))), (True, ras((12, 14, 16))), (False, ras((20, 24, 28))), (True, ras((20, 24, 31)))]
    echoed = []
    for segments in (saved, [SegmentPrompts("without", [p for p in saved[0].prompts if p.include])]):
        replayer = InteractiveSession(server.url, KEY)
        replayer.connect()
        segment_with_prompts(ctx, volume, segments, replayer, echo=echoed.append)
        replayed = mask_of(replayer, segments[0].name)
        replayer.close()
        assert np.array_equal(replayed, made) == (segments is saved)
    assert any(line.startswith("made: prompt 3/4 (point, exclude) in ") and line.endswith(
        " (changed nothing; kept for the prompts that follow)") for line in echoed)


def test_steps_the_memory_cap_drops_keep_their_prompts_in_the_record(server, scene_parts):
    """The cap lets go of the oldest steps' masks (no longer undoable), not of their prompts: a prompt file saved after
    many prompts still replays the first ones."""
    volume, segmentation, target, editor = scene_parts
    session = open_session(server, scene_parts)
    spots = [(12, 12, 12), (12, 20, 20), (20, 14, 22), (24, 24, 14)]
    session.add(Prompt("point", True, ras=ras(spots[0])))
    session.max_undo_bytes = session._history.done[0].nbytes
    for spot in spots[1:]:
        session.add(Prompt("point", True, ras=ras(spot)))
    assert len(session._history.done) == 1 and len(session._history.settled) == 3
    assert all(step.nbytes == 0 for step in session._history.settled)
    assert [p.ras for p in session.prompts_of(target)] == [ras(s) for s in spots]
    session.undo()
    assert [p.ras for p in session.prompts_of(target)] == [ras(s) for s in spots[:3]] and not session.can_undo
    session.reset()
    assert session.prompts_of(target) == []
    session.undo()
    assert len(session.prompts_of(target)) == 3
    session.close()
