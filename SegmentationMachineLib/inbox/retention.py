"""Series that `listen` received are removed once the queue is finished with them and they have been quiet a while.

The journal is the judge, so a sweep right after a restart knows as much as a long-running one: a file is
finished when the journal read this very file (path, size, modification time) and either delivered its content
(modelled, or failed with a reason that status.json keeps) or found it is no image (skipped and reported). A
series folder goes only when every file in it is finished and nothing in it changed for the kept days; whatever
is arriving, settling, held or being modelled stays. Only the study/series folders the DICOM node writes are
looked at: anything else in the inbox, and anything outside it, is left alone.
"""

import contextlib
import logging
import os
import sqlite3
import stat
import time
from pathlib import Path

from ..core.errors import UserError
from ..dicom.archives import size_text
from .watcher import SeriesState

log = logging.getLogger("segmentation-machine")

DAY_S = 86400.0
SWEEP_EVERY_S = 3600.0
FINISHED = (SeriesState.LOADED, SeriesState.ERROR, SeriesState.SKIPPED)


class Retention:
    """lock (a context manager) is held while a sweep looks and removes: the writer of the inbox takes it around
    each new file, so that no file arrives in a folder that is being removed."""

    def __init__(self, keep_days: float, lock=None, clock=time.time, timer=time.monotonic):
        if not keep_days >= 0:  # NaN too
            raise UserError(f"--keep-received {keep_days:g} is not a number of days to keep received series: give 0 "
                            "or more (0 removes a series' received files as soon as it is modelled).")
        self.keep_days = keep_days
        self._lock = lock or contextlib.nullcontext()
        self._clock, self._timer = clock, timer  # wall time (files' ages), and the sweep schedule
        self._next_sweep = None
        self._seen = None

    def tick(self, inbox):
        """On the queue's loop after each poll: sweeps at the first call and then hourly; with 0 days also as soon
        as the queue finished a series or the inbox settled (a series sent again is known at once)."""
        now = self._timer()
        seen = (sum(s.state in FINISHED for s in inbox.statuses()), inbox.pending())
        changed, self._seen = seen != self._seen, seen
        if self._next_sweep is None or now >= self._next_sweep or (self.keep_days == 0 and changed):
            self._next_sweep = now + SWEEP_EVERY_S
            try:
                self.sweep(inbox)
            except (OSError, sqlite3.Error) as error:  # e.g. the journal's disk is full: the queue goes on
                log.warning("Could not remove old received series (%s); trying again in an hour.", error)

    def sweep(self, inbox) -> tuple:
        """Removes the finished series folders quiet for the kept days: (how many, bytes)."""
        delivered = inbox.journal.delivered_hashes()
        cutoff = self._clock() - self.keep_days * DAY_S
        count = size = 0
        for study in _subfolders(inbox.folder):
            removed = False
            for series in _subfolders(study):
                with self._lock:  # one series at a time: instances arriving meanwhile wait only that long
                    files = _finished_files(series, inbox.journal, delivered, cutoff)
                    if files is not None:
                        size += _remove(series, files, inbox.journal)
                        count, removed = count + 1, True
            if removed:
                with self._lock, contextlib.suppress(OSError):
                    study.rmdir()  # only when empty
        if count:
            log.info("Removed %d received series (%s) modelled more than %g days ago.", count, size_text(size),
                     self.keep_days)
        return count, size


def _subfolders(folder: Path) -> list:
    """Real folders in folder (never a link), not hidden; none when it cannot be listed."""
    try:
        with os.scandir(folder) as entries:
            return [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")]
    except OSError:
        return []


def _finished_files(series: Path, journal, delivered: set, cutoff: float):
    """{path: size} when every file in series is finished and nothing changed since cutoff, else None."""
    try:
        newest, files = os.lstat(series).st_mtime, {}
        with os.scandir(series) as entries:
            for entry in entries:
                info = entry.stat(follow_symlinks=False)
                if not stat.S_ISREG(info.st_mode):
                    return None  # not something the node writes: left alone, and so is its folder
                newest = max(newest, info.st_mtime)
                files[Path(entry.path)] = info
    except OSError:
        return None
    if newest > cutoff:
        return None
    for path, info in files.items():
        known = journal.known_file(path, info.st_size, info.st_mtime_ns)
        if known is None:
            return None  # not read yet (arriving, settling) or changed since
        sha256, item, _ = known
        if item is not None and sha256 not in delivered:
            return None  # an image not delivered: waiting, held or being modelled
    return {path: info.st_size for path, info in files.items()}


def _remove(series: Path, files: dict, journal) -> int:
    """Removes files and then their folder; bytes removed. A file that appeared meanwhile keeps the folder."""
    removed = 0
    for path, size in files.items():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += size
    journal.forget_files(files)
    with contextlib.suppress(OSError):
        series.rmdir()
    return removed
