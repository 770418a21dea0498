"""Memory: what a scan will need, what this computer (or its container) can give, and the sentences for both."""

import os
import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

# Peak resident memory of `model` (load, bone and skin presets, every format): a fixed start-up cost (VTK, MRML,
# NumPy, SciPy) plus a cost per voxel. `.venv/bin/python benchmarks/memory_peak.py` runs the real CLI under
# /usr/bin/time -v on the real CT series tiled to 20-640 slices of 512x512: 0.62, 1.38, 2.30 and 4.14 GiB, a line
# of 502 MiB + 23.3 bytes per voxel; rounded up to lie above each. A coarse 3 mm scan took twice as much per voxel
# (the presets' 2 mm steps run at full resolution there), but such scans have few voxels.
FIXED_BYTES = 520 * 2**20
BYTES_PER_VOXEL = 24

CGROUP_FOLDER = Path("/sys/fs/cgroup")


def memory_needed(voxels: int) -> int:
    """Bytes a run on a scan of this many voxels needs at its peak, by the measured estimate."""
    return FIXED_BYTES + voxels * BYTES_PER_VOXEL


def available_memory(meminfo: Path = Path("/proc/meminfo"), cgroups: Path = Path("/proc/self/cgroup"),
                     cgroup_folder: Path = CGROUP_FOLDER, platform: str = sys.platform) -> "int | None":
    """Bytes this process can take without swapping or being killed: on Linux the least of the system's MemAvailable
    and the room left under each memory limit of its control groups (Docker, Kubernetes, Slurm, systemd); on
    Windows and macOS what the system counts as available; None if nothing is known."""
    if platform.startswith("win"):
        return _windows_available()
    if platform == "darwin":
        return _macos_available()
    known = [room for room in (_meminfo_available(meminfo), *_cgroup_rooms(cgroups, cgroup_folder),
                               _address_space_room()) if room is not None]
    if known:
        return max(0, min(known))
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def _address_space_room(statm: Path = Path("/proc/self/statm")) -> "int | None":
    """Room left under `ulimit -v` (RLIMIT_AS, which batch systems without control groups set): the limit less what
    this process has mapped; past it an allocation fails."""
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit == resource.RLIM_INFINITY:
            return None
        return limit - int(statm.read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (ImportError, OSError, ValueError, IndexError):
        return None


def _windows_available(kernel32=None) -> "int | None":
    """GlobalMemoryStatusEx's available physical memory (what Task Manager shows as available)."""
    import ctypes

    class MemoryStatus(ctypes.Structure):
        _fields_ = [("dwLength", ctypes.c_uint32), ("dwMemoryLoad", ctypes.c_uint32),  # DWORD: 32 bits
                    *((name, ctypes.c_ulonglong) for name in ("ullTotalPhys", "ullAvailPhys", "ullTotalPageFile",
                                                              "ullAvailPageFile", "ullTotalVirtual", "ullAvailVirtual",
                                                              "ullAvailExtendedVirtual"))]

    status = MemoryStatus(dwLength=ctypes.sizeof(MemoryStatus))
    try:
        kernel32 = kernel32 or ctypes.windll.kernel32
        return status.ullAvailPhys if kernel32.GlobalMemoryStatusEx(ctypes.byref(status)) else None
    except (AttributeError, OSError):
        return None


def _macos_available(run=subprocess.run) -> "int | None":
    """Free and inactive pages by vm_stat, as psutil counts available memory on macOS (inactive pages are given up
    before anything swaps)."""
    try:
        text = run(["vm_stat"], capture_output=True, text=True, timeout=10).stdout
        page = int(re.search(r"page size of (\d+) bytes", text).group(1))
        pages = dict(re.findall(r"^Pages (free|inactive):\s+(\d+)\.", text, re.MULTILINE))
        return page * (int(pages["free"]) + int(pages["inactive"]))
    except (OSError, subprocess.SubprocessError, AttributeError, KeyError, ValueError):
        return None


def _meminfo_available(meminfo: Path) -> int:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_rooms(cgroups: Path, cgroup_folder: Path):
    """The room left in this process's memory cgroup and in each above it (a limit set on a Slurm job holds for
    its steps)."""
    try:
        lines = [line.split(":", 2) for line in cgroups.read_text().splitlines() if line.count(":") >= 2]
    except OSError:
        return
    for number, controllers, path in lines:
        if number == "0" and not controllers:  # cgroup v2, one hierarchy
            hierarchy, files = cgroup_folder, ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):  # cgroup v1
            hierarchy, files = cgroup_folder / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes",
                                                          "total_inactive_file")
        else:
            continue
        folder = hierarchy / path.strip("/")
        # In a container the hierarchy's top may be the container's own group, whatever path the host gives.
        while True:
            room = _room(folder, *files)
            if room is not None:
                yield room
            if folder == hierarchy or hierarchy not in folder.parents:
                break
            folder = folder.parent


def _room(folder: Path, limit_file: str, usage_file: str, inactive_key: str) -> int:
    """The limit less the working set of one group, None where it sets none ("max", or no such group here). The
    working set leaves out the inactive file cache, which the kernel drops before it kills: what `docker stats`
    and the kubelet count."""
    try:
        room = int((folder / limit_file).read_text()) - int((folder / usage_file).read_text())
    except (OSError, ValueError):
        return None
    try:
        for line in (folder / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == inactive_key:
                return room + int(value)
    except (OSError, ValueError):
        pass
    return room


def memory_warning(voxels: int, available: int = None) -> str:
    """One sentence when a scan of `voxels` will need more memory than is free (available: bytes, read from the
    system when None); None when it fits or nothing is known."""
    available = available_memory() if available is None else available
    needed = memory_needed(voxels)
    if available is None or needed <= available:
        return None
    return (f"This scan has {voxels / 1e6:.0f} million voxels and will need about {needed / 2**30:.1f} GiB of memory "
            f"where {available / 2**30:.1f} GiB is free: close other programs first, or the run may slow to a "
            "crawl or be stopped by the system.")


def out_of_memory(voxels: int = None) -> str:
    """The one sentence for a MemoryError; voxels: the scan's size, when known, for the estimate."""
    need = (f" (a scan of {voxels / 1e6:.0f} million voxels needs about {memory_needed(voxels) / 2**30:.1f} GiB)"
            if voxels else "")
    return (f"This computer ran out of memory{need}: close other programs, crop the scan to the region you need, "
            "or run it on a computer with more memory.")


@contextmanager
def said_when_out_of_memory(voxels: int = None):
    """A MemoryError inside becomes out_of_memory's sentence (a UserError): never a traceback."""
    try:
        yield
    except MemoryError:
        raise UserError(out_of_memory(voxels)) from None
