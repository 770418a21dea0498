"""What the AI prompt tests (test_interactive*.py) share: the oblique volume their prompts land on, a session or a
prompts panel connected to a server of conftest.py's (the real upstream nnInteractive server on loopback), painting
by hand, and reading the server's log.

The volume is oblique, mirrored and anisotropic, so a prompt can only land on the right voxels if RAS, IJK and array
order are all handled right.
"""

import time

import numpy as np
import slicer

from SegmentationMachineLib.core import arrays
from SegmentationMachineLib.prompts.session import InteractiveSession, SegmentTarget

KEY = "test-key-0123456789"
SHAPE = (40, 48, 56)  # K, J, I
SLOW_S = 3.0  # per forward pass of slow_server's model: a point takes one


def oblique_matrix():
    angle = np.radians(25)
    rotation = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ np.diag([0.8, -1.2, 2.0])  # J mirrored
    matrix[:3, 3] = [-30.0, 15.0, 40.0]
    return matrix


def ras(kji) -> tuple:
    k, j, i = kji
    return tuple((oblique_matrix() @ [i, j, k, 1.0])[:3])


def open_session(server, scene_parts, **options) -> InteractiveSession:
    volume, segmentation, target, editor = scene_parts
    session = InteractiveSession(server.url, KEY, **options)
    session.connect()
    session.set_volume(volume)
    session.select_segment(SegmentTarget(segmentation, target, editor))
    return session


def mask_of(session, name="target") -> np.ndarray:
    segmentation = session._target.segmentation_node
    return session._segment_mask(segmentation.GetSegmentation().GetSegmentIdBySegmentName(name))


def paint(session, mask: np.ndarray):
    """Replaces the selected segment's voxels through the MRML API, as the Segment Editor's paint and erase do."""
    labelmap = slicer.vtkOrientedImageData()
    labelmap.ShallowCopy(arrays.image_from_array(mask.astype(np.uint8)))
    labelmap.SetImageToWorldMatrix(arrays.array_to_matrix(oblique_matrix()))
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    target = session._target
    assert logic.SetBinaryLabelmapToSegment(labelmap, target.segmentation_node, target.segment_id, logic.MODE_REPLACE)


def counts(server) -> tuple:
    """(claims, volume uploads, points the model started on), from the server's log."""
    return tuple(server.count(text) for text in ('"POST /claim', '"POST /set_image', "Added new point interaction"))


def wait_for_log(server, text: str, times: int, seconds: float = 60):
    deadline = time.monotonic() + seconds
    while server.count(text) < times:
        assert time.monotonic() < deadline, f"the server did not log {text!r} {times} times"
        time.sleep(0.1)


def settle(panel, seconds=60):
    """Ticks the panel as the widget's timer does until it has nothing left to do."""
    deadline = time.monotonic() + seconds
    while panel.busy:
        assert time.monotonic() < deadline, panel.status
        panel.tick()
        time.sleep(0.01)


def connected_panel(server, scene_parts, **options):
    from SegmentationMachineLib.panels.prompts import PromptsPanel

    volume, segmentation, target, editor = scene_parts
    panel = PromptsPanel(**options)
    panel.connect(server.url, KEY)
    settle(panel)
    assert panel.connected and panel.status.startswith("Connected: nnInteractive")
    assert "prompts point, box (on one slice), scribble, lasso" in panel.status
    panel.choose(volume, SegmentTarget(segmentation, target, editor))
    settle(panel)
    return panel
