"""Cancel, with real components: an export of a real segmentation (slicer-core MRML) stopped between segments or before
its formats writes nothing and leaves the earlier export of the same segmentation as it was; a send to a PACS stopped
between instances (STOW-RS to a real Orthanc, C-STORE to a real pynetdicom node) says how many instances the PACS has,
and it has exactly those; a cancel that comes as the work ends loses nothing. Each cancel is requested from a hook
between two steps, never raced against a sleep."""

import threading

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from conftest import UNCOMPRESSED_SERIES, tree_digest
from orthanc_server import PASSWORD, USER, copies_in_a_new_study, free_port, serving
from SegmentationMachineLib.core import arrays
from SegmentationMachineLib.core.cancel import CancelRequest, Cancelled
from SegmentationMachineLib.dicom.volumes import load_input
from SegmentationMachineLib.mesh.export import (EXPORT_CANCELLED, ExportOptions, export_segmentation, prepare_export,
                                                write_export)
from SegmentationMachineLib.mesh.surfaces import SurfaceOptions, meshes_from, read_segments
from SegmentationMachineLib.core.errors import UserError
from SegmentationMachineLib.pacs.dicomnode import DicomNode, NodeOptions, send_file
from SegmentationMachineLib.pacs.dicomweb import DicomWeb, DicomWebServer
from SegmentationMachineLib.pacs.sending import send_instances
from SegmentationMachineLib.panels.export import ExportPanel
from SegmentationMachineLib.panels.pacs import send_seg
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


def test_a_segment_not_yet_started_when_cancel_comes_is_never_started(ctx, phantom_dir):
    """One meshing thread: Cancel comes as the first segment's mesh is made, and the thread's next segment stops at its
    own check, before any meshing. This thread's check (after each segment is done) is held back until the meshing
    thread is past that point, so without the check before each segment the second segment would be meshed."""
    options = SurfaceOptions(threads=1)
    segments = read_segments(boxes(ctx, phantom_dir), options=options)
    cancel, meshed, past_the_cancel = CancelRequest(), [], threading.Event()

    def each(mesh):  # the meshing thread, as soon as a segment's mesh is made
        meshed.append(mesh.name)
        if cancel.requested:
            past_the_cancel.set()  # meshed after Cancel: the check before its segment is missing
        cancel.cancel()  # the user presses Cancel as the first segment is done

    def check():
        if threading.current_thread() is not threading.main_thread() and cancel.requested:
            past_the_cancel.set()  # the meshing thread's check before its next segment
        cancel.check(EXPORT_CANCELLED)

    def progress(done, total, name):  # this thread, before its own check
        if done == 1:
            assert past_the_cancel.wait(60)

    with pytest.raises(Cancelled, match=r"^Export cancelled: nothing was written\.$"):
        meshes_from(segments, options, progress, each, check)
    assert meshed == ["Box 1"]


class HeldBeforeItsSegments(ExportPanel):
    """The panel as the module has it, its export's thread held before its first segment until released."""

    def _progress(self, done, total, name):
        super()._progress(done, total, name)
        if done == 0:
            self.reached.set()
            assert self.released.wait(60)


def closing_the_scene_tells(ctx, panel):
    """The module's observer: Slicer's Close Scene (vtkMRMLScene::Clear) sends StartCloseEvent, then removes nodes."""
    ctx.scene.AddObserver(ctx.scene.StartCloseEvent, lambda caller, event: panel.scene_closed())


