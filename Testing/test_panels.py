"""The module's panel state, driven as the widget drives it: start, poll, finish on the main thread."""

import re
from pathlib import Path

from conftest import DATA
from SegmentationMachineLib.core import arrays
from SegmentationMachineLib.core.provenance import made_by, PRESET
from SegmentationMachineLib.dicom.volumes import load_input
from SegmentationMachineLib.panels.export import ExportPanel
from SegmentationMachineLib.panels.presets import PresetsPanel
from SegmentationMachineLib.segment.masks import preset_parameters
from SegmentationMachineLib.segment.presets import add_segment_from_mask
import numpy as np


def test_presets_then_export_then_print_as_the_widget_does(ctx, phantom_dir, tmp_path):
    volume = load_input(ctx, phantom_dir).node
    presets = PresetsPanel()
    assert not presets.can_apply(None) and presets.can_apply(volume)
    presets.start(volume)
    assert not presets.can_apply(volume) and "Running the bone preset" in presets.status
    assert presets.task.wait(120)
    # The child process's progress reached the status line, up to its last step.
    assert re.fullmatch(r"Running the bone preset on '.+': .+ \((\d+)/\1\)\.\.\.", presets.status), presets.status
    segmentation = presets.finish(ctx)
    assert segmentation.GetSegmentation().GetNthSegment(0).GetName() == "Bone"
    assert presets.status.startswith("Added segment 'Bone'")
    # its checksum, made from the cropped mask on the worker, is the segment's own: unedited
    assert made_by(segmentation, segmentation.GetSegmentation().GetNthSegmentID(0)) == PRESET

    export = ExportPanel(output_folder=tmp_path, formats={"stl", "3mf"})
    assert export.can_export(segmentation) and not export.can_send()
    export.start(segmentation)
    assert export.task.wait(120)
    result = export.finish()
    assert export.status == f"Exported to {result.folder}." and export.can_send()
    assert sorted(p.name for p in result.folder.iterdir()) == ["Bone.stl", "report.json", "segments.3mf"]
    assert "Bone:" in export.report_text() and "watertight" in export.report_text()
    # Traceable as the CLI's: the series the volume was read from, and the preset with every parameter it ran with.
    phantom_files = sorted(p.name for p in phantom_dir.iterdir())
    series = result.report["input"]
    assert series["path"] == str(phantom_dir) and sorted(f["name"] for f in series["files"]) == phantom_files
    assert series["series_uid"].startswith("1.") and all(len(f["sha256"]) == 64 for f in series["files"])
    assert result.report["presets"] == [{"name": "bone", "parameters": preset_parameters("bone")}]

    export.send_to_printer(str(tmp_path / "no-orca-here"))
    assert export.status.startswith("OrcaSlicer is not at the configured path") and export.orcaslicer_missing
    orca = tmp_path / "OrcaSlicer"  # where the user says it is, when the module asks
    orca.write_text("#!/bin/sh\n")
    export.send_to_printer(str(orca), env={"PATH": ""})  # as a browser saved it: asking again would not help
    assert "may not be run" in export.status and not export.orcaslicer_missing
    orca.chmod(0o755)
    export.send_to_printer(str(orca), env={"PATH": ""})
    assert export.status == "Opened in OrcaSlicer." and not export.orcaslicer_missing


def test_a_preset_whose_volume_left_the_scene_adds_nothing_to_the_next_patients(ctx, phantom_dir):
    """Close Scene while the bone preset ran: the next patient's volume got the same node ID, and the closed scene's
    bone was added to the new scene (under the new patient's transform, into their segmentation)."""
    volume = load_input(ctx, phantom_dir).node
    presets = PresetsPanel()
    presets.start(volume)
    old_id = volume.GetID()
    ctx.scene.Clear(False)  # File > Close Scene
    next_patient = load_input(ctx, phantom_dir).node
    theirs = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "their segmentation")
    assert next_patient.GetID() == old_id  # what made the old result land in the new scene
    assert presets.task.wait(120)
    assert presets.finish(ctx) is None and presets.can_apply(next_patient)
    assert presets.status == f"'{volume.GetName()}' left the scene while its bone preset ran: nothing was added."
    assert [n.GetName() for n in ctx.scene.GetNodesByClass("vtkMRMLSegmentationNode")] == ["their segmentation"]
    assert theirs.GetSegmentation().GetNumberOfSegments() == 0


