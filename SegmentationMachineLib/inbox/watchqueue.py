"""The headless processing queue: every ready inbox series through the model pipeline, one at a time.

OUTBOX/status.json says where each series stands (waiting, processing, done, failed or skipped + reason) with
absolute paths; a series finished more than BOARD_DAYS ago leaves it (the journal keeps it). It is replaced whole
after every change (a new temporary name each time, owner-only: it names patients' series), so a reader never sees
half of it.

A delivery is one atomic step, whatever kills the process when (a power cut too): the result is written into
OUTBOX/.segmentation-machine-staging and flushed to disk, the journal commits it, then it is renamed into place. On
start the journal is the truth: a committed result still in staging is moved into place, status.json is corrected,
and any other staging (an interrupted export) is removed, so the series is processed again.
"""

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
from contextlib import suppress
from datetime import datetime
from pathlib import Path

from ..core.clock import local_time
from ..core.errors import UnsuitableImage, UserError
from ..core.files import (
    WINDOWS, empty_folder, printable, publish_folder, replace_private, reserved_folder, sync_tree, unreserve,
)
from .locks import hold_lock
from .watcher import Delivery, Inbox, SeriesState

log = logging.getLogger(__name__)

STATUS_NAME = "status.json"
# A series a full disk stopped (watch without --once) is tried again after this, the wait doubling to an hour while
# the disk has no more free space than at its failure (each try runs the whole pipeline).
DISK_RETRY_S = 60.0
DISK_RETRY_MAX_S = 3600.0
BOARD_STATES = {SeriesState.LOADED.value: "done", SeriesState.SKIPPED.value: "skipped"}  # journal's, else "failed"
STAGING = ".segmentation-machine-staging"  # results being written; removed at a start: a name only ours has
OLDER_STAGING = ".staging"  # where versions before 2026-11-27 staged them
# status.json is rewritten whole at every change: a watch running for months keeps it to recent series.
BOARD_DAYS = 30
FINISHED = ("done", "failed", "skipped")
# What status.json and the journal say of a failure that is not the user's: the error itself goes to the log only.
UNEXPECTED = ("an unexpected error stopped this series: the details are in the log of watch or listen (its terminal, "
              "or its --log file); please report it with them")
# How versions before 2026-11-28 began that sentence, the library's words after it: replaced where they remain.
OLDER_UNEXPECTED = "an unexpected error stopped this series ("


def _ours(reason: str) -> str:
    """reason as status.json may show it: an older version's unexpected error, its words dropped."""
    return UNEXPECTED if (reason or "").startswith(OLDER_UNEXPECTED) else reason or ""


class StatusBoard:
    def __init__(self, outbox: Path, inbox_folder: Path):
        self.path = Path(outbox).absolute() / STATUS_NAME
        self._inbox = str(Path(inbox_folder).absolute())
        self._series = {}
        self.failed_here = set()  # keys of the series that failed since this board was opened
        self.unsaved = False  # a change the full disk did not take
        if self.path.is_symlink():  # never ours, never followed: replaced by the board
            return
        try:  # a restart continues the same board; an empty one (a power cut's) is rebuilt from the journal
            text = self.path.read_text(encoding="utf-8")
            self._series = {s["key"]: {**s, "reason": _ours(s.get("reason"))}
                            for s in json.loads(text)["series"]} if text.strip() else {}
        except FileNotFoundError:
            pass
        except OSError as error:
            advice = "close the program that holds it" if WINDOWS else "check that you may read it"
            raise UserError(f"{printable(self.path)} cannot be read ({error.strerror or error}): {advice}, or choose "
                            "another outbox folder.") from None
        except (ValueError, KeyError, TypeError):  # replaced whole, ours is never half-written
            raise UserError(f"{printable(self.path)} is not watch's status file, and watch would replace it: choose "
                            "another outbox folder, or move that file away.") from None

    def get(self, key: str) -> dict:
        return self._series.get(key, {})

    def entries(self) -> list:
        return list(self._series.values())

    def set(self, key: str, name: str, files: int, state: str, reason: str = "", result: str = ""):
        entry = {"key": key, "name": name, "files": files, "state": state, "reason": reason,
                 "result": str(Path(result).absolute()) if result else "",
                 "updated": local_time()}
        if state == "failed":
            self.failed_here.add(key)
        else:
            self.failed_here.discard(key)
        if {k: v for k, v in self.get(key).items() if k != "updated"} == {k: v for k, v in entry.items() if k != "updated"}:
            return
        self._series[key] = entry
        self.save()

    @staticmethod
    def old(finished_at: float) -> bool:
        """A series finished at finished_at (epoch seconds) is too old for the board."""
        return finished_at < time.time() - BOARD_DAYS * 86400

    def _finished_long_ago(self, entry: dict) -> bool:
        try:
            return entry["state"] in FINISHED and self.old(datetime.fromisoformat(entry["updated"]).timestamp())
        except (KeyError, TypeError, ValueError):  # written by hand or by another program: kept
            return False

    def save(self):
        """Where the disk is full, the board is written again at the next change, or run_queue's next poll."""
        self._series = {key: entry for key, entry in self._series.items() if not self._finished_long_ago(entry)}
        try:
            replace_private(self.path, json.dumps({"inbox": self._inbox, "updated": local_time(),
                                                   "series": list(self._series.values())}, indent=2))
            self.unsaved = False
        except OSError as error:
            if not _disk_full(error):
                raise
            self.unsaved = True