def test_close_scene_during_an_export_lets_it_finish_from_its_copies_and_says_so(ctx, phantom_dir, tmp_path):
    """Closing the scene is not Cancel: the user's export is written whole from what start() copied, though the
    scene's nodes are gone while it runs, and is not the next scene's last export (nor Send to OrcaSlicer's)."""
    node = boxes(ctx, phantom_dir)
    panel = HeldBeforeItsSegments(output_folder=tmp_path, formats={"stl", "3mf"})
    panel.reached, panel.released = threading.Event(), threading.Event()
    closing_the_scene_tells(ctx, panel)
    panel.start(node)
    assert panel.reached.wait(60)
    ctx.scene.Clear(False)  # File > Close Scene
    said = panel.status
    assert ctx.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    panel.released.set()
    assert panel.task.wait(120)
    result = panel.finish()
    assert said == "Exporting 'Boxes': segment 1 of 4..."
    assert panel.status == f"Exported to {result.folder} (its scene was closed meanwhile)."
    assert sorted(p.name for p in result.folder.iterdir()) == sorted(
        [f"Box_{n}.stl" for n in range(1, BOXES + 1)] + ["segments.3mf", "report.json"])
    assert panel.task is None and not panel.can_send() and panel.last_result is None and panel.report_text() == ""


class CancelledBetweenSegments(ExportPanel):
    """The panel as the module has it, its user pressing Cancel once cancel_at segments are done."""
    cancel_at: int = None
    said: str = None  # the status line once Cancel was pressed

    def _progress(self, done, total, name):
        super()._progress(done, total, name)
        if done == self.cancel_at:
            self.cancel()
            self.said = self.status


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
    assert panel.said == "Cancelling the export of 'Boxes' (after the segment under way)..."
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


def instance_uids(paths) -> list:
    return [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]


def c_store_to(destination: tuple, calling_ae: str):
    """store(path) for send_instances, by C-STORE (pynetdicom): a refusal raised as its sentence."""
    def store(path):
        problem = send_file(path, destination, calling_ae)
        if problem:
            raise UserError(problem)
    return store


def cancelling_after(count: int, cancel: CancelRequest):
    def progress(sent, total):  # between two instances: the user presses Cancel
        if sent == count:
            cancel.cancel()
    return progress


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    yield from serving(tmp_path_factory.mktemp("orthanc"), lambda: sorted(UNCOMPRESSED_SERIES.glob("*.dcm")))


def test_a_stow_to_a_real_dicomweb_server_cancelled_between_instances_leaves_it_the_instances_said(orthanc, tmp_path):
    study = generate_uid()
    paths = copies_in_a_new_study(tmp_path, study, 4)[:10]
    web = DicomWeb(DicomWebServer.parse(f"dicomweb+{orthanc.dicomweb_url}"), (USER.encode(), PASSWORD.encode()))
    cancel = CancelRequest()
    with pytest.raises(Cancelled) as cancelled:
        send_instances(paths, web.store, cancel, cancelling_after(3, cancel))
    assert str(cancelled.value) == "Sending cancelled after 3 of 10 instances: the PACS has those 3."
    found = orthanc.get(f"/dicom-web/studies/{study}/instances").json()
    assert sorted(item["00080018"]["Value"][0] for item in found) == sorted(instance_uids(paths[:3]))


def test_a_seg_send_cancelled_before_it_went_sends_and_keeps_nothing(orthanc, ctx, tmp_path, private_tmp):
    """Cancel pressed while the SEG was being written: the PACS gets nothing, and no copy is left behind."""
    pytest.importorskip("highdicom")
    from test_pacs_panel import STUDY, two_segments_on_the_ct

    prepared = prepare_export(two_segments_on_the_ct(ctx), ExportOptions(formats=("seg",)))
    series = orthanc.get(f"/dicom-web/studies/{STUDY}/series").json()
    cancel = CancelRequest()
    cancel.cancel()
    server = DicomWebServer.parse(f"dicomweb+{orthanc.dicomweb_url}")
    with pytest.raises(Cancelled, match=r"^Sending cancelled: nothing was sent\.$"):
        send_seg(server, (USER.encode(), PASSWORD.encode()), prepared.seg, keep_in=tmp_path / "unsent", cancel=cancel)
    assert orthanc.get(f"/dicom-web/studies/{STUDY}/series").json() == series
    assert not (tmp_path / "unsent").exists() and not any(private_tmp.iterdir())