def test_a_preset_goes_into_the_segmentation_chosen_when_it_started_or_a_new_one_if_that_was_deleted(ctx, phantom_dir):
    volume = load_input(ctx, phantom_dir).node
    chosen = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "chosen")
    presets = PresetsPanel()
    presets.start(volume, chosen)
    assert presets.task.wait(120)
    assert presets.finish(ctx) is chosen and chosen.GetSegmentation().GetNumberOfSegments() == 1
    presets.start(volume, chosen)
    ctx.scene.RemoveNode(chosen)
    assert presets.task.wait(120)
    made = presets.finish(ctx)
    assert made is not chosen and ctx.scene.IsNodePresent(made) and made.GetSegmentation().GetNumberOfSegments() == 1


def test_a_user_error_on_the_worker_becomes_the_status_line_and_a_log_line(ctx, caplog):
    volume = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "MR")
    arrays.set_volume_array(volume, np.zeros((4, 8, 8), np.int16), np.eye(4))
    panel = PresetsPanel()
    panel.start(volume)
    assert panel.task.wait(30)
    assert panel.finish(ctx) is None
    assert "'MR' has no value below 0, so it is not a CT" in panel.status and panel.can_apply(volume)
    assert [r.getMessage() for r in caplog.records if r.name == "segmentation-machine"] == [panel.status]


def test_memory_running_out_on_the_worker_is_the_status_line_and_the_next_export_works(ctx, phantom_dir, tmp_path,
                                                                                       monkeypatch):
    from SegmentationMachineLib.panels import export as export_module

    volume = load_input(ctx, phantom_dir).node
    presets = PresetsPanel()
    presets.start(volume)
    assert presets.task.wait(120)
    segmentation = presets.finish(ctx)
    write = export_module.write_export

    def runs_out(*args, **kwargs):
        raise MemoryError()  # as numpy does when an allocation fails

    monkeypatch.setattr(export_module, "write_export", runs_out)
    panel = ExportPanel(output_folder=tmp_path, formats={"stl"})
    panel.start(segmentation)
    assert panel.task.wait(30) and panel.finish() is None
    assert panel.status == ("This computer ran out of memory: close other programs, crop the scan to the region you "
                            "need, or run it on a computer with more memory.")
    monkeypatch.setattr(export_module, "write_export", write)
    panel.start(segmentation)
    assert panel.task.wait(120) and panel.finish() is not None


def test_inbox_panel_delivers_loads_and_lists_states(ctx, tmp_path, phantom_dir):
    import shutil
    import time

    from SegmentationMachineLib.dicom.volumes import load_series
    from SegmentationMachineLib.panels.inbox import InboxPanel

    inbox_folder = tmp_path / "inbox"
    inbox_folder.mkdir()
    panel = InboxPanel(folder=inbox_folder, settle_seconds=0.5, state_folder=tmp_path / "state")
    panel.start()
    assert panel.running and panel.status.startswith(f"Watching {inbox_folder}")
    shutil.copytree(phantom_dir, inbox_folder / "upload")
    (inbox_folder / "upload" / "notes.txt").write_text("hello")
    deliveries, deadline = [], time.monotonic() + 15
    while not deliveries and time.monotonic() < deadline:
        deliveries = panel.tick()  # as the widget's QTimer does
        time.sleep(0.05)
    [delivery] = deliveries
    assert not panel.copies_into_database(delivery)  # files dropped as they are stay where the user put them
    volume = load_series(ctx, delivery.series).node  # what the widget does on the main thread
    assert arrays.volume_array(volume).shape == (72, 128, 128)
    panel.loaded(delivery, True)
    while panel.task is None or not panel.task.done():  # the next poll applies the acknowledgement
        panel.tick()
        time.sleep(0.05)
    rows = panel.rows()
    assert ("CT 'SegmentationMachine CT phantom'", 72, "loaded", "") in rows
    assert ("notes.txt", 1, "error", "not a DICOM file") in rows
    panel.stop()
    assert not panel.running and panel.status == "Stopped."


def test_inbox_panel_missing_folder_is_a_status_sentence(tmp_path):
    from SegmentationMachineLib.panels.inbox import InboxPanel

    panel = InboxPanel(folder=tmp_path / "nowhere", state_folder=tmp_path / "state")
    panel.start()
    assert not panel.running and "does not exist" in panel.status