def _staging_folder(outbox: Path, key: str, staging: str = STAGING) -> Path:
    return outbox / staging / hashlib.sha256(key.encode()).hexdigest()[:16]


def _remove(staging: Path):
    shutil.rmtree(staging, ignore_errors=True)
    with suppress(OSError):
        staging.parent.rmdir()  # the staging folder only while something is being written


def _reserve(made: Path, outbox: Path) -> Path:
    """A free name for made in outbox, held by an empty folder made there (mkdir, as exports name theirs): a name
    only looked at could be taken by a Slicer or `model` export in the same second, and the rename would then put
    this series' result under another run's folder. made is renamed inside staging to the name reserved."""
    result = reserved_folder(outbox, made.name)
    if result is None:
        raise UserError(f"Too many results named {made.name} in {printable(outbox)}: move some out of it.")
    try:
        if result.name != made.name:
            made.rename(made.with_name(result.name))
    except BaseException:
        unreserve(result)
        raise
    return result


def _commit(inbox: Inbox, delivery: Delivery, staged: Path, result: Path):
    sync_tree(staged)  # on disk before the journal says it is done (a power cut would leave empty files)
    inbox.acknowledge(delivery, True, delivery.remarks(), result=str(result))


def _disk_full(error: Exception) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT) or \
        isinstance(error, sqlite3.OperationalError) and "disk is full" in str(error)


def _disk_problem(error: OSError) -> str:
    if _disk_full(error):
        return "The disk is full: free some space, then restart watch to process this series again."
    return f"Cannot write the results ({error.strerror}): check the outbox folder."


def reconcile(inbox: Inbox, board: StatusBoard, outbox: Path):
    """After a crash: the journal is the truth; staging that the journal does not name is removed."""
    for entry in inbox.journal.deliveries():
        key, result = entry["series_key"], Path(entry["result"]) if entry["result"] else None
        # Committed only once complete: a staged folder the journal names is a whole result (also one an older
        # version staged under its name for staging)
        places = [_staging_folder(outbox, key, name) / result.name for name in (STAGING, OLDER_STAGING) if result]
        staged = next((place for place in places if place.is_dir()), None)
        if staged and (not result.exists() or empty_folder(result)):
            publish_folder(staged, result)  # committed, killed before the rename onto its reservation
        on_board = board.get(key).get("state")
        if on_board in ("processing", "waiting") or on_board is None and not board.old(entry["updated"] or 0):
            state = BOARD_STATES.get(entry["state"], "failed")
            board.set(key, entry["description"], entry["files"], state, _ours(entry["reason"]), entry["result"] or "")
    for entry in board.entries():
        if entry["state"] == "processing":  # killed before the commit: processed again
            board.set(entry["key"], entry["name"], entry["files"], "waiting", "interrupted; processed again")
    for staged in (outbox / STAGING).glob("*/*"):  # not committed: a kill after its name was reserved
        unreserve(outbox / staged.name)
    shutil.rmtree(outbox / STAGING, ignore_errors=True)
    older = outbox / OLDER_STAGING
    if older.is_dir() and all(re.fullmatch("[0-9a-f]{16}", p.name) for p in older.iterdir()):  # ours, not the user's
        shutil.rmtree(older, ignore_errors=True)


