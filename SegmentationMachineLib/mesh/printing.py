"""Send to OrcaSlicer: find it wherever people install it, and open exported models in it, detached."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import PrintError
from .writers import read_stl, write_3mf

EXECUTABLE_NAMES = ("orca-slicer", "OrcaSlicer", "orcaslicer")
FLATPAK_IDS = ("com.orcaslicer.OrcaSlicer", "io.github.softfever.OrcaSlicer")
UNKNOWN_COLOR = (0.9, 0.9, 0.9)  # a segment whose export report is gone
HAND_OVER_S = 5.0  # how long Send to OrcaSlicer waits on macOS for open's verdict
SETTING_ENV = "SM_ORCASLICER"  # a path set by the user, when it is not found by itself
DOWNLOAD_HINT = ("install it from https://github.com/SoftFever/OrcaSlicer/releases (or Flathub), "
                 f"or give its path (--orcaslicer, the {SETTING_ENV} environment variable, or in Slicer where Send to "
                 "OrcaSlicer asks for it)")


class OrcaSlicerNotFound(PrintError):
    """Neither found by itself nor at the configured path: the module then asks where it is."""


@dataclass
class OrcaSlicer:
    command: list  # what to run, before the model files
    found: str  # how it was found, for messages
    flatpak: bool = False
    handed_over: bool = False  # macOS's open: ends once the app has the files, and says when it could not


def _from_path(path: Path, found: str):
    path = Path(path).expanduser().absolute()  # "./OrcaSlicer" as "OrcaSlicer" would be looked up on PATH
    if path.suffix == ".app" and path.is_dir():
        # Files by Apple Event (a running OrcaSlicer gets them too; its own hand-over from a second instance
        # garbles a path with 'ä'), not as a new instance's arguments
        return OrcaSlicer(["open", "-a", str(path)], found, handed_over=True)
    if path.is_file() and os.access(path, os.X_OK):
        return OrcaSlicer([str(path)], found)
    return None


def _not_executable(path: Path) -> PrintError:
    """A browser saves a downloaded AppImage without the permission to run it (found: the module asks nothing)."""
    return PrintError(f"OrcaSlicer's {path} may not be run (a downloaded AppImage is saved that way): "
                              f"allow it (chmod +x '{path}', or Properties > Permissions) and try again.")


def _candidates(platform: str, env, home: Path):
    if platform == "darwin":
        for root in (Path("/Applications"), home / "Applications"):
            yield root / "OrcaSlicer.app", "macOS application"
    if platform.startswith("win"):
        for variable in ("ProgramFiles", "ProgramFiles(x86)", "ProgramW6432"):
            if env.get(variable):
                yield Path(env[variable]) / "OrcaSlicer" / "orca-slicer.exe", f"%{variable}%"
        if env.get("LOCALAPPDATA"):
            yield Path(env["LOCALAPPDATA"]) / "Programs" / "OrcaSlicer" / "orca-slicer.exe", "%LOCALAPPDATA%"
    for folder in (home / "Applications", home / "Downloads", home / ".local" / "bin", home / "bin",
                   Path("/opt"), Path("/opt/OrcaSlicer"), Path("/usr/local/bin")):
        if folder.is_dir():
            for appimage in sorted(folder.glob("*rca*licer*.AppImage"), reverse=True):  # newest version first
                yield appimage, f"AppImage in {folder}"
            yield folder / "squashfs-root" / "AppRun", f"extracted AppImage in {folder}"


def _flatpak(env, home: Path, which):
    flatpak = which("flatpak", path=env.get("PATH"))
    if not flatpak:
        return None
    for app_id in FLATPAK_IDS:
        for root in (home / ".local/share/flatpak/app", Path("/var/lib/flatpak/app")):
            if (root / app_id).is_dir():
                return OrcaSlicer([flatpak, "run", app_id], f"Flatpak {app_id}", flatpak=True)
    return None


def find_orcaslicer(configured: str = None, env=None, platform: str = None, home: Path = None,
                    which=shutil.which):
    """OrcaSlicer if installed anywhere usual (or at the configured path), else None."""
    env = os.environ if env is None else env
    platform = platform or sys.platform
    home = Path(home) if home else Path.home()
    configured = configured or env.get(SETTING_ENV)
    if configured:
        found = _from_path(Path(configured), "the configured path")
        if found is None and Path(configured).expanduser().is_file():
            raise _not_executable(Path(configured).expanduser())
        if found is None:
            raise OrcaSlicerNotFound(f"OrcaSlicer is not at the configured path {configured}: fix the path or "
                                     f"{DOWNLOAD_HINT}.")
        return found
    for name in EXECUTABLE_NAMES:
        executable = which(name, path=env.get("PATH"))
        if executable:
            return OrcaSlicer([executable], "PATH")
    not_runnable = None
    for path, found in _candidates(platform, env, home):
        orca = _from_path(path, found)
        if orca:
            return orca
        not_runnable = not_runnable or (path if path.is_file() else None)
    orca = _flatpak(env, home, which)
    if orca is None and not_runnable:
        raise _not_executable(not_runnable)
    return orca


def model_files(path) -> list:
    """The file to open for an export folder (its 3MF, else its STLs as one 3MF made beside them, else its
    one STL) or a given model file. One 3MF opens as one object with a part per segment, where the
    segments lie relative to each other; several STLs would each be centred on the bed on their own."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        threemf = sorted(path.glob("*.3mf"))
        from .export import MERGED_STEM  # here: export loads VTK and MRML, which `print` does without
        stls = sorted(p for p in path.glob("*.stl") if p.stem != MERGED_STEM)
        if threemf or len(stls) == 1:
            return (threemf or stls)[:1]
        if stls:
            return [_threemf_from_stls(path, stls)]
    raise PrintError(f"No 3MF or STL model in {path}: export first, then send the export folder.")