def test_an_inbox_whose_records_cannot_be_opened_says_so_and_can_start_once_they_can(tmp_path):
    """A journal left unreadable (a crash, a sync tool) or a state folder that is a file raised out of start(): in
    Slicer the Start button's slot printed a traceback to the Python console and seemed to do nothing."""
    from SegmentationMachineLib.panels.inbox import InboxPanel

    (tmp_path / "inbox").mkdir()
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "journal.sqlite").write_bytes(b"not a database " * 100)
    panel = InboxPanel(folder=tmp_path / "inbox", state_folder=tmp_path / "state")
    panel.start()
    assert not panel.running and panel.status.startswith("The inbox could not open its records of what it loaded, in ")
    assert "move it aside to start afresh" in panel.status and "Traceback" not in panel.status
    (tmp_path / "state" / "journal.sqlite").unlink()
    panel.start()  # its lock on the state folder was given back
    assert panel.running, panel.status
    panel.stop()
    (tmp_path / "file").write_text("a file where the state folder goes")
    panel = InboxPanel(folder=tmp_path / "inbox", state_folder=tmp_path / "file")
    panel.start()
    assert not panel.running and "(File exists)" in panel.status


def test_inbox_stop_returns_even_while_a_read_hangs(tmp_path, monkeypatch):
    """Whatever blocks a poll (a file system that never answers), the module's Stop returns."""
    import threading
    import time

    from SegmentationMachineLib.panels import inbox as inbox_panel
    from SegmentationMachineLib.panels.inbox import InboxPanel

    monkeypatch.setattr(inbox_panel, "STOP_WAIT_S", 0.3)
    (tmp_path / "inbox").mkdir()
    panel = InboxPanel(folder=tmp_path / "inbox", state_folder=tmp_path / "state")
    panel.start()
    stuck = threading.Event()
    monkeypatch.setattr(panel.inbox, "poll", lambda: stuck.wait(60) or [])
    panel.tick()  # the poll starts on its worker and hangs
    started = time.monotonic()
    panel.stop()
    assert time.monotonic() - started < 5 and not panel.running
    stuck.set()


def test_a_loaded_series_that_looks_incomplete_or_was_resampled_says_so_in_its_row_and_the_status(ctx, tmp_path):
    """The widget loads what the inbox holds back no longer: 'loaded' alone would hide that a slice is missing."""
    import time

    from SegmentationMachineLib.dicom.phantom import make_phantom, write_ct_series
    from SegmentationMachineLib.dicom.volumes import load_series
    from SegmentationMachineLib.panels.inbox import InboxPanel

    (tmp_path / "inbox").mkdir()
    panel = InboxPanel(folder=tmp_path / "inbox", settle_seconds=0.2, hold_seconds=0.5, state_folder=tmp_path / "state")
    panel.start()
    write_ct_series(tmp_path / "inbox" / "gap", make_phantom(shape=(4, 16, 16)).hu, 1.5,
                    [(-12.0, -12.0, z) for z in (0.0, 2.0, 4.0, 8.0)], "one slice lost")  # the slice at 6 mm never came
    deliveries, deadline = [], time.monotonic() + 15
    while not deliveries and time.monotonic() < deadline:
        deliveries = panel.tick()
        time.sleep(0.05)
    [delivery] = deliveries
    loaded = load_series(ctx, delivery.series)  # what the widget's loadDelivery returns
    panel.loaded(delivery, True, notes=loaded.notes)
    assert panel.status.startswith(f"{delivery.series.name} was loaded. Looks incomplete: its slice positions have "
                                   "a gap")
    assert "resampled to even spacing" in panel.status
    while panel.task is None or not panel.task.done():  # the next poll applies the acknowledgement
        panel.tick()
        time.sleep(0.05)
    [row] = [row for row in panel.rows() if row[0] == delivery.series.name]
    assert row[:3] == (delivery.series.name, 4, "loaded") and row[3] == panel.status.split(" was loaded. ", 1)[1]
    panel.stop()