def _failure_reason(error: Exception, series_name: str) -> str:
    """The sentence status.json and the journal keep. Only ours: a library's words may quote a header value (pydicom
    and highdicom name the value they refuse, a patient's name or birth date), and those two are read by whoever uses
    the drop folder, and kept for good; the log (the operator's) gets the error itself."""
    if _disk_full(error) or isinstance(error, OSError) and error.strerror:  # the system's words, a file's name left out
        return _disk_problem(error)
    if isinstance(error, UserError):  # worded by us, never quoting a header value
        return str(error)
    # Not the user's mistake: remembered as failed (not retried on every restart) and said plainly.
    log.error("An unexpected error stopped series %s", series_name, exc_info=error)
    return UNEXPECTED


def deliver(inbox: Inbox, board: StatusBoard, delivery: Delivery, process, outbox: Path, echo,
            wait_for_space: bool = False) -> bool:
    """process(delivery, folder) writes one result folder into folder (staging) and returns it. A full disk is not
    the series' fault: with wait_for_space, True is returned (the caller hands the series back); else it fails."""
    series = delivery.series
    staging = _staging_folder(outbox, delivery.key)
    shutil.rmtree(staging, ignore_errors=True)
    board.set(delivery.key, series.name, len(series.files), "processing")
    echo(f"{series.name}: processing {len(series.files)} files" + (" (an update)" if delivery.is_update else ""))
    try:
        staging.mkdir(parents=True)
        result = _reserve(Path(process(delivery, staging)), outbox)
    except UnsuitableImage as error:  # an MR or a localizer in the study: left aside, nothing failed
        _remove(staging)
        inbox.acknowledge(delivery, False, str(error), skipped=True)
        board.set(delivery.key, series.name, len(series.files), "skipped", str(error))
        echo(f"{series.name}: skipped: {error}")
        return False
    except Exception as error:  # noqa: BLE001 — one series' failure, even our own bug, never stops the queue
        _remove(staging)
        if _disk_full(error) and wait_for_space:
            return True
        reason = _failure_reason(error, series.name)
        if not _disk_full(error):  # a full disk is not this series' fault: not remembered
            inbox.acknowledge(delivery, False, reason)
        board.set(delivery.key, series.name, len(series.files), "failed", reason)
        echo(f"{series.name}: failed: {reason}")
        return False
    except BaseException:
        _remove(staging)
        board.set(delivery.key, series.name, len(series.files), "waiting", "interrupted; processed again on restart")
        raise
    staged = staging / result.name
    try:
        _commit(inbox, delivery, staged, result)
    except BaseException:
        unreserve(result)  # reconcile publishes a result the journal took all the same
        raise
    publish_folder(staged, result)
    _remove(staging)
    echo(f"{series.name}: done → {printable(result)}" + (f" (looks incomplete: {delivery.incomplete})"
                                                           if delivery.incomplete else ""))
    board.set(delivery.key, series.name, len(series.files), "done", delivery.remarks(), result)
    return False


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


