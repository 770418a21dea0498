"""A watched folder whose uploads become series, each delivered once, and nothing of the user's touched.

File events (watchdog; where events are unavailable, e.g. network shares, or watchdog is not installed,
as in a stock 3D Slicer, polling of the folders' modification times) only mark paths to look at; poll() does the work on the caller's thread. A file is read once it has
not changed for the settle time; a series is delivered when its files are read and nothing in
its folders is still changing. The journal remembers what was delivered across restarts, by
content, so a re-upload is not delivered again and a series that gains files is delivered again
as an update.
"""

import hashlib
import os
import threading
import time
import zipfile
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from ..core.errors import UserError
from ..dicom.archives import ArchiveLimits, extract_zip
from ..dicom.series import DicomSeries, build_series, read_slice
from .journal import Journal

DEFAULT_INBOX = Path.home() / "SegmentationMachine" / "Inbox"
# A file is read once it has been quiet this long; its series still waits for the settle time.
READ_AFTER_S = 0.5
# Folders with recent changes are re-listed this often (a safety net for missed file events).
RESCAN_EVERY_S = 1.0
ARCHIVE = "a zip archive (its contents are read from the scratch folder)"


class InboxError(UserError):
    """The inbox folder cannot be watched."""


class SeriesState(str, Enum):
    WAITING = "waiting"  # files still arriving or settling
    READY = "ready"  # handed to the consumer, not yet acknowledged
    LOADED = "loaded"  # acknowledged: loaded or processed
    ERROR = "error"  # acknowledged as failed, with a reason


@dataclass(frozen=True)
class InboxOptions:
    folder: Path
    state_folder: Path  # journal and scratch area; never inside the user's files
    settle_seconds: float = 5.0
    polling: bool = False  # look at folders' modification times instead of file events
    poll_interval: float = 2.0  # how often polling looks (polling mode only)
    archive_limits: ArchiveLimits = ArchiveLimits()


@dataclass
class Delivery:
    key: str
    series: DicomSeries
    hashes: frozenset
    is_update: bool  # the series was delivered before with fewer files


@dataclass
class SeriesStatus:
    key: str
    name: str
    files: int
    state: SeriesState
    reason: str = ""


@dataclass
class _File:
    size: int
    mtime_ns: int
    changed_at: float
    read: bool = False
    sha256: str = None
    slice: object = None  # DicomSlice
    reason: str = None


def _file_events(folder: Path, dirty: set, lock: threading.Lock):
    """A started watchdog observer adding changed paths to dirty; None without watchdog."""
    try:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
    except ImportError:
        return None

    class Events(FileSystemEventHandler):
        def on_any_event(self, event):
            if event.event_type in ("opened", "closed_no_write"):
                return
            with lock:
                dirty.add(os.fsdecode(event.src_path))
                if getattr(event, "dest_path", ""):
                    dirty.add(os.fsdecode(event.dest_path))

    observer = Observer()
    observer.schedule(Events(), str(folder), recursive=True)
    try:
        observer.start()
    except OSError as error:  # e.g. inotify watch limit reached
        raise InboxError(f"Cannot watch {folder} ({error.strerror}): use polling (--polling) instead.") from None
    return observer


