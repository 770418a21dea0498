"""The inbox's memory across restarts (SQLite): what each file was, and which series were delivered.

Files are remembered by path with their size and modification time (so an unchanged file is
never read again) and by content hash (so the same file uploaded twice, anywhere, counts once).
"""

import json
import os
import sqlite3
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..core.files import PRIVATE_FILE, private_folder
from ..dicom.slices import DicomSlice

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, sha256 TEXT, slice TEXT, reason TEXT);
CREATE TABLE IF NOT EXISTS deliveries (
    series_key TEXT PRIMARY KEY, uid TEXT, description TEXT, hashes TEXT,
    state TEXT, reason TEXT, result TEXT, delivered INTEGER, updated REAL);
CREATE TABLE IF NOT EXISTS delivered_files (sha256 TEXT PRIMARY KEY, series_key TEXT);
"""


def slice_to_json(item: DicomSlice) -> str:
    data = asdict(item)
    data["path"] = str(item.path)
    data["position"] = item.position.tolist()
    data["orientation"] = item.orientation.tolist()
    return json.dumps(data)


def slice_from_json(text: str) -> DicomSlice:
    data = json.loads(text)
    data.update(path=Path(data["path"]), position=np.array(data["position"]),
                orientation=np.array(data["orientation"]), pixel_spacing=tuple(data["pixel_spacing"]),
                shape=tuple(data["shape"]))
    return DicomSlice(**data)


class Journal:
    def __init__(self, path: Path):
        private_folder(path.parent)
        # Created owner-only before SQLite opens it: its -wal and -shm files take the same mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), PRIVATE_FILE))
        self._lock = threading.Lock()  # the Slicer module polls from a timer, the CLI from its loop
        self._db = sqlite3.connect(path, check_same_thread=False)
        # WAL: readers never wait for the writer. FULL: a commit is on disk when it returns (NORMAL may lose the
        # last commits at a power cut, and the series they delivered would be processed twice).
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self):
        self.commit()
        self._db.close()

    def commit(self):
        """Files remembered since the last commit are saved together (the inbox commits once a poll)."""
        with self._lock:
            self._db.commit()

    def known_file(self, path: Path, size: int, mtime_ns: int):
        """(sha256, DicomSlice or None, reason) if this exact file was read before, else None."""
        with self._lock:
            row = self._db.execute("SELECT sha256, slice, reason FROM files WHERE path=? AND size=? AND mtime_ns=?",
                                   (str(path), size, mtime_ns)).fetchone()
        if row is None:
            return None
        return row[0], (slice_from_json(row[1]) if row[1] else None), row[2]

    def remember_file(self, path: Path, size: int, mtime_ns: int, sha256: str, item: DicomSlice, reason: str):
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)",
                             (str(path), size, mtime_ns, sha256, slice_to_json(item) if item else None, reason))

    def forget_files(self, paths, commit: bool = True):
        """Files removed for good (listen's retention, a user's delete): their rows go, so the journal does not grow
        forever; what was delivered is still remembered by content. Without commit, the next poll's commit saves it
        (one sync for a thousand files deleted at once)."""
        with self._lock:
            self._db.executemany("DELETE FROM files WHERE path=?", [(str(path),) for path in paths])
            if commit:
                self._db.commit()

    def forget_folder(self, folder: Path):
        """Every file under folder removed for good (an unpacked zip's folder), known in this run or not."""
        prefix = f"{folder}{os.sep}"
        with self._lock, self._db:
            self._db.execute("DELETE FROM files WHERE substr(path, 1, ?) = ?", (len(prefix), prefix))

    def delivered_hashes(self) -> set:
        with self._lock:
            return {row[0] for row in self._db.execute("SELECT sha256 FROM delivered_files")}

    def was_delivered(self, series_key: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM deliveries WHERE series_key=?", (series_key,)).fetchone() is not None

    def record_delivery(self, series_key: str, uid: str, description: str, hashes, state: str,
                        reason: str = "", result: str = ""):
        """The consumer is done with a series (loaded, processed, or failed): never deliver these files again."""
        with self._lock, self._db:
            row = self._db.execute("SELECT delivered FROM deliveries WHERE series_key=?", (series_key,)).fetchone()
            self._db.execute("INSERT OR REPLACE INTO deliveries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (series_key, uid, description, json.dumps(sorted(hashes)), state, reason, result,
                              (row[0] if row else 0) + 1, time.time()))
            self._db.executemany("INSERT OR IGNORE INTO delivered_files VALUES (?, ?)",
                                 [(h, series_key) for h in hashes])

    def replace_reasons(self, beginning: str, reason: str):
        """Every delivery's reason that begins with beginning becomes reason."""
        with self._lock, self._db:
            self._db.execute("UPDATE deliveries SET reason=? WHERE substr(reason, 1, ?)=?",
                             (reason, len(beginning), beginning))

    def deliveries(self) -> list:
        with self._lock:
            rows = self._db.execute("SELECT series_key, uid, description, state, reason, result, delivered, updated, "
                                    "hashes FROM deliveries ORDER BY updated").fetchall()
        keys = ("series_key", "uid", "description", "state", "reason", "result", "delivered", "updated")
        return [dict(zip(keys, row), files=len(json.loads(row[-1]))) for row in rows]
