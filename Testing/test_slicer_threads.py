"""The module under Slicer's threading: an idle main thread that keeps the GIL, and MRML on the main thread only.

IdleMainThread (slicer_standins.py) runs the widget's timers as Qt does in Slicer 5.10: the GIL held
in C between ticks. Every flow must complete under it; a worker without the module's GIL pump must
starve (the stand-in is faithful); and no worker thread may touch a scene object (MainThreadOnly).
Speed is measured by benchmarks/slicer_threads.py, not here.
"""

import shutil
import sys
import threading

import numpy as np
import pytest
import slicer
import vtk
from scipy import ndimage

from conftest import RUNPOD_KEY
from slicer_standins import (IdleMainThread, MainThreadOnly, POLL_MS, cloud_flow, drive, export_flow,
                             inbox_flow, preset_flow, prompts_flow)
from SegmentationMachineLib.cloud.cloudgpu import KEY_NAME
from SegmentationMachineLib.cloud.podstart import PodRecords
from SegmentationMachineLib.core import arrays
from SegmentationMachineLib.core.credentials import SecretStore
from SegmentationMachineLib.dicom.volumes import load_series
from SegmentationMachineLib.panels.cloud import CloudPanel
from SegmentationMachineLib.panels.inbox import InboxPanel
from SegmentationMachineLib.panels.prompts import PromptsPanel
from SegmentationMachineLib.panels.tasks import BackgroundTask, share_gil
from SegmentationMachineLib.prompts.session import headless_editor, SegmentTarget
from SegmentationMachineLib.segment import presets
from test_presets import segment_mask

LONGEST_TICK_S = 0.05  # the bound: longer, and Slicer's GUI visibly stutters


def counted_in_one_second(hold_gil: bool, pump: bool) -> int:
    """How far a CPU-bound worker counts in 1 s while the poll timer ticks (and the pump, if asked)."""
    stop, count = threading.Event(), [0]

    def work():
        while not stop.is_set():
            count[0] += 1

    task = BackgroundTask(work)
    drive(IdleMainThread(hold_gil), lambda: False, (POLL_MS, task.done), pump=pump, seconds=1.0)
    stop.set()
    assert task.wait(10)
    return count[0]


def test_the_idle_main_thread_starves_a_worker_and_the_pump_feeds_it():
    switch_interval = sys.getswitchinterval()
    free = counted_in_one_second(hold_gil=False, pump=False)
    starved = counted_in_one_second(hold_gil=True, pump=False)
    pumped = counted_in_one_second(hold_gil=True, pump=True)
    # One switch interval (5 ms) per 100 ms tick without the pump; most of the time with it.
    assert starved < 0.25 * free < 0.5 * free < pumped, (free, starved, pumped)
    assert sys.getswitchinterval() == switch_interval and share_gil() is False  # nothing runs: returns at once


@pytest.fixture
def volume(ctx, phantom):
    node = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Phantom")
    arrays.set_volume_array(node, phantom.hu, np.diag([-1.5, -1.5, 2.0, 1.0]))
    return node


def test_preset_and_its_export_complete_under_the_idle_main_thread(ctx, volume, tmp_path):
    main = IdleMainThread()
    with MainThreadOnly() as calls:
        segmentation = preset_flow(main, ctx, volume)
    assert segmentation.GetSegmentation().GetNthSegment(0).GetName() == "Bone" and calls.calls == []
    result = export_flow(main, segmentation, tmp_path)
    assert [p.name for p in result.files] == ["Bone.stl", "segments.obj", "segments.mtl", "segments.3mf", "report.json"]