class Inbox:
    def __init__(self, options: InboxOptions, clock=time.monotonic):
        self.options = options
        self._clock = clock
        self._files = {}  # Path -> _File
        self._unread = set()  # paths not read since they last changed
        self._recent = {}  # path -> when it changed, while within the settle time
        self._changed = False  # readiness is recomputed only after something changed
        self._dirty = set()
        self._active = {}  # folder -> when a file in it last changed: re-listed until quiet
        self._folders = {}  # folder -> modification time, for polling mode
        self._last_folder_poll = None
        self._last_rescan = None
        self._lock = threading.Lock()
        self._observer = None
        self.polling = options.polling  # also without watchdog
        self._handed_out = {}  # series key -> hashes handed out and not yet acknowledged
        self._states = {}  # series key -> SeriesStatus
        self.bad_files = {}  # Path -> reason, for every file that is not part of a series
        self.scratch = Path(options.state_folder) / "extracted"
        self.journal = None
        self._delivered = set()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self):
        folder = Path(self.options.folder).expanduser()
        if not folder.is_dir():
            raise InboxError(f"The inbox folder {folder} does not exist: create it or choose another folder.")
        state = Path(self.options.state_folder).expanduser().resolve()
        if state == folder.resolve() or folder.resolve() in state.parents:
            raise InboxError(f"The state folder {state} is inside the inbox: choose one outside {folder}.")
        self.journal = Journal(state / "journal.sqlite")
        self._delivered = self.journal.delivered_hashes()
        if not self.options.polling:
            self._observer = _file_events(folder, self._dirty, self._lock)
        self.polling = self._observer is None
        with self._lock:
            self._dirty.add(str(folder))  # the first poll reads what is already there

    def stop(self):
        if self._observer:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
        if self.journal:
            self.journal.close()
            self.journal = None

    # -- the work, on the caller's thread ----------------------------------------------------
    def poll(self) -> list:
        """Looks at what changed; returns the series that became ready (each handed out once)."""
        now = self._clock()
        with self._lock:  # drained in place: the event handler holds this same set
            dirty = set(self._dirty)
            self._dirty.clear()
        # Events can miss files created before a new subfolder's watch exists: folders with
        # recent changes are listed again on every poll until they have been quiet a while.
        if self._last_rescan is None or now - self._last_rescan >= RESCAN_EVERY_S:
            self._last_rescan = now
            for folder, changed in list(self._active.items()):
                if now - changed > 2 * self.options.settle_seconds:
                    del self._active[folder]
                else:
                    dirty.add(str(folder))
        if self.polling:
            dirty |= self._changed_folders(now)
        for path in sorted(dirty):
            self._refresh(Path(path), now)
        for path in sorted(self._unread):
            record = self._files[path]
            if now - record.changed_at >= min(READ_AFTER_S, self.options.settle_seconds):
                self._read(path, record, now)
        for path, changed in list(self._recent.items()):
            if now - changed >= self.options.settle_seconds:
                del self._recent[path]
                self._changed = True  # a folder may have settled: its series may be ready now
        if self.journal:
            self.journal.commit()
        if not self._changed:
            return []  # idle: nothing to look at (a large, quiet inbox costs nothing)
        self._changed = False
        return self._ready_series()

    def pending(self) -> bool:
        """True while some file has not settled yet or events are waiting to be looked at."""
        with self._lock:
            if self._dirty:
                return True
        return bool(self._unread) or bool(self._recent)

    def acknowledge(self, delivery: Delivery, ok: bool, reason: str = "", result: str = ""):
        """The consumer finished a delivery (loaded/processed, or failed with reason): never again."""
        state = SeriesState.LOADED if ok else SeriesState.ERROR
        self.journal.record_delivery(delivery.key, delivery.series.uid, delivery.series.name, delivery.hashes,
                                     state.value, reason, result)
        self._delivered |= delivery.hashes
        self._handed_out.pop(delivery.key, None)
        self._changed = True
        self._states[delivery.key] = SeriesStatus(delivery.key, delivery.series.name, len(delivery.series.files),
                                                  state, reason)

    def statuses(self) -> list:
        return list(self._states.values())

    # -- internals -------------------------------------------------------------------------
    def _changed_folders(self, now: float) -> set:
        """Polling mode: a folder's modification time changes when files appear in or leave it,
        so statting the folders (not the files) each interval finds new uploads cheaply."""
        if self._last_folder_poll is not None and now - self._last_folder_poll < self.options.poll_interval:
            return set()
        self._last_folder_poll = now
        changed = set()
        for folder, mtime_ns in list(self._folders.items()):
            try:
                current = folder.stat().st_mtime_ns
            except OSError:
                current = None
                del self._folders[folder]
            if current != mtime_ns:
                changed.add(str(folder))
        return changed

    def _refresh(self, path: Path, now: float):
        if path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                try:
                    self._folders[Path(root)] = os.stat(root).st_mtime_ns
                except OSError:
                    continue
                for name in names:
                    if not name.startswith("."):
                        self._refresh_file(Path(root) / name, now)
        elif path.is_file():
            if not path.name.startswith("."):
                self._refresh_file(path, now)
        else:  # deleted or moved away: forget it and anything under it
            for known in [p for p in self._folders if p == path or path in p.parents]:
                del self._folders[known]
            for known in [p for p in self._files if p == path or path in p.parents]:
                del self._files[known]
                self._unread.discard(known)
                self._recent.pop(known, None)
                self.bad_files.pop(known, None)
                self._changed = True

    def _refresh_file(self, path: Path, now: float, complete: bool = False):
        try:
            info = path.stat()
        except OSError:
            return
        record = self._files.get(path)
        if record and (record.size, record.mtime_ns) == (info.st_size, info.st_mtime_ns):
            return
        known = self.journal.known_file(path, info.st_size, info.st_mtime_ns)
        if known:
            sha256, item, reason = known
            record = _File(info.st_size, info.st_mtime_ns, now, True, sha256, item, reason)
            self._files[path] = record
            self._unread.discard(path)
            self._changed = True
            self._note(path, record)
            if reason == ARCHIVE:
                self._add_extracted(self.scratch / sha256[:24], now)
            return
        # New or changed: wait for it to settle. Extracted files are complete when they appear.
        self._files[path] = _File(info.st_size, info.st_mtime_ns,
                                  now - self.options.settle_seconds if complete else now)
        self._unread.add(path)
        self._changed = True
        if not complete:
            self._active[path.parent] = now
            self._recent[path] = now

    def _read(self, path: Path, record: _File, now: float):
        self._unread.discard(path)
        self._changed = True
        try:
            data = path.read_bytes()
        except OSError as error:
            record.read, record.reason = True, f"unreadable ({error.strerror})"
            self._note(path, record)
            return
        record.read = True
        record.sha256 = hashlib.sha256(data).hexdigest()
        if zipfile.is_zipfile(path):
            record.slice, record.reason = None, ARCHIVE
            self._extract(path, record.sha256, now)
        else:
            record.slice, record.reason = read_slice(path, data)
        self.journal.remember_file(path, record.size, record.mtime_ns, record.sha256, record.slice, record.reason)
        self._note(path, record)

    def _extract(self, archive: Path, sha256: str, now: float):
        destination = self.scratch / sha256[:24]
        if not destination.exists():
            extraction = extract_zip(archive, destination, self.options.archive_limits)
            for member, reason in extraction.refused:
                self.bad_files[Path(f"{archive}!{member}")] = f"refused from {archive.name}: {reason}"
        self._add_extracted(destination, now)

    def _add_extracted(self, folder: Path, now: float):
        for root, _, names in os.walk(folder):
            for name in names:
                self._refresh_file(Path(root) / name, now, complete=True)

    def _note(self, path: Path, record: _File):
        if record.slice is None and record.reason != ARCHIVE:
            self.bad_files[path] = record.reason
        else:
            self.bad_files.pop(path, None)

    def _ready_series(self) -> list:
        unsettled_folders = {p.parent for p in self._unread} | {p.parent for p in self._recent}
        groups = {}
        for record in self._files.values():
            if record.slice is not None:
                groups.setdefault(record.slice.series_key, []).append(record)
        ready = []
        for key, records in groups.items():
            hashes = frozenset(r.sha256 for r in records)
            if hashes <= self._delivered:
                continue  # everything here was delivered before, under this or another name
            if self._handed_out.get(key) == hashes:
                continue
            skipped = []
            series = build_series(key, [r.slice for r in records], skipped)
            if any(r.slice.path.parent in unsettled_folders for r in records):
                self._states[key] = SeriesStatus(key, series.name, len(records), SeriesState.WAITING)
                continue
            for item in skipped:
                self.bad_files[item.path] = item.reason
            self._handed_out[key] = hashes
            self._states[key] = SeriesStatus(key, series.name, len(series.files), SeriesState.READY)
            ready.append(Delivery(key, series, hashes, is_update=self.journal.was_delivered(key)))
        return ready
