"""Files written safely: whole or not at all, and private where they hold secrets or patient data."""

import errno
import os
import re
import tempfile
import threading
import time
from contextlib import contextmanager, suppress
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

PRIVATE_FOLDER = 0o700  # patient data and state: the owner only
PRIVATE_FILE = 0o600
# The user's umask, read once (setting it is the only way to read it, and it is process-wide: not in threads).
UMASK = os.umask(0o077)
os.umask(UMASK)

# Text we write is UTF-8 whatever the locale (Windows' is cp1252, where "Głowa" cannot be written at all)
_UTF8_TEXT = {"encoding": "utf-8"}
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1
# Behaviour Windows needs (tests switch it); calls that exist only on Windows ask os.name itself
WINDOWS = os.name == "nt"
# Names Windows keeps for devices, with any extension: CON.stl cannot be made there
WINDOWS_DEVICES = {"con", "prn", "aux", "nul", "conin$", "conout$",
                   *(f"{port}{n}" for port in ("com", "lpt") for n in "0123456789¹²³")}


def not_a_device(name: str) -> str:
    """name, '_' before it where Windows would take it for a device (CON, nul.txt, COM1.v2.stl: whatever follows
    the first dot)."""
    return f"_{name}" if name.split(".")[0].rstrip(" ").casefold() in WINDOWS_DEVICES else name  # "nul .txt" too


def _as_the_umask_says(descriptor: int):
    """A file mkstemp made (0600) given the user's normal permissions, as any program's output."""
    if hasattr(os, "fchmod"):  # Windows' Python has none before 3.13 (Slicer 5.10's is 3.12)
        os.fchmod(descriptor, 0o666 & ~UMASK)


@contextmanager
def atomic_file(path: Path, mode: str = "wb"):
    """Writes to a hidden temporary file beside path, then renames it into place; never overwrites.
    The file gets the user's normal permissions (umask), as any program's output: others may open exports."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(path)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        _as_the_umask_says(handle)
        with os.fdopen(handle, mode, **_UTF8_TEXT if "b" not in mode else {}) as stream:
            yield stream
        try:
            os.link(temp, path)  # fails instead of replacing when path appeared meanwhile
        except FileExistsError:
            raise
        except OSError:  # file systems without hard links
            if path.exists():
                raise FileExistsError(path) from None
            os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


def _sync(path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError as error:  # a folder on CIFS (Linux < 4.17), Ceph or WSL1's drives cannot be flushed
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EIO) or not os.path.isdir(path):
            raise
    finally:
        os.close(descriptor)


def sync_folder(folder: Path):
    """A rename or a new entry is durable only once its folder is flushed (POSIX; Windows has no such call)."""
    if os.name != "nt":
        _sync(folder)


def sync_tree(folder: Path):
    """Every file and folder under folder, and folder's own entry, on disk: a power cut after a journal says a
    result is there leaves it whole, not empty files (the system writes data back up to half a minute later)."""
    if os.name == "nt":  # NTFS journals its names; FlushFileBuffers needs write access
        return
    for root, _, files in os.walk(folder):
        for name in files:
            _sync(os.path.join(root, name))
        _sync(root)
    sync_folder(Path(folder).parent)


def replace_private(path: Path, text: str, private: bool = True):
    """Replaces path whole with text, owner-only (0600) unless not private (then as the umask says). The temporary
    file is made by mkstemp in the same folder (a new name, O_EXCL), so a link planted there is never followed."""
    path = Path(path)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        if not private:
            _as_the_umask_says(handle)
        with os.fdopen(handle, "w", **_UTF8_TEXT) as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())  # its bytes before its name: a power cut leaves the old file or this one
        replace_when_free(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


def replace_when_free(source, target, move=None, waits=(0.1, 0.2, 0.4, 0.8, 1.5, 2.0)):
    """move (os.replace; os.rename for a folder that must not land on another), tried again for about 5 s where
    Windows refuses it (errno 13) because another program has a file in it open for a moment: a virus scanner just
    after it was written, a monitor reading status.json."""
    for wait in (*waits, None) if WINDOWS else (None,):
        try:
            return (move or os.replace)(source, target)
        except PermissionError:
            if wait is None:
                raise
            time.sleep(wait)


def publish_folder(staged: Path, reserved: Path):
    """staged, written in full, onto its reserved_folder: POSIX's rename replaces an empty folder at once; Windows'
    refuses to, so there the reservation goes first."""
    if WINDOWS and empty_folder(reserved):
        replace_when_free(reserved, None, lambda folder, _: os.rmdir(folder))
    replace_when_free(staged, reserved, os.rename)
    sync_folder(reserved.parent)


def reserved_folder(parent: Path, base: str) -> Path | None:
    """A new, empty folder parent/base (or base-2, base-3...): made with mkdir, so no other run can take its name
    between the look and the write. None when a thousand are taken."""
    for attempt in range(1, 1000):
        folder = parent / (base if attempt == 1 else f"{base}-{attempt}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    return None


def unreserve(folder: Path):
    """A reserved_folder given back: removed only while empty, so never a result written into it."""
    with suppress(OSError):
        folder.rmdir()


def empty_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def private_folder(path: Path) -> Path:
    """path created if needed and made owner-only (0700)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_FOLDER)
    os.chmod(path, PRIVATE_FOLDER)
    return path


