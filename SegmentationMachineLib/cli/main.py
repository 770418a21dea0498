"""segmentation-machine: the DICOM → segmentation → printable meshes pipeline, without a GUI.

A user's mistake ends in one line on stderr (and in the log) and exit status 2, never a traceback.
"""

import argparse
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

from .. import __version__
from ..cloud.cloudgpu import recorded_pod_at
from ..cloud.heartbeat import Heartbeat
from ..cloud.podstart import PodRecords
from ..core.errors import UserError
from .pod import add_pod_commands, run_pod

# The pipeline's modules (VTK, MRML, pydicom) take seconds to import: the commands that need them
# import them, so `pod ...`, `--help` and bad arguments answer at once.
DEFAULT_OUT = Path.home() / "SegmentationMachine" / "Exports"  # = export.DEFAULT_EXPORT_FOLDER (a test checks)

log = logging.getLogger("segmentation-machine")


class _Progress:
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


def _surface_args(parser):
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
    model.add_argument("--preset", help="bone, skin, or both as bone,skin (default bone, none with --prompts)")
    model.add_argument("--series", help="series to use: its number in --list or its SeriesInstanceUID")
    model.add_argument("--server", help="nnInteractive server URL, to replay --prompts through")
    model.add_argument("--prompts", type=Path, help="prompt file (JSON, RAS mm) saved from the module")
    model.add_argument("--api-key-env", default="SM_NNI_API_KEY",
                       help="environment variable holding the server's API key (default SM_NNI_API_KEY)")
    model.add_argument("--list", action="store_true", help="list the series found and exit")
    _surface_args(model)

    export = commands.add_parser("export", parents=[common], help="segmentation file → meshes")
    export.add_argument("segfile", type=Path, help=".seg.nrrd, a labelmap NIfTI/NRRD, or a DICOM SEG")
    export.add_argument("--volume", type=Path,
                        help="reference volume (sets the labelmap geometry; a DICOM series for --format seg)")
    export.add_argument("--labels", type=Path, help='JSON {"1": "liver", ...} naming labelmap values')
    _surface_args(export)

    watch = commands.add_parser("watch", parents=[common],
                                help="process every series dropped into INBOX, one at a time, into OUTBOX")
    watch.add_argument("inbox", type=Path)
    watch.add_argument("--out", type=Path, required=True, help="OUTBOX: a result folder per series and status.json")
    watch.add_argument("--preset", default="bone", help="bone, skin, or both as bone,skin (default bone)")
    watch.add_argument("--format", default="stl,obj,3mf", help="any of stl,obj,3mf,glb,seg (default stl,obj,3mf)")
    watch.add_argument("--once", action="store_true", help="process what is there, then exit")
    watch.add_argument("--settle", type=float, default=5.0, help="seconds a series' files must be unchanged (default 5)")
    watch.add_argument("--polling", action="store_true", help="poll instead of file events (network shares)")
    watch.add_argument("--state", type=Path, help="journal and scratch folder (default OUTBOX/.segmentation-machine)")
    watch.add_argument("--hold", type=float, default=60.0,
                       help="seconds a series that looks incomplete waits for more files (default 60)")

    serve = commands.add_parser("server", parents=[common],
                                help="run the upstream nnInteractive server (GPU workstation or pod)")
    serve.add_argument("--model-dir", type=Path, help="a model folder (else the official weights, downloaded once)")
    serve.add_argument("--fold", default="0", help="fold of --model-dir (default 0)")
    serve.add_argument("--model", help="official model id (default: upstream's default model)")
    serve.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when a GPU is present")
    serve.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1; 0.0.0.0 in the pod image")
    serve.add_argument("--port", type=int, default=1527)
    serve.add_argument("--max-sessions", type=int, help="concurrent sessions (upstream default 3)")

    add_pod_commands(commands, common)

    send = commands.add_parser("print", parents=[common], help="open an export folder or model file in OrcaSlicer")
    send.add_argument("path", type=Path)
    send.add_argument("--orcaslicer", help="path of OrcaSlicer, when it is not found by itself")
    return parser


def _presets(text: str) -> list:
    from ..segment.presets import PRESETS

    presets = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown or not presets:
        raise UserError(f"Unknown preset '{','.join(unknown) or text}': choose from {', '.join(PRESETS)}.")
    return presets


