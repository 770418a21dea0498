"""Memory: the estimate a big scan is warned with, the memory a container really leaves, and running out of it
as one sentence (model, watch, the module's preset process) on a real CT under a real address-space limit."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import EXAMPLE_CT, UNCOMPRESSED_SERIES
from SegmentationMachineLib.core import arrays, memory
from SegmentationMachineLib.dicom.phantom import write_ct_series
from SegmentationMachineLib.dicom.volumes import load_input

GiB = 2**30
# One thread pool and two malloc arenas: the address space a process reserves does not grow with the cores.
SMALL_ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
# What the work on the tiled CT may reserve above the imports: enough to load it (0.2 GB), far less than its
# presets need (more than 1.3 GB above the imports, measured).
HEADROOM = 600 * 2**20
needs_linux = pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS and /proc are Linux's")


def test_the_estimate_is_the_measured_peak_and_the_warning_one_sentence():
    voxels = 512 * 512 * 640  # 4.14 GiB measured at the peak (benchmarks/memory_peak.py)
    assert 4.14 * GiB < memory.memory_needed(voxels) < 4.4 * GiB
    warning = memory.memory_warning(voxels, available=4 * GiB)
    assert warning.startswith("This scan has 168 million voxels and will need about 4.3 GiB of memory")
    assert "4.0 GiB is free" in warning and warning.endswith(".") and ". " not in warning  # one sentence
    assert memory.memory_warning(voxels, available=9 * GiB) is None  # a 16 GB laptop's free memory: no false alarm


def fake_system(tmp_path, cgroups: str, groups: dict, available_gib: float = 8):
    """A /proc/meminfo, a /proc/self/cgroup and a cgroup folder with groups {path: {file: text}}."""
    tmp_path.mkdir()
    (tmp_path / "meminfo").write_text(f"MemTotal: 33554432 kB\nMemAvailable: {int(available_gib * 2**20)} kB\n")
    (tmp_path / "cgroup").write_text(cgroups)
    for path, files in groups.items():
        folder = tmp_path / "fs" / path
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (folder / name).write_text(text)
    return dict(meminfo=tmp_path / "meminfo", cgroups=tmp_path / "cgroup", cgroup_folder=tmp_path / "fs")


def test_available_memory_is_the_least_the_system_and_each_container_limit_leave(tmp_path):
    # cgroup v2 (Docker, Kubernetes, systemd): a Slurm-like job limited to 4 GiB, its step unlimited; 3 GiB used,
    # 1 GiB of it file cache the kernel drops first.
    v2 = fake_system(tmp_path / "v2", "0::/job/step\n", {
        ".": {"memory.stat": "anon 0\n"},  # the root has no memory.max
        "job": {"memory.max": f"{4 * GiB}\n", "memory.current": f"{3 * GiB}\n",
                "memory.stat": f"anon {2 * GiB}\ninactive_file {GiB}\nactive_file 0\n"},
        "job/step": {"memory.max": "max\n", "memory.current": f"{3 * GiB}\n"}})
    assert memory.available_memory(**v2) == 2 * GiB
    # cgroup v1 (older Docker): a 3 GiB limit with 2.5 GiB in use
    v1 = fake_system(tmp_path / "v1", "5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n", {
        "memory/docker/abc": {"memory.limit_in_bytes": f"{3 * GiB}\n", "memory.usage_in_bytes": f"{5 * GiB // 2}\n",
                              "memory.stat": "cache 0\ntotal_inactive_file 0\n"}})
    assert memory.available_memory(**v1) == GiB // 2
    # no limit (v1 says so with a huge number), or no cgroup files at all: MemAvailable
    unlimited = fake_system(tmp_path / "none", "4:memory:/\n", {
        "memory": {"memory.limit_in_bytes": "9223372036854771712\n", "memory.usage_in_bytes": f"{GiB}\n"}}, 6.5)
    assert memory.available_memory(**unlimited) == int(6.5 * GiB)
    assert memory.available_memory(**{**v2, "cgroups": tmp_path / "absent"}) == 8 * GiB
    # over its limit (it swaps): nothing is free
    over = fake_system(tmp_path / "over", "0::/\n", {".": {"memory.max": f"{GiB}\n", "memory.current": f"{2 * GiB}\n"}})
    assert memory.available_memory(**over) == 0


def test_available_memory_on_windows_and_macos_is_what_the_system_counts_available():
    """Windows and macOS have no /proc nor SC_AVPHYS_PAGES: the warning never came there, where most users are."""
    import ctypes
    import subprocess

    # vm_stat's output on an Apple Silicon Mac (16 KiB pages); "Pages free" already leaves out speculative pages
    vm_stat = ("Mach Virtual Memory Statistics: (page size of 16384 bytes)\nPages free:                               "
               "30000.\nPages active:                            400000.\nPages inactive:                          "
               "100000.\nPages speculative:                         5000.\nPages wired down:                        "
               "150000.\n")
    ran = lambda command, **_: subprocess.CompletedProcess(command, 0, vm_stat, "")  # noqa: E731
    assert memory._macos_available(ran) == 130000 * 16384
    assert memory._macos_available(lambda command, **_: subprocess.CompletedProcess(command, 0, "", "")) is None

    class Kernel32:  # GlobalMemoryStatusEx fills in the structure it is given
        @staticmethod
        def GlobalMemoryStatusEx(status):
            assert status._obj.dwLength == ctypes.sizeof(status._obj) == 64  # MEMORYSTATUSEX, as Windows checks
            status._obj.ullAvailPhys = 5 * GiB
            return 1

    assert memory._windows_available(Kernel32()) == 5 * GiB
    for platform, reader in (("win32", "_windows_available"), ("darwin", "_macos_available")):
        with pytest.MonkeyPatch.context() as system:
            system.setattr(memory, reader, lambda: 3 * GiB)
            assert memory.available_memory(platform=platform) == 3 * GiB


@needs_linux
def test_this_machines_available_memory_is_at_most_its_memavailable():
    def mem_available() -> int:
        line = next(line for line in open("/proc/meminfo") if line.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024

    before = mem_available()
    available = memory.available_memory()
    assert 0 < available <= max(before, mem_available())  # other jobs' memory may change between the reads


@pytest.fixture(scope="module")
def tiled_ct():
    """The real abdomen CT (122x101x112, 3 mm) tiled 2x3x3: 25 million voxels of real HU, 50 MB as int16."""
    if not EXAMPLE_CT.is_file():
        pytest.skip(f"the real scans are not at {EXAMPLE_CT.parent}")
    from SegmentationMachineLib.core.scene import create_headless_scene

    hu = arrays.volume_array(load_input(create_headless_scene(), EXAMPLE_CT).node)
    return np.tile(hu.astype(np.int16), (2, 3, 3))


def write_series(folder, hu, description):
    write_ct_series(folder, hu, 3.0, [(0.0, 0.0, 3.0 * k) for k in range(len(hu))], description)


def imports_peak(code: str) -> int:
    """Bytes of address space a Python that runs code (the imports of a run) reserves at its peak."""
    done = subprocess.run([sys.executable, "-c", code + "\nprint(open('/proc/self/status').read())"],
                          capture_output=True, text=True, check=True, timeout=300, env=SMALL_ENV)
    return int(re.search(r"VmPeak:\s+(\d+) kB", done.stdout).group(1)) * 1024


CLI_IMPORTS = """
from SegmentationMachineLib import pipeline
from SegmentationMachineLib.cli import main, model, watch
from SegmentationMachineLib.core.scene import create_headless_scene
from SegmentationMachineLib.dicom import volumes
from SegmentationMachineLib.inbox import watcher, watchqueue
create_headless_scene()
"""


def run_limited(command, limit: int, wait: bool = True):
    """command in a process that may reserve no more than limit bytes of address space (ulimit -v): finished,
    or started (wait=False) with its output on pipes."""
    import resource

    def limited():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=SMALL_ENV,
                               preexec_fn=limited, stdin=subprocess.DEVNULL)
    if not wait:
        return process
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@needs_linux
def test_available_memory_stays_within_ulimit_v():
    """A batch system's `ulimit -v` (RLIMIT_AS) ended a run in 'ran out of memory' with no warning before it."""
    done = run_limited([sys.executable, "-c", "from SegmentationMachineLib.core import memory; "
                        "print(memory.available_memory())"], 3 * GiB)
    assert done.returncode == 0 and 0 < int(done.stdout) < 3 * GiB, done.stderr


