"""The AI prompts sent stay shown (panels/prompttrail.py): real MRML markups from slicer-core, Slicer's own Markups
logic wired as Slicer wires it; the prompts panel against the real upstream nnInteractive server on CPU for what only
a real prompt's life shows (written, failed, cancelled, undone, redone, reset, another segment, Disconnect)."""

import numpy as np
import slicer
import vtk

from interactive_parts import connected_panel, ras, settle
from SegmentationMachineLib.panels.prompttrail import (EXCLUDE_COLOUR, INCLUDE_COLOUR, NAME, PromptTrail,
                                                       WAITING_NAME, WAITING_OPACITY)
from SegmentationMachineLib.prompts.promptfile import Prompt
from SegmentationMachineLib.prompts.session import SegmentTarget

POINT = Prompt("point", True, ras=(1.0, 2.0, 3.0))
FLAT_BOX = Prompt("box", False, ras_min=(0.0, -10.0, 5.0), ras_max=(10.0, 20.0, 5.0))  # drawn on an axial slice
SCRIBBLE = Prompt("scribble", True, ras_points=((0.0, 0.0, 0.0), (1.0, 1.5, 0.0), (2.0, 0.0, 0.5)))
LASSO = Prompt("lasso", False, ras_points=((0.0, 0.0, 1.0), (5.0, 0.0, 1.0), (5.0, 5.0, 1.0), (0.0, 4.0, 1.0)))


def markups_logic(ctx):
    """Slicer's Markups logic, which makes every markups node added the active place node."""
    logic = slicer.vtkSlicerMarkupsLogic()
    logic.SetMRMLApplicationLogic(ctx.app_logic)
    logic.SetMRMLScene(ctx.scene)
    return logic


def world(node, index=0) -> tuple:
    position = [0.0, 0.0, 0.0]
    node.GetNthControlPointPositionWorld(index, position)
    return tuple(position)


def saved_scene(scene) -> str:
    scene.SetSaveToXMLString(1)
    scene.Commit()
    return scene.GetSceneXMLString()


def test_prompts_sent_are_shown_read_only_each_as_its_kind_in_its_polarity_colour(ctx):
    logic = markups_logic(ctx)
    selection = ctx.app_logic.GetSelectionNode()
    mine = ctx.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "my landmarks")  # the user's active list
    trail = PromptTrail(ctx.scene, ctx.app_logic)
    trail.show([POINT, FLAT_BOX, SCRIBBLE, LASSO])
    point, box, scribble, lasso = trail.nodes
    assert [n.GetClassName() for n in trail.nodes] == ["vtkMRMLMarkupsFiducialNode", "vtkMRMLMarkupsROINode",
                                                       "vtkMRMLMarkupsCurveNode", "vtkMRMLMarkupsClosedCurveNode"]
    # Slicer's logic made each the active place node: the user's list is active again, so their next click goes there.
    assert (selection.GetActivePlaceNodeClassName(), selection.GetActivePlaceNodeID()) == (mine.GetClassName(),
                                                                                        mine.GetID())
    assert world(point) == POINT.ras and point.GetNumberOfControlPoints() == 1
    assert list(box.GetCenter()) == [5.0, 5.0, 5.0] and list(box.GetSize()) == [10.0, 30.0, 0.0]  # flat, as sent
    for curve, prompt in ((scribble, SCRIBBLE), (lasso, LASSO)):  # the points sent, joined as sent: not re-splined
        assert curve.GetCurveType() == slicer.vtkCurveGenerator.CURVE_TYPE_LINEAR_SPLINE
        assert [world(curve, i) for i in range(curve.GetNumberOfControlPoints())] == list(prompt.ras_points)
    for node, prompt in zip(trail.nodes, (POINT, FLAT_BOX, SCRIBBLE, LASSO)):
        display = node.GetDisplayNode()
        colour = INCLUDE_COLOUR if prompt.include else EXCLUDE_COLOUR
        assert display.GetColor() == display.GetSelectedColor() == colour
        assert node.GetLocked() and node.GetFixedNumberOfControlPoints() and node.GetHideFromEditors()
        assert not node.GetSaveWithScene() and not display.GetSaveWithScene()
        assert node.GetName().startswith(NAME)
    assert point.GetDisplayNode().GetGlyphType() == point.GetDisplayNode().Cross2D  # + include, - exclude
    assert not box.GetDisplayNode().GetFillVisibility() and box.GetDisplayNode().GetOutlineVisibility()
    assert point.AddControlPoint(vtk.vtkVector3d(0, 0, 0)) == -1  # nothing can be placed into a prompt shown
    assert point.GetNumberOfControlPoints() == 1
    text = saved_scene(ctx.scene)
    assert "my landmarks" in text and NAME not in text  # the scene saved holds none of them
    del logic


