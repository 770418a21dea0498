"""`segmentation-machine watch`: every series dropped into a folder, one at a time, into a result folder."""

import logging
import math
import signal
from pathlib import Path

from ..core.errors import UserError
from .common import (STOP_SIGNALS, add_surface_options, command_record, examples, exit_status, export_options, log,
                     parse_presets, steps, stop_on_signals, writable_folder)


def add_watch_command(commands, common):
    watch = commands.add_parser("watch", parents=[common],
                                help="process every series dropped into INBOX, one at a time, into OUTBOX",
                                **examples("segmentation-machine watch ~/Inbox --out ~/Outbox --preset bone,skin",
                                           "segmentation-machine watch /mnt/share/ct --out ~/Outbox --polling --once"))
    watch.add_argument("inbox", type=Path, help="the folder series are dropped into (DICOM files, folders or zips)")
    add_queue_options(watch)
    watch.add_argument("--once", action="store_true", help="process what is there, then exit")
    watch.add_argument("--polling", action="store_true",
                       help="look every 2 s instead of relying on file events (network shares: without it, files that "
                            "other computers write there are seen within 10 s)")
    watch.set_defaults(run=run_watch)


def add_queue_options(parser):
    """What watch and listen share: where results go, how series are modelled, how long they settle."""
    add_surface_options(parser, queue=True)
    parser.add_argument("--preset", default="bone", help="bone, skin, or both as bone,skin (default bone)")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds a series' files must be unchanged (default 5)")
    parser.add_argument("--state", type=Path, help="journal and scratch folder (default OUTBOX/.segmentation-machine)")
    parser.add_argument("--hold", type=float, default=60.0,
                        help="seconds a series that looks incomplete waits for more files (default 60)")


def run_watch(args):
    from ..core.files import printable

    serve_inbox(args, args.inbox.expanduser(), f"Watching {printable(args.inbox.expanduser().resolve())}")


def state_folder(args) -> Path:
    from ..inbox.watcher import OUTBOX_STATE

    return args.state or args.out.expanduser().absolute() / OUTBOX_STATE


def serve_inbox(args, inbox_folder: Path, banner: str, service=None, modelled=lambda result: None,
                polled=lambda inbox: None):
    """The queue of watch and listen: every series that settles in inbox_folder, modelled once into args.out, until a
    signal. service (start(), stop()) feeds inbox_folder while the inbox is held; modelled(result) follows each model;
    polled(inbox) runs on the queue's loop after each poll (listen's retention)."""
    from ..core.files import printable
    from ..core.memory import said_when_out_of_memory
    from ..core.scene import create_headless_scene
    from ..dicom.series import is_quiet_skip, skipped_groups
    from ..dicom.volumes import input_record, load_series
    from ..inbox.watcher import Inbox, InboxOptions
    from ..inbox.watchqueue import run_queue
    from ..pipeline import model_volume
    from ..segment.masks import check_modality

    if not (0 <= args.settle < math.inf and 0 <= args.hold < math.inf):  # NaN or infinity: nothing would ever settle
        raise UserError("--settle and --hold are waiting times: give 0 or more seconds.")
    options = export_options(args)  # also checks that OUTBOX can be written
    presets = parse_presets(args.preset)
    outbox = args.out.expanduser().absolute()
    writable_folder(state_folder(args), "--state")
    inbox = Inbox(InboxOptions(folder=inbox_folder, state_folder=state_folder(args),
                               settle_seconds=args.settle, polling=args.polling, hold_seconds=args.hold))
    reported = set()

    def process(delivery, folder):
        ctx = create_headless_scene()  # a fresh scene per series: memory does not grow with the queue
        series = delivery.series
        check_modality(series.name, series.modality)  # an MR in the study is left aside, not modelled
        with said_when_out_of_memory(series.voxel_count):  # the queue goes on
            loaded = load_series(ctx, series)
        for note in loaded.notes:
            log.warning("%s", note)
        provenance = {"input": input_record(loaded, inbox_folder), "command": command_record(args)}
        result = model_volume(ctx, loaded.node, presets, folder, options, provenance=provenance)
        modelled(result)
        return result.folder

    def report_skipped():
        fresh = []
        for path, item in list(inbox.skipped.items()):
            if path not in reported and path not in inbox.seen_before:  # said once, not on every restart
                reported.add(path)
                fresh.append(item)
        # Many files left out of one series for one reason are one line; each file is named in the --log file.
        for sentence, items in skipped_groups(fresh):
            # reports and CD indexes belong in an export: listed in --log, not warned about
            log.log(logging.INFO if is_quiet_skip(items[0].reason) else logging.WARNING, "Skipped %s",
                    printable(sentence))
            for item in items if len(items) > 1 else ():
                steps.info("Skipped %s", printable(item))

    def after_poll():
        report_skipped()
        polled(inbox)

    def echo(line):
        report_skipped()
        print(printable(line), flush=True)  # series names come from the files' headers

    signals = stop_on_signals(STOP_SIGNALS)
    try:
        outbox.mkdir(parents=True, exist_ok=True)
        inbox.start()
        if service:
            service.start()
        print(f"{banner} → {printable(outbox)} (settle {args.settle:g} s; Ctrl-C stops)", flush=True)
        board = run_queue(inbox, outbox, process, once=args.once, echo=echo, polled=after_poll)
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
        if service:
            service.stop()
        inbox.stop()
    if board.failed_here:  # --once: a script or a scheduler learns that something needs a look
        log.error("%d series failed (reasons in %s).", len(board.failed_here), printable(board.path))
        raise SystemExit(1)