def test_the_preset_segment_equals_its_mask_and_is_added_as_one_paused_change(ctx, volume, phantom):
    events = []
    for name in ("PauseRenderEvent", "ResumeRenderEvent"):
        ctx.app_logic.AddObserver(getattr(ctx.app_logic, name), lambda caller, event, name=name: events.append(name))

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def added(scene, event, node):
        if node.IsA("vtkMRMLSegmentationNode"):
            for name in ("ModifiedEvent", "SegmentAdded"):
                node.AddObserver(getattr(slicer.vtkSegmentation, name, name), lambda *_, name=name: events.append(name))

    ctx.scene.AddObserver(ctx.scene.NodeAddedEvent, added)
    segmentation = preset_flow(IdleMainThread(), ctx, volume)
    bone = presets.bone_mask(phantom.hu, presets.spacing_kji(volume))
    assert bone.any() and np.array_equal(segment_mask(segmentation, "Bone", phantom.hu), bone)  # cropped, not changed
    # Reference geometry, transform, display nodes and the segment: one batch of events while the views pause.
    assert events == ["PauseRenderEvent", "ModifiedEvent", "SegmentAdded", "ResumeRenderEvent"], events


def test_3d_hole_filling_is_scipys_and_leaves_the_gil_to_the_gui():
    rng = np.random.default_rng(3)
    small = ndimage.binary_opening(rng.random((30, 40, 50)) > 0.4)
    assert np.array_equal(presets._fill_holes(small), ndimage.binary_fill_holes(small))
    # A body with lungs on a 300x512x512 grid: scipy's own loop keeps the GIL for 200 ms at a time.
    k, j, i = np.ogrid[:300, :512, :512]
    body = (((j - 256) / 200) ** 2 + ((i - 256) / 240) ** 2 <= 1) & (k >= 0)
    body &= ~((((j - 240) / 80) ** 2 + ((i - 160) / 60) ** 2 <= 1) & (k > 20) & (k < 280))
    main = IdleMainThread()
    task = BackgroundTask(presets._fill_holes, body)
    assert drive(main, task.done, (POLL_MS, task.done))
    assert task.result.sum() > body.sum() and max(seconds for seconds, _ in main.ticks) < LONGEST_TICK_S


def test_the_preset_flow_keeps_every_main_thread_tick_short_on_a_512x512x300_scan(ctx, monkeypatch):
    """The Apply click, the pump and the segment write: each under 50 ms, the write even for a segment
    of most of the volume (whole-volume copies on the main thread took 90-380 ms here)."""
    dense = presets.Preset("dense", "Dense", (1, 1, 1), "", lambda hu, spacing, progress=None: hu > 300)
    monkeypatch.setitem(presets.PRESETS, "dense", dense)
    hu = np.full((300, 512, 512), -1000, np.int16)
    hu[10:290, 40:480, 30:500] = 1000
    node = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "large")
    arrays.set_volume_array(node, hu, np.diag([-0.7, -0.7, 1.0, 1.0]))
    main = IdleMainThread()
    segmentation = preset_flow(main, ctx, node, "dense")
    longest = max(main.ticks)
    assert longest[0] < LONGEST_TICK_S, longest
    assert np.array_equal(segment_mask(segmentation, "Dense", hu), hu > 300)


def test_export_uses_no_scene_object_off_the_main_thread(ctx, volume, tmp_path):
    segmentation = preset_flow(IdleMainThread(), ctx, volume)
    with MainThreadOnly() as calls:
        export_flow(IdleMainThread(), segmentation, tmp_path)
    assert calls.calls == []


def test_the_recorder_catches_a_worker_reading_a_node(volume):
    with MainThreadOnly() as calls:
        assert BackgroundTask(volume.GetName).wait(10)
    assert len(calls.calls) == 1 and "vtkMRMLScalarVolumeNode.GetName" in calls.calls[0]


def test_inbox_delivers_under_the_idle_main_thread_and_loads_on_the_main_thread(ctx, tmp_path, phantom_dir):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    panel = InboxPanel(folder=inbox, settle_seconds=0.5, state_folder=tmp_path / "state")
    panel.start()
    loaded = []
    with MainThreadOnly() as calls:
        deliveries = inbox_flow(IdleMainThread(), panel, lambda: shutil.copytree(phantom_dir, inbox / "upload"),
                                load=lambda delivery: loaded.append(load_series(ctx, delivery.series).node))
    panel.stop()
    assert len(deliveries) == 1 and loaded[0].GetImageData().GetDimensions() == (128, 128, 72)
    assert calls.calls == []


