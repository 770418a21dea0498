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
    panel = PromptsPanel()
    with MainThreadOnly() as calls:
        prompts_flow(IdleMainThread(), panel, lambda: panel.connect(nni_server.url, interactive.KEY),
                     lambda: panel.choose(volume, SegmentTarget(segmentation, target, editor)),
                     lambda: panel.submit("point", ras=interactive.ras((10, 10, 10))))
    assert panel.status.startswith("Point applied in"), panel.status
    assert panel.session._segment_mask(target)[10, 10, 10]
    assert calls.calls == []
    panel.session.close()


def test_a_pod_start_under_the_idle_main_thread(fake, tmp_path, monkeypatch):
    fake.boot_s, fake.ports_s, fake.server_s = 0.2, 0.2, 0.2
    monkeypatch.setenv("SM_RUNPOD_PROXY_URL", fake.proxy_template())
    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    panel = CloudPanel(SecretStore(tmp_path / "secrets", use_keychain=False), PodRecords(tmp_path / "pods.json"))
    panel.store.save(KEY_NAME, RUNPOD_KEY)
    pod = cloud_flow(IdleMainThread(), panel, panel.refresh, lambda: panel.start("NVIDIA L40S", "server"))
    assert pod is not None and pod is panel.pod and "is ready" in panel.status, panel.status
    assert panel.terminate_started_here() == [] and fake.pods == {}
