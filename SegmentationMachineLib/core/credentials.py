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
    """name → secret; folder is used when no keychain is available or it refuses (macOS locks its keychain over SSH
    and for services). Loading looks in both: stock Slicer has no keyring and keeps its keys in the file, where the
    CLI (with keyring) finds them too."""

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
        """Where the secret went: the keychain, or the file where the keychain refused it."""
        if self._keyring:
            try:
                self._keyring.set_password(SERVICE, name, secret)
                (self.folder / name).unlink(missing_ok=True)  # one copy: the keychain's
                return self.where
            except Exception:  # noqa: BLE001 - a locked or refusing keychain: the file store works
                pass
        write_private(self.folder / name, secret)
        return self._file_store

    def load(self, name: str):
        if self._keyring:
            try:
                secret = self._keyring.get_password(SERVICE, name)
                if secret is not None:
                    return secret
            except Exception:  # noqa: BLE001 - as in save
                pass
        path = self.folder / name
        return path.read_text(encoding="utf-8") if path.exists() else None

    def forget(self, name: str):
        if self._keyring:
            try:
                self._keyring.delete_password(SERVICE, name)
            except Exception:  # noqa: BLE001 - nothing stored there, or a locked keychain
                pass
        (self.folder / name).unlink(missing_ok=True)