@pytest.fixture(scope="module")
def interactive():
    """test_interactive's helpers; its torch-based server is only in .venv (scripts/test.sh, step 2)."""
    return pytest.importorskip("test_interactive")


@pytest.fixture(scope="module")
def nni_server(interactive, tmp_path_factory):
    running = interactive.Server(interactive.write_model_folder(tmp_path_factory.mktemp("nni") / "model"),
                                 interactive.KEY).start()
    yield running
    running.stop()


def test_a_prompt_round_trip_under_the_idle_main_thread(ctx, interactive, nni_server):
    volume = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "oblique")
    image = np.random.default_rng(1).normal(0, 100, interactive.SHAPE).astype(np.int16)
    arrays.set_volume_array(volume, image, interactive.oblique_matrix())
    segmentation = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    target = segmentation.GetSegmentation().AddEmptySegment("", "target")
    editor = headless_editor(ctx.scene, ctx.app_logic, segmentation, volume)
    editor.GetSegmentEditorNode().SetMaskMode(segmentation.EditAllowedOutsideAllSegments)
    mask_changes = []  # the edit mask is made from the other segments: a pass over the volume each time
    editor.GetMaskLabelmap().AddObserver("ModifiedEvent", lambda *_: mask_changes.append(1))
    editor.UpdateMaskLabelmap()
    one_update, mask_changes[:] = len(mask_changes), []
    panel = PromptsPanel()
    with MainThreadOnly() as calls:
        prompts_flow(IdleMainThread(), panel, lambda: panel.connect(nni_server.url, interactive.KEY),
                     lambda: panel.choose(volume, SegmentTarget(segmentation, target, editor)),
                     lambda: panel.submit("point", ras=interactive.ras((10, 10, 10))))
    assert panel.status.startswith("Point applied in"), panel.status
    assert panel.session._segment_mask(target)[10, 10, 10]
    assert calls.calls == [] and 0 < len(mask_changes) <= one_update  # one mask update for one prompt's write
    panel.session.close()


def test_an_edit_through_the_modules_segment_editor_logic_pauses_the_views(ctx, volume):
    segmentation = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "edited")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    target = segmentation.GetSegmentation().AddEmptySegment("", "target")
    editor = headless_editor(ctx.scene, ctx.app_logic, segmentation, volume)
    editor.GetSegmentEditorNode().SetSelectedSegmentID(target)
    events = []
    for name in ("PauseRenderEvent", "ResumeRenderEvent"):
        ctx.app_logic.AddObserver(getattr(ctx.app_logic, name), lambda caller, event, name=name: events.append(name))
    box = np.ones((4, 5, 6), bool)
    modifier = arrays.labelmap_from_array(box, arrays.ijk_to_ras(volume), start=(1, 2, 3))
    editor.ModifySegmentByLabelmap(segmentation, target, modifier, editor.ModificationModeSet, [3, 8, 2, 6, 1, 4],
                                   False, False)
    assert events == ["PauseRenderEvent", "ResumeRenderEvent"]
    assert segment_mask(segmentation, "target", arrays.volume_array(volume)).sum() == box.sum()


def test_a_pod_start_under_the_idle_main_thread(fake, tmp_path, monkeypatch):
    fake.boot_s, fake.ports_s, fake.server_s = 0.2, 0.2, 0.2
    monkeypatch.setenv("SM_RUNPOD_PROXY_URL", fake.proxy_template())
    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    panel = CloudPanel(SecretStore(tmp_path / "secrets", use_keychain=False), PodRecords(tmp_path / "pods.json"))
    panel.store.save(KEY_NAME, RUNPOD_KEY)
    pod = cloud_flow(IdleMainThread(), panel, panel.refresh, lambda: panel.start("NVIDIA L40S", "server"))
    assert pod is not None and pod is panel.pod and "is ready" in panel.status, panel.status
    assert panel.terminate_started_here() == [] and fake.pods == {}