def test_prompts_shown_follow_the_volume_under_its_transform_and_change_only_at_the_end(ctx):
    """The history keeps prompts in the volume's own RAS: the markups sit under its transform, where its voxels are."""
    volume = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    transform = ctx.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 100.0)
    transform.SetMatrixTransformToParent(matrix)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    trail = PromptTrail(ctx.scene)  # no Markups logic (the CLI's scene): display nodes made here
    trail.show([POINT, FLAT_BOX], volume)
    point, box = trail.nodes
    assert point.GetDisplayNode() is not None
    assert world(point) == (101.0, 2.0, 3.0)
    centre = [0.0, 0.0, 0.0]
    box.GetCenterWorld(centre)
    assert centre == [105.0, 5.0, 5.0]
    trail.show([POINT, FLAT_BOX, SCRIBBLE], volume)  # one more sent
    assert trail.nodes[:2] == [point, box] and len(trail.nodes) == 3
    trail.show([POINT], volume)  # two undone
    assert trail.nodes == [point] and box.GetScene() is None
    volume.SetAndObserveTransformNodeID(None)  # the volume moved: its prompts with it
    trail.show([POINT], volume)
    assert world(trail.nodes[0]) == POINT.ras and point.GetScene() is None
    trail.show([], volume)
    assert trail.nodes == [] and ctx.scene.GetNumberOfNodesByClass("vtkMRMLMarkupsNode") == 0
    volume.SetAndObserveTransformNodeID(transform.GetID())
    trail.show([POINT], volume, [SCRIBBLE, LASSO])  # placed and waiting: in world, as placed, faint
    sent, (scribble, lasso) = trail.nodes[0], trail.waiting_nodes
    assert world(sent) == (101.0, 2.0, 3.0) and world(scribble) == SCRIBBLE.ras_points[0]
    assert scribble.GetTransformNodeID() is None and scribble.GetName().startswith(WAITING_NAME)
    for node, prompt in ((scribble, SCRIBBLE), (lasso, LASSO)):
        display = node.GetDisplayNode()
        colour = INCLUDE_COLOUR if prompt.include else EXCLUDE_COLOUR
        assert display.GetOpacity() == WAITING_OPACITY < sent.GetDisplayNode().GetOpacity() == 1.0
        assert display.GetColor() == colour and node.GetLocked() and not node.GetSaveWithScene()
    trail.show([POINT, SCRIBBLE], volume, [LASSO])  # the scribble's result is in: sent; the lasso still waits
    assert trail.nodes[0] is sent and trail.waiting_nodes == [lasso] and scribble.GetScene() is None
    trail.show([POINT, SCRIBBLE], volume)  # the lasso failed or was cancelled: gone
    assert lasso.GetScene() is None and len(trail.nodes) == 2
    trail.show([LASSO], None, [SCRIBBLE])
    ctx.scene.Clear(0)  # Close Scene took them: forgetting them is no error
    trail.clear()
    assert trail.nodes == [] == trail.waiting_nodes


def markups_shown(trail, waiting=False) -> list:
    """(kind, include, world RAS of its first point) of each markup shown as sent (or as waiting)."""
    classes = {"vtkMRMLMarkupsFiducialNode": "point", "vtkMRMLMarkupsROINode": "box",
               "vtkMRMLMarkupsCurveNode": "scribble", "vtkMRMLMarkupsClosedCurveNode": "lasso"}
    nodes = trail.waiting_nodes if waiting else trail.nodes
    assert all(node.GetDisplayNode().GetOpacity() == (WAITING_OPACITY if waiting else 1.0) for node in nodes)
    return [(classes[node.GetClassName()], node.GetDisplayNode().GetColor() == INCLUDE_COLOUR,
             tuple(np.round(world(node), 3))) for node in nodes if node.GetScene() is not None]


