"""What the commands share: progress bars, export options, signals that end a command as Ctrl-C does."""

import argparse
import errno
import logging
import os
import signal
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from ..core.errors import UserError
from ..core.files import printable

DEFAULT_OUT = Path.home() / "SegmentationMachine" / "Exports"  # = export.DEFAULT_EXPORT_FOLDER (a test checks)
STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")  # Ctrl-C, a service stop, a closed terminal

log = logging.getLogger("segmentation-machine")
# Each step of a run (scan, load, preset, mesh, files), at INFO: kept in the --log file, not shown on the console.
steps = logging.getLogger("segmentation-machine.steps")
SECRET_WORDS = ("key", "token", "password", "secret")  # options never recorded, should one ever hold a secret


class Progress:
    """A progress bar on stderr for one long step; none when stderr is not a terminal (logs, pipes, CI)."""

    def __init__(self, label: str, quiet: bool):
        self._bar = tqdm(desc=label, unit="", leave=False, disable=quiet or not sys.stderr.isatty(), file=sys.stderr)

    def __call__(self, done, total, item=""):
        if self._bar.total is None or done == 0 < self._bar.n:  # a start: its clock starts now, not at the bar's making
            self._bar.reset(total=total)
        self._bar.total = total
        self._bar.set_postfix_str(str(item)[:30], refresh=False)
        if done > self._bar.n:
            self._bar.update(done - self._bar.n)
        else:  # tqdm draws only on progress: a new step that starts at 0 would be shown as the last one's end
            self._bar.n = done
            self._bar.refresh()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._bar.close()


def say(line: str):
    """A line on stdout around the progress bars on screen: tqdm takes them away, prints, and draws them again."""
    tqdm.write(str(line), file=sys.stdout)


def examples(*lines: str) -> dict:
    """add_parser() arguments that end a command's help with examples, laid out as written."""
    return {"epilog": "example" + ("s" if len(lines) > 1 else "") + ":\n" + "\n".join(f"  {line}" for line in lines),
            "formatter_class": argparse.RawDescriptionHelpFormatter}


def add_surface_options(parser, queue: bool = False):
    """The export options of model and export; queue (watch, listen): --out is the required OUTBOX and
    nothing is opened on screen."""
    if queue:
        parser.add_argument("--out", type=Path, required=True, help="OUTBOX: a result folder per series and status.json")
    else:
        parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                            help=f"parent of the new export folder (default {DEFAULT_OUT})")
    parser.add_argument("--format", default="stl,obj,3mf",
                        help="any of stl,obj,3mf,glb,seg (default stl,obj,3mf; glb: binary glTF in metres, +Y up; "
                             "seg: DICOM SEG, needs a DICOM input and segmentation-machine[hospital])")
    parser.add_argument("--smoothing", type=float, default=0.5, help="0 (none) to 1 (strong), default 0.5")
    parser.add_argument("--decimate", type=float, default=0.0, help="fraction of triangles to remove, 0 to 0.95")
    parser.add_argument("--method", choices=["flying_edges", "surface_nets"], default="flying_edges",
                        help="surface algorithm: flying_edges (default, watertight) or surface_nets (fewer, more even "
                             "triangles)")
    parser.add_argument("--ras", action="store_true", help="write RAS coordinates instead of LPS")
    parser.add_argument("--merged-stl", action="store_true", help="also write all segments into merged.stl")
    if not queue:
        parser.add_argument("--print", dest="send_to_printer", action="store_true",
                            help="open the result in OrcaSlicer")
        parser.add_argument("--orcaslicer", help="path of OrcaSlicer, when it is not found by itself")


def parse_presets(text: str) -> list:
    from ..segment.masks import PRESETS

    presets = list(dict.fromkeys(p.strip().lower() for p in text.split(",") if p.strip()))  # bone,bone: one
    unknown = [p for p in presets if p not in PRESETS]
    if unknown or not presets:
        raise UserError(f"Unknown preset '{','.join(unknown) or text}': choose from {', '.join(PRESETS)}.")
    return presets


