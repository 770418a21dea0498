"""`segmentation-machine model`: a DICOM folder (or NIfTI/NRRD, or a series on a DICOMweb server)
→ preset or prompted segmentation → meshes (and, for DICOMweb, the DICOM SEG stored back)."""

import importlib.util
import math
import os
import shutil
import stat
import tempfile
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

from ..cloud.cloudgpu import recorded_pod_at
from ..cloud.keepalive import heartbeat_note, pod_heartbeat
from ..cloud.podstart import PodRecords
from ..core.errors import UserError, install_extra
from ..core.files import UMASK, printable
from .common import (Progress, add_surface_options, api_key, command_record, examples, export_options, log,
                     parse_presets, report_export, say, steps)

SCRATCH_AGE_S = 24 * 3600  # no run lasts a day: a scratch folder this old is a killed run's

def add_model_command(commands, common):
    model = commands.add_parser("model", parents=[common],
                                help="DICOM folder, NIfTI/NRRD or DICOMweb series → segmentation → meshes",
                                **examples("segmentation-machine model ~/scans/ct --preset bone,skin --format stl,3mf",
                                           "segmentation-machine model study.zip --list",
                                           "segmentation-machine model ct.nii.gz --server URL --prompts liver.json",
                                           "segmentation-machine model dicomweb+https://pacs/dicom-web --study UID "
                                           "--store-seg"))
    model.add_argument("input", nargs="?",
                       help="DICOM folder, DICOM file, NIfTI/NRRD volume, or a DICOMweb server as "
                            "dicomweb+https://HOST/dicom-web (with --study; credentials from SM_DICOMWEB_TOKEN, or "
                            "SM_DICOMWEB_USER and SM_DICOMWEB_PASSWORD, or the keychain); none: a CT phantom")
    model.add_argument("--preset", help="bone, skin, or both as bone,skin (default bone, none with --prompts)")
    model.add_argument("--series", help="series to use: its number in --list or its SeriesInstanceUID")
    model.add_argument("--study", help="StudyInstanceUID of the study on the DICOMweb server")
    model.add_argument("--store-seg", action="store_true",
                       help="DICOMweb: store the DICOM SEG in the study on the same server (STOW-RS; needs "
                            "segmentation-machine[hospital])")
    model.add_argument("--server", help="nnInteractive server URL, to replay --prompts through")
    model.add_argument("--prompts", type=Path, help="prompt file (JSON, RAS mm) saved from the module")
    model.add_argument("--api-key-env", default="SM_NNI_API_KEY",
                       help="environment variable holding the server's API key (default SM_NNI_API_KEY)")
    model.add_argument("--list", action="store_true", help="list the series found and exit")
    model.add_argument("--save-segmentation", action="store_true",
                       help="also write the segmentation as NAME.seg.nrrd (Slicer's format) beside the meshes")
    add_surface_options(model)
    model.set_defaults(run=run_model)


def _input_or_phantom(args) -> Path:
    from ..dicom.phantom import write_phantom

    if args.input is not None:
        return Path(args.input)
    folder = args.out.expanduser() / "phantom-ct-dicom"
    if not any(folder.glob("*.dcm")):
        # Written beside it, then renamed whole: a run stopped half-way, or a second run at that moment, would
        # have used a phantom short of slices (and kept using it).
        folder.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=".phantom-ct-dicom-", dir=folder.parent))
        try:
            write_phantom(partial)
            os.chmod(partial, 0o777 & ~UMASK)  # mkdtemp's is the owner's alone
            try:
                os.rename(partial, folder)
            except OSError:
                if not any(folder.glob("*.dcm")):  # not another run's whole phantom
                    raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    print(f"No input given: using the CT phantom written as DICOM in {folder}")
    return folder


