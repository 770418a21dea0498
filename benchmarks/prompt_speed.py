"""AI prompts on 512x512 CTs of 300 and 1000 slices: what goes on the wire, upload times at home uplinks, the
client's own milliseconds per prompt, and how a click's 300 ms on an H100 pod split.

Run: .venv/bin/python benchmarks/prompt_speed.py   (about 3 minutes on 2 cores, ~6 GB of memory)
The server is the real upstream nnInteractive server on CPU with the tests' hand-set model, so
server times here say nothing about a GPU with the official weights; client-side times and bytes do.
Volumes: the synthetic CT phantom (a small body ellipse in noisy air, bone, -3024 HU padding) and
three real 512x512 CT slices (/work/shared/data/dcmqi/ct-3slice: an abdomen filling the field of view,
quiet air) repeated to 300 and 1000 slices. Repeating packs no better: blosc2 packs blocks smaller
than a slice.
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
from SegmentationMachineLib.prompts.region import Limits, Planner, size, slices  # noqa: E402
from SegmentationMachineLib.prompts.remote import pack_image  # noqa: E402
from SegmentationMachineLib.prompts.session import headless_editor, InteractiveSession, SegmentTarget  # noqa: E402

KEY = "benchmark-key"
MBIT = 1e6 / 8  # bytes per second in one Mbit/s
REAL_CT = ROOT.parent / "shared" / "data" / "dcmqi" / "ct-3slice"
# The click -> mask budget on an H100 pod through RunPod's proxy, besides the client's measured share.
SERVER_MS = 150  # one network pass for a small structure (notes/nninteractive-official-model.md)
NETWORK_MS = 60  # one round trip home -> Cloudflare -> pod over a kept-alive TLS connection (assumed)
DISPLAY_MS = 40  # Slicer redrawing the changed segment in 2D views and the 3D surface (assumed)


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


def seconds(count: float, mbit: float) -> str:
    return f"{count / (mbit * MBIT):.0f} s"


def wire_table(volumes: dict):
    """Bytes sent for the whole volume and for the first region, and their upload times."""
    print("| volume | raw | whole volume packed | at 20 / 100 Mbit/s | first region (default limits) | packed "
          "| at 20 / 100 Mbit/s |\n|---|---|---|---|---|---|---|")
    for name, hu in volumes.items():
        full = len(pack_image(hu[np.newaxis]))
        for mbit in (20, 100):
            region = Planner(hu, Limits(uplink_bytes_per_s=mbit * MBIT), pack_image).first()
            sent = len(pack_image(np.ascontiguousarray(hu[slices(region)])[np.newaxis]))
            shape = "x".join(map(str, size(region)[::-1]))
            print(f"| {name} | {hu.nbytes / 1e6:.0f} MB | {full / 1e6:.0f} MB | {seconds(full, 20)} / "
                  f"{seconds(full, 100)} | {shape} (planned for {mbit} Mbit/s) | {sent / 1e6:.0f} MB | "
                  f"{seconds(sent, 20)} / {seconds(sent, 100)} |")


def real_ct(slices_wanted: int) -> np.ndarray:
    import pydicom

    files = [pydicom.dcmread(path) for path in sorted(REAL_CT.glob("*.dcm"))]
    hu = np.stack([f.pixel_array * float(f.RescaleSlope) + float(f.RescaleIntercept) for f in files]).astype(np.int16)
    return np.tile(hu, (slices_wanted // len(hu) + 1, 1, 1))[:slices_wanted]


def scene_with(ctx, hu, matrix):
    volume = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"ct{len(hu)}")
    arrays.set_volume_array(volume, hu, matrix)
    segmentation = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    target = SegmentTarget(segmentation, segmentation.GetSegmentation().AddEmptySegment("", "organ"),
                           headless_editor(ctx.scene, ctx.app_logic, segmentation, volume))
    return volume, target


def prompts_on(session, traffic, matrix, name: str, depth: int) -> dict:
    """Client-side and total ms (medians of 8) per prompt kind, near the volume's middle slice."""
    ras = lambda k, j, i: tuple((matrix @ [i, j, k, 1.0])[:3])
    k = depth // 2
    kinds = {
        "point": lambda n: Prompt("point", True, ras=ras(k, 200 + n, 256)),
        "box (2D)": lambda n: Prompt("box", True, ras_min=ras(k, 230, 230 + n), ras_max=ras(k, 250, 250 + n)),
        "scribble": lambda n: Prompt("scribble", True,
                                     ras_points=(ras(k + 10, 200, 200 + n), ras(k + 10, 200, 230 + n))),
        "lasso": lambda n: Prompt("lasso", True, ras_points=(ras(k + 20, 200, 200 + n), ras(k + 20, 200, 220 + n),
                                                             ras(k + 20, 220, 220 + n), ras(k + 20, 220, 200 + n))),
    }
    medians = {}
    for kind, make in kinds.items():
        session.add(make(9))  # the first prompt after an upload seeds the server: not a click's usual cost
        client, total, received = [], [], []
        for n in range(8):
            before = traffic.received
            timing = session.add(make(n))
            client.append(timing.client_s * 1000)
            total.append(timing.total_s * 1000)
            received.append(traffic.received - before)
        medians[kind] = statistics.median(client)
        print(f"| {name}, {kind}: client-side ms (median of 8) | {medians[kind]:.1f} ms "
              f"(total {statistics.median(total):.0f} ms on CPU; "
              f"{statistics.median(received) / 1e3:.1f} kB returned) |")
    return medians


