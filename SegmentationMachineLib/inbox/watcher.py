"""A watched folder whose uploads become series, each delivered once, and nothing of the user's touched.

File events (watchdog; where watchdog is not installed, as in a stock 3D Slicer, polling) only mark
paths to look at; poll() does the work on the caller's thread. A network share (CIFS/SMB, NFS) reports
no events for files that other computers write, so events mode also re-lists slowly (RELIST_EVERY_S),
with the same bounded statting as polling mode. A file is read once it has not changed for a moment; a
series is delivered when its files are read and nothing in its folders changed for the settle time. The
journal remembers what was delivered across restarts, by content, so a re-upload is not delivered again
and a series that gains files is delivered again as an update.

Whoever can drop a file here must not hang, exhaust or steer the watcher: links are refused (never
followed), only regular files are opened (without blocking, so a FIFO cannot hang a poll), files are
classified from their first bytes and read whole only when they are DICOM and not too big, and
archives are unpacked, within limits, from the very bytes that were hashed.
"""

import errno
import hashlib
import math
import os
import shutil
import sqlite3
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from ..core import files as file_system  # WINDOWS through the module, which tests switch
from ..core.errors import UserError
from ..core.files import PATH_NOT_UTF8, printable, private_folder, utf8_path
from ..dicom.archives import ArchiveLimits, extract_zip, is_zip, size_text
from ..dicom.series import (DicomSeries, SkippedFile, build_series, group_series, unreadable_folder,
                            unreadable_folder_advice)
from ..dicom.slices import looks_like_dicom, read_slice
from .journal import Journal
from .locks import hold_lock

DEFAULT_INBOX = Path.home() / "SegmentationMachine" / "Inbox"
OUTBOX_STATE = ".segmentation-machine"  # watch's and listen's journal and scratch, inside OUTBOX unless --state
# A file is read once it has been quiet this long; its series still waits for the settle time.
READ_AFTER_S = 0.5
# Folders with recent changes are re-listed this often (a safety net for missed file events).
POLL_STATS = 500  # settled files statted per polling interval, in turn: 10,000 are all looked at every 40 s
RESCAN_EVERY_S = 1.0
RELIST_EVERY_S = 10.0  # events mode: what no event announced (a network share's other writers) is seen this late
ARCHIVE = "a zip archive (its contents are read from the scratch folder)"
LINK = "a link (links are not followed: copy the files themselves into the inbox)"
NOT_REGULAR = "not a regular file (a FIFO, socket or device)"
CHUNK = 1024 * 1024
# Left in a series folder by the DICOM node when the association storing into it ended without a release (a sender
# killed, a network cut, the node's idle timeout): the series looks incomplete until an instance is stored there again.
BROKEN_OFF = ".broken-off"
NO_FOLLOW = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


class InboxError(UserError):
    """The inbox folder cannot be watched."""


class SeriesState(str, Enum):
    WAITING = "waiting"  # files still arriving or settling
    READY = "ready"  # handed to the consumer, not yet acknowledged
    LOADED = "loaded"  # acknowledged: loaded or processed
    ERROR = "error"  # acknowledged as failed, with a reason
    SKIPPED = "skipped"  # acknowledged as not for this consumer (an MR for the presets), with a reason


@dataclass(frozen=True)
class InboxOptions:
    folder: Path
    state_folder: Path  # journal and scratch area; never inside the user's files
    settle_seconds: float = 5.0
    polling: bool = False  # look at modification times instead of file events
    poll_interval: float = 2.0  # how often polling looks (polling mode only)
    archive_limits: ArchiveLimits = ArchiveLimits()
    max_file_bytes: int = 1024 ** 3  # a DICOM file is read whole: bigger ones are refused
    # A series that looks incomplete, or a file that looks cut short, is held this long after its
    # last change for more files to arrive; then the series is delivered, marked incomplete.
    hold_seconds: float = 60.0