def _dicomweb(args):
    """The DICOMweb connection when the input is a dicomweb+ address; None for files and folders."""
    from ..core.addresses import is_dicomweb

    if not is_dicomweb(args.input):
        if args.study or args.store_seg:
            raise UserError("--study and --store-seg are for a DICOMweb input: give the server as "
                            "dicomweb+https://HOST/dicom-web.")
        return None
    try:
        from ..pacs.dicomweb import DicomWeb, DicomWebServer, credentials
    except ImportError:  # requests, which a bare install lacks (Slicer bundles it)
        raise UserError(f"DICOMweb needs the PACS extra: {install_extra('pacs')}.") from None
    server = DicomWebServer.parse(args.input)
    if not args.study:
        raise UserError(f"Give the study to fetch from {server.url} with --study StudyInstanceUID.")
    if args.store_seg and importlib.util.find_spec("highdicom") is None:
        raise UserError(f"--store-seg writes a DICOM SEG, which needs highdicom: {install_extra('hospital')}.")
    return DicomWeb(server, credentials(server))


def _scratch(kind: str, cleanup: ExitStack) -> Path:
    """A private temporary folder for patient data (a DICOMweb download, a zip's files) that lives until the command
    ends. Those of runs killed before their end (out of memory, kill -9) are removed once a day old."""
    prefix = f"segmentation-machine-{kind}-"
    for old in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        try:
            info = old.lstat()
            ours = info.st_uid == getattr(os, "getuid", lambda: info.st_uid)()  # Windows: a temp folder per user
            if stat.S_ISDIR(info.st_mode) and ours and time.time() - info.st_mtime > SCRATCH_AGE_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
    return Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))


def _fetch(web, args, cleanup: ExitStack) -> Path:
    """The chosen series of --study, in a private temporary folder that lives until the command ends."""
    series = web.choose_series(args.study, args.series)
    folder = _scratch("dicomweb", cleanup)
    with Progress("retrieving", args.quiet) as progress:
        paths = web.retrieve(args.study, series, folder, progress)
    print(printable(f"Retrieved {series.summary()} from {web.server.url}: {len(paths)} file(s)"))
    return folder


def _unzipped(source: Path, cleanup: ExitStack) -> Path:
    """A zip archive is read as watch reads one: unpacked, within the same limits, into a private temporary
    folder that lives until the command ends; anything else is returned as it is."""
    from ..dicom.archives import extract_zip, is_zip

    try:
        with open(source, "rb") as stream:
            if not is_zip(stream.read(4)):
                return source
    except OSError:  # a folder, or nothing there: the scan says what it is
        return source
    scratch = _scratch("zip", cleanup)
    extraction = extract_zip(source, scratch / "unpacked")
    for member, reason in extraction.refused:
        if member != "*":
            log.warning("Skipped %s in %s: %s", member, source.name, reason)
    if not extraction.files:
        reason = extraction.refused[0][1] if extraction.refused else "it holds no files"
        raise UserError(f"Nothing could be unpacked from {source}: {reason}; check the archive.")
    print(printable(f"Unpacked {len(extraction.files)} file(s) from {source}"))
    return extraction.folder


def _store_seg(web, result):
    from ..mesh.dicomseg import SEG_FILE
    from ..pacs.dicomweb import kept

    path = result.folder / SEG_FILE
    try:
        stored = web.store(path)
    except UserError as error:
        raise kept(error, path) from None
    header = stored.dataset
    print(f"Stored the DICOM SEG (series {header.SeriesInstanceUID}, {len(header.SegmentSequence)} segment(s)) "
          f"in study {header.StudyInstanceUID} on {web.server.url}")
    if stored.unconfirmed:
        log.warning("%s", stored.unconfirmed)


def _warn_if_too_big(voxels: int):
    from ..core.memory import memory_warning

    warning = memory_warning(voxels)
    if warning:
        log.warning("%s", warning)


def run_model(args):
    with ExitStack() as cleanup:  # a series fetched from a DICOMweb server is kept until its SEG is stored
        _run_model(args, cleanup)


