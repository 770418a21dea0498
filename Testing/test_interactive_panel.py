"""The AI prompts panel (panels/prompts.py, which the module's AI section binds) against the real upstream
nnInteractive server on CPU (as test_interactive.py): prompts queued during a prediction, the scan being sent, a slow
prediction and Cancel, a wrong key, a connect abandoned, the segment the section makes to prompt into.
"""

import threading

import numpy as np
import pytest
import slicer

from interactive_parts import connected_panel, counts, KEY, oblique_matrix, ras, settle, SHAPE, wait_for_log
from SegmentationMachineLib.core import arrays
from SegmentationMachineLib.core.errors import UserError
from SegmentationMachineLib.prompts.session import headless_editor, SegmentTarget


def test_prompts_panel_queues_prompts_made_during_a_prediction(server, scene_parts):
    volume, segmentation, target, editor = scene_parts
    panel = connected_panel(server, scene_parts)
    assert not panel.can_undo and not panel.can_redo  # the widget's Undo and Redo buttons are greyed
    # Three prompts at once: the 2nd and 3rd arrive while the 1st is still on the server.
    panel.submit("point", ras=ras((10, 10, 10)))
    assert panel.can_undo  # its Undo may be queued behind it
    panel.tick()
    assert panel.task is not None
    panel.submit("point", ras=ras((20, 20, 20)))
    panel.toggle_include()
    panel.submit("point", ras=ras((10, 10, 10)))
    settle(panel)
    mask = panel.session._segment_mask(target)
    assert not mask[10, 10, 10] and mask[20, 20, 20]  # all three ran, in order
    assert panel.last_latency.endswith("server + network)") and panel.status.startswith("Point applied in")
    assert panel.can_undo and not panel.can_redo
    panel.undo()
    settle(panel)
    assert panel.session._segment_mask(target)[10, 10, 10] and panel.can_undo and panel.can_redo
    panel.submit("point", ras=(9999.0, 0.0, 0.0))
    settle(panel)
    assert panel.status == "The point is outside the image: place it on the volume."
    panel.session.close()


def test_the_ai_section_makes_its_own_segment_to_prompt_into(server, ctx):
    """A volume just loaded (from the inbox, say) and nothing else: Slicer's segment selector cannot add one, so
    Add segment makes the segmentation and the segment, and the first prompt lands there."""
    from SegmentationMachineLib.panels.prompts import new_segment

    with pytest.raises(UserError, match="^There is no volume to segment: load one"):
        new_segment(None)
    volume = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    arrays.set_volume_array(volume, np.random.default_rng(2).normal(0, 100, SHAPE).astype(np.int16), oblique_matrix())
    segmentation, first = new_segment(volume)
    assert segmentation.GetName() == "CT segmentation" and segmentation.GetDisplayNode() is not None
    on_volume = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    on_volume.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    geometry = segmentation.GetSegmentation().GetConversionParameter(name)
    assert geometry == on_volume.GetSegmentation().GetConversionParameter(name) != ""  # on the volume's grid
    again, second = new_segment(volume, segmentation)
    assert again is segmentation and second != first and segmentation.GetSegmentation().GetNumberOfSegments() == 2
    editor = headless_editor(ctx.scene, ctx.app_logic, segmentation, volume)
    panel = connected_panel(server, (volume, segmentation, second, editor))
    panel.submit("point", ras=ras((10, 10, 10)))
    settle(panel)
    assert panel.status.startswith("Point applied in") and panel.session._segment_mask(second).any()
    panel.session.close()


def test_prompts_panel_says_the_scan_is_being_sent(server, scene_parts):
    """The first upload takes a minute on a hospital's uplink: the status said 'Connected' all along."""
    volume, segmentation, target, editor = scene_parts
    now = [0.0]
    panel = connected_panel(server, scene_parts, clock=lambda: now[0])
    sent = threading.Event()
    panel.session.stage_volume = lambda node: sent.wait  # the upload, held as a slow uplink holds it
    panel.choose(volume, SegmentTarget(segmentation, target, editor))
    panel.tick()
    assert panel.status == "Sending the scan to the server (prompts placed meanwhile wait for it)."
    now[0] = 42.0
    panel.tick()
    assert panel.status == "Sending the scan to the server: 42 s (prompts placed meanwhile wait for it)."
    sent.set()
    settle(panel)
    assert panel.status.startswith("Ready (slices")
    panel.session.close()