def one_sentence(stderr: str) -> str:
    assert "Traceback" not in stderr and "MemoryError" not in stderr, stderr
    said = [line for line in stderr.splitlines() if "ran out of memory" in line]
    assert len(said) == 1, stderr
    return said[0]


SENTENCE = ("This computer ran out of memory (a scan of 25 million voxels needs about {:.1f} GiB): close other "
            "programs, crop the scan to the region you need, or run it on a computer with more memory.")


@needs_linux
def test_running_out_of_memory_in_model_is_one_sentence_and_leaves_nothing(tiled_ct, tmp_path):
    write_series(tmp_path / "ct", tiled_ct, "tiled")
    limit = imports_peak(CLI_IMPORTS) + HEADROOM
    done = run_limited([sys.executable, "-m", "SegmentationMachineLib.cli", "model", str(tmp_path / "ct"),
                        "--out", str(tmp_path / "out"), "--quiet"], limit)
    assert done.returncode == 2, done.stderr
    assert one_sentence(done.stderr) == "segmentation-machine: ERROR: " + SENTENCE.format(
        memory.memory_needed(tiled_ct.size) / GiB)
    assert not any((tmp_path / "out").glob("*/*"))  # no half-written export


@needs_linux
def test_running_out_of_memory_in_watch_fails_that_series_and_the_next_is_done(tiled_ct, tmp_path):
    import json
    import shutil
    import signal
    import threading

    inbox = tmp_path / "inbox"
    write_series(inbox / "big", tiled_ct, "big")
    limit = imports_peak(CLI_IMPORTS) + HEADROOM
    watch = run_limited([sys.executable, "-m", "SegmentationMachineLib.cli", "watch", str(inbox), "--out",
                         str(tmp_path / "out"), "--settle", "0.2", "--hold", "0", "--format", "stl", "--polling"],
                        limit, wait=False)
    timer = threading.Timer(240, watch.kill)  # a hang fails the test, never the suite
    timer.start()
    lines = []

    def read_until(text):
        for line in watch.stdout:
            lines.append(line)
            if text in line:
                return line
        raise AssertionError("".join(lines) + watch.stderr.read())

    try:
        failed = read_until("CT 'big': failed")
        assert failed.strip() == f"CT 'big': failed: {SENTENCE.format(memory.memory_needed(tiled_ct.size) / GiB)}"
        shutil.copytree(UNCOMPRESSED_SERIES, inbox / "small")  # the queue goes on with the next series
        done = read_until("CT 'series 2': done → ")
        assert (Path(done.split(" → ")[1].strip()) / "Bone.stl").is_file()
        watch.send_signal(signal.SIGTERM)
        assert watch.wait(60) in (0, 128 + signal.SIGTERM)
    finally:
        timer.cancel()
        watch.kill()
    assert "Traceback" not in watch.stderr.read() and "unexpected" not in "".join(lines)
    states = {s["name"]: s for s in json.loads((tmp_path / "out" / "status.json").read_text())["series"]}
    assert states["CT 'big'"]["state"] == "failed" and "ran out of memory" in states["CT 'big'"]["reason"]


@needs_linux
def test_running_out_of_memory_in_the_modules_preset_process_is_its_sentence(tiled_ct, tmp_path):
    """The Slicer module computes presets in a child process (preset_child): its failure is the sentence."""
    np.save(tmp_path / "hu.npy", tiled_ct)
    limit = imports_peak("import numpy\nfrom SegmentationMachineLib.segment import preset_child") + HEADROOM
    parent = f"""
import numpy as np
from SegmentationMachineLib.core.errors import SegmentationError
from SegmentationMachineLib.segment.preset_child import PresetProcess
try:
    PresetProcess().run("bone", np.load({str(tmp_path / "hu.npy")!r}), (3.0, 3.0, 3.0), "tiled")
except SegmentationError as error:
    print(error)
"""
    done = run_limited([sys.executable, "-c", parent], limit + tiled_ct.nbytes)  # it holds the volume too
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == SENTENCE.format(memory.memory_needed(tiled_ct.size) / GiB), done.stdout + done.stderr
