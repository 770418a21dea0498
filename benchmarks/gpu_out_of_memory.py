"""What the real nnInteractive server does when its GPU runs out of memory mid-prompt, and whether it works
again afterwards: the check behind the tests' out_of_memory model (Testing/nninteractive_model.py), the client's
sentence for it, and `segmentation-machine server` restarting it.

On a CUDA GPU, with the official model's architecture (random weights) and a 512x512x300 CT-like volume, through
`segmentation-machine server --no-torch-compile` (the pod image's mode) and our own guarded client:
  1. a point, twice (how far the model repeats itself: a mask this large differs a little each time);
  2. this process takes all but --leave-mib of the GPU's free memory, and the same point is sent again:
     the answer's HTTP status and text, and what the server's log says;
  3. the memory is given back; our server restarts upstream's (the seconds until it is Ready again, and a new
     session sends the volume again), or with --no-restart keeps it, and the server is restarted from an empty
     segment as our client does after any failed prompt (target buffer, reset); the same point is sent three more
     times: times, and masks against the first.
--no-failure takes and gives back the memory without the prompt in between: the control for what the failure
itself changes. --one-pass makes every prompt one network pass (an output layer that always says background),
the time a small structure takes; such a prompt needs less memory, so leave less free (--leave-mib 256).

Run on a machine with a GPU and the server's packages (the README's *Benchmarks* says how they ran):
    python benchmarks/gpu_out_of_memory.py [--no-restart] [--no-failure] [--one-pass --leave-mib 256]
--device cpu --tests-model is a dry run of the steps without taking memory (no failure then).
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_server import ct_like, KEY, start_server  # noqa: E402 (also puts the repository and Testing/ on the path)
from nninteractive_model import write_model_folder  # noqa: E402
from nninteractive_server import free_port  # noqa: E402
from SegmentationMachineLib.prompts.remote import error_text, GuardedSession  # noqa: E402

POINT = (150, 230, 320)  # K, J, I: inside the "organ" of ct_like


def take_gpu_memory(leave_mib: int) -> list:
    """Tensors holding all but leave_mib of the GPU's free memory, as another process's work would."""
    import torch
    held, chunk = [], 256 << 20
    while torch.cuda.mem_get_info()[0] - chunk > leave_mib << 20:
        held.append(torch.empty(chunk, dtype=torch.uint8, device="cuda"))
    return held


def prompt(session: GuardedSession, target: np.ndarray, baseline: np.ndarray = None) -> tuple:
    """A point from an empty segment, restarted as our client restarts the server: (ms, what the server answered,
    the mask's voxels and its Dice with baseline)."""
    target[:] = 0
    session.set_target_buffer(target)
    session.reset_interactions()
    started = time.monotonic()
    try:
        session.add_point_interaction(POINT, include_interaction=True)
        answer = "answered"
    except httpx.HTTPStatusError as error:
        answer = f"HTTP {error.response.status_code}: {error_text(error.response)}"
    voxels = f"{int(target.sum())}"
    if baseline is not None:
        voxels += f" (Dice with the first {dice(target, baseline):.4f})"
    return f"{(time.monotonic() - started) * 1000:.0f}", answer, voxels


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def give_back_gpu_memory(held: list):
    held.clear()
    import torch
    torch.cuda.empty_cache()  # else this process's allocator keeps it
    print(f"GPU memory free after giving it back: {torch.cuda.mem_get_info()[0] >> 20} MiB")


def connect(port: int, image: np.ndarray) -> GuardedSession:
    session = GuardedSession(f"http://127.0.0.1:{port}", KEY, read_timeout=120)
    session.set_image(image[None], {"spacing": [1, 1, 1]})
    return session


def wait_for_ready(log: list, count: int, timeout_s: float = 300) -> float:
    """Seconds until the server's log holds count lines starting with Ready."""
    started = time.monotonic()
    while sum(line.startswith("Ready") for line in log) < count:
        if time.monotonic() - started > timeout_s:
            raise SystemExit("the server did not restart:\n" + "\n".join(log[-40:]))
        time.sleep(0.1)
    return time.monotonic() - started


def run(port: int, log: list, args) -> list:
    image = ct_like()
    target = np.zeros(image.shape, np.uint8)
    session = connect(port, image)
    rows = [("first point", *prompt(session, target))]
    first = target.astype(bool)
    rows.append(("the same point again (how far the model repeats itself)", *prompt(session, target, first)))
    held = take_gpu_memory(args.leave_mib) if args.device == "cuda" else []
    if args.no_failure:
        rows.append((f"(memory taken, {args.leave_mib} MiB left free, no prompt sent)", "-", "-", "-"))
    else:
        rows.append((f"the same point, {args.leave_mib} MiB of GPU memory left free", *prompt(session, target)))
    if held:
        give_back_gpu_memory(held)
    if not args.no_restart and rows[-1][2].startswith("HTTP 500"):
        seconds = wait_for_ready(log, 2)
        session.close()
        started = time.monotonic()
        session = connect(port, image)
        rows.append((f"restarted by our server: Ready again {seconds:.1f} s after the failure; a new session sends "
                     "the volume", f"{(time.monotonic() - started) * 1000:.0f}", "-", "-"))
    for what in ("memory given back, the same point from the empty segment", "and again", "and again"):
        rows.append((what, *prompt(session, target, first)))
    session.close()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tests-model", action="store_true", help="the tests' hand-set tiny model (a CPU dry run)")
    parser.add_argument("--one-pass", action="store_true", help="every prompt one network pass (a small structure)")
    parser.add_argument("--no-failure", action="store_true", help="take and give back the memory without a prompt "
                        "in between (the control for what the failure itself changes)")
    parser.add_argument("--no-restart", action="store_true", help="the server keeps running after the failure "
                        "(--no-restart-on-out-of-memory)")
    parser.add_argument("--leave-mib", type=int, default=1024, help="GPU memory left free for the failing prompt")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        model = write_model_folder(Path(folder) / "model", official_architecture=not args.tests_model,
                                   predicts_nothing=args.one_pass)
        port = free_port()
        _, process, log = start_server(model, port, True, args.device,
                                       ["--no-restart-on-out-of-memory"] if args.no_restart else [])
        try:
            rows = run(port, log, args)
        finally:
            time.sleep(1)  # the failure's traceback reaches the log
            process.terminate()
            process.wait(30)
    print("| step | ms | answer | mask voxels |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print("\nserver log lines naming memory, errors or restarts:")
    for line in log:
        if any(word in line for word in ("OutOfMemory", "out of memory", "Error", "500", "Ready", "restarting")):
            print("  " + line[:300])


if __name__ == "__main__":
    main()