def test_prompts_placed_while_a_scan_that_then_fails_was_sent_are_dropped_with_it(server, scene_parts):
    """The upload of a newly chosen scan failed, and the prompts placed while it was sent then ran on the scan the
    server had before: voxels written from another series."""
    volume, segmentation, target, editor = scene_parts
    panel = connected_panel(server, scene_parts)
    points = counts(server)[2]

    def failed():
        raise UserError("The upload failed.")

    panel.session.stage_volume = lambda node: failed  # the upload, as a dropped uplink ends it
    panel.choose(volume, SegmentTarget(segmentation, target, editor))
    panel.submit("point", ras=ras((20, 24, 28)))
    settle(panel)
    assert panel.status == "The upload failed." and not panel.queue and counts(server)[2] == points
    panel.session.close()


def test_prompts_panel_shows_a_slow_prediction_and_cancels_one(slow_server, scene_parts):
    volume, segmentation, target, editor = scene_parts
    now = [0.0]
    panel = connected_panel(slow_server, scene_parts, clock=lambda: now[0])
    before = counts(slow_server)
    panel.submit("point", ras=ras((10, 10, 10)))
    panel.tick()
    assert panel.can_cancel and not panel.status.startswith("Point: the server")  # quick answers show no wait
    now[0] = 7.0
    panel.tick()
    assert panel.status == "Point: the server is working on it, 7 s (Cancel stops waiting)."
    settle(panel)  # waited for, however slow: applied once
    assert panel.status.startswith("Point applied in") and panel.session._segment_mask(target)[10, 10, 10]
    panel.submit("point", ras=ras((30, 30, 40)))
    panel.submit("point", ras=ras((35, 35, 45)))
    panel.tick()
    panel.cancel()  # while the first of the two is on the server
    assert not panel.busy and not panel.can_cancel and panel.status == "Cancelled: the segment is as it was."
    assert not panel.session._segment_mask(target)[30, 30, 40]
    panel.submit("point", ras=ras((20, 24, 28)))
    settle(panel)
    mask = panel.session._segment_mask(target)
    # The cancelled answer is ignored and the model restarted from the segment: its point is nowhere.
    assert mask[10, 10, 10] and mask[20, 24, 28] and not mask[30, 30, 40] and not mask[35, 35, 45]
    claims, uploads, points = counts(slow_server)
    assert (claims, uploads, points) == (before[0], before[1], before[2] + 3)
    panel.session.close()


def test_prompts_panel_wrong_key_is_the_status_line(server):
    from SegmentationMachineLib.panels.prompts import PromptsPanel

    panel = PromptsPanel()
    panel.connect(server.url, "not-the-key")
    assert panel.task.wait(30)
    panel.tick()
    assert not panel.connected and "rejected the API key" in panel.status


def test_a_connect_abandoned_by_disconnect_gives_its_lease_back(server):
    """Upstream's client keeps a lease alive by its own heartbeats: one nobody uses would hold one of the server's
    few slots until its idle reaper (10 min)."""
    from SegmentationMachineLib.panels.prompts import PromptsPanel

    claims, releases = server.count('"POST /claim'), server.count('"POST /release')
    panel = PromptsPanel()
    panel.connect(server.url, KEY)
    assert panel.connecting  # Disconnect is enabled
    panel.disconnect()  # while the connect is on its way
    assert not panel.connected and not panel.connecting and not panel.busy and panel.status == "Disconnected."
    wait_for_log(server, '"POST /claim', claims + 1)
    wait_for_log(server, '"POST /release', releases + 1, seconds=30)


def test_a_prompt_before_connect_is_said_not_kept_and_one_while_connecting_waits(server):
    """A point placed before Connect vanished from the view, the status line unchanged."""
    from SegmentationMachineLib.panels.prompts import PromptsPanel

    panel = PromptsPanel()
    panel.submit("point", ras=(0.0, 0.0, 0.0))
    panel.undo()
    assert not panel.busy and panel.status == "Connect to a server first: that prompt was not kept."
    panel.connect(server.url, KEY)
    panel.submit("point", ras=(0.0, 0.0, 0.0))
    assert len(panel.queue) == 1
    panel.disconnect()
    assert not panel.busy and not panel.queue  # dropped: else it ran on the next server, in the next scan
