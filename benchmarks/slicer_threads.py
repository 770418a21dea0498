"""The module's flows with Slicer's idle main thread (GIL held between timer ticks) and without it.

Run: .venv/bin/python benchmarks/slicer_threads.py [WORD...]  (only the flows whose name holds a WORD)
Each flow is driven by the widget's timers (Testing/slicer_standins.py): first with the GIL released
between ticks (as if PythonQt let go of it), then held in C as Slicer 5.10 does, with the module's
GIL pump running. Prints seconds for both, their ratio and the main-thread ticks' lengths.
The bone preset runs in a child process, as in the module; its control (a child that only keeps a core
busy) gives the ticks that the machine's load alone causes.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "Testing")]
from fake_runpod import FakeRunPod  # noqa: E402
from nninteractive_model import write_model_folder  # noqa: E402
from nninteractive_server import Server  # noqa: E402
from slicer_standins import (POLL_MS, IdleMainThread, cloud_flow, drive, export_flow, inbox_flow,  # noqa: E402
                             preset_flow, prompts_flow)
from SegmentationMachineLib.cloud.cloudgpu import KEY_NAME  # noqa: E402
from SegmentationMachineLib.cloud.podstart import PodRecords  # noqa: E402
from SegmentationMachineLib.core import arrays  # noqa: E402
from SegmentationMachineLib.core.credentials import SecretStore  # noqa: E402
from SegmentationMachineLib.core.scene import create_headless_scene  # noqa: E402
from SegmentationMachineLib.dicom.phantom import make_phantom, write_phantom  # noqa: E402
from SegmentationMachineLib.dicom.volumes import load_input  # noqa: E402
from SegmentationMachineLib.panels.cloud import CloudPanel  # noqa: E402
from SegmentationMachineLib.panels.inbox import InboxPanel  # noqa: E402
from SegmentationMachineLib.panels.prompts import PromptsPanel  # noqa: E402
from SegmentationMachineLib.panels.tasks import BackgroundTask  # noqa: E402
from SegmentationMachineLib.prompts.session import headless_editor, SegmentTarget  # noqa: E402
from SegmentationMachineLib.segment.preset_child import NICENESS  # noqa: E402
from SegmentationMachineLib.segment.presets import add_preset_segment  # noqa: E402
from SegmentationMachineLib.segment.segmentations import load_segmentation  # noqa: E402

LABELS = ROOT.parent / "shared" / "data" / "totalsegmentator" / "example_seg_fast_force_split.nii.gz"
KEY = "benchmark-key"
RUNPOD_KEY = "rpa_BENCHMARK0123456789abcdef"


def timed(flow, warm_up: bool) -> tuple:
    """Seconds without the fixture and with it; the ticks (seconds, timer) with it."""
    if warm_up:  # first uses (the server's first image and prediction, highdicom's import) are not part of either time
        flow(IdleMainThread(hold_gil=False))
    seconds = []
    for hold_gil in (False, True):
        main = IdleMainThread(hold_gil)
        started = time.perf_counter()
        flow(main)
        seconds.append(time.perf_counter() - started)
    return seconds[0], seconds[1], main.ticks


def export_61_labels(ctx):
    segmentation = load_segmentation(ctx, LABELS)
    return lambda main: export_flow(main, segmentation, Path(tempfile.mkdtemp()))


def export_bone_with_seg(ctx, phantom, folder: Path):
    """The bone of a 512x512x300 DICOM series as STL, OBJ, 3MF and DICOM SEG: large meshes, and the series' headers."""
    write_phantom(folder, phantom)
    volume = load_input(ctx, folder).node
    segmentation = add_preset_segment(ctx, volume, "bone", phantom.bone)
    return lambda main: export_flow(main, segmentation, Path(tempfile.mkdtemp()), ("stl", "obj", "3mf", "seg"))


def bone_preset(ctx, phantom):
    volume = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    arrays.set_volume_array(volume, phantom.hu, np.diag([-0.7, -0.7, 1.0, 1.0]))
    return lambda main: preset_flow(main, ctx, volume, seconds=1800)  # minutes on a machine shared with other jobs


def busy_child(seconds: float):
    """The preset's control: a child process that only keeps a core busy (at the preset child's niceness),
    waited for on a worker thread. Its ticks are what the machine's load alone does to the main thread."""
    code = (f"import os, time\nos.nice({NICENESS})\nend = time.monotonic() + {seconds}\n"
            "while time.monotonic() < end: pass")

    def flow(main):
        task = BackgroundTask(lambda: subprocess.run([sys.executable, "-c", code], check=True))
        assert drive(main, task.done, (POLL_MS, task.done)) and task.outcome()
    return flow


