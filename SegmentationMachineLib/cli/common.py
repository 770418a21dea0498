"""What the commands share: progress bars, export options, signals that end a command as Ctrl-C does."""

import logging
import os
import signal
import sys
from pathlib import Path

from tqdm import tqdm

from ..core.errors import UserError

DEFAULT_OUT = Path.home() / "SegmentationMachine" / "Exports"  # = export.DEFAULT_EXPORT_FOLDER (a test checks)
STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")  # Ctrl-C, a service stop, a closed terminal

log = logging.getLogger("segmentation-machine")


class Progress:
    """A progress bar on stderr for one long step; none when stderr is not a terminal (logs, pipes, CI)."""

    def __init__(self, label: str, quiet: bool):
        self._bar = tqdm(desc=label, unit="", leave=False, disable=quiet or not sys.stderr.isatty(), file=sys.stderr)

    def __call__(self, done, total, item=""):
        self._bar.total = total
        self._bar.set_postfix_str(str(item)[:30], refresh=False)
        self._bar.update(done - self._bar.n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._bar.close()


def add_surface_options(parser):
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"parent of the new export folder (default {DEFAULT_OUT})")
    parser.add_argument("--format", default="stl,obj,3mf",
                        help="any of stl,obj,3mf,glb,seg (default stl,obj,3mf; glb: binary glTF in metres, +Y up; "
                             "seg: DICOM SEG, needs a DICOM input and segmentation-machine[hospital])")
    parser.add_argument("--smoothing", type=float, default=0.5, help="0 (none) to 1 (strong), default 0.5")
    parser.add_argument("--decimate", type=float, default=0.0, help="fraction of triangles to remove, 0 to 0.95")
    parser.add_argument("--method", choices=["flying_edges", "surface_nets"], default="flying_edges")
    parser.add_argument("--ras", action="store_true", help="write RAS coordinates instead of LPS")
    parser.add_argument("--merged-stl", action="store_true", help="also write all segments into merged.stl")
    parser.add_argument("--print", dest="send_to_printer", action="store_true", help="open the result in OrcaSlicer")
    parser.add_argument("--orcaslicer", help="path of OrcaSlicer, when it is not found by itself")


def parse_presets(text: str) -> list:
    from ..segment.presets import PRESETS

    presets = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown or not presets:
        raise UserError(f"Unknown preset '{','.join(unknown) or text}': choose from {', '.join(PRESETS)}.")
    return presets


def export_options(args):
    from ..mesh.export import ExportOptions, parse_formats
    from ..mesh.surfaces import SurfaceMethod, SurfaceOptions

    if not 0 <= args.smoothing <= 1 or not 0 <= args.decimate <= 0.95:
        raise UserError("--smoothing must be between 0 and 1 and --decimate between 0 and 0.95.")
    return ExportOptions(formats=parse_formats(args.format), coordinates="RAS" if args.ras else "LPS",
                         merged_stl=args.merged_stl,
                         surface=SurfaceOptions(SurfaceMethod(args.method), args.smoothing, args.decimate))


def report_export(args, result):
    from ..mesh.printing import send_to_orcaslicer

    print(f"Exported to {result.folder}")
    for line in result.summary_lines():
        print(f"  {line}")
    print(f"  files: {', '.join(p.name for p in result.files)}")
    if result.not_watertight:
        log.warning("Not watertight: %s; the printer's slicer may need to repair these meshes "
                    "(flying_edges with smoothing gives closed meshes).", ", ".join(result.not_watertight))
    if args.send_to_printer:
        send_to_orcaslicer(result.folder, args.orcaslicer)
        print("Opened in OrcaSlicer.")
    return result


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


def exit_status(received: list) -> int:
    return 128 + (received[-1] if received else signal.SIGINT)