def test_export_options_as_slicers_own_exporter_has_them_shown_segments_coordinates_merged_stl(ctx, tmp_path):
    segmentation = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Two")
    segmentation.CreateDefaultDisplayNodes()
    cube = np.zeros((12, 12, 12), bool)
    cube[3:9, 3:9, 3:9] = True
    ids = [add_segment_from_mask(segmentation, cube, np.diag([1.0, 1.0, 1.0, 1.0]), name, (1, 0, 0), start)
           for name, start in (("Shown", (0, 0, 0)), ("Hidden", (0, 0, 20)))]
    segmentation.GetDisplayNode().SetSegmentVisibility(ids[1], False)
    export = ExportPanel(output_folder=tmp_path, formats={"stl"}, shown_only=True, merged_stl=True, coordinates="RAS")
    export.start(segmentation)
    assert export.task.wait(60)
    result = export.finish()
    assert [m["name"] for m in result.report["meshes"]] == ["Shown"] and result.report["coordinates"] == "RAS"
    assert sorted(p.name for p in result.folder.iterdir()) == ["Shown.stl", "merged.stl", "report.json"]
    assert result.report["meshes"][0]["bounds_min_mm"][0] > 0  # RAS: x as in Slicer (LPS would negate it)
    segmentation.GetDisplayNode().SetVisibility(False)
    export.start(segmentation)
    assert export.task is None and export.status == ("No segment of 'Two' is shown: show the ones to export, or "
                                                     "untick Only shown segments.")


def test_a_provenance_that_cannot_be_vouched_for_is_left_out_and_the_export_goes_on(ctx, tmp_path):
    """The volume's file gone before the worker hashes it, a segment tagged by a preset this version lacks (a scene
    from another version): the report says nothing of them; the meshes are made all the same."""
    import shutil

    from SegmentationMachineLib.core.provenance import mark_segment

    scan = tmp_path / "scan.nii.gz"
    shutil.copy(DATA / "totalsegmentator" / "example_ct_sm.nii.gz", scan)
    volume = load_input(ctx, scan).node
    segmentation = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "From elsewhere")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    cube = np.zeros((10, 10, 10), bool)
    cube[2:8, 2:8, 2:8] = True
    segment = add_segment_from_mask(segmentation, cube, arrays.ijk_to_ras(volume), "Ribs", (1, 1, 1))
    mark_segment(segmentation, segment, PRESET, preset="ribs")
    scan.unlink()  # (Export's click reads none of it: the worker finds it gone)
    export = ExportPanel(output_folder=tmp_path / "out", formats={"stl"})
    export.start(segmentation)
    assert export.task.wait(60)
    result = export.finish()
    assert result is not None, export.status
    assert result.report["input"] is None and result.report["presets"] == [] and result.report["meshes"]


def test_the_inbox_keeps_its_newest_series_in_the_scene_and_never_one_the_user_works_with(ctx):
    """Each delivered series stayed in the scene: a Slicer left watching for weeks filled its memory. A volume leaves
    with its display node, which held its voxels (and a volume rendering that shows it keeps it: read in source,
    slicer-core has no volume rendering nodes)."""
    from types import SimpleNamespace

    from SegmentationMachineLib.panels.inbox import KEEP_LOADED, InboxPanel

    panel, volumes = InboxPanel(), []
    for number in range(KEEP_LOADED + 3):
        volumes.append(ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"CT {number}"))
        volumes[-1].CreateDefaultDisplayNodes()
        volumes[-1].AddDefaultStorageNode()
        if number == 2:  # the user's: shown in a slice view, and one a segmentation editor works on
            ctx.scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode").SetBackgroundVolumeID(volumes[0].GetID())
            ctx.scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode").SetNodeReferenceID("sourceVolume",
                                                                                         volumes[1].GetID())
        delivery = SimpleNamespace(series=SimpleNamespace(name=f"CT {number}"), remarks=lambda notes: "")
        panel.loaded(delivery, True, node=volumes[-1])
    own_nodes = [volumes[2].GetDisplayNode(), volumes[2].GetStorageNode()]
    in_scene = [v.GetName() for v in volumes if ctx.scene.IsNodePresent(v)]
    assert in_scene == ["CT 0", "CT 1", *(f"CT {n}" for n in range(3, KEEP_LOADED + 3))]
    assert panel.status == (f"CT 2 left the scene: the inbox keeps its {KEEP_LOADED} newest series there; the DICOM "
                            "database still has it.")
    assert not any(ctx.scene.IsNodePresent(node) for node in own_nodes)


