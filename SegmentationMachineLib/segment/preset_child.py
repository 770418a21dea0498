"""A preset's mask computed in a child process: `python -m SegmentationMachineLib.segment.preset_child FOLDER`.

Inside Slicer the main thread keeps the GIL while Qt idles, and on a worker thread scipy's distance
transforms and NumPy's label statistics hand it back only every 100-400 ms: the GUI stutters. A child
process has its own GIL; the module's worker thread only writes the volume, waits and reads the crop.
The CLI computes presets in its own process (segment.presets), where no GUI waits.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from ..core.child import LAUNCHER_CRASH, USER_ERROR_EXIT, last_line, start_module, stop
from ..core.errors import SegmentationError, UserError
from ..core.grids import bounding_box
from ..core.memory import out_of_memory
from .masks import preset_mask

TIMEOUT_S = 3600  # a large scan on a slow machine takes minutes; an hour means the child hangs
NICENESS = 10  # a background job's: when every core is busy, the GUI's threads get one first
PROGRESS = "progress"  # the first field of the child's progress lines on stdout

log = logging.getLogger(__name__)
_parent_gone = threading.Event()


class PresetProcess:
    """One preset run in a child process: run() waits for it (a worker thread's job), cancel() kills it
    from any thread."""

    def __init__(self, timeout: float = TIMEOUT_S):
        self.timeout = timeout
        self._process = None
        self._stopped = None  # why the child was killed: "cancelled" or "timeout"
        self._lock = threading.Lock()

    def run(self, preset: str, hu: np.ndarray, spacing, volume_name: str, progress=None, ijk_to_ras=None) -> tuple:
        """(the preset's mask cut to its bounding box, the box's first K, J, I index).

        hu may be a view of a scene's volume: it is written once, into a private folder (0700: the voxels
        are patient data) that the child maps and that is removed afterwards. progress(done, total, step)
        as the child starts each step. ijk_to_ras: hu's grid, as preset_mask takes it."""
        # Windows: a killed child's mapping of hu.npy may outlive it a moment; a cancel must stay a cancel
        with tempfile.TemporaryDirectory(prefix="sm-preset-", ignore_cleanup_errors=True) as folder:
            folder = Path(folder)
            try:
                np.save(folder / "hu.npy", hu)  # the only copy; writing a file releases the GIL
            except OSError as error:
                raise SegmentationError(f"Cannot write the volume for the {preset} preset in {folder.parent} "
                                        f"({error.strerror}): free space there and run it again.") from None
            job = {"preset": preset, "spacing": [float(s) for s in spacing], "volume_name": volume_name,
                   "ijk_to_ras": None if ijk_to_ras is None else np.asarray(ijk_to_ras, float).tolist()}
            (folder / "job.json").write_text(json.dumps(job))
            with open(folder / "stderr.txt", "w+", encoding="utf-8", errors="replace") as stderr:  # child: UTF-8
                returncode = self._wait(folder, stderr, progress)
                if returncode != 0:
                    stderr.seek(0)
                    raise self._failure(preset, returncode, stderr.read())
            start = json.loads((folder / "result.json").read_text())["start"]
            return np.load(folder / "mask.npy"), tuple(start)

    @property
    def pid(self):
        """The child's process id once it has started, else None."""
        return self._process.pid if self._process else None

    def cancel(self):
        self._kill("cancelled")

    def _kill(self, why: str):
        with self._lock:
            self._stopped = self._stopped or why
            if self._process:
                stop(self._process)  # Slicer's PythonSlicer is a launcher: the Python it started goes too

    def _wait(self, folder: Path, stderr, progress) -> int:
        with self._lock:
            if self._stopped:
                return -1
            # The child reads its stdin to the end: our end closes when this process ends, even by a crash.
            self._process = start_module(__name__, [folder], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=stderr, encoding="utf-8", errors="replace")
        timer = threading.Timer(self.timeout, self._kill, ["timeout"])
        timer.daemon = True
        timer.start()
        try:
            with self._process as process:  # closes the pipes and waits for the child
                for line in process.stdout:  # reading a pipe releases the GIL
                    fields = line.rstrip("\n").split("\t")  # other lines are the libraries' own
                    if progress and len(fields) == 4 and fields[0] == PROGRESS:
                        progress(int(fields[1]), int(fields[2]), fields[3])
            return process.returncode
        finally:
            timer.cancel()

    def _failure(self, preset: str, returncode: int, stderr: str) -> SegmentationError:
        sentence = last_line(stderr)
        if self._stopped == "cancelled":
            return SegmentationError(f"The {preset} preset was cancelled.")
        if self._stopped == "timeout":
            limit = f"{self.timeout / 60:g} minutes" if self.timeout >= 120 else f"{self.timeout:g} s"
            return SegmentationError(f"The {preset} preset took more than {limit} and was stopped: crop the volume "
                                     "to the region you need and run it again.")
        if returncode == USER_ERROR_EXIT:
            return SegmentationError(sentence)
        # A signal (through Slicer's launcher, its crash report): on a large scan most likely the out-of-memory killer.
        if returncode < 0 or sentence.endswith(LAUNCHER_CRASH):
            how = f" (signal {-returncode})" if returncode < 0 else ""
            return SegmentationError(f"The {preset} preset's process was killed{how}, most likely for lack of memory: "
                                     "close other programs or crop the volume, and run it again.")
        log.error("The %s preset's process ended with exit code %s:\n%s", preset, returncode, stderr)
        return SegmentationError(f"The {preset} preset failed: {sentence or f'exit code {returncode}'} "
                                 "(the log has the details).")