def inbox_delivery(series: Path):
    def flow(main):
        root = Path(tempfile.mkdtemp())
        (root / "inbox").mkdir()
        panel = InboxPanel(folder=root / "inbox", settle_seconds=0.5, state_folder=root / "state")
        panel.start()
        inbox_flow(main, panel, lambda: shutil.copytree(series, root / "inbox" / "upload"))
        panel.stop()
    return flow


def prompt_round_trip(ctx, phantom, server):
    volume = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "prompted")
    matrix = np.diag([-0.7, -0.7, 1.0, 1.0])
    arrays.set_volume_array(volume, phantom.hu, matrix)
    segmentation = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    target = SegmentTarget(segmentation, segmentation.GetSegmentation().AddEmptySegment("", "organ"),
                           headless_editor(ctx.scene, ctx.app_logic, segmentation, volume))
    k, j, i = (n // 2 for n in phantom.hu.shape)

    def flow(main):
        panel = PromptsPanel()
        prompts_flow(main, panel, lambda: panel.connect(server.url, KEY), lambda: panel.choose(volume, target),
                     lambda: panel.submit("point", ras=tuple((matrix @ [i, j, k, 1.0])[:3])))
        assert panel.status.startswith("Point applied"), panel.status
        panel.session.close()
    return flow


def pod_start(folder: Path):
    def flow(main):
        stamp = time.monotonic_ns()  # a fresh key store and pod records per run
        panel = CloudPanel(SecretStore(folder / f"secrets-{stamp}", use_keychain=False),
                           PodRecords(folder / f"pods-{stamp}.json"))
        panel.store.save(KEY_NAME, RUNPOD_KEY)
        assert cloud_flow(main, panel, panel.refresh, lambda: panel.start("NVIDIA L40S", "server")), panel.status
        assert panel.end_started_here() == []
    return flow


def main():
    ctx = create_headless_scene()
    work = Path(tempfile.mkdtemp())
    big = make_phantom(shape=(300, 512, 512), pixel_spacing=0.7, slice_spacing=1.0)
    small = make_phantom()
    write_phantom(work / "series", small)
    server = Server(write_model_folder(work / "model"), KEY).start()
    fake = FakeRunPod(RUNPOD_KEY).start()
    fake.boot_s, fake.ports_s, fake.server_s = 0.5, 0.7, 1.0
    os.environ.update({**fake.environment(), "SM_RUNPOD_PROXY_URL": fake.proxy_template()})
    os.environ.pop("RUNPOD_API_KEY", None)
    flows = [
        ("export, 61 labels (example_seg_fast_force_split, STL+OBJ+3MF)", export_61_labels(ctx), False),
        ("export, bone of a 512x512x300 DICOM series (the phantom's), STL+OBJ+3MF+SEG",
         export_bone_with_seg(ctx, big, work / "big"), True),  # warmed: highdicom's first import is not the flow
        (f"inbox delivery, {small.hu.shape[0]}-slice DICOM series (settle 0.5 s)", inbox_delivery(work / "series"),
         False),
        ("AI prompt: connect, upload 512x512x300, one point (real server, CPU)", prompt_round_trip(ctx, big, server),
         True),
        ("Cloud GPU: pod start on the fake RunPod (boot 0.5 s, ports 0.7 s, server 1 s)", pod_start(work), False),
        ("bone preset, 512x512x300 phantom (0.7 x 0.7 x 1 mm), in a child process", bone_preset(ctx, big), False),
        ("bone preset's control: a child process that only keeps a core busy for 20 s", busy_child(20), False),
    ]
    words = sys.argv[1:]
    flows = [flow for flow in flows if not words or any(word in flow[0] for word in words)]
    try:
        print("| flow | s without fixture | s with fixture | ratio | ticks | 95th percentile tick ms | "
              "longest tick ms, per timer |\n|---|---|---|---|---|---|---|")
        for name, flow, warm_up in flows:
            free, held, ticks = timed(flow, warm_up)
            p95 = 1000 * np.percentile([seconds for seconds, _ in ticks], 95)
            longest = {}
            for seconds, timer in ticks:
                timer = timer.split(".")[-1]  # share_gil (the pump), poll, tick, start (the button's click)
                longest[timer] = max(longest.get(timer, 0.0), seconds)
            per_timer = ", ".join(f"{timer} {1000 * seconds:.0f}" for timer, seconds in longest.items())
            print(f"| {name} | {free:.2f} | {held:.2f} | {held / free:.2f} | {len(ticks)} | {p95:.0f} | {per_timer} |",
                  flush=True)
    finally:
        server.stop()
        fake.stop()


if __name__ == "__main__":
    main()
