"""`segmentation-machine watch`: every series dropped into a folder, one at a time, into a result folder."""

import signal
from pathlib import Path

from ..core.errors import UserError
from .common import STOP_SIGNALS, exit_status, log, parse_presets, stop_on_signals


def add_watch_command(commands, common):
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
    watch.set_defaults(run=run_watch)


def run_watch(args):
    from ..core.files import printable
    from ..core.scene import create_headless_scene
    from ..dicom.volumes import load_series
    from ..inbox.watcher import Inbox, InboxOptions
    from ..inbox.watchqueue import run_queue
    from ..mesh.export import ExportOptions, parse_formats
    from ..pipeline import model_volume

    options = ExportOptions(formats=parse_formats(args.format))
    presets = parse_presets(args.preset)
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

    signals = stop_on_signals(STOP_SIGNALS)
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
        raise SystemExit(exit_status(signals)) from None
    except OSError as error:
        raise UserError(f"Cannot use {printable(error.filename or outbox)} ({error.strerror}): "
                        "check the folder and the free space.") from None
    finally:
        inbox.stop()