def _export_options(args):
    from ..mesh.export import ExportOptions, parse_formats
    from ..mesh.surfaces import SurfaceMethod, SurfaceOptions

    if not 0 <= args.smoothing <= 1 or not 0 <= args.decimate <= 0.95:
        raise UserError("--smoothing must be between 0 and 1 and --decimate between 0 and 0.95.")
    return ExportOptions(formats=parse_formats(args.format), coordinates="RAS" if args.ras else "LPS",
                         merged_stl=args.merged_stl,
                         surface=SurfaceOptions(SurfaceMethod(args.method), args.smoothing, args.decimate))


def _report(args, result):
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

    options = _export_options(args)  # a bad option fails before minutes of work, not after
    if bool(args.server) != bool(args.prompts):
        raise UserError("--server and --prompts go together: give the server URL and the prompt file.")
    presets = [] if args.prompts and not args.preset else _presets(args.preset or "bone")
    prompt_segments = load_prompt_file(args.prompts) if args.prompts else None
    pod = recorded_pod_at(PodRecords(), args.server) if args.server else None  # a pod started here
    api_key = _api_key(args.api_key_env, pod) if args.server else None
    source = _input_or_phantom(args)
    scan = None
    if source.is_dir() or args.list:
        with _Progress("scanning", args.quiet) as progress:
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
        session = InteractiveSession(args.server, api_key, status=log.warning)
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
    with _Progress("surfaces", args.quiet) as progress:
        result = model_volume(ctx, loaded.node, presets, args.out, options, progress, print, segmentation)
    _report(args, result)


def _api_key(variable: str, pod=None) -> str:
    key = os.environ.get(variable) or (pod.secrets["SM_NNI_API_KEY"] if pod else None)
    if not key:
        raise UserError(f"Set the server's API key in the environment variable {variable} "
                        "(keys are never taken on the command line, where other users could see them).")
    return key


def run_server(args):
    executable = shutil.which("nninteractive-server", path=os.pathsep.join(
        [str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if executable is None:
        raise UserError("The nnInteractive server is not installed: pip install 'segmentation-machine[server]' "
                        "(on a GPU machine, install a CUDA build of torch first).")
    key = os.environ.get("SM_NNI_API_KEY")
    if not key:
        key = secrets.token_urlsafe(32)
        print(f"API key (shown once; clients need it): {key}", flush=True)
    device = args.device or _default_device()
    command = [executable, "--host", args.host, "--port", str(args.port), "--device", device]
    if args.model_dir:
        command += ["--model-dir", str(args.model_dir), "--fold", str(args.fold)]
    elif args.model:
        command += ["--model", args.model]
    if args.max_sessions:
        command += ["--max-sessions", str(args.max_sessions)]
    if device == "cpu":
        command += ["--torch-n-threads", str(os.cpu_count() or 1)]
    print(f"nnInteractive server on http://{args.host}:{args.port} ({device}); Ctrl-C stops it.", flush=True)
    # The key goes by environment, never on the command line where `ps` shows it to every user.
    process = subprocess.Popen(command, env={**os.environ, "NN_INTERACTIVE_API_KEY": key}, stdin=subprocess.DEVNULL)
    _stop_on_signals(("SIGTERM",))
    try:
        process.wait()
    except KeyboardInterrupt:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:  # it ignores TERM while a prediction runs
            process.kill()
    if process.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL, None):
        raise UserError(f"The nnInteractive server stopped with status {process.returncode}: see its messages above.")


def _default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def run_export(args):
    from ..core.scene import create_headless_scene
    from ..dicom.volumes import load_input
    from ..mesh.export import export_segmentation
    from ..segment.segmentations import load_segmentation, read_label_names

    options = _export_options(args)
    ctx = create_headless_scene()
    reference = load_input(ctx, args.volume).node if args.volume else None
    names = read_label_names(args.labels) if args.labels else None
    segmentation = load_segmentation(ctx, args.segfile, names, reference)
    with _Progress("surfaces", args.quiet) as progress:
        _report(args, export_segmentation(segmentation, args.out, options, progress=progress))


def run_watch(args):
    from ..core.files import printable
    from ..core.scene import create_headless_scene
    from ..dicom.volumes import load_series
    from ..inbox.watcher import Inbox, InboxOptions
    from ..inbox.watchqueue import run_queue
    from ..mesh.export import ExportOptions, parse_formats
    from ..pipeline import model_volume

    options = ExportOptions(formats=parse_formats(args.format))
    presets = _presets(args.preset)
    outbox = args.out.expanduser().absolute()
    inbox = Inbox(InboxOptions(folder=args.inbox.expanduser(), state_folder=args.state or outbox / ".segmentation-machine",
                               settle_seconds=args.settle, polling=args.polling, hold_seconds=args.hold))
    reported = set()

    def process(delivery, folder):
        ctx = create_headless_scene()  # a fresh scene per series: memory does not grow with the queue
        loaded = load_series(ctx, delivery.series)
        for note in loaded.notes:
            log.warning("%s", note)
        return model_volume(ctx, loaded.node, presets, folder, options).folder

    def report_skipped():
        for path, reason in list(inbox.bad_files.items()):
            if path not in reported:
                reported.add(path)
                log.warning("Skipped %s: %s", path, reason)

    def echo(line):
        report_skipped()
        print(printable(line), flush=True)  # series names come from the files' headers

    signals = _stop_on_signals(STOP_SIGNALS)
    try:
        outbox.mkdir(parents=True, exist_ok=True)
        inbox.start()
        print(f"Watching {printable(inbox.folder)} → {printable(outbox)} (settle {args.settle:g} s; Ctrl-C stops)",
              flush=True)
        run_queue(inbox, outbox, process, once=args.once, echo=echo, polled=report_skipped)
    except KeyboardInterrupt:
        for name in STOP_SIGNALS:
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), signal.SIG_IGN)  # a second signal must not cut the clean-up short
        print("Stopped; run the same command again to continue where it stopped.", flush=True)
        raise SystemExit(_exit_status(signals)) from None
    except OSError as error:
        raise UserError(f"Cannot use {printable(error.filename or outbox)} ({error.strerror}): "
                        "check the folder and the free space.") from None
    finally:
        inbox.stop()


STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")  # Ctrl-C, a service stop, a closed terminal


def _stop_on_signals(names) -> list:
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


def _exit_status(received: list) -> int:
    return 128 + (received[-1] if received else signal.SIGINT)


def run_print(args):
    from ..mesh.printing import send_to_orcaslicer

    command = send_to_orcaslicer(args.path, args.orcaslicer)
    print(f"Opened in OrcaSlicer: {' '.join(command)}")


def _printable_record(record: logging.LogRecord) -> bool:
    """Paths and servers' messages in a log line, with control characters escaped: no forged lines."""
    from ..core.files import printable

    record.msg, record.args = printable(record.getMessage()), ()
    return True


def _configure_logging(log_file: Path = None):
    handlers = [logging.StreamHandler(sys.stderr)]
    if log_file:  # owner-only: the log names patients' series and files
        descriptor = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.chmod(log_file, 0o600)  # also when it existed before
        handlers.append(logging.StreamHandler(os.fdopen(descriptor, "a")))
    for handler in handlers:
        handler.addFilter(_printable_record)
    logging.basicConfig(level=logging.INFO, format="segmentation-machine: %(levelname)s: %(message)s",
                        handlers=handlers, force=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.log)
    commands = {"model": run_model, "export": run_export, "watch": run_watch, "server": run_server,
                "print": run_print, "pod": run_pod}
    # model and export end on a closed terminal or a service stop as on Ctrl-C; watch and server set their own.
    signals = _stop_on_signals(STOP_SIGNALS) if args.command in ("model", "export") else []
    try:
        commands[args.command](args)
    except UserError as error:
        log.error("%s", error)
        return 2
    except KeyboardInterrupt:
        log.error("Interrupted: nothing was overwritten, and no incomplete export was left behind.")
        return _exit_status(signals)
    except OSError as error:  # a full disk, a folder taken away: the files of this run are removed
        log.error("Could not write %s (%s): free some space or choose another folder with --out, then run "
                  "again.", error.filename or "the output", error.strerror or error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