def test_the_inbox_never_unloads_an_old_series_whose_voxels_were_changed(ctx):
    """A series the user edited (its voxels changed since it was read: painted, thresholded in place) that nothing
    shows or refers to left the scene with its edits once KEEP_LOADED newer series came."""
    from types import SimpleNamespace

    from SegmentationMachineLib.panels.inbox import KEEP_LOADED, InboxPanel

    panel, volumes = InboxPanel(), []
    for number in range(KEEP_LOADED + 2):
        volumes.append(ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"CT {number}"))
        volumes[-1].CreateDefaultDisplayNodes()
        volumes[-1].AddDefaultStorageNode()
        assert not volumes[-1].GetModifiedSinceRead()
        if number == 0:
            arrays.set_volume_array(volumes[0], np.full((2, 2, 2), 7, np.int16), np.eye(4))  # the user's edit
            assert volumes[0].GetModifiedSinceRead()
        panel.loaded(SimpleNamespace(series=SimpleNamespace(name=f"CT {number}"), remarks=lambda notes: ""), True,
                     node=volumes[-1])
    in_scene = [v.GetName() for v in volumes if ctx.scene.IsNodePresent(v)]
    assert in_scene == ["CT 0", *(f"CT {n}" for n in range(2, KEEP_LOADED + 2))]
    assert panel.status.startswith("CT 1 left the scene")


def test_after_close_scene_the_inbox_never_takes_the_next_scenes_nodes_for_its_own(ctx):
    """Close Scene hands the old node IDs to the next nodes: a user's own volume, loaded from a file after it, was
    taken for an old inbox series and removed when the next series arrived."""
    from types import SimpleNamespace

    from SegmentationMachineLib.panels.inbox import KEEP_LOADED, InboxPanel

    panel = InboxPanel()

    def deliver(name):
        volume = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        panel.loaded(SimpleNamespace(series=SimpleNamespace(name=name), remarks=lambda notes: ""), True, node=volume)

    for number in range(KEEP_LOADED):
        deliver(f"CT {number}")
    ctx.scene.Clear(False)
    panel.scene_closed()
    own = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my MR")  # the first ID the inbox had
    deliver("CT next")
    assert ctx.scene.IsNodePresent(own) and "left the scene" not in panel.status


def _cube_segmentation(ctx, name):
    segmentation = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    cube = np.zeros((8, 8, 8), bool)
    cube[2:6, 2:6, 2:6] = True
    add_segment_from_mask(segmentation, cube, np.eye(4), "Cube", (1, 0, 0), (0, 0, 0))
    return segmentation


def _exported(export, segmentation):
    export.start(segmentation)
    assert export.task.wait(60)
    return export.finish()


def test_the_last_export_is_forgotten_at_close_scene_and_when_another_segmentation_is_chosen(ctx, tmp_path):
    """Close Scene left Send to OrcaSlicer and Open folder enabled, and the report shown, for the closed scene's
    export; so did choosing another segmentation."""
    export = ExportPanel(output_folder=tmp_path, formats={"stl"})
    first, second = _cube_segmentation(ctx, "First"), _cube_segmentation(ctx, "Second")
    assert _exported(export, first) is not None and export.can_send() and export.report_text()
    export.segmentation_chosen(first)  # the same one (the widget calls this on every update): kept
    assert export.can_send()
    export.segmentation_chosen(second)
    assert not export.can_send() and export.last_result is None and export.report_text() == ""
    assert export.status == "Press Export to write the chosen segmentation."
    assert _exported(export, second) is not None and export.can_send()
    ctx.scene.Clear(False)  # File > Close Scene
    export.scene_closed()
    assert not export.can_send() and export.report_text() == "" and export.status == "Choose a segmentation to export."
    # An export running while the scene closes writes its files, but is not the last export of the next scene.
    third = _cube_segmentation(ctx, "Third")
    export.start(third)
    export.scene_closed()
    assert export.task.wait(60) and export.finish() is not None
    assert not export.can_send() and export.status.endswith("(its scene was closed meanwhile).")
    # Another segmentation chosen while one is exported: the same, said so
    export.start(third)
    export.segmentation_chosen(None)
    assert export.task.wait(60) and export.finish() is not None
    assert not export.can_send() and export.status.endswith("(the segmentation chosen before).")


def test_while_an_export_runs_export_and_send_wait_and_close_scene_leaves_its_status(ctx, tmp_path):
    """Export and Send to OrcaSlicer stayed enabled while an export ran (a second press replaced the running task, and
    Send opened the previous export); Close Scene during an export put "Choose a segmentation" over "Exporting..."."""
    export = ExportPanel(output_folder=tmp_path, formats={"stl"})
    first, second = _cube_segmentation(ctx, "First"), _cube_segmentation(ctx, "Second")
    assert _exported(export, first) is not None and export.can_export(first) and export.can_send()
    export.start(second)
    assert not export.can_export(second) and not export.can_send()
    export.scene_closed()
    assert export.status == "Exporting 'Second'..."
    assert export.task.wait(60) and export.finish() is not None and export.can_export(second)