class _WaitingForSpace:
    """The series a full disk stopped, each handed back to the inbox: processed again once the outbox's disk has
    more free space than at its failure, looked at after DISK_RETRY_S, then after a wait doubling to an hour."""

    def __init__(self, inbox: Inbox, board: StatusBoard, outbox: Path, echo):
        self._inbox, self._board, self._outbox, self._echo = inbox, board, outbox, echo
        self._series = {}  # key -> (free bytes at its failure, its last wait)

    def still_full(self, delivery: Delivery) -> bool:
        """Handed back again, quietly, where the disk has no more space than when it failed."""
        if delivery.key not in self._series or _free_bytes(self._outbox) > self._series[delivery.key][0]:
            return False
        free, wait = self._series[delivery.key]
        self._series[delivery.key] = free, min(2 * wait, DISK_RETRY_MAX_S)
        return self._inbox.hand_back(delivery, self._series[delivery.key][1], self._reason)

    def full(self, delivery: Delivery) -> bool:
        """False where there is nothing to hand back: the journal took its result before the disk filled."""
        if not self._inbox.hand_back(delivery, DISK_RETRY_S, self._reason):
            return False
        self._series[delivery.key] = _free_bytes(self._outbox), DISK_RETRY_S
        self._echo(f"{delivery.series.name}: waiting: {self._reason}")
        self._board.set(delivery.key, delivery.series.name, len(delivery.series.files), "waiting", self._reason)
        return True

    def done(self, delivery: Delivery):
        self._series.pop(delivery.key, None)

    _reason = "the disk is full: free some space; it is processed again once there is more"


def run_queue(inbox: Inbox, outbox: Path, process, once: bool = False, echo=print,
              stop: threading.Event = None, tick: float = 0.5, polled=lambda: None):
    """Processes ready series until stopped (or, with once, until nothing is left to settle or process).

    process(delivery, folder) writes the result folder into folder and returns it; a UserError marks
    the series failed with its sentence. polled() is called after each poll (e.g. to report skipped
    files). One queue per outbox: a second one is refused, naming the first.
    """
    stop = stop or threading.Event()
    outbox = Path(outbox).absolute()
    outbox.mkdir(parents=True, exist_ok=True)
    lock = hold_lock(outbox / ".status.lock", f"The outbox {outbox}")
    try:
        inbox.journal.replace_reasons(OLDER_UNEXPECTED, UNEXPECTED)  # words an older version kept there
        board = StatusBoard(outbox, inbox.folder)
        space = _WaitingForSpace(inbox, board, outbox, echo)
        reconcile(inbox, board, outbox)
        board.failed_here.clear()  # what failed before a restart was said then
        board.save()  # from the start: a reader (or a monitor) finds the board before the first series
        while not stop.is_set():
            deliveries = _poll(inbox, echo)
            polled()
            if board.unsaved:
                board.save()
            for status in inbox.statuses():
                if status.state == SeriesState.WAITING and board.get(status.key).get("state") != "waiting":
                    board.set(status.key, status.name, status.files, "waiting", status.reason)
                    echo(f"{status.name}: " + (status.reason or "waiting for its files to settle"))
            while inbox.duplicates:
                copy = inbox.duplicates.pop(0)
                result = board.get(copy.key).get("result")
                echo(f"{copy.name}: {copy.files} file(s) {copy.reason}; not processed again"
                     + (f" (result: {printable(result)})" if result else "") + ".")
            for delivery in deliveries:
                if space.still_full(delivery):
                    continue
                try:
                    full = deliver(inbox, board, delivery, process, outbox, echo, wait_for_space=not once)
                except (OSError, sqlite3.OperationalError) as error:  # the journal's or status.json's disk
                    if not (_disk_full(error) and not once and space.full(delivery)):  # said; --once's status says it
                        board.failed_here.add(delivery.key)
                        echo(f"{delivery.series.name}: cannot record its result ({printable(error)}): check the "
                             "outbox and state folders and their free space, then run again to process it.")
                    continue
                if not (full and space.full(delivery)):
                    space.done(delivery)
            if once and not deliveries and not inbox.pending():
                return board
            stop.wait(tick)
        return board
    finally:
        os.close(lock)


def _poll(inbox: Inbox, echo) -> list:
    try:
        return inbox.poll()
    except (OSError, sqlite3.OperationalError) as error:  # e.g. the journal's disk is full
        echo(f"Cannot update the inbox journal ({printable(error)}): free some space; retrying.")
        return []