def staging_ms(session, volume) -> float:
    """Median of 5: the main thread's share of choosing a volume."""
    times = []
    for _ in range(5):
        session._volume_key = None
        started = time.perf_counter()
        session.stage_volume(volume)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def session_table(ctx, server, volumes: dict, matrix):
    print("\n| measurement (loopback, CPU server) | value |\n|---|---|")
    client_ms = None
    for name, hu in volumes.items():
        volume, target = scene_with(ctx, hu, matrix)
        session = InteractiveSession(server.url, KEY)
        session.connect()
        traffic = Traffic()
        traffic.attach(session)
        staged_ms = staging_ms(session, volume)
        session._volume_key = None
        upload = session.stage_volume(volume)
        copy_started = time.perf_counter()
        arrays.volume_array(volume).copy()  # what staging did on the main thread before
        copy_ms = (time.perf_counter() - copy_started) * 1000
        started = time.perf_counter()
        upload()
        print(f"| {name}: staging on the main thread (median of 5) | {staged_ms:.1f} ms (a whole copy there took "
              f"{copy_ms:.0f} ms) |")
        print(f"| {name}: first region ({session.region_note}) on the worker: choose, copy, pack, send | "
              f"{traffic.sent / 1e6:.0f} MB sent, {time.perf_counter() - started:.1f} s |")
        session.select_segment(target)
        medians = prompts_on(session, traffic, matrix, name, len(hu))
        client_ms = client_ms or max(medians.values())  # the first volume's: 512x512x300
        sent, started = traffic.sent, time.perf_counter()
        far = tuple((matrix @ [256, 200, len(hu) - 5, 1.0])[:3])
        session.add(Prompt("point", True, ras=far))
        print(f"| {name}: a point outside the region (moves it: {session.region_note}) | "
              f"{(traffic.sent - sent) / 1e6:.0f} MB sent, {time.perf_counter() - started:.1f} s |")
        if name == "phantom, 300 slices":
            session._client._http.post("/release")  # the server forgets the lease, as when it reaps it
            started = time.perf_counter()
            session.add(Prompt("point", True, ras=far))
            print(f"| {name}: resume after a lost session (claim, upload, seed, prompt) | "
                  f"{time.perf_counter() - started:.2f} s |")
        session.close()
        ctx.scene.RemoveNode(volume)
    return client_ms


def budget_table(client_ms: float):
    total = SERVER_MS + NETWORK_MS + client_ms + DISPLAY_MS
    print(f"\n| click -> mask on an H100 pod (small structure) | ms |\n|---|---|\n"
          f"| server: one network pass (measured on an H100, notes) | {SERVER_MS} |\n"
          f"| network: one round trip through RunPod's proxy (assumed) | {NETWORK_MS} |\n"
          f"| client: prompt to voxels, result into the segment (measured here, slowest kind, 300 slices) | "
          f"{client_ms:.0f} |\n"
          f"| Slicer redrawing the segment (assumed) | {DISPLAY_MS} |\n"
          f"| total (goal 300) | {total:.0f} {'(within)' if total <= 300 else '(OVER)'} |")
    print(f"client-side ms per prompt on 512x512x300: {client_ms:.1f} ms "
          f"({'within' if client_ms <= 20 else 'OVER'} the 20 ms goal)")


def main():
    matrix = np.diag([-0.7, -0.7, 1.0, 1.0])
    hu300 = make_phantom(shape=(300, 512, 512), pixel_spacing=0.7, slice_spacing=1.0).hu
    volumes = {"phantom, 300 slices": hu300,
               "phantom, 1000 slices": np.concatenate([hu300, hu300[::-1], hu300, hu300[:100]])}
    if REAL_CT.is_dir():
        volumes.update({"real CT, 300 slices": real_ct(300), "real CT, 1000 slices": real_ct(1000)})
    else:
        print(f"(no real CT at {REAL_CT}: its rows are left out)")
    wire_table(volumes)
    ctx = create_headless_scene()
    server = Server(write_model_folder(Path(tempfile.mkdtemp()) / "model"), KEY).start()
    try:
        client_ms = session_table(ctx, server, {name: volumes[name] for name in volumes
                                                if name in ("phantom, 300 slices", "real CT, 1000 slices")}, matrix)
    finally:
        server.stop()
    budget_table(client_ms)


if __name__ == "__main__":
    main()
