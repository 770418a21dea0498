"""`segmentation-machine export`: a segmentation file → meshes."""

from pathlib import Path

from .common import Progress, add_surface_options, export_options, report_export


def add_export_command(commands, common):
    export = commands.add_parser("export", parents=[common], help="segmentation file → meshes")
    export.add_argument("segfile", type=Path, help=".seg.nrrd, a labelmap NIfTI/NRRD, or a DICOM SEG")
    export.add_argument("--volume", type=Path,
                        help="reference volume (sets the labelmap geometry; a DICOM series for --format seg)")
    export.add_argument("--labels", type=Path, help='JSON {"1": "liver", ...} naming labelmap values')
    add_surface_options(export)
    export.set_defaults(run=run_export)


def run_export(args):
    from ..core.scene import create_headless_scene
    from ..dicom.volumes import load_input
    from ..mesh.export import export_segmentation
    from ..segment.segmentations import load_segmentation, read_label_names

    options = export_options(args)
    ctx = create_headless_scene()
    reference = load_input(ctx, args.volume).node if args.volume else None
    names = read_label_names(args.labels) if args.labels else None
    segmentation = load_segmentation(ctx, args.segfile, names, reference)
    with Progress("surfaces", args.quiet) as progress:
        report_export(args, export_segmentation(segmentation, args.out, options, progress=progress))