def test_a_sentence_the_export_said_stays_until_another_segmentation_is_chosen_and_close_scene_forgets_orcaslicer(
        ctx, tmp_path):
    """The widget calls segmentation_chosen on every update: with nothing exported yet it put "Press Export" over the
    sentence saying why the export did not start. Close Scene left the question where OrcaSlicer is."""
    export = ExportPanel(output_folder=tmp_path, formats={"stl"}, shown_only=True)
    segmentation = _cube_segmentation(ctx, "Hidden")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.GetDisplayNode().SetVisibility(False)
    export.start(segmentation)
    export.segmentation_chosen(segmentation)
    assert export.status == ("No segment of 'Hidden' is shown: show the ones to export, or untick Only shown "
                             "segments.")
    export.shown_only = False
    assert _exported(export, segmentation) is not None
    export.send_to_printer(str(tmp_path / "no-orca-here"))
    assert export.orcaslicer_missing
    export.scene_closed()
    assert not export.orcaslicer_missing and export.status == "Choose a segmentation to export."


def test_a_new_series_waits_for_the_user_while_they_prompt_and_a_failed_one_is_said_without_a_dialog(ctx, caplog):
    """The inbox switched the source volume under an active AI prompt tool (prompts went to the new series), and a
    failed series opened a modal dialog from the timer."""
    from types import SimpleNamespace

    from SegmentationMachineLib.panels.inbox import InboxPanel

    panel = InboxPanel()

    def delivery(name, remarks=""):
        return SimpleNamespace(series=SimpleNamespace(name=name, origin=""), remarks=lambda notes: remarks)

    ct = delivery("CT 2")
    panel.loaded(ct, True, node=ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT 2"))
    assert panel.as_source(ct, wanted=True, prompting=False)
    assert not panel.as_source(ct, wanted=False, prompting=False)
    status = panel.status
    assert not panel.as_source(ct, wanted=False, prompting=True) and panel.status == status  # not wanted: not said
    assert not panel.as_source(ct, wanted=True, prompting=True)
    assert panel.status == "Series CT 2 arrived: choose it as source volume when you are ready."
    odd = delivery("CT 3", remarks="It looks incomplete: 40 of 41 slices.")
    panel.loaded(odd, True, node=ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT 3"))
    assert not panel.as_source(odd, wanted=True, prompting=True)
    assert panel.status == ("CT 3 was loaded. It looks incomplete: 40 of 41 slices. Series CT 3 arrived: choose it as "
                            "source volume when you are ready.")
    with caplog.at_level("WARNING", logger="segmentation-machine"):
        panel.loaded(delivery("CT 4"), False, "Series CT 4 was not loaded: its slices are not evenly spaced.")
    assert panel.status == "Series CT 4 was not loaded: its slices are not evenly spaced."
    assert "Series CT 4 was not loaded" in caplog.text
    module = (Path(__file__).resolve().parents[1] / "SegmentationMachine" / "SegmentationMachine.py").read_text()
    assert "errorDisplay" not in module.split("def onInboxTick")[1].split("\n    def ")[0]  # no dialog from the timer


def test_declining_dicom_segs_install_exports_the_other_formats_and_says_seg_was_skipped(ctx, tmp_path):
    """Declining the highdicom install cancelled the whole export, with nothing said."""
    from SegmentationMachineLib.panels.export import SEG_SKIPPED

    export = ExportPanel(output_folder=tmp_path, formats={"stl", "seg"})
    segmentation = _cube_segmentation(ctx, "Cube")
    export.start(segmentation, seg_installed=False)
    assert export.status == f"Exporting 'Cube'... {SEG_SKIPPED}"
    assert export.task.wait(60)
    result = export.finish()
    assert sorted(p.name for p in result.folder.iterdir()) == ["Cube.stl", "report.json"]
    assert export.status == f"Exported to {result.folder}. {SEG_SKIPPED}"
    assert SEG_SKIPPED == "DICOM SEG skipped: highdicom was not installed."
    export.formats = {"seg"}
    export.start(segmentation, seg_installed=False)
    assert export.task is None and export.status.startswith(f"{SEG_SKIPPED} Choose another format")
