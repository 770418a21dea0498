"""`segmentation-machine model`: a DICOM folder (or NIfTI/NRRD) → preset or prompted segmentation → meshes."""

from pathlib import Path

from ..cloud.cloudgpu import recorded_pod_at
from ..cloud.heartbeat import Heartbeat
from ..cloud.podstart import PodRecords
from ..core.errors import UserError
from .common import Progress, add_surface_options, api_key, export_options, log, parse_presets, report_export


def add_model_command(commands, common):
    model = commands.add_parser("model", parents=[common], help="DICOM folder (or NIfTI/NRRD) → preset segmentation → meshes")
    model.add_argument("input", nargs="?", type=Path,
                       help="DICOM folder, DICOM file, or NIfTI/NRRD volume; none: a CT phantom written as DICOM")
    model.add_argument("--preset", help="bone, skin, or both as bone,skin (default bone, none with --prompts)")
    model.add_argument("--series", help="series to use: its number in --list or its SeriesInstanceUID")
    model.add_argument("--server", help="nnInteractive server URL, to replay --prompts through")
    model.add_argument("--prompts", type=Path, help="prompt file (JSON, RAS mm) saved from the module")
    model.add_argument("--api-key-env", default="SM_NNI_API_KEY",
                       help="environment variable holding the server's API key (default SM_NNI_API_KEY)")
    model.add_argument("--list", action="store_true", help="list the series found and exit")
    add_surface_options(model)
    model.set_defaults(run=run_model)


def _input_or_phantom(args) -> Path:
    from ..dicom.phantom import write_phantom

    if args.input is not None:
        return args.input
    folder = args.out.expanduser() / "phantom-ct-dicom"
    if not any(folder.glob("*.dcm")):
        write_phantom(folder)
    print(f"No input given: using the CT phantom written as DICOM in {folder}")
    return folder


def run_model(args):
    from ..core.scene import create_headless_scene
    from ..dicom.series import scan_folder
    from ..dicom.volumes import load_input
    from ..pipeline import model_volume, segment_with_prompts
    from ..prompts.promptfile import load_prompt_file
    from ..prompts.session import InteractiveSession

    options = export_options(args)  # a bad option fails before minutes of work, not after
    if bool(args.server) != bool(args.prompts):
        raise UserError("--server and --prompts go together: give the server URL and the prompt file.")
    presets = [] if args.prompts and not args.preset else parse_presets(args.preset or "bone")
    prompt_segments = load_prompt_file(args.prompts) if args.prompts else None
    pod = recorded_pod_at(PodRecords(), args.server) if args.server else None  # a pod started here
    key = api_key(args.api_key_env, pod) if args.server else None
    source = _input_or_phantom(args)
    scan = None
    if source.is_dir() or args.list:
        with Progress("scanning", args.quiet) as progress:
            scan = scan_folder(source, progress)
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
    if prompt_segments:
        session = InteractiveSession(args.server, key, status=log.warning)
        caps = session.connect()
        print(f"Connected to {args.server} (nnInteractive {caps.server_version}, prompts {caps.describe()}, "
              f"model licence: {caps.licence})")
        heartbeat = Heartbeat(pod.agent_url, pod.secrets["SM_HEARTBEAT_TOKEN"]).start() if pod else None
        try:
            segmentation = segment_with_prompts(ctx, loaded.node, prompt_segments, session, print)
        finally:
            session.close()
            if heartbeat:
                heartbeat.stop()
    with Progress("surfaces", args.quiet) as progress:
        result = model_volume(ctx, loaded.node, presets, args.out, options, progress, print, segmentation)
    report_export(args, result)
