"""`segmentation-machine server` on a CUDA GPU, driven by our own guarded client: start-up, upload and
prompt times on a 512x512x300 CT-like volume, with the official model's architecture (random weights).

Run on a machine with a GPU and the server's packages (the README's *Benchmarks* says how they ran):
    python benchmarks/gpu_server.py [--no-torch-compile]
Random weights give real network and refinement times but meaningless masks; the mask sizes are printed
so a prompt that set off autozoom (a prediction that reached its patch's border) can be told apart.
--one-pass makes the output layer always say background: each prompt is then one network pass, the time
a small structure takes.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "Testing")]
from nninteractive_model import write_model_folder  # noqa: E402
from nninteractive_server import free_port  # noqa: E402
from SegmentationMachineLib.prompts.remote import GuardedSession  # noqa: E402

KEY = "gpu-benchmark-key-0123456789"
SHAPE = (300, 512, 512)  # K, J, I as the client sends it


def ct_like(shape=SHAPE, seed=0) -> np.ndarray:
    """Air, a body ellipse of soft tissue with an organ, a contrast-filled vessel and a spine; CT noise."""
    k, j, i = np.ogrid[:shape[0], :shape[1], :shape[2]]
    volume = np.full(shape, -1000, np.int16)
    body = ((j - 256) / 170.0) ** 2 + ((i - 256) / 220.0) ** 2 <= 1
    volume[np.broadcast_to(body, shape)] = 40
    organ = ((k - 150) / 60.0) ** 2 + ((j - 230) / 60.0) ** 2 + ((i - 320) / 70.0) ** 2 <= 1
    volume[organ] = 60
    vessel = np.broadcast_to(((j - 280) / 12.0) ** 2 + ((i - 230) / 12.0) ** 2 <= 1, shape)
    volume[vessel] = 250
    spine = np.broadcast_to(((j - 360) / 25.0) ** 2 + ((i - 256) / 25.0) ** 2 <= 1, shape)
    volume[spine] = 700
    noise = np.random.default_rng(seed).normal(0, 12, shape).astype(np.int16)
    return volume + noise


class GpuMemory:
    """Peak GPU memory in use (nvidia-smi, every 0.2 s) while the benchmark runs."""

    def __init__(self):
        self.peak_mib, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        while not self._stop.wait(0.2):
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout.split()
            if out:
                self.peak_mib = max(self.peak_mib, int(out[0]))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak_mib


def start_server(model: Path, port: int, no_compile: bool, device: str, options=()):
    """Our CLI's `server` (not upstream's directly): the seconds until it printed Ready, the process, its log."""
    command = [sys.executable, "-m", "SegmentationMachineLib.cli", "server", "--model-dir", str(model),
               "--device", device, "--port", str(port), *options] + (["--no-torch-compile"] if no_compile else [])
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "SM_NNI_API_KEY": KEY, "PYTHONUNBUFFERED": "1"}, cwd=ROOT)
    lines = []
    for line in process.stdout:
        lines.append(line.rstrip())
        if line.startswith("Ready"):
            break
    if process.poll() is not None or not lines or not lines[-1].startswith("Ready"):
        raise SystemExit("the server did not start:\n" + "\n".join(lines[-40:]))
    # keep its pipe drained, and its log in lines
    threading.Thread(target=lambda: lines.extend(line.rstrip() for line in process.stdout), daemon=True).start()
    return time.monotonic() - started, process, lines


def timed(rows: list, what: str, call, target: np.ndarray):
    started = time.monotonic()
    result = call()
    rows.append((what, (time.monotonic() - started) * 1000, int(target.sum())))
    return result


def plane_mask(k: int, j0: int, i0: int, size: int, filled: bool) -> tuple:
    """A scribble (a diagonal line) or a lasso (a filled disc) on axial slice k, as a crop and its box."""
    mask = np.zeros((1, size, size), np.uint8)
    if filled:
        jj, ii = np.ogrid[:size, :size]
        mask[0][(jj - size / 2) ** 2 + (ii - size / 2) ** 2 <= (size / 2 - 1) ** 2] = 1
    else:
        mask[0][np.arange(size), np.arange(size)] = 1
    return mask, [[k, k + 1], [j0, j0 + size], [i0, i0 + size]]


def run(session: GuardedSession, image: np.ndarray) -> list:
    rows, target = [], np.zeros(image.shape, np.uint8)
    timed(rows, "set_image (upload 512x512x300)", lambda: session.set_image(image[None], {"spacing": [1, 1, 1]}),
          target)
    session.set_target_buffer(target)
    session.reset_interactions()
    points = [(150, 230, 320), (150, 280, 230), (120, 360, 256), (200, 230, 330), (100, 250, 200), (180, 300, 300)]
    for n, point in enumerate(points):
        what = "point, first after set_image" if n == 0 else "point"
        timed(rows, what, lambda: session.add_point_interaction(point, include_interaction=True), target)
        session.reset_interactions()
        target[:] = 0
    for n in range(3):
        k = 140 + 10 * n
        box = [[k, k + 1], [200, 260], [290, 350]]
        timed(rows, "2D box", lambda: session.add_bbox_interaction(box, include_interaction=True), target)
        session.reset_interactions()
        target[:] = 0
    for kind, filled in (("scribble", False), ("lasso", True)):
        for n in range(3):
            mask, box = plane_mask(140 + 10 * n, 210, 300, 40, filled)
            add = getattr(session, f"add_{kind}_interaction")
            timed(rows, kind, lambda: add(mask, include_interaction=True, interaction_bbox=box), target)
            session.reset_interactions()
            target[:] = 0
    timed(rows, "point (kept)", lambda: session.add_point_interaction((150, 230, 320), include_interaction=True),
          target)
    timed(rows, "point on top (kept)", lambda: session.add_point_interaction((150, 240, 330), include_interaction=True),
          target)
    timed(rows, "undo", session.undo, target)
    try:
        session.add_bbox_interaction([[140, 150], [200, 260], [290, 350]], include_interaction=True)
        rows.append(("3D box", float("nan"), -1))
    except Exception as error:  # the official capability set refuses it (HTTP 400)
        rows.append((f"3D box refused: {type(error).__name__} {str(error)[:40]}", float("nan"), 0))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-torch-compile", action="store_true")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tests-model", action="store_true", help="the tests' hand-set tiny model (a CPU dry run)")
    parser.add_argument("--one-pass", action="store_true", help="an output layer that always says background: each "
                                                                "prompt is one network pass, as for a small structure")
    args = parser.parse_args()
    memory = GpuMemory() if args.device == "cuda" else None
    with tempfile.TemporaryDirectory() as folder:
        started = time.monotonic()
        model = write_model_folder(Path(folder) / "model", official_architecture=not args.tests_model,
                                   predicts_nothing=args.one_pass)
        print(f"model folder written in {time.monotonic() - started:.1f} s")
        port = free_port()
        startup_s, process, lines = start_server(model, port, args.no_torch_compile, args.device)
        print("\n".join(f"  server: {line}" for line in lines if "API key" not in line))
        try:
            session = GuardedSession(f"http://127.0.0.1:{port}", KEY, read_timeout=120)
            rows = run(session, ct_like())
            session.close()
        finally:
            process.terminate()
            process.wait(30)
    peak = memory.stop() if memory else "-"
    compile_state = "without" if args.no_torch_compile or args.device == "cpu" else "with"  # upstream: CUDA only
    print(f"\n`segmentation-machine server --device {args.device}` {compile_state} torch.compile: Ready after {startup_s:.1f} s; "
          f"peak GPU memory {peak} MiB")
    print("| request | ms | mask voxels after |\n|---|---|---|")
    for what, ms, voxels in rows:
        print(f"| {what} | {ms:.0f} | {voxels} |")
    kinds = {}
    for what, ms, _ in rows[2:]:
        kinds.setdefault(what, []).append(ms)
    print("medians: " + ", ".join(f"{k} {statistics.median(v):.0f} ms" for k, v in kinds.items() if v[0] == v[0]))


if __name__ == "__main__":
    main()
