"""Our own modules run as child processes of the Python we run in.

Work that must not share Slicer's process (packages newer than Slicer's pins, CPU work that would
hold the GIL the main thread needs) runs as `python -m SegmentationMachineLib....` in a child.
"""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

LIBRARY_PARENT = Path(__file__).resolve().parents[2]  # the folder that holds SegmentationMachineLib
USER_ERROR_EXIT = 2  # a child's status when its last stderr line is a sentence for the user, as the CLI's exit 2
# How PythonSlicer (CTK AppLauncher 0.1.33, ctkAppLauncher.cpp) ends the stderr of a Python that crashed or was
# killed; it then exits 1, so the signal itself is not seen.
LAUNCHER_CRASH = "exit abnormally - Report the problem."


def last_line(stderr: str) -> str:
    """The last non-blank line of a child's stderr: its sentence, or its traceback's last line."""
    return next((line for line in reversed(stderr.splitlines()) if line.strip()), "")


def python_executable() -> str:
    """Inside Slicer, `PythonSlicer` (its sys.executable is the application, and Slicer puts PythonSlicer
    on PATH: slicer/util.py _executePythonModule at v5.10.0); elsewhere this interpreter."""
    in_slicer = hasattr(sys.modules.get("slicer"), "app")  # only the Slicer application's slicer has it
    return (shutil.which("PythonSlicer") if in_slicer else None) or sys.executable


# PythonSlicer is a CTK AppLauncher: it puts Slicer's own paths, its site-packages (pydicom 2.4) among them,
# before the PYTHONPATH it inherits (commontk/AppLauncher Base/ctkAppLauncher.cpp, "Path environment
# variables"; Slicer's SuperBuild/python_configure_python_launcher.cmake). So the child puts first_paths
# first itself, before it imports anything, then runs the module as -m would.
_FIRST_PATHS_THEN_MODULE = ("import runpy, sys; sys.path[:0] = {paths!r}; "
                            "runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")


def _command(module: str, args: list, first_paths=()) -> list:
    if first_paths:
        code = _FIRST_PATHS_THEN_MODULE.format(paths=[str(p) for p in first_paths], module=module)
        return [python_executable(), "-c", code, *map(str, args)]
    return [python_executable(), "-m", module, *map(str, args)]


# UTF-8 for a Python child, which we read as UTF-8: on Windows Slicer's own process runs in UTF-8, but the Python
# PythonSlicer starts writes (and reads files) in the system's code page; 'Schädel' then came back undecodable
UTF8_CHILD = {"PYTHONUTF8": "1", "PYTHONIOENCODING": "utf-8"}


def _environment() -> dict:
    paths = [str(LIBRARY_PARENT), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), **UTF8_CHILD}


# PythonSlicer (CTK AppLauncher) runs the real Python as its own child: killing the launcher would leave that
# computing. So a child gets a process group of its own, and stop() ends the group. On Windows also no console
# window, as Slicer's own launchConsoleProcess starts PythonSlicer (Base/Python/slicer/util.py).
_OWN_GROUP = (dict(creationflags=subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW)
              if os.name == "nt" else dict(start_new_session=True))


def stop(process: subprocess.Popen):
    """Kills process and whatever it started (the Python a launcher runs)."""
    if process.poll() is not None:
        return
    try:
        if os.name == "nt":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True, **_OWN_GROUP)
        else:
            os.killpg(process.pid, signal.SIGKILL)
    except OSError:  # ended meanwhile
        pass
    process.kill()


def run_module(module: str, args: list, timeout: float, first_paths=()) -> subprocess.CompletedProcess:
    """Runs `python -m module args` and returns it finished; first_paths go before everything else on its
    sys.path. Raises subprocess.TimeoutExpired (the child, and the Python a launcher started, killed) or OSError;
    the caller turns a non-zero returncode (stderr has the child's traceback) into its own sentence."""
    with start_module(module, args, first_paths, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, encoding="utf-8", errors="replace") as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except BaseException:  # the time-out, or Ctrl-C
            stop(process)
            raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def start_module(module: str, args: list, first_paths=(), **popen) -> subprocess.Popen:
    """Starts `python -m module args` as run_module does, without waiting, in a process group of its own: the
    caller reads its output as it comes and may stop() it from another thread. popen: Popen's stdin, stdout,
    stderr, text..."""
    return subprocess.Popen(_command(module, args, first_paths), env=_environment(), **_OWN_GROUP, **popen)
