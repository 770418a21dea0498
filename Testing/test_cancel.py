"""Cancel, with real components: an export of a real segmentation (slicer-core MRML) stopped between segments or before
its formats writes nothing and leaves the earlier export of the same segmentation as it was; a cancel that comes as
the work ends loses nothing. Each cancel is requested from a hook between two steps, never raced against a sleep."""

import numpy as np
import pytest

from conftest import tree_digest
from SegmentationMachineLib.core import arrays
from SegmentationMachineLib.core.cancel import CancelRequest, Cancelled
from SegmentationMachineLib.dicom.volumes import load_input
from SegmentationMachineLib.mesh.export import ExportOptions, export_segmentation, prepare_export, write_export
from SegmentationMachineLib.panels.export import ExportPanel
from SegmentationMachineLib.segment.presets import add_segment_from_mask

BOXES = 4


def boxes(ctx, phantom_dir):
    """A segmentation of BOXES box segments, 'Box 1'..., on the phantom CT read from its DICOM files."""
    volume = load_input(ctx, phantom_dir).node
    shape, ijk_to_ras = arrays.volume_array(volume).shape, arrays.ijk_to_ras(volume)
    node = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Boxes")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for number in range(BOXES):
        box = np.zeros(shape, bool)
        box[10:30, 20 + 20 * number:35 + 20 * number, 30:90] = True
        add_segment_from_mask(node, box, ijk_to_ras, f"Box {number + 1}", (0.2 * number, 0.6, 0.9))
    return node


def partial_files(folder):
    """The files of an export being written (in its hidden .NAME.partial folder)."""
    return sorted(p.name for p in folder.glob(".*.partial/*"))


@pytest.mark.parametrize("cancel_after", [1, BOXES])  # between two segments; after the last, before OBJ and 3MF
def test_an_export_cancelled_mid_way_writes_nothing_and_keeps_the_earlier_export(ctx, phantom_dir, tmp_path,
                                                                                  cancel_after):
    node = boxes(ctx, phantom_dir)
    options = ExportOptions(formats=("stl", "obj", "3mf"))
    earlier = export_segmentation(node, tmp_path, options)  # the same segmentation, the same name
    kept = tree_digest(tmp_path)
    cancel, seen, written = CancelRequest(), [], []

    def progress(done, total, name):  # on the export's thread, between two segments: the user presses Cancel
        seen.append(done)
        if done == cancel_after:
            written.extend(partial_files(tmp_path))
            cancel.cancel()

    with pytest.raises(Cancelled) as cancelled:
        write_export(prepare_export(node, options), tmp_path, options, progress, cancel=cancel)
    assert str(cancelled.value) == "Export cancelled: nothing was written."
    assert seen == list(range(cancel_after + 1))  # it stopped there
    assert "Box_1.stl" in written and "segments.3mf" not in written  # half written when cancelled...
    assert [p.name for p in tmp_path.iterdir()] == [earlier.folder.name]  # ...and nothing of it is left
    assert tree_digest(tmp_path) == kept  # the earlier export, byte for byte


class CancelledBetweenSegments(ExportPanel):
    """The panel as the module has it, its user pressing Cancel once cancel_at segments are done."""
    cancel_at: int = None

    def _progress(self, done, total, name):
        super()._progress(done, total, name)
        if done == self.cancel_at:
            self.cancel()


def export_with(panel, node):
    panel.start(node)
    assert panel.task is not None, panel.status
    assert panel.task.wait(120)
    return panel.finish()


def test_the_export_panels_cancel_says_so_keeps_the_last_export_and_is_ready_again(ctx, phantom_dir, tmp_path):
    node = boxes(ctx, phantom_dir)
    panel = CancelledBetweenSegments(output_folder=tmp_path, formats={"stl", "3mf"})
    earlier = export_with(panel, node)
    kept = tree_digest(tmp_path)
    panel.cancel_at = 2
    assert export_with(panel, node) is None
    assert panel.status == "Export cancelled: nothing was written."
    assert [p.name for p in tmp_path.iterdir()] == [earlier.folder.name] and tree_digest(tmp_path) == kept
    assert panel.last_result is earlier and panel.can_send()  # Send to OrcaSlicer still sends the earlier one
    assert panel.task is None and panel.can_export(node)
    panel.cancel_at = None
    again = export_with(panel, node)
    assert panel.status == f"Exported to {again.folder}."
    assert sorted(p.name for p in again.folder.iterdir()) == [f"Box_{n}.stl" for n in range(1, BOXES + 1)] + [
        "report.json", "segments.3mf"]


def test_a_cancel_pressed_as_the_export_finishes_loses_nothing(ctx, phantom_dir, tmp_path):
    """The export is done but the poll timer has not seen it yet: the button still reads Cancel."""
    node = boxes(ctx, phantom_dir)
    panel = ExportPanel(output_folder=tmp_path, formats={"stl"})
    panel.start(node)
    assert panel.task.wait(120)
    panel.cancel()
    result = panel.finish()
    assert panel.status == f"Exported to {result.folder} (it was finished when Cancel was pressed)."
    assert panel.last_result is result and panel.task is None
    assert sorted(p.name for p in result.folder.iterdir()) == [f"Box_{n}.stl" for n in range(1, BOXES + 1)] + [
        "report.json"]
    assert [p.name for p in tmp_path.iterdir()] == [result.folder.name]
    panel.cancel()  # nothing runs: nothing changes
    assert panel.status.startswith("Exported to")