@dataclass
class Delivery:
    key: str
    series: DicomSeries
    hashes: frozenset
    is_update: bool  # the series was delivered before with fewer files
    incomplete: str = ""  # why the series looks incomplete, when it does (delivered after the hold)

    def remarks(self, notes=()) -> str:
        """What a consumer that loaded it says with its acknowledgement: why it looks incomplete, then the loader's
        notes (e.g. resampled to even spacing); "" when there is nothing to say."""
        return " ".join([f"Looks incomplete: {self.incomplete}."] * bool(self.incomplete) + [str(n) for n in notes])


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
    fresh: bool = False  # read in this run and not yet part of a delivery (not remembered from the journal)


def _may_still_grow(reason: str) -> bool:
    """A DICOM file that reads as cut short may be an upload in progress."""
    return bool(reason) and reason.startswith(("truncated", "unreadable DICOM"))


def _broken_off(records: list) -> str:
    if any((folder / BROKEN_OFF).exists() for folder in {r.slice.path.parent for r in records}):
        return "the sender broke off the association that sent it before the end"
    return ""


def incompleteness(series: DicomSeries, slices: list) -> str:
    """Why series looks incomplete (missing instance numbers, a gap in positions, fewer slices than
    its headers announce, a single slice other than a localizer), or "" when it looks whole."""
    used = set(series.files)
    kept = [s for s in slices if s.path in used]
    numbers = sorted({s.instance_number for s in kept if s.instance_number > 0})
    announced = max((s.images_in_acquisition for s in kept), default=0)
    # One acquisition of several in a series may be numbered every n-th (echoes interleaved): count in its steps.
    step = (math.gcd(*(b - a for a, b in zip(numbers, numbers[1:]))) or 1) if series.part and len(numbers) > 1 else 1
    if len(numbers) == len(kept) and numbers and (numbers[-1] - numbers[0]) // step + 1 > len(numbers):
        missing = (numbers[-1] - numbers[0]) // step + 1 - len(numbers)
        return f"{missing} instance number(s) between {numbers[0]} and {numbers[-1]} are missing"
    if series.is_uneven:
        return "its slice positions have a gap (a slice is probably missing)"
    if announced > len(series.files):
        return f"its headers announce {announced} images, {len(series.files)} arrived"
    # A topogram (scout) is one image by nature: waiting the hold time for more would only delay its sentence.
    if len(series.files) == 1 and kept[0].frames == 1 and not series.is_localizer:
        return "it has a single slice so far"
    return ""


