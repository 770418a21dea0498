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
    """name → secret, one copy of each: in the keychain, else in a file in folder (no keychain, or it refuses: macOS
    locks its keychain over SSH and for services). A secret already in the file stays there: stock Slicer has no
    keyring and reads only the file, the CLI (with keyring) both."""

    def __init__(self, folder: Path = None, use_keychain: bool = True):
        self.folder = Path(folder or Path.home() / ".segmentation-machine" / "secrets")
        self._keyring = _keyring() if use_keychain else None

    @property
    def where(self) -> str:
        return "the OS keychain" if self._keyring else self._file_store

    @property
    def _file_store(self) -> str:
        return f"{self.folder} (readable only by you)"

    def save(self, name: str, secret: str) -> str:
        """Where the secret went: the keychain, else the file (where the keychain refuses it, or where the file
        already holds it: stock Slicer reads only the file). One copy either way."""
        if self._keyring and not (self.folder / name).exists():
            try:
                self._keyring.set_password(SERVICE, name, secret)
                return self.where
            except Exception:  # noqa: BLE001 - a locked or refusing keychain: the file store works
                pass
        write_private(self.folder / name, secret)
        self._forget_in_keychain(name)
        return self._file_store

    def load(self, name: str):
        path = self.folder / name
        if path.exists():  # the one copy where it exists (see save)
            return path.read_text(encoding="utf-8")
        if self._keyring:
            try:
                return self._keyring.get_password(SERVICE, name)
            except Exception:  # noqa: BLE001 - as in save
                pass
        return None

    def forget(self, name: str):
        self._forget_in_keychain(name)
        (self.folder / name).unlink(missing_ok=True)

    def _forget_in_keychain(self, name: str):
        if self._keyring:
            try:
                self._keyring.delete_password(SERVICE, name)
            except Exception:  # noqa: BLE001 - nothing stored there, or a locked keychain
                pass
