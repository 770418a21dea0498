"""`segmentation-machine export`: a segmentation file → meshes."""

from pathlib import Path

from .common import Progress, add_surface_options, command_record, examples, export_options, report_export, steps


def add_export_command(commands, common):
    export = commands.add_parser("export", parents=[common], help="segmentation file → meshes",
                                 **examples("segmentation-machine export Segmentation.seg.nrrd --format stl,3mf",
                                            "segmentation-machine export labels.nii.gz --labels names.json --out ~/3d"))
    export.add_argument("segfile", type=Path, help=".seg.nrrd, a labelmap NIfTI/NRRD, or a DICOM SEG")
    export.add_argument("--volume", type=Path,
                        help="reference volume (sets the labelmap geometry; a DICOM series for --format seg)")
    export.add_argument("--labels", type=Path, help='JSON {"1": "liver", ...} naming labelmap values')
    add_surface_options(export)
    export.set_defaults(run=run_export)


def run_export(args):
    from ..core.scene import create_headless_scene
    from ..dicom.volumes import file_sha256, input_record, load_input
    from ..mesh.export import export_segmentation
    from ..segment.segmentations import load_segmentation, read_label_names

    options = export_options(args)
    ctx = create_headless_scene()
    reference = load_input(ctx, args.volume) if args.volume else None
    names = read_label_names(args.labels) if args.labels else None
    segmentation = load_segmentation(ctx, args.segfile, names, reference.node if reference else None)
    steps.info("Loaded %s: %d segment(s).", args.segfile, segmentation.GetSegmentation().GetNumberOfSegments())
    # The input is the segmentation file itself (so there is no --save-segmentation here), with its volume.
    source = {"path": str(Path(args.segfile).absolute()), "sha256": file_sha256(args.segfile),
              "volume": input_record(reference) if reference else None}
    with Progress("surfaces", args.quiet) as progress:
        result = export_segmentation(segmentation, args.out, options, progress=progress,
                                     provenance={"input": source, "command": command_record(args)})
    steps.info("Wrote %s in %s.", ", ".join(p.name for p in result.files), result.folder)
    report_export(args, result)