def _run_model(args, cleanup: ExitStack):
    from ..core.scene import create_headless_scene
    from ..dicom.series import choose_series, is_volume_file, scan_folder
    from ..dicom.volumes import input_record, load_input
    from ..pipeline import model_volume, segment_with_prompts
    from ..prompts.promptfile import load_prompt_file
    from ..prompts.session import InteractiveSession
    from ..segment.masks import FOR_OTHER_IMAGES, check_modality

    web = _dicomweb(args)
    options = replace(export_options(args), save_segmentation=args.save_segmentation)  # fails before the work
    if args.store_seg and "seg" not in options.formats:
        options = replace(options, formats=(*options.formats, "seg"))
    if bool(args.server) != bool(args.prompts):
        raise UserError("--server and --prompts go together: give the server URL and the prompt file.")
    presets = [] if args.prompts and not args.preset else parse_presets("bone" if args.preset is None else args.preset)
    prompt_segments = load_prompt_file(args.prompts) if args.prompts else None
    pod = recorded_pod_at(PodRecords(), args.server) if args.server else None  # a pod started here
    key = api_key(args.api_key_env, pod) if args.server else None
    if web and args.list:
        for number, series in enumerate(web.series(args.study), 1):
            print(printable(f"{number}. {series.summary()}"))  # headers and names are anyone's text
        return
    source = _fetch(web, args, cleanup) if web else _unzipped(_input_or_phantom(args), cleanup)
    if args.series and source.is_file() and is_volume_file(source):
        raise UserError(f"--series does not apply to {source.name}: a NIfTI/NRRD file holds one volume; "
                        "leave --series out.")
    scan = None
    if source.is_dir() or args.list:
        with Progress("scanning", args.quiet) as progress:
            scan = scan_folder(source, progress)
        steps.info("Scanned %s: %d series, %d volume file(s), %d file(s) skipped.", source, len(scan.series),
                   len(scan.volume_files), len(scan.skipped))
        for skipped in scan.skipped:  # the console's warning says many files of one series and reason in one line
            steps.info("Skipped %s", printable(skipped))
    if args.list:
        for number, series in enumerate(scan.series, 1):
            print(printable(f"{number}. {series.summary()}"))  # headers and file names are anyone's text
        for path in scan.volume_files:
            print(printable(f"-  volume file {path}"))
        for skipped in scan.skipped:
            print(printable(f"skipped {skipped}"))
        if not scan.series and not scan.volume_files:
            print(printable(f"No DICOM image series in {source}."))
        return
    chosen = choose_series(scan, args.series) if scan and scan.series else None
    if chosen:  # before reading a voxel; a volume file's size is known once it is read
        if presets:
            check_modality(chosen.name, chosen.modality, "leave --preset out, and the prompts alone segment it"
                           if prompt_segments else FOR_OTHER_IMAGES)
        _warn_if_too_big(chosen.voxel_count)
    ctx = create_headless_scene()
    with Progress("loading", args.quiet) as progress:
        loaded = load_input(ctx, source, args.series, scan, progress)
    for note in loaded.notes:
        log.warning(note)
    dimensions = loaded.node.GetImageData().GetDimensions()
    if not chosen:
        _warn_if_too_big(math.prod(dimensions))
    print(printable(f"Loaded {loaded.source}: {'x'.join(map(str, dimensions))} voxels"))  # a description: anyone's
    steps.info("Loaded %s from %s: %s voxels of %s mm.", loaded.source, source, "x".join(map(str, dimensions)),
               "x".join(f"{v:.4g}" for v in loaded.node.GetSpacing()))
    with Progress("hashing", args.quiet) as progress:
        provenance = {"input": input_record(loaded, args.input or source, progress), "command": command_record(args)}
    segmentation = None
    if prompt_segments:
        session = InteractiveSession(args.server, key, status=log.warning)
        caps = session.connect()
        print(f"Connected to {args.server} (nnInteractive {caps.server_version}, prompts {caps.describe()}, "
              f"model licence: {caps.licence})")
        heartbeat = pod_heartbeat(args.server, key, PodRecords())  # a pod's server, whoever started the pod
        if heartbeat:
            heartbeat.start()
        try:
            segmentation = segment_with_prompts(ctx, loaded.node, prompt_segments, session, say)
        finally:
            session.close()
            if heartbeat:
                heartbeat.stop()
            if note := heartbeat_note(heartbeat):  # the pod ends soon, or ignored the heartbeats
                log.warning("%s", note)
    with Progress("presets", args.quiet) as preset_progress, Progress("surfaces", args.quiet) as progress:
        result = model_volume(ctx, loaded.node, presets, args.out, options, progress, say, segmentation,
                              provenance, preset_progress)
    report_export(args, result)
    if args.store_seg:
        _store_seg(web, result)