def export_options(args):
    """The export options, checked before any work: a bad value or an output folder that cannot be written
    fails now, not after minutes of segmentation."""
    from ..mesh.export import ExportOptions, parse_formats
    from ..mesh.surfaces import SurfaceMethod, SurfaceOptions

    if not 0 <= args.smoothing <= 1 or not 0 <= args.decimate <= 0.95:
        raise UserError("--smoothing must be between 0 and 1 and --decimate between 0 and 0.95.")
    options = ExportOptions(formats=parse_formats(args.format), coordinates="RAS" if args.ras else "LPS",
                            merged_stl=args.merged_stl,
                            surface=SurfaceOptions(SurfaceMethod(args.method), args.smoothing, args.decimate))
    if not getattr(args, "list", False):  # --list writes nothing
        writable_folder(args.out)
        if getattr(args, "send_to_printer", False):
            ready_to_print(args, options.formats)
    return options


def ready_to_print(args, formats):
    """--print's needs, before the work: a model OrcaSlicer opens, and OrcaSlicer."""
    from ..mesh.printing import DOWNLOAD_HINT, OrcaSlicerNotFound, find_orcaslicer

    if not {"stl", "3mf"} & set(formats):
        raise UserError("--print opens the export's 3MF or STL in OrcaSlicer: add 3mf or stl to --format.")
    if find_orcaslicer(args.orcaslicer) is None:
        raise OrcaSlicerNotFound(f"OrcaSlicer was not found: {DOWNLOAD_HINT}.")


def writable_folder(folder: Path, option: str = "--out") -> Path:
    """folder, once a file could be made in it or, while it does not exist, in the folder it would be made in
    (nothing is left behind; the only test that also holds for root, read-only mounts and full disks)."""
    folder = Path(folder).expanduser().absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == p.parent)
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UserError(f"Cannot write in {printable(folder)} ({error.strerror or error}): choose a folder you can "
                        f"write to with {option}.") from None
    return folder


def report_export(args, result):
    from ..mesh.printing import send_to_orcaslicer

    print(printable(f"Exported to {result.folder}"))
    for line in result.summary_lines():
        print(printable(f"  {line}"))  # segment names: anyone's text
    print(printable(f"  files: {', '.join(p.name for p in result.files)}"))
    if result.not_watertight:
        log.warning("Not watertight: %s; the printer's slicer may need to repair these meshes "
                    "(flying_edges with smoothing gives closed meshes).", ", ".join(result.not_watertight))
    for warning in result.warnings:
        log.warning("%s", warning)
    if args.send_to_printer:
        send_to_orcaslicer(result.folder, args.orcaslicer)
        print("Opened in OrcaSlicer.")
    return result


def command_record(args) -> dict:
    """The command and its options for report.json: every option as given, none that could hold a secret
    (keys come from the environment, never the command line; the variable's name is no secret)."""
    options = {name: (str(value) if isinstance(value, Path) else value) for name, value in vars(args).items()
               if name not in ("run", "command") and (name.endswith("_env") or not any(w in name for w in SECRET_WORDS))}
    return {"name": args.command, "options": options}


def api_key(variable: str, pod=None) -> str:
    key = os.environ.get(variable) or (pod.secrets["SM_NNI_API_KEY"] if pod else None)
    if not key:
        raise UserError(f"Set the server's API key in the environment variable {variable} "
                        "(keys are never taken on the command line, where other users could see them).")
    return key


def stop_on_signals(names) -> list:
    """Each of these signals ends the command as Ctrl-C does (KeyboardInterrupt); returns the list of the
    signals received, for the exit status."""
    received = []

    def interrupted(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    for name in names:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), interrupted)
    return received


@contextmanager
def signals_held(names=("SIGINT", "SIGTERM")):
    """Main thread: these signals, arriving inside, act at its end. A child started inside is then known to the
    code that stops it: a Ctrl-C between Popen's return and the assignment of its result would leave it running.
    A held signal whose handler was the system's default (which ends the process at once) ends it as Ctrl-C does,
    so the caller's cleanup still runs."""
    held, previous = [], {}
    try:
        for name in names:
            if hasattr(signal, name):
                number = getattr(signal, name)
                previous[number] = signal.signal(number, lambda signum, frame: held.append(signum))
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        handler = previous[held[0]] if held else signal.SIG_IGN
        if handler in (signal.SIG_DFL, None):
            raise KeyboardInterrupt
        if handler != signal.SIG_IGN:
            signal.raise_signal(held[0])  # to the handler it would have met: Ctrl-C's KeyboardInterrupt, or ours


def exit_status(received: list) -> int:
    return 128 + (received[-1] if received else signal.SIGINT)