def write_private(path: Path, text: str):
    """Writes text to path, readable and writable by the user only, replacing it whole."""
    path = Path(path)
    private_folder(path.parent)
    replace_private(path, text)


# Windows' locks are mandatory: a locked byte cannot even be read by others. So the lock is on a byte far past
# anything written in a lock file (inbox/locks.py writes who holds it there, for a second process to read).
WINDOWS_LOCKED_BYTE = 1 << 20


def lock(descriptor: int, wait: bool = False) -> bool:
    """Takes the operating system's lock on an open file (flock / msvcrt), which ends with its process, even one
    killed with kill -9; whether it was taken (with wait: once it is free)."""
    try:
        if fcntl:
            fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            return True
        os.lseek(descriptor, WINDOWS_LOCKED_BYTE, os.SEEK_SET)
        while True:  # LK_LOCK itself gives up after 10 s
            try:
                msvcrt.locking(descriptor, msvcrt.LK_LOCK if wait else msvcrt.LK_NBLCK, 1)  # from the position
                return True
            except OSError:
                if not wait:
                    raise
    except OSError:
        return False
    finally:
        os.lseek(descriptor, 0, os.SEEK_SET)


_THREAD_LOCKS = {}  # lock file path -> the lock this process's threads take before the file's
_THREAD_LOCKS_GUARD = threading.Lock()


def _thread_lock(path) -> threading.Lock:
    with _THREAD_LOCKS_GUARD:
        return _THREAD_LOCKS.setdefault(os.path.normcase(os.path.abspath(path)), threading.Lock())


@contextmanager
def locked(path: Path):
    """One process (and thread) at a time inside: path is the lock file, created owner-only where missing; the others
    wait. Threads take a lock of this process first: over NFS flock is emulated with fcntl's locks, which are the
    process's and do not keep its threads apart."""
    with _thread_lock(path):
        private_folder(Path(path).parent)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), PRIVATE_FILE)
        try:
            lock(descriptor, wait=True)
            yield
        finally:
            if not fcntl:  # Windows releases a lock some time after its file is closed: at once here
                os.lseek(descriptor, WINDOWS_LOCKED_BYTE, os.SEEK_SET)
                msvcrt.locking(descriptor, msvcrt.LK_UNLCK, 1)
            os.close(descriptor)  # flock's lock goes with it


# A file or folder name that is not UTF-8 (Latin-1, from an older share or CD): Slicer's readers and our journal take
# text only.
PATH_NOT_UTF8 = ("its path is not UTF-8 text (a file's or a folder's name made on an older system): rename it, or "
                 "copy it with a tool that converts names")


def utf8_path(path) -> bool:
    """Whether path can be written as UTF-8 (Python keeps other bytes of a name as lone surrogates)."""
    try:
        str(path).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def printable(text) -> str:
    """text with control characters escaped (\\n, \\x1b...): a file name or a server's message
    printed as is could forge log lines or send escape sequences to the terminal. A name's bytes that are not
    UTF-8 are shown as \\xNN."""
    text = str(text)
    if not utf8_path(text):
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return CONTROL_CHARACTERS.sub(lambda m: repr(m.group())[1:-1], text)
