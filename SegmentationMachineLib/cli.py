"""segmentation-machine: the DICOM → segmentation → printable meshes pipeline, without a GUI.

A user's mistake ends in one line on stderr (and in the log) and exit status 2, never a traceback.
"""

import argparse
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from . import __version__
from .dicomseries import scan_folder
from .errors import UserError
from .export import DEFAULT_EXPORT_FOLDER as DEFAULT_OUT
from .export import ExportOptions, export_segmentation, parse_formats
from .phantom import write_phantom
from .presets import PRESETS, apply_preset
from .printing import send_to_orcaslicer
from .scene import create_headless_scene
from .segmentations import load_segmentation, read_label_names
from .surfaces import SurfaceMethod, SurfaceOptions
from .volumes import load_input

log = logging.getLogger("segmentation-machine")


class _Progress:
    """A progress bar on stderr for one long step; none when stderr is not a terminal (logs, pipes, CI)."""

    def __init__(self, label: str, quiet: bool):
        self._bar = tqdm(desc=label, unit="", leave=False, disable=quiet or not sys.stderr.isatty(), file=sys.stderr)

    def __call__(self, done, total, item=""):
        self._bar.total = total
        self._bar.set_postfix_str(str(item)[:30], refresh=False)
        self._bar.update(done - self._bar.n)

    def close(self):
        self._bar.close()


def _surface_args(parser):
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"parent of the new export folder (default {DEFAULT_OUT})")
    parser.add_argument("--format", default="stl,obj,3mf", help="any of stl,obj,3mf (default all)")
    parser.add_argument("--smoothing", type=float, default=0.5, help="0 (none) to 1 (strong), default 0.5")
    parser.add_argument("--decimate", type=float, default=0.0, help="fraction of triangles to remove, 0 to 0.95")
    parser.add_argument("--method", choices=["flying_edges", "surface_nets"], default="flying_edges")
    parser.add_argument("--ras", action="store_true", help="write RAS coordinates instead of LPS")
    parser.add_argument("--merged-stl", action="store_true", help="also write all segments into merged.stl")
    parser.add_argument("--print", dest="send_to_printer", action="store_true", help="open the result in OrcaSlicer")
    parser.add_argument("--orcaslicer", help="path of OrcaSlicer, when it is not found by itself")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segmentation-machine", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    common.add_argument("--log", type=Path, help="also append the log to this file")
    commands = parser.add_subparsers(dest="command", required=True)

    model = commands.add_parser("model", parents=[common], help="DICOM folder (or NIfTI/NRRD) → preset segmentation → meshes")
    model.add_argument("input", nargs="?", type=Path,
                       help="DICOM folder, DICOM file, or NIfTI/NRRD volume; none: a CT phantom written as DICOM")
    model.add_argument("--preset", default="bone", help="bone, skin, or both as bone,skin (default bone)")
    model.add_argument("--series", help="series to use: its number in --list or its SeriesInstanceUID")
    model.add_argument("--list", action="store_true", help="list the series found and exit")
    _surface_args(model)

    export = commands.add_parser("export", parents=[common], help="segmentation file → meshes")
    export.add_argument("segfile", type=Path, help=".seg.nrrd, or a labelmap NIfTI/NRRD")
    export.add_argument("--volume", type=Path, help="reference volume (sets the labelmap geometry)")
    export.add_argument("--labels", type=Path, help='JSON {"1": "liver", ...} naming labelmap values')
    _surface_args(export)

    send = commands.add_parser("print", parents=[common], help="open an export folder or model file in OrcaSlicer")
    send.add_argument("path", type=Path)
    send.add_argument("--orcaslicer", help="path of OrcaSlicer, when it is not found by itself")
    return parser


def _export_options(args):
    if not 0 <= args.smoothing <= 1 or not 0 <= args.decimate <= 0.95:
        raise UserError("--smoothing must be between 0 and 1 and --decimate between 0 and 0.95.")
    return ExportOptions(formats=parse_formats(args.format), coordinates="RAS" if args.ras else "LPS",
                         merged_stl=args.merged_stl,
                         surface=SurfaceOptions(SurfaceMethod(args.method), args.smoothing, args.decimate))


def _export_and_report(args, options, segmentation_node):
    progress = _Progress("surfaces", args.quiet)
    try:
        result = export_segmentation(segmentation_node, args.out, options, progress=progress)
    finally:
        progress.close()
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


def _input_or_phantom(args) -> Path:
    if args.input is not None:
        return args.input
    folder = args.out.expanduser() / "phantom-ct-dicom"
    if not any(folder.glob("*.dcm")):
        write_phantom(folder)
    print(f"No input given: using the CT phantom written as DICOM in {folder}")
    return folder


def run_model(args):
    options = _export_options(args)  # a bad option fails before minutes of work, not after
    presets = [p.strip() for p in args.preset.split(",") if p.strip()]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown or not presets:
        raise UserError(f"Unknown preset '{','.join(unknown) or args.preset}': choose from {', '.join(PRESETS)}.")
    source = _input_or_phantom(args)
    scan = None
    if source.is_dir() or args.list:
        progress = _Progress("scanning", args.quiet)
        try:
            scan = scan_folder(source, progress)
        finally:
            progress.close()
    if args.list:
        for number, series in enumerate(scan.series, 1):
            print(f"{number}. {series.summary()}")
        for path in scan.volume_files:
            print(f"-  volume file {path}")
        for skipped in scan.skipped:
            print(f"skipped {skipped}")
        if not scan.series and not scan.volume_files:
            print(f"No DICOM image series in {source}.")
        return
    ctx = create_headless_scene()
    loaded = load_input(ctx, source, args.series, scan)
    for note in loaded.notes:
        log.warning(note)
    print(f"Loaded {loaded.source}: {'x'.join(map(str, loaded.node.GetImageData().GetDimensions()))} voxels")
    segmentation = None
    for name in presets:
        segmentation = apply_preset(ctx, loaded.node, name, segmentation)
        print(f"Segmented with preset '{name}'")
    _export_and_report(args, options, segmentation)


def run_export(args):
    options = _export_options(args)
    ctx = create_headless_scene()
    reference = load_input(ctx, args.volume).node if args.volume else None
    names = read_label_names(args.labels) if args.labels else None
    _export_and_report(args, options, load_segmentation(ctx, args.segfile, names, reference))


def run_print(args):
    command = send_to_orcaslicer(args.path, args.orcaslicer)
    print(f"Opened in OrcaSlicer: {' '.join(command)}")


def _configure_logging(log_file: Path = None):
    handlers = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=logging.INFO, format="segmentation-machine: %(levelname)s: %(message)s",
                        handlers=handlers, force=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.log)
    commands = {"model": run_model, "export": run_export, "print": run_print}
    try:
        commands[args.command](args)
    except UserError as error:
        log.error("%s", error)
        return 2
    except KeyboardInterrupt:
        log.error("Interrupted: nothing was overwritten; an export folder without report.json is incomplete.")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
