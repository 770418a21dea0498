"""Qt-free state of the module's Send to PACS part (in Export and print): a segmentation stored as a DICOM SEG in its
study on a DICOMweb server (STOW-RS), with credentials kept in the keychain under the server's names."""

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..core.addresses import DICOMWEB_PREFIX, is_dicomweb
from ..core.cancel import CancelRequest, Cancelled
from ..core.credentials import SecretStore
from ..core.errors import UserError
from ..mesh.dicomseg import SEG_FILE, SegInput, write_seg
from ..mesh.export import DEFAULT_EXPORT_FOLDER, ExportOptions, new_output_folder, prepare_export
from ..pacs.dicomweb import TIMEOUT, DicomWeb, DicomWebServer, credentials, kept
from ..pacs.sending import send_instances, sending_cancelled
from .tasks import BackgroundTask

SAVE_CREDENTIALS = "save a token, or a user name and password, that it accepts (Save credentials)"


def send_seg(server: DicomWebServer, auth, seg: SegInput, timeout=TIMEOUT, keep_in: Path = DEFAULT_EXPORT_FOLDER,
             name: str = "segmentation", cancel: CancelRequest = None):
    """Any thread: writes the SEG into a private temporary folder and stores it in its study; returns it (Stored).
    A SEG the server did not store (or not keep) is moved into a new folder NAME_seg-not-stored_TIME in keep_in,
    which the sentence names: the user's work is never lost with the temporary folder. cancel: checked before the
    SEG is written and before it is sent (Cancelled: nothing was sent, nothing kept); a store under way finishes."""
    with tempfile.TemporaryDirectory(prefix="segmentation-machine-seg-") as folder:
        if cancel:
            cancel.check(sending_cancelled(0, 1))
        path = Path(folder) / SEG_FILE
        write_seg(path, seg)
        try:
            web = DicomWeb(server, auth, timeout, set_credentials=SAVE_CREDENTIALS)
            return send_instances([path], web.store, cancel)[0]
        except Cancelled:  # asked for: the SEG goes with its temporary folder
            raise
        except UserError as error:
            try:
                kept_path = new_output_folder(keep_in, f"{name}_seg-not-stored") / SEG_FILE
                shutil.move(path, kept_path)
            except (UserError, OSError) as problem:
                raise UserError(f"{str(error).rstrip('.')}; keeping the DICOM SEG failed too ({problem}).") from None
            raise kept(error, kept_path) from None


def _segments(count: int) -> str:
    return f"{count} segment" + ("" if count == 1 else "s")


@dataclass
class PacsPanel:
    server: str = ""  # as typed: https://HOST/dicom-web, with or without the dicomweb+ of the CLI
    status: str = "Give the PACS's DICOMweb address to send a segmentation made on a DICOM series."
    task: BackgroundTask = None
    store: SecretStore = None  # default: the keychain (or ~/.segmentation-machine/secrets)
    environ: dict = field(default_factory=lambda: os.environ)  # SM_DICOMWEB_* there come before saved ones
    timeout: tuple = TIMEOUT
    unsent_folder: Path = DEFAULT_EXPORT_FOLDER  # where a SEG the server did not store is kept
    _sent: str = ""  # the sentence that ends the send well
    _cancel: CancelRequest = None  # the running send's (Cancel)

    def __post_init__(self):
        self.store = self.store or SecretStore()

    def can_send(self) -> bool:
        return bool(self.server.strip()) and self.task is None

    def _parsed(self) -> DicomWebServer:
        text = self.server.strip()
        return DicomWebServer.parse(text if is_dicomweb(text) else DICOMWEB_PREFIX + text)

    def save_credentials(self, token: str = "", user: str = "", password: str = "") -> bool:
        """A token, or a user and password, for this server; the others are forgotten. True once saved (the
        widget then clears its fields); the secrets are never part of the status."""
        try:
            server = self._parsed()
        except UserError as error:
            self.status = str(error)
            return False
        token, user = token.strip(), user.strip()
        if not token and not (user and password):
            self.status = "Give a token, or a user name and a password, then Save credentials."
            return False
        secrets = (token, "", "") if token else ("", user, password)
        places = set()
        for name, secret in zip(server.keychain_names(), secrets):
            if secret:
                places.add(self.store.save(name, secret))
            else:
                self.store.forget(name)
        self.status = f"Saved the credentials for {server.url} in {' and '.join(sorted(places))}."
        return True

    def forget_credentials(self):
        try:
            server = self._parsed()
        except UserError as error:
            self.status = str(error)
            return
        for name in server.keychain_names():
            self.store.forget(name)
        self.status = f"Forgot the credentials for {server.url}."

    def start(self, segmentation_node, ctx=None, seg_installed: bool = True):
        """Main thread: checks, and copies the SEG's input out of the scene; writing and sending go to a worker.
        ctx: the module's scene context (prepare_export); seg_installed: False where the user declined the packages
        DICOM SEG needs."""
        if not seg_installed:
            self.status = "Not sent: DICOM SEG needs highdicom, which was not installed (Send to PACS offers it again)."
            return
        if segmentation_node is None:
            self.status = "Choose the segmentation to send (Segmentation, above), then Send to PACS."
            return
        try:
            server = self._parsed()
            auth = credentials(server, self.environ, self.store)
            prepared = prepare_export(segmentation_node, ExportOptions(formats=("seg",)), ctx=ctx)
        except UserError as error:
            self.status = str(error)
            return
        if prepared.seg is None:
            self.status = f"Every segment of '{prepared.name}' is empty: nothing to send."
            return
        what = f"'{prepared.name}' ({_segments(len(prepared.seg.segments))}) to {server.url} as a DICOM SEG"
        self._cancel = CancelRequest()
        self.task = BackgroundTask(send_seg, server, auth, prepared.seg, self.timeout, self.unsent_folder,
                                   prepared.name, self._cancel)
        self.status, self._sent = f"Sending {what}...", f"Sent {what}."

    def cancel(self):
        """Main thread (Send to PACS, which reads Cancel meanwhile): the send stops before its next instance; one
        under way is finished, so the PACS has it whole or not at all. finish() says which."""
        if self.task and not self._cancel.requested:
            self._cancel.cancel()
            self.status = ("Cancelling the send (a store under way is finished first: the PACS gets the DICOM SEG "
                           "whole or not at all)...")

    def finish(self):
        """Main thread, once the task is done: the header of what was stored, or None with the cause as status."""
        task, self.task = self.task, None
        stored, problem = task.outcome()
        late = "Cancel came after the PACS had stored it." if self._cancel and self._cancel.requested else ""
        self.status = problem or " ".join(filter(None, [self._sent, late, stored.unconfirmed]))
        return stored and stored.dataset