def test_the_panel_shows_the_prompts_written_into_the_segment_chosen(server, ctx, scene_parts):
    volume, segmentation, target, editor = scene_parts
    logic = markups_logic(ctx)  # kept: dropped, VTK would delete it
    trail = PromptTrail(ctx.scene, ctx.app_logic)
    panel = connected_panel(server, scene_parts, trail=trail)
    first, second = tuple(np.round(ras((10, 10, 10)), 3)), tuple(np.round(ras((20, 20, 20)), 3))
    panel.submit("point", ras=ras((10, 10, 10)))
    panel.submit("point", ras=ras((20, 20, 20)))
    panel.tick()
    assert markups_shown(trail) == []  # on the server: not shown as sent before its result is written
    assert markups_shown(trail, waiting=True) == [("point", True, first), ("point", True, second)]  # but at once
    panel.submit("point", ras=(9999.0, 0.0, 0.0))  # refused: never sent, never shown
    settle(panel)
    assert panel.status == "The point is outside the image: place it on the volume."
    assert markups_shown(trail) == [("point", True, first), ("point", True, second)] and not trail.waiting_nodes
    panel.undo()
    settle(panel)
    assert markups_shown(trail) == [("point", True, first)]
    panel.redo()
    settle(panel)
    assert markups_shown(trail) == [("point", True, first), ("point", True, second)]
    panel.toggle_include()
    panel.submit("point", ras=ras((10, 10, 10)))  # takes away what the first made: written, so shown
    settle(panel)
    assert markups_shown(trail)[-1] == ("point", False, first) and len(trail.nodes) == 3
    panel.submit("point", ras=ras((10, 10, 10)))  # the same exclude again: nothing left to take away
    settle(panel)
    assert panel.status.startswith("Point sent in ") and panel.status.endswith(
        ": it changed nothing in the segment, but the AI keeps it for the prompts that follow (Undo takes it back).")
    assert markups_shown(trail)[-1] == ("point", False, first) and len(trail.nodes) == 4  # shown: the server keeps it
    panel.undo()  # Ctrl+Z takes it back: the segment stays as it is, the marker goes
    settle(panel)
    assert len(trail.nodes) == 3
    other = segmentation.GetSegmentation().AddEmptySegment("", "other")
    panel.choose(volume, SegmentTarget(segmentation, other, editor))
    settle(panel)
    assert markups_shown(trail) == []  # another segment: none of its prompts yet
    panel.choose(volume, SegmentTarget(segmentation, target, editor))
    settle(panel)
    assert len(markups_shown(trail)) == 3  # back to the first: what made it
    panel.reset()
    settle(panel)
    assert markups_shown(trail) == []
    panel.undo()  # the reset undone: the prompts that made the segment are back
    settle(panel)
    assert len(markups_shown(trail)) == 3
    panel.disconnect()
    assert trail.nodes == [] and ctx.scene.GetNumberOfNodesByClass("vtkMRMLMarkupsNode") == 0
    del logic


def test_a_prompt_cancelled_is_not_shown_as_sent(slow_server, ctx, scene_parts):
    trail = PromptTrail(ctx.scene, ctx.app_logic)
    panel = connected_panel(slow_server, scene_parts, trail=trail)
    panel.submit("point", ras=ras((30, 30, 40)))
    panel.submit("point", ras=ras((35, 35, 45)))  # queued behind it: dropped by Cancel
    panel.tick()
    assert len(markups_shown(trail, waiting=True)) == 2  # the one on the server and the one queued, faint
    panel.cancel()
    panel.tick()  # as the widget's Cancel does
    assert trail.nodes == [] == trail.waiting_nodes
    panel.submit("point", ras=ras((20, 24, 28)))
    settle(panel)
    assert markups_shown(trail) == [("point", True, tuple(np.round(ras((20, 24, 28)), 3)))]
    # Close Scene while one is on the server and one queued: neither comes back, faint, in the next scene
    panel.submit("point", ras=ras((30, 30, 40)))
    panel.submit("point", ras=ras((35, 35, 45)))
    panel.tick()
    assert len(markups_shown(trail, waiting=True)) == 2
    panel.scene_closed()  # the widget's, at StartCloseEvent
    ctx.scene.Clear(0)
    panel.tick()  # the timer's next tick, in the new scene
    assert trail.nodes == [] == trail.waiting_nodes
    assert ctx.scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode") == 0
    assert panel.status == "The scene was closed: the prompts not yet answered were dropped."
    panel.session.close()

