"""One owner per folder: a second watcher on the same state or outbox is refused, naming the first.

The lock is the operating system's (flock / msvcrt), so it ends with its process, even one killed
with kill -9; the file only says who holds it.
"""

import os
import socket
import time
from pathlib import Path

from ..core.errors import UserError
from ..core.files import PRIVATE_FILE, lock


class FolderInUse(UserError):
    """Another process already watches with this folder."""


def hold_lock(path: Path, what: str) -> int:
    """The open descriptor holding path's lock (close it to release); FolderInUse when another holds it."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), PRIVATE_FILE)
    if not lock(descriptor):
        holder = os.read(descriptor, 300).decode(errors="replace").strip() or "another process"
        os.close(descriptor)
        raise FolderInUse(f"{what} is in use by {holder}: stop that one first, or choose another folder.")
    try:
        os.ftruncate(descriptor, 0)
        os.lseek(descriptor, 0, os.SEEK_SET)
        os.write(descriptor, f"process {os.getpid()} on {socket.gethostname()} since "
                             f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    except BaseException:  # a full disk: the lock would be held by this process until it ends
        os.close(descriptor)
        raise
    return descriptor
