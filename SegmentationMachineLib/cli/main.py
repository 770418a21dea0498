"""segmentation-machine: the DICOM → segmentation → printable meshes pipeline, without a GUI.

A user's mistake ends in one line on stderr (and in the log) and exit status 2, never a traceback.
Each command lives in its own module; the pipeline's modules (VTK, MRML, pydicom) take seconds to
import, so commands import them when they run, and `pod ...`, `--help` and bad arguments answer at once.
"""

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from .. import __version__
from ..core.clock import local_time
from ..core.errors import UserError
from ..core.files import PRIVATE_FILE
from ..core.memory import out_of_memory
from .common import STOP_SIGNALS, examples, exit_status, log, steps, stop_on_signals
from .export import add_export_command
from .listen import add_listen_command
from .model import add_model_command
from .pod import add_pod_commands
from .server import add_server_command
from .watch import add_watch_command


LINE_FORMAT = "segmentation-machine: %(levelname)s: %(message)s"


class _StampedFormatter(logging.Formatter):
    def formatTime(self, record, datefmt=None):
        return local_time(record.created)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segmentation-machine", description=__doc__.splitlines()[0],
                                     **examples("segmentation-machine model ~/scans/ct --preset bone",
                                                "segmentation-machine COMMAND --help"))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    common.add_argument("--log", type=Path, help="also append the log to this file")
    commands = parser.add_subparsers(dest="command", required=True)
    for add_command in (add_model_command, add_export_command, add_watch_command, add_listen_command,
                        add_server_command, add_pod_commands, _add_print_command):
        add_command(commands, common)
    return parser


def _add_print_command(commands, common):
    send = commands.add_parser("print", parents=[common], help="open an export folder or model file in OrcaSlicer",
                               **examples("segmentation-machine print ~/SegmentationMachine/Exports/CT_20260101-1200"))
    send.add_argument("path", type=Path, help="an export folder (its 3MF, else its STLs) or one model file")
    send.add_argument("--orcaslicer", help="path of OrcaSlicer, when it is not found by itself")
    send.set_defaults(run=_run_print)


def _run_print(args):
    from ..mesh.printing import send_to_orcaslicer

    command = send_to_orcaslicer(args.path, args.orcaslicer)
    print(f"Opened in OrcaSlicer: {' '.join(command)}")


def _printable_record(record: logging.LogRecord) -> bool:
    """Paths and servers' messages in a log line, with control characters escaped: no forged lines."""
    from ..core.files import printable

    record.msg, record.args = printable(record.getMessage()), ()
    return True


class _AroundProgressBars(logging.Handler):
    """The terminal's log lines on stderr (whichever it is now), around the progress bars on screen (tqdm takes
    them away, writes, draws them again): printed under a bar, a line was glued to it."""

    def emit(self, record):
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - as logging's own handlers: a line that cannot be written is no crash
            self.handleError(record)


def _configure_logging(log_file: Path = None):
    handlers = [_AroundProgressBars()]
    if log_file:  # owner-only: the log names patients' series and files
        # O_BINARY: Windows' text mode would end lines in CR CR LF (Python already writes its CR LF)
        descriptor = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_BINARY", 0),
                             PRIVATE_FILE)
        os.chmod(log_file, PRIVATE_FILE)  # also when it existed before
        handlers.append(logging.StreamHandler(os.fdopen(descriptor, "a", encoding="utf-8", errors="backslashreplace")))
        handlers[-1].setFormatter(_StampedFormatter(f"%(asctime)s {LINE_FORMAT}"))  # weeks of watch: when
    for handler in handlers:
        handler.addFilter(_printable_record)
        # pydicom's and highdicom's remarks on a file's odd values (a one-part patient name, a cut file): our
        # sentences say what matters. A filter, not the logger's level: importing pydicom sets that to WARNING.
        handler.addFilter(lambda record: record.levelno >= logging.ERROR or not record.name.startswith("pydicom"))
    handlers[0].addFilter(lambda record: not record.name.startswith(steps.name))  # steps: the --log file only
    # Third parties' INFO lines (httpx's requests, NumExpr's threads) are noise to the user: only warnings pass.
    logging.basicConfig(level=logging.WARNING, format=LINE_FORMAT, handlers=handlers, force=True)
    log.setLevel(logging.INFO)
    # pynetdicom's errors come as several lines, some with tracebacks: the DICOM node writes one sentence for each.
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(pydicom|highdicom)(\.|$)")


def main(argv=None) -> int:
    # A name or a '→' the terminal's encoding lacks is escaped, never a crash: Windows writes cp1252 (strictly)
    # wherever the output is redirected, and a locale may be ASCII.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    _configure_logging(args.log)
    # model and export end on a closed terminal or a service stop as on Ctrl-C; watch and server set their own.
    signals = stop_on_signals(STOP_SIGNALS) if args.command in ("model", "export") else []
    try:
        args.run(args)
    except UserError as error:
        log.error("%s", error)
        return 2
    except MemoryError:  # where the scan's size is known, the pipeline says it (pipeline.model_volume)
        log.error("%s", out_of_memory())
        return 2
    except KeyboardInterrupt:
        log.error("Interrupted: nothing was overwritten, and no incomplete export was left behind.")
        return exit_status(signals)
    except OSError as error:  # a full disk, a folder taken away: the files of this run are removed
        log.error("Could not write %s (%s): free some space or choose another folder with --out, then run "
                  "again.", error.filename or "the output", error.strerror or error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