def _exit_with_parent(folder: Path):
    """The parent keeps our stdin open while it waits for us: its end means the parent is gone (Slicer quit
    or crashed), and with it whoever would remove the folder and its copy of the volume."""
    sys.stdin.read()
    _parent_gone.set()
    shutil.rmtree(folder, ignore_errors=True)
    os._exit(1)


def main(folder: str) -> int:
    folder = Path(folder)
    threading.Thread(target=_exit_with_parent, args=(folder,), daemon=True).start()
    if hasattr(os, "nice"):  # POSIX; an idle machine still runs the child at full speed
        os.nice(NICENESS)
    job = json.loads((folder / "job.json").read_text())
    hu = np.load(folder / "hu.npy", mmap_mode="c")  # copy-on-write: the file stays as written

    def progress(done, total, step):
        try:
            print(PROGRESS, done, total, step, sep="\t", flush=True)
        except BrokenPipeError:  # the parent is gone: _exit_with_parent ends us
            pass

    try:
        mask = preset_mask(job["preset"], np.asarray(hu), np.asarray(job["spacing"]), job["volume_name"], progress,
                           job["ijk_to_ras"])
    except UserError as error:
        print(error, file=sys.stderr)
        return USER_ERROR_EXIT
    except MemoryError:  # the parent shows stderr's last line as the preset's failure
        print(out_of_memory(hu.size), file=sys.stderr)
        return USER_ERROR_EXIT
    crop, start = cropped(mask)
    np.save(folder / "mask.npy", crop)
    (folder / "result.json").write_text(json.dumps({"start": start}))
    return 0


def cropped(mask: np.ndarray) -> tuple:
    """(mask cut to its bounding box, the box's first K, J, I index): the segment the main thread then writes,
    and the memory it keeps, grow with the structure, not with the volume."""
    box = bounding_box(mask)
    return np.ascontiguousarray(mask[box]), [int(part.start) for part in box]


if __name__ == "__main__":
    try:
        status = main(*sys.argv[1:])
    finally:
        if _parent_gone.is_set():  # whatever main met after the folder went, _exit_with_parent ends us
            threading.Event().wait()
    sys.exit(status)
