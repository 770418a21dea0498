"""Extract uploaded zip archives safely into a scratch folder (never beside the user's files).

Members that would escape the folder, links, and members that are too big or compressed too
well are refused one by one with a reason. An archive that is too big or compressed too well
as a whole (a zip bomb split into many small members), or not a readable zip, is refused whole,
and whatever was extracted of it is removed. Bytes are counted as they are written, not taken
from the archive's own (forgeable) headers. Everything extracted is owner-only: it is patient data.
"""

import os
import re
import shutil
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..core.files import PRIVATE_FILE, PRIVATE_FOLDER, not_a_device, private_folder, replace_when_free

CHUNK = 1024 * 1024
METHOD_NAMES = {9: "Deflate64, as Windows compresses folders over 2 GB"}  # numbers: APPNOTE 4.4.5
UNPACKABLE = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA,
              getattr(zipfile, "ZIP_ZSTANDARD", zipfile.ZIP_STORED)}  # zstandard: Python 3.14
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first member, or an empty zip


def is_zip(head: bytes) -> bool:
    """From a file's first bytes: a zip archive (whatever its name)."""
    return head[:4] in ZIP_MAGIC


@dataclass(frozen=True)
class ArchiveLimits:
    max_total_bytes: int = 8 * 1024 ** 3  # a whole CT study compresses to far less
    max_member_bytes: int = 2 * 1024 ** 3
    max_ratio: float = 200.0  # DICOM compresses 2-10x; zip bombs reach thousands
    max_members: int = 100_000
    max_depth: int = 3  # archives inside archives: each level is unpacked at most this deep
    max_scratch_bytes: int = 32 * 1024 ** 3  # everything unpacked, all archives together


@dataclass
class Extraction:
    folder: Path
    files: list = field(default_factory=list)
    refused: list = field(default_factory=list)  # (member name, reason)
    cut_short: bool = False  # no zip directory at its end: most often a zip still being written under its name


class _Refused(Exception):
    """The whole archive is refused; the message is the reason."""


def size_text(count: float) -> str:
    """Bytes as a person reads them: 512 bytes, 3.4 MB, 2.1 GB."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count:.0f} bytes"


def _check_readable(members: list):
    """What Python's zipfile cannot unpack, said before any work (it says 'compression method not supported')."""
    if any(m.flag_bits & 0x1 for m in members):  # WinZip's AES (method 99) too
        raise _Refused("it is password-protected: drop the unzipped folder instead")
    others = sorted({m.compress_type for m in members} - UNPACKABLE)
    if others:  # 7-Zip's PPMd (98), IBM's, ...: APPNOTE 4.4.5 lists them
        methods = ", ".join(METHOD_NAMES.get(n, f"method {n}") for n in others)
        raise _Refused(f"it is compressed with {methods}, which cannot be unpacked here: drop the unzipped folder "
                       "instead, or zip it with 7-Zip set to Deflate")


def _portable(part: str) -> str:
    """A member's path part as every file system holds it (Windows refuses '?', ':', 'x.', CON...); names matter
    only in messages: DICOM files are known by their content."""
    return not_a_device(re.sub(r'[<>:"|?*\x00-\x1f]', "_", part).rstrip(". ") or "_")


def _member_problem(info: zipfile.ZipInfo, limits: ArchiveLimits):
    name = PurePosixPath(info.filename.replace("\\", "/"))
    if name.is_absolute() or ".." in name.parts or (name.parts and ":" in name.parts[0]):
        return "its path leads outside the archive's folder"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "it is a link"
    if info.file_size > limits.max_member_bytes:
        return f"it unpacks to {size_text(info.file_size)}, over the limit"
    if info.compress_size and info.file_size / info.compress_size > limits.max_ratio and info.file_size > CHUNK:
        return f"it is compressed {info.file_size / info.compress_size:.0f}:1, like a zip bomb"
    return None


class _Budget:
    """Bytes the whole archive may still write: its total limit, its ratio to the archive's size, the scratch room."""

    def __init__(self, archive_bytes: int, limits: ArchiveLimits, scratch_room: int):
        self.limits, self.archive_bytes, self.written = limits, max(archive_bytes, 1), 0
        self.allowed = min(limits.max_total_bytes, scratch_room)
        self.ratio_allowed = max(limits.max_ratio * self.archive_bytes, 64 * CHUNK)  # small archives of tiny files pass

    def check(self, more: int):
        total = self.written + more
        if total > self.ratio_allowed:
            raise _Refused(f"it unpacks to over {total / self.archive_bytes:.0f} times its size, like a zip bomb")
        if total > self.allowed:
            what = (f"the {size_text(self.allowed)} left for unpacked archives (removing processed zips from the inbox "
                    "frees their room)" if self.allowed < self.limits.max_total_bytes else "the limit")
            raise _Refused(f"it unpacks to over {size_text(total)}, more than {what}")

    def write(self, source, sink):
        while chunk := source.read(CHUNK):
            self.check(len(chunk))
            self.written += len(chunk)
            sink.write(chunk)


def _extract_member(package, member, target: Path, budget: _Budget):
    target.parent.mkdir(parents=True, exist_ok=True, mode=PRIVATE_FOLDER)
    # Windows has no O_NOFOLLOW, and without O_BINARY its text mode turns every LF byte into CRLF
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    descriptor = os.open(target, flags, PRIVATE_FILE)
    with package.open(member) as source, os.fdopen(descriptor, "wb") as sink:
        budget.write(source, sink)


def extract_zip(archive, destination: Path, limits: ArchiveLimits = ArchiveLimits(),
                scratch_room: int = None) -> Extraction:
    """Extracts archive (a path or an open binary file) into destination (created; must not exist).

    scratch_room: bytes the scratch folder may still take (default: limits.max_scratch_bytes).
    Returns what was written and refused; a whole-archive refusal leaves nothing behind.
    """
    result = Extraction(folder=destination)
    partial = destination.with_name(destination.name + ".partial")
    try:
        size = os.fstat(archive.fileno()).st_size if hasattr(archive, "fileno") else os.stat(archive).st_size
        budget = _Budget(size, limits, limits.max_scratch_bytes if scratch_room is None else scratch_room)
        try:
            package = zipfile.ZipFile(archive)
        except (zipfile.BadZipFile, EOFError):  # no directory at its end: most often a zip still being written
            result.cut_short = True
            raise
        with package:
            members = [m for m in package.infolist() if not m.is_dir()]
            _check_readable(members)
            if len(members) > limits.max_members:
                raise _Refused(f"it holds {len(members)} files, over the limit of {limits.max_members}")
            budget.check(sum(m.file_size for m in members))  # what the headers admit to, before writing
            shutil.rmtree(partial, ignore_errors=True)
            private_folder(partial)
            for member in members:
                problem = _member_problem(member, limits)
                if problem:
                    result.refused.append((member.filename, problem))
                    continue
                target = partial.joinpath(*map(_portable, PurePosixPath(member.filename.replace("\\", "/")).parts))
                try:
                    _extract_member(package, member, target, budget)
                except FileExistsError:
                    result.refused.append((member.filename, "another file in the archive has the same name here "
                                                            "(or one differing only in case or odd characters)"))
                    continue
                result.files.append(destination / target.relative_to(partial))
            replace_when_free(partial, destination, os.rename)  # the scratch copy appears whole or not at all
    except _Refused as refusal:
        result.refused.append(("*", f"the archive was refused: {refusal}"))
        result.files = []
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, OSError, EOFError, ValueError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        result.refused.append(("*", f"the archive cannot be read ({reason})"))
        result.files = []
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return result
