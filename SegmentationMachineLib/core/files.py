"""Files written safely: whole or not at all, and private where they hold secrets."""

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(path: Path, mode: str = "wb"):
    """Writes to a hidden temporary file beside path, then renames it into place; never overwrites."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(path)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(handle, mode) as stream:
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


def write_private(path: Path, text: str):
    """Writes text to path, readable and writable by the user only, replacing it whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    temporary = path.with_name(f".{path.name}.partial")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as stream:
        stream.write(text)
    os.replace(temporary, path)