def _threemf_from_stls(folder: Path, stls: list) -> Path:
    """segments.3mf from an export's STLs, with the segments' names and colours from its report."""
    from .export import REPORT_NAME  # as in model_files

    try:
        report = json.loads((folder / REPORT_NAME).read_text())
    except (OSError, ValueError):
        report = {}
    known = {m["stl"]: m for m in report.get("meshes", []) if isinstance(m, dict) and "stl" in m}
    meshes = []
    for stl in stls:
        mesh = read_stl(stl)
        if mesh is None:
            raise PrintError(f"{stl} is no binary STL: send a 3MF or export the segmentation again.")
        entry = known.get(stl.name, {})
        meshes.append((entry.get("name", stl.stem), entry.get("color", UNKNOWN_COLOR), *mesh))
    target = folder / "segments.3mf"
    try:
        write_3mf(target, meshes, report.get("segmentation"))
    except OSError as error:
        raise PrintError(f"Cannot write {target} for OrcaSlicer ({error.strerror}): export with the 3MF format, "
                         "or send one STL file.") from None
    return target


def send_to_orcaslicer(path, configured: str = None, launcher=subprocess.Popen, **find_args):
    """Opens the models at path in OrcaSlicer without waiting for it (on macOS, for at most HAND_OVER_S); returns
    the launched command.

    find_args["env"], when given, is also OrcaSlicer's environment: inside Slicer, Slicer's startup
    environment, without the library paths Slicer's launcher adds for itself."""
    files = [f.resolve() for f in model_files(path)]
    orca = find_orcaslicer(configured, **find_args)
    if orca is None:
        raise OrcaSlicerNotFound(f"OrcaSlicer was not found: {DOWNLOAD_HINT}.")
    command = list(orca.command)
    if orca.flatpak:
        # The Flatpak sandbox sees only what it is given (it cannot read /tmp at all by default).
        command[2:2] = [f"--filesystem={folder}:ro" for folder in sorted({str(f.parent) for f in files})]
    command += [str(f) for f in files]
    if orca.handed_over:
        return _hand_over(command, orca, find_args.get("env"))
    detach = ({"creationflags": subprocess.DETACHED_PROCESS | subprocess.CREATE_NEW_PROCESS_GROUP}
              if sys.platform.startswith("win") else {"start_new_session": True})
    try:
        launcher(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                 close_fds=True, env=find_args.get("env"), **detach)
    except OSError as error:
        raise PrintError(f"OrcaSlicer ({orca.found}) could not be started ({error.strerror}): "
                         f"reinstall it, or {DOWNLOAD_HINT}.") from None
    return command


def _hand_over(command: list, orca: OrcaSlicer, env) -> list:
    """Runs macOS's open, which returns within a second once the app has the files: a damaged or refused app is
    said, not taken for opened. Slicer waits for it: a first launch that macOS checks longer goes on without us."""
    try:
        done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=HAND_OVER_S,
                              env=env)
    except subprocess.TimeoutExpired:  # LaunchServices goes on opening it: killing open stops nothing
        return command
    except OSError as error:
        raise PrintError(f"OrcaSlicer ({orca.found}) could not be opened ({error.strerror}): reinstall it, or "
                         f"{DOWNLOAD_HINT}.") from None
    if done.returncode:
        said = (done.stderr.strip().splitlines() or [f"status {done.returncode}"])[-1]
        raise PrintError(f"OrcaSlicer ({orca.found}) could not be opened ({said}): open it once from the Finder "
                         f"(macOS may ask to allow it), or reinstall it, or {DOWNLOAD_HINT}.")
    return command
