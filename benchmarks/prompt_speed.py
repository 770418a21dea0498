"""AI prompts over loopback on a 512x512x300 int16 CT: upload size and time, per-prompt client time and bytes, resume time.

Run: .venv/bin/python benchmarks/prompt_speed.py
The server is the real upstream nnInteractive server on CPU with the tests' hand-set model, so
server times here say nothing about a GPU with the official weights; client-side times and bytes do.
"""

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "Testing")]
from nninteractive_model import write_model_folder  # noqa: E402
from nninteractive_server import Server  # noqa: E402
from SegmentationMachineLib.core import arrays  # noqa: E402
from SegmentationMachineLib.core.scene import create_headless_scene  # noqa: E402
from SegmentationMachineLib.dicom.phantom import make_phantom  # noqa: E402
from SegmentationMachineLib.prompts.promptfile import Prompt  # noqa: E402
from SegmentationMachineLib.prompts.session import headless_editor, InteractiveSession, SegmentTarget  # noqa: E402

KEY = "benchmark-key"


class Traffic:
    """Bytes on the wire, counted by httpx event hooks on the upstream client's connection."""

    def __init__(self):
        self.sent = self.received = 0

    def attach(self, session: InteractiveSession):
        hooks = session._client._http.event_hooks
        hooks["request"].append(lambda request: setattr(self, "sent", self.sent + len(request.content or b"")))
        hooks["response"].append(self._response)

    def _response(self, response):
        response.read()
        self.received += len(response.content)


def main():
    ctx = create_headless_scene()
    phantom = make_phantom(shape=(300, 512, 512), pixel_spacing=0.7, slice_spacing=1.0)
    volume = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    matrix = np.diag([-0.7, -0.7, 1.0, 1.0])
    arrays.set_volume_array(volume, phantom.hu, matrix)
    segmentation = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    target = SegmentTarget(segmentation, segmentation.GetSegmentation().AddEmptySegment("", "organ"),
                           headless_editor(ctx.scene, ctx.app_logic, segmentation, volume))
    model = write_model_folder(Path(tempfile.mkdtemp()) / "model")
    server = Server(model, KEY).start()
    try:
        session = InteractiveSession(server.url, KEY)
        session.connect()
        traffic = Traffic()
        traffic.attach(session)
        started = time.perf_counter()
        session.set_volume(volume)
        upload_s = time.perf_counter() - started
        raw = phantom.hu.nbytes
        print("| measurement | value |\n|---|---|")
        print(f"| volume upload (512x512x300 int16, {raw / 1e6:.0f} MB raw) | {traffic.sent / 1e6:.1f} MB sent "
              f"({traffic.sent / raw * 100:.0f}% of raw), {upload_s:.2f} s |")
        session.select_segment(target)
        ras = lambda k, j, i: tuple((matrix @ [i, j, k, 1.0])[:3])
        prompts = {
            "point": lambda n: Prompt("point", True, ras=ras(150, 200 + n, 256)),
            "box (2D)": lambda n: Prompt("box", True, ras_min=ras(150, 230, 230 + n), ras_max=ras(150, 250, 250 + n)),
            "scribble": lambda n: Prompt("scribble", True, ras_points=(ras(160, 200, 200 + n), ras(160, 200, 230 + n))),
            "lasso": lambda n: Prompt("lasso", True, ras_points=(ras(170, 200, 200 + n), ras(170, 200, 220 + n),
                                                                 ras(170, 220, 220 + n), ras(170, 220, 200 + n))),
        }
        for name, make in prompts.items():
            client, total, received = [], [], []
            for n in range(8):
                before = traffic.received
                timing = session.add(make(n))
                client.append(timing.client_s * 1000)
                total.append(timing.total_s * 1000)
                received.append(traffic.received - before)
            print(f"| {name}: client-side ms (median of 8) | {statistics.median(client):.1f} ms "
                  f"(total {statistics.median(total):.0f} ms; {statistics.median(received) / 1e3:.1f} kB returned) |")
        session._client._http.post("/release")  # the server forgets the lease, as when it reaps it
        started = time.perf_counter()
        session.add(prompts["point"](20))
        print(f"| resume after a lost session (claim, upload, seed, prompt) | {time.perf_counter() - started:.2f} s |")
        session.close()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