def _listed(folder: Path) -> bool:
    """Whether folder can be listed and holds something: where a file went from it, it was removed (an unmounted
    share leaves its mount point empty, or unreadable)."""
    try:
        with os.scandir(folder) as entries:
            return next(entries, None) is not None
    except OSError:
        return False


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
        self.folder = None  # the inbox's real, absolute path once started
        self._files = {}  # Path -> _File
        self._unread = set()  # paths not read since they last changed
        self._recent = {}  # path -> when it changed, while within the settle time
        self._growing = {}  # path -> when it changed, for files that read as cut short (held)
        self._denied = {}  # path -> when opening it was first refused: Windows refuses a file another program writes
        # Hidden files (rsync's .name.XXXXXX, the files page's marker) are never read, but one being written means
        # its folder is still arriving: path -> (size, mtime_ns, when it changed; None once quiet for the settle time)
        self._hidden = {}
        self._held = {}  # series key -> until when an incomplete-looking series is held
        self._changed = False  # readiness is recomputed only after something changed
        self._dirty = set()
        self._active = {}  # folder -> when a file in it last changed: re-listed until quiet
        self._folders = {}  # folder -> modification time, for polling mode
        self._last_poll_scan = None
        self._poll_turn = 0  # where the next polling interval's share of settled files starts
        self._last_rescan = None
        self._lock = threading.Lock()
        self._observer = None
        self._lock_descriptor = None
        self.polling = options.polling  # also without watchdog
        self._handed_out = {}  # series key -> hashes handed out and not yet acknowledged
        self._not_before = {}  # series key -> when a series handed back (a full disk) is handed out again
        self._states = {}  # series key -> SeriesStatus
        self._grouped = {}  # DICOM series key -> (its (path, hash) pairs, its groups' paths): see _groups
        # Path -> SkippedFile, for every file that is not part of a series (one a series left out names it)
        self.skipped = {}
        self.seen_before = set()  # bad files an earlier run found (and reported): from the journal
        self.duplicates = []  # SeriesStatus of drops whose files were all delivered before; the consumer empties it
        self.scratch = None
        self._extracted = {}  # extraction folder -> how deep in nested archives it is
        self.in_use = set()  # unpacked folders the consumer still reads (Slicer's scene): kept though their zip is gone
        self._sweep_due = True  # an unpacked folder may have lost its zip: see _remove_unpacked
        self.journal = None
        self._delivered = set()

    @property
    def bad_files(self) -> dict:
        """Path -> reason, for every file that is not part of a series (skipped, without the series' names)."""
        return {path: item.reason for path, item in list(self.skipped.items())}  # one C call: a poll may change it

    # -- lifecycle -------------------------------------------------------------------------
    def start(self):
        folder = Path(self.options.folder).expanduser().resolve()
        if folder.exists() and not folder.is_dir():
            raise InboxError(f"The inbox {folder} is a file, not a folder: give the folder that series are dropped "
                             "into.")
        if not folder.is_dir():
            raise InboxError(f"The inbox folder {folder} does not exist: create it or choose another folder.")
        if not utf8_path(folder):
            raise InboxError(f"The inbox {printable(folder)} cannot be watched: {PATH_NOT_UTF8}.")
        try:
            os.listdir(folder)
        except OSError as error:  # else it would look empty for ever
            raise InboxError(f"The inbox {folder} cannot be read ({error.strerror}): "
                             f"{unreadable_folder_advice()}.") from None
        state = Path(self.options.state_folder).expanduser().resolve()
        if state == folder or folder in state.parents:
            raise InboxError(f"The state folder {state} is inside the inbox: choose one outside {folder}.")
        try:
            private_folder(state)  # the journal and the unpacked archives are patient data
            self._lock_descriptor = hold_lock(state / "inbox.lock", f"The inbox state folder {state}")
            self.folder = folder
            self.scratch = private_folder(state / "extracted")
            for leftover in self.scratch.glob("*.partial"):  # an extraction cut short by a crash
                shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink()
            self.journal = Journal(state / "journal.sqlite")
            self._delivered = self.journal.delivered_hashes()
        except (OSError, sqlite3.DatabaseError) as error:  # a file in its place, a full disk, a journal a crash or a
            self.stop()  # sync tool left damaged; its lock is given back for the next start
            reason = error.strerror if isinstance(error, OSError) and error.strerror else error
            raise InboxError(f"The inbox could not open its records of what it loaded, in {printable(state)} "
                             f"({printable(reason)}): check that folder (space, permissions), or move it aside to "
                             "start afresh (series already loaded would then be loaded again).") from None
        if not self.options.polling:
            self._observer = _file_events(folder, self._dirty, self._lock)
        self.polling = self._observer is None
        with self._lock:
            self._dirty.add(str(folder))  # the first poll reads what is already there

    def stop(self, timeout: float = 5.0):
        """Stops watching within timeout seconds (the observer thread is a daemon: never waited for longer)."""
        if self._observer:
            self._observer.stop()
            self._observer.join(timeout=timeout)
            self._observer = None
        if self.journal:
            self.journal.close()
            self.journal = None
        if self._lock_descriptor is not None:
            os.close(self._lock_descriptor)
            self._lock_descriptor = None

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
        dirty |= self._polled_changes(now, self.options.poll_interval if self.polling else RELIST_EVERY_S)
        for path in sorted(dirty):
            self._refresh(Path(path), now)
        for path in sorted(self._unread):
            if path not in self._unread:
                continue  # forgotten by a read before it: its zip's unpacked folder was removed
            record = self._files[path]
            if now - record.changed_at >= min(READ_AFTER_S, self.options.settle_seconds):
                self._read(path, record, now)
        for path, changed in list(self._recent.items()):
            if now - changed >= self.options.settle_seconds:
                del self._recent[path]
                self._changed = True  # a folder may have settled: its series may be ready now
        for path, (size, mtime_ns, changed) in list(self._hidden.items()):
            if changed is not None and now - changed >= self.options.settle_seconds:
                self._hidden[path] = (size, mtime_ns, None)
                self._changed = True
        for path, changed in list(self._growing.items()):
            if now - changed >= self.options.hold_seconds:  # not an upload in progress after all
                del self._growing[path]
                self._note(path, self._files[path])
                self._changed = True
        if any(now >= until for until in (*self._held.values(), *self._not_before.values())):
            self._changed = True
        if self._sweep_due and all(self._is_extracted(path) for path in self._unread):
            self._remove_unpacked()  # only once every zip in the inbox is known: an unread one may own a folder
        if self.journal:
            self.journal.commit()
        if not self._changed:
            return []  # idle: nothing to look at (a large, quiet inbox costs nothing)
        self._changed = False
        return self._ready_series(now)

    def pending(self) -> bool:
        """True while some file has not settled yet, a series is held, or events wait to be looked at."""
        with self._lock:
            if self._dirty:
                return True
        return bool(self._unread or self._recent or self._growing or self._held or self._busy_hidden())

    def _busy_hidden(self) -> set:
        """The hidden files written within the settle time."""
        return {path for path, (_, _, changed) in self._hidden.items() if changed is not None}

    def hand_back(self, delivery: Delivery, seconds: float, reason: str) -> bool:
        """The consumer could not finish a delivery for a cause outside the series (a full disk): it is handed out
        again, as it is then, after seconds. False where it was acknowledged meanwhile (nothing to hand back)."""
        if self._handed_out.get(delivery.key) != delivery.hashes:
            return False
        del self._handed_out[delivery.key]
        self._not_before[delivery.key] = self._clock() + seconds
        self._states[delivery.key] = SeriesStatus(delivery.key, delivery.series.name, len(delivery.series.files),
                                                  SeriesState.WAITING, reason)
        return True

    def acknowledge(self, delivery: Delivery, ok: bool, reason: str = "", result: str = "", skipped: bool = False):
        """The consumer finished a delivery (loaded/processed, or failed or skipped with reason): never again."""
        self._sweep_due = True
        state = SeriesState.LOADED if ok else SeriesState.SKIPPED if skipped else SeriesState.ERROR
        self.journal.record_delivery(delivery.key, delivery.series.uid, delivery.series.name, delivery.hashes,
                                     state.value, reason, result)
        self._delivered |= delivery.hashes
        self._handed_out.pop(delivery.key, None)
        self._changed = True
        self._states[delivery.key] = SeriesStatus(delivery.key, delivery.series.name, len(delivery.series.files),
                                                  state, reason)

    def statuses(self) -> list:
        return list(self._states.values())

    def unpacked_folders(self, delivery: Delivery) -> set:
        """The unpacked zips' folders that delivery's files are in (none for files dropped as they are)."""
        return {self._unpacked_folder(path) for path in map(Path, delivery.series.files) if self._is_extracted(path)}

    # -- internals -------------------------------------------------------------------------
    def _polled_changes(self, now: float, interval: float) -> set:
        """Every interval: a folder's modification time changes when files appear in or leave it,
        and a file's when it is written again (an upload that resumes after a pause): the folders and
        the files still settling (hidden ones being written too) are statted each interval, the settled files
        POLL_STATS at a time in turn (never read: a network share answers each lstat in about a millisecond)."""
        if self._last_poll_scan is not None and now - self._last_poll_scan < interval:
            return set()
        self._last_poll_scan = now
        scratch = f"{self.scratch}{os.sep}"
        known = [path for path in self._files if not str(path).startswith(scratch)] + [
            path for path, (_, _, changed) in self._hidden.items() if changed is None]
        start = self._poll_turn if self._poll_turn < len(known) else 0
        self._poll_turn = start + POLL_STATS
        changed = set()
        for path in {*known[start:start + POLL_STATS], *self._unread, *self._recent, *self._growing,
                     *self._busy_hidden()}:
            record = self._files.get(path)  # the settling ones are known files too
            size, mtime_ns = (record.size, record.mtime_ns) if record else self._hidden[path][:2]
            try:
                info = os.lstat(path)
            except OSError:
                info = None  # gone: _refresh forgets it
            if info is None or (info.st_size, info.st_mtime_ns) != (size, mtime_ns):
                changed.add(str(path))
        for folder, mtime_ns in list(self._folders.items()):
            try:
                current = os.lstat(folder).st_mtime_ns
            except OSError:
                current = None
                del self._folders[folder]
            if current != mtime_ns:
                changed.add(str(folder))
        return changed

    def _inside(self, path: Path) -> bool:
        real = Path(os.path.realpath(path.parent))
        return real == self.folder or self.folder in real.parents

    def _refresh(self, path: Path, now: float):
        try:
            info = os.lstat(path)
        except OSError:
            if self._hidden.pop(path, None) is None:  # a hidden file is no folder: nothing under it to forget
                self._forget(path)
            else:
                self._changed = True  # the DICOM node's mark gone: its series may be ready now
            return
        if path != self.folder and not self._inside(path):
            return
        if not utf8_path(path):
            return self._refuse(path, PATH_NOT_UTF8)
        if path != self.folder and path.name.startswith("."):
            if stat.S_ISREG(info.st_mode):
                self._note_hidden(path, info, now)
            return
        if stat.S_ISDIR(info.st_mode):
            self._walk(path, now)
        elif stat.S_ISREG(info.st_mode):
            self._refresh_file(path, now)
        else:
            self._refuse(path, LINK if stat.S_ISLNK(info.st_mode) else NOT_REGULAR)

    def _walk(self, folder: Path, now: float):
        def unreadable(error: OSError):
            if not isinstance(error, FileNotFoundError):  # gone while walked: nothing to say
                self.skipped[Path(error.filename)] = SkippedFile(Path(error.filename), unreadable_folder(error))
                self._folders[Path(error.filename)] = None  # polling looks at it again

        for root, dirs, names in os.walk(folder, onerror=unreadable):  # never into linked folders
            root = Path(root)
            self.skipped.pop(root, None)  # readable now
            for name in [d for d in dirs if (root / d).is_symlink()]:
                dirs.remove(name)
                names.append(name)  # refused as a link below
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            try:
                self._folders[root] = os.lstat(root).st_mtime_ns
            except OSError:
                continue
            for name in names:
                self._refresh(root / name, now)

    def _remove_unpacked(self):
        """An unpacked zip is patient data the inbox keeps only while it is needed: once its zip has left the inbox
        (the user removed or replaced it) and nothing from it waits for an acknowledgement or is in use, its folder
        is removed and what was read from it forgotten (what was delivered is remembered by content). Nested zips
        go one level per pass, as their own zips are forgotten."""
        self._sweep_due = False
        waiting = set().union(*self._handed_out.values())
        kept = {self.scratch / r.sha256[:24] for r in self._files.values() if r.reason == ARCHIVE and r.sha256}
        kept |= self.in_use | {self._unpacked_folder(p) for p, r in self._files.items()
                               if r.sha256 in waiting and self._is_extracted(p)}
        for folder in self.scratch.iterdir():
            if folder not in kept and folder.is_dir() and not folder.name.endswith(".partial"):
                shutil.rmtree(folder, ignore_errors=True)
                self._forget(folder)
                self._extracted.pop(folder, None)
                self.journal.forget_folder(folder)

    def _forget(self, path: Path):
        """Deleted or moved away: forget it and anything under it."""
        for known in [p for p in self._folders if p == path or path in p.parents]:
            del self._folders[known]
        for known in [p for p in self._hidden if p == path or path in p.parents]:
            del self._hidden[known]
            self._changed = True
        gone = [p for p in set(self._files) | set(self.skipped)
                if p == path or path in p.parents or str(p).startswith(f"{path}!")]
        if gone and self.journal and _listed(path.parent):  # a share that dropped out: its files come back
            self.journal.forget_files(gone, commit=False)
        for known in gone:
            if getattr(self._files.get(known), "reason", None) == ARCHIVE:
                self._sweep_due = True  # its unpacked folder may be unused now
            self._files.pop(known, None)
            self._unread.discard(known)
            self._recent.pop(known, None)
            self._growing.pop(known, None)
            self._denied.pop(known, None)
            self.skipped.pop(known, None)
            self.seen_before.discard(known)
            self._changed = True

    def _refuse(self, path: Path, reason: str):
        self._forget(path)
        self.skipped[path] = SkippedFile(path, reason)

    def _note_hidden(self, path: Path, info, now: float):
        size, mtime_ns, _ = self._hidden.get(path, (None, None, None))
        if (size, mtime_ns) != (info.st_size, info.st_mtime_ns):
            self._hidden[path] = (info.st_size, info.st_mtime_ns, now)
            self._active[path.parent] = now
            self._changed = True

    def _refresh_file(self, path: Path, now: float, complete: bool = False):
        try:
            info = os.lstat(path)
        except OSError:
            return
        record = self._files.get(path)
        if record and (record.size, record.mtime_ns) == (info.st_size, info.st_mtime_ns):
            return
        self._growing.pop(path, None)
        known = self.journal.known_file(path, info.st_size, info.st_mtime_ns)
        if known:
            sha256, item, reason = known
            record = _File(info.st_size, info.st_mtime_ns, now, True, sha256, item, reason)
            self._files[path] = record
            self._unread.discard(path)
            self._changed = True
            self._note(path, record)
            if path in self.skipped:
                self.seen_before.add(path)
            if reason == ARCHIVE:
                self._add_extracted(self.scratch / sha256[:24], self._depth(path) + 1, now)
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
        record.read, record.fresh = True, True
        record.sha256, record.slice, record.reason = None, None, None
        self.seen_before.discard(path)
        try:
            descriptor = os.open(path, NO_FOLLOW)  # a link swapped in since the listing is refused here
        except OSError as error:
            if error.errno == errno.ELOOP:
                record.reason = LINK
            elif isinstance(error, PermissionError) and file_system.WINDOWS and \
                    now - self._denied.setdefault(path, now) < self.options.hold_seconds:
                # Windows refuses (errno 13) a file that a copy, a PACS or a virus scanner holds open: its folder
                # waits, and it is opened again until the hold time has passed.
                self._unread.add(path)
                return
            else:  # said, never journaled: a chmod changes neither size nor time, and the file may be read then
                self._denied.pop(path, None)
                record.reason = f"unreadable ({error.strerror})" + (
                    ": another program may hold it open" if file_system.WINDOWS else "")
                self._note(path, record)
                return
        else:
            self._denied.pop(path, None)
            with os.fdopen(descriptor, "rb") as stream:
                self._classify(path, stream, record, now)
        if record.slice is None and _may_still_grow(record.reason) and not self._is_extracted(path):
            self._growing[path] = record.changed_at  # reported only if it stays like this
        self.journal.remember_file(path, record.size, record.mtime_ns, record.sha256, record.slice, record.reason)
        if path in self._growing:
            self.skipped.pop(path, None)
        else:
            self._note(path, record)

    def _classify(self, path: Path, stream, record: _File, now: float):
        """From the open file: its kind from the first bytes; only DICOM is read whole, only archives copied."""
        info = os.fstat(stream.fileno())
        if not stat.S_ISREG(info.st_mode):
            record.reason = NOT_REGULAR
            return
        head = stream.read(132)
        if is_zip(head):
            self._read_archive(path, stream, head, record, now)
        elif not looks_like_dicom(head):
            record.reason = "not a DICOM file"
        elif info.st_size > self.options.max_file_bytes:
            record.reason = f"too big for a DICOM file ({size_text(info.st_size)})"
        else:
            # read(n) reserves n bytes first: the file's size, not the 1 GiB cap (a ulimit -v would refuse it)
            data = head + stream.read(min(info.st_size, self.options.max_file_bytes) + 1 - len(head))
            record.sha256 = hashlib.sha256(data).hexdigest()
            record.slice, record.reason = read_slice(path, data)

    def _read_archive(self, path: Path, stream, head: bytes, record: _File, now: float):
        """Copies the archive to a private scratch file while hashing it, then unpacks that copy:
        the files delivered under this hash are the bytes that were hashed, whatever happens to path."""
        limits = self.options.archive_limits
        depth = self._depth(path) + 1
        for said in [known for known in self.skipped if str(known).startswith(f"{path}!")]:
            del self.skipped[said]  # what an earlier read of this zip refused
        if depth > limits.max_depth:
            record.reason = f"an archive nested more than {limits.max_depth} deep (not unpacked)"
            return
        digest = hashlib.sha256(head)
        with tempfile.TemporaryFile(dir=self.scratch) as copy:
            copy.write(head)
            while chunk := stream.read(CHUNK):
                if copy.tell() + len(chunk) > limits.max_total_bytes:
                    record.reason = f"an archive over {size_text(limits.max_total_bytes)} (not unpacked)"
                    return
                digest.update(chunk)
                copy.write(chunk)
            record.sha256, record.reason = digest.hexdigest(), ARCHIVE
            destination = self.scratch / record.sha256[:24]
            copied = destination.exists()  # the same bytes were unpacked before: this drop is a copy
            if not copied:
                copy.seek(0)
                if self._sweep_due:
                    self._remove_unpacked()  # what zips the user removed took is room for this one
                room = limits.max_scratch_bytes - _folder_bytes(self.scratch)
                extraction = extract_zip(copy, destination, limits, scratch_room=room)
                if extraction.cut_short:  # held like a cut DICOM file, said only if it stays so
                    record.reason = f"truncated, or not a whole zip archive ({extraction.refused[0][1]})"
                    return
                for member, reason in extraction.refused:
                    refused = Path(f"{path}!{member}")
                    self.skipped[refused] = SkippedFile(refused, f"refused from {path.name}: {reason}")
        self._add_extracted(destination, depth, now)
        if copied:
            for known, each in self._files.items():
                if destination in known.parents and each.slice is not None:
                    each.fresh = True  # said as a duplicate if its files were delivered

    def _depth(self, path: Path) -> int:
        """How many archives deep path is: 0 in the inbox itself."""
        return self._extracted.get(self._unpacked_folder(path), 0) if self._is_extracted(path) else 0

    def _is_extracted(self, path: Path) -> bool:
        return self.scratch in path.parents

    def _unpacked_folder(self, path: Path) -> Path:
        """The folder of the unpacked zip an extracted path is in."""
        return self.scratch / path.relative_to(self.scratch).parts[0]

    def _add_extracted(self, folder: Path, depth: int, now: float):
        self._extracted[folder] = depth
        for root, dirs, names in os.walk(folder):
            # Hidden names are skipped as in the inbox: a macOS Finder zip holds __MACOSX/._name and .DS_Store files.
            dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__MACOSX"]
            for name in names:
                if not name.startswith("."):
                    self._refresh_file(Path(root) / name, now, complete=True)

    def _note(self, path: Path, record: _File):
        if record.slice is None and record.reason != ARCHIVE:
            self.skipped[path] = SkippedFile(path, record.reason)
        else:
            self.skipped.pop(path, None)

    def _note_duplicate(self, key: str, records: list):
        """Files dropped in this run that are all copies of delivered ones: said once, not processed again."""
        fresh = [r for r in records if r.fresh]
        if not fresh:
            return  # the delivered files themselves, or copies already said
        for record in fresh:
            record.fresh = False
        name = build_series(key, [r.slice for r in fresh], []).name
        self.duplicates.append(SeriesStatus(key, name, len(fresh), SeriesState.LOADED,
                                            "already processed: the same files as an earlier delivery"))

    def _ready_series(self, now: float) -> list:
        unsettled_folders = {p.parent for p in self._unread} | {p.parent for p in self._recent} | \
                            {p.parent for p in self._growing} | {p.parent for p in self._busy_hidden()}
        groups = self._groups()
        for key in [k for k, s in self._states.items() if s.state is SeriesState.WAITING and k not in groups]:
            del self._states[key]  # split into its acquisitions (or gone) since it was seen waiting
        for key in [k for k in self._not_before if k not in groups]:
            del self._not_before[key]
        ready, self._held = [], {}
        for key, records in groups.items():
            hashes = frozenset(r.sha256 for r in records)
            if hashes <= self._delivered:  # everything here was delivered before, under this or another name
                self._not_before.pop(key, None)
                self._note_duplicate(key, records)
                continue
            if self._handed_out.get(key) == hashes or now < self._not_before.get(key, -math.inf):
                continue
            self._not_before.pop(key, None)
            skipped = []
            series = build_series(key, [r.slice for r in records], skipped)
            if any(r.slice.path.parent in unsettled_folders for r in records):
                self._states[key] = SeriesStatus(key, series.name, len(records), SeriesState.WAITING)
                continue
            incomplete = incompleteness(series, [r.slice for r in records]) or _broken_off(records)
            hold_until = max(r.changed_at for r in records) + self.options.hold_seconds
            if incomplete and now < hold_until:
                self._held[key] = hold_until
                self._states[key] = SeriesStatus(key, series.name, len(records), SeriesState.WAITING,
                                                 f"Looks incomplete ({incomplete}): held for more files")
                continue
            for item in skipped:
                self.skipped[item.path] = item
            self._handed_out[key] = hashes
            for record in records:
                record.fresh = False
            self._states[key] = SeriesStatus(key, series.name, len(series.files), SeriesState.READY)
            ready.append(Delivery(key, series, hashes, is_update=self.journal.was_delivered(key),
                                  incomplete=incomplete))
        return ready

    def _groups(self) -> dict:
        """key -> the records of one series; a series of several acquisitions is one group each (group_series).
        Telling acquisitions apart takes numpy work per slice, so it is redone only for a DICOM series whose files
        changed: on every poll, 10,000 delivered files took half a second."""
        by_series = {}
        for record in self._files.values():
            if record.slice is not None:
                by_series.setdefault(record.slice.series_key, []).append(record)
        groups, known = {}, {}
        for series_key, records in by_series.items():
            members = frozenset((r.slice.path, r.sha256) for r in records)
            cached = self._grouped.get(series_key)
            if cached is None or cached[0] != members:
                cached = members, {key: [s.path for s in slices]
                                   for key, slices in group_series([r.slice for r in records]).items()}
            known[series_key] = cached
            by_path = {r.slice.path: r for r in records}
            groups.update({key: [by_path[path] for path in paths] for key, paths in cached[1].items()})
        self._grouped = known
        return groups


def _folder_bytes(folder: Path) -> int:
    return sum(os.lstat(Path(root) / name).st_size for root, _, names in os.walk(folder) for name in names)
