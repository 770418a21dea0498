"""Secrets (API keys) in the OS keychain where one works, else in a file only the user can read.

Never printed, logged or put in URLs; forget() removes them.
"""

from pathlib import Path

from .files import write_private

SERVICE = "SegmentationMachine"


def _keyring():
    """The keyring module when a real keychain backend is available, else None."""
    try:
        import keyring
        from keyring.backends import fail
    except ImportError:
        return None
    try:
        backend = keyring.get_keyring()
    except Exception:  # a broken keychain must not stop the user: the file store works
        return None
    # Without a real keychain (a headless Linux) keyring offers only backends of priority <= 0.
    return None if isinstance(backend, fail.Keyring) or getattr(backend, "priority", 0) <= 0 else keyring


class SecretStore:
    """name → secret; folder is used when no keychain is available."""

    def __init__(self, folder: Path = None, use_keychain: bool = True):
        self.folder = Path(folder or Path.home() / ".segmentation-machine" / "secrets")
        self._keyring = _keyring() if use_keychain else None

    @property
    def where(self) -> str:
        return "the OS keychain" if self._keyring else f"{self.folder} (readable only by you)"

    def save(self, name: str, secret: str):
        if self._keyring:
            self._keyring.set_password(SERVICE, name, secret)
            return
        write_private(self.folder / name, secret)

    def load(self, name: str):
        if self._keyring:
            return self._keyring.get_password(SERVICE, name)
        path = self.folder / name
        return path.read_text() if path.exists() else None

    def forget(self, name: str):
        if self._keyring:
            try:
                self._keyring.delete_password(SERVICE, name)
            except Exception:  # nothing stored: nothing to forget
                pass
            return
        (self.folder / name).unlink(missing_ok=True)