def test_a_c_store_to_a_real_dicom_node_cancelled_between_instances_leaves_it_the_instances_said(tmp_path):
    paths = copies_in_a_new_study(tmp_path, generate_uid(), 4)[:10]
    port = free_port()
    node = DicomNode(NodeOptions("PACS", port, ("SEGMACHINE",), "127.0.0.1", min_free_mb=0),
                     tmp_path / "received", tmp_path / "receiving")
    node.start()
    try:
        store = c_store_to(("PACS", "127.0.0.1", port), "SEGMACHINE")
        cancel = CancelRequest()
        cancel.cancel()  # pressed before the first instance went (while a SEG was being written)
        with pytest.raises(Cancelled, match=r"^Sending cancelled: nothing was sent\.$"):
            send_instances(paths, store, cancel)
        assert not any((tmp_path / "received").rglob("*.dcm"))
        cancel = CancelRequest()
        with pytest.raises(Cancelled) as cancelled:
            send_instances(paths, store, cancel, cancelling_after(1, cancel))
        assert str(cancelled.value) == "Sending cancelled after 1 of 10 instances: the PACS has that one."
        assert instance_uids((tmp_path / "received").rglob("*.dcm")) == instance_uids(paths[:1])
        cancel = CancelRequest()
        with pytest.raises(Cancelled) as cancelled:
            send_instances(paths[1:], store, cancel, cancelling_after(3, cancel))
        assert str(cancelled.value) == "Sending cancelled after 3 of 9 instances: the PACS has those 3."
        assert sorted(instance_uids((tmp_path / "received").rglob("*.dcm"))) == sorted(instance_uids(paths[:4]))
        # Cancel pressed as the last instance is sent: the send is whole, and said so by returning
        cancel = CancelRequest()
        assert send_instances(paths[4:], store, cancel, cancelling_after(6, cancel)) == [None] * 6
        assert sorted(instance_uids((tmp_path / "received").rglob("*.dcm"))) == sorted(instance_uids(paths))
    finally:
        node.stop()


def test_a_cancel_pressed_as_the_seg_is_stored_loses_nothing_and_says_it_came_too_late(orthanc, ctx, tmp_path):
    """The send is done but the timer has not seen it yet: the button still reads Cancel."""
    pytest.importorskip("highdicom")
    from test_pacs_panel import panel_for, two_segments_on_the_ct

    panel = panel_for(tmp_path, orthanc.dicomweb_url)
    assert panel.save_credentials(user=USER, password=PASSWORD)
    panel.start(two_segments_on_the_ct(ctx))
    assert panel.task.wait(120)
    panel.cancel()
    assert panel.status == ("Cancelling the send (a store under way is finished first: the PACS gets the DICOM SEG "
                            "whole or not at all)...")
    stored = panel.finish()
    assert panel.status == (f"Sent 'CT bones' (2 segments) to {orthanc.dicomweb_url} as a DICOM SEG. Cancel came after "
                            "the PACS had stored it.")
    assert len(orthanc.instance_files(stored.SeriesInstanceUID)) == 1
    assert panel.task is None and panel.can_send()


@pytest.mark.parametrize("failing", [4, 1])
def test_a_send_that_fails_part_way_says_how_many_instances_the_pacs_has(tmp_path, failing):
    """A real pynetdicom SCP that runs out of resources at the fourth instance (0xA700); or at the first, where the
    PACS has none and the sentence is the store's own."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    paths = copies_in_a_new_study(tmp_path, generate_uid(), 2)
    received = []

    def store(event):
        received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000 if len(received) < failing else 0xA700

    destination = AE(ae_title="DEST")
    destination.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = destination.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, store)])
    try:
        with pytest.raises(UserError) as failed:
            send_instances(paths, c_store_to(("DEST", "127.0.0.1", port), "SEGMACHINE"), CancelRequest())
    finally:
        server.shutdown()
    said = f"DEST at 127.0.0.1:{port} did not store {paths[failing - 1].name} (status 0xA700)"
    assert str(failed.value) == (f"{said}; the PACS has the 3 of the 6 instances sent before it." if failing == 4 else
                                 f"{said}.")
    assert received == instance_uids(paths[:failing])
