"""A DICOM node: studies a PACS pushes (C-STORE) land in an inbox folder, each instance durable before it is acknowledged.

Each received instance is written to a private staging file, flushed to disk, then renamed into
FOLDER/<study>/<series>/<instance>.dcm, and only then does the sender hear "success": an instance the
PACS saw acknowledged survives a kill -9, and one it did not is sent again by the PACS; the inbox never
holds half a file. Only the calling AE titles on the allow-list may connect; TLS is optional. While the disk
would keep less than the minimum free space, instances are refused as "out of resources", which a PACS with a
retry queue sends again later: the node never fills the disk that the models and the journal need too.
A series folder holds a hidden mark, touched while an association that stored into it is open: the inbox never
takes a series in parts while a PACS pauses between instances (a slow link, an archive fetching from tape).
"""

import hashlib
import logging
import os
import re
import shutil
import ssl
import tempfile
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from ..core.errors import UserError
from ..core.files import PRIVATE_FOLDER, printable, private_folder, replace_when_free, sync_folder
from ..dicom.transfer_syntaxes import DECODABLE
from ..dicom.uids import is_uid
from ..inbox.watcher import BROKEN_OFF

log = logging.getLogger("segmentation-machine")

SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000
# The DICOM default repertoire without backslash or control characters, at most 16 (spaces are padding).
AE_TITLE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")
TIMEOUT_S = 30
MB = 1024 ** 2
RECEIVED, RECEIVING = "received", "receiving"  # in listen's state folder: its inbox, and its staging area
MARK = ".receiving"  # hidden: the inbox never reads it, and one being touched holds its folder
MARK_INTERVAL_S = 0.25  # well within the shortest useful --settle


def check_ae_title(text: str, what: str) -> str:
    title = text.strip()
    if not AE_TITLE.fullmatch(title):
        raise UserError(f"{what} '{text}' is not a DICOM AE title: use 1 to 16 letters, digits or spaces "
                        "(no backslash), e.g. SEGMACHINE.")
    return title


def parse_destination(text: str) -> tuple:
    """'AE@HOST:PORT' → (AE, HOST, PORT)."""
    match = re.fullmatch(r"(.+)@(.+):([0-9]{1,5})", text.strip())
    if not match or not 0 < int(match[3]) < 65536:
        raise UserError(f"'{text}' is not a DICOM destination: write it as AE@HOST:PORT, e.g. PACS@10.0.0.5:104.")
    return check_ae_title(match[1], "The destination's AE title"), match[2], int(match[3])


@dataclass(frozen=True)
class NodeOptions:
    ae_title: str
    port: int
    allowed: tuple  # calling AE titles that may connect (never empty: nobody else may)
    host: str = ""  # every interface
    tls_cert: Path = None
    tls_key: Path = None
    tls_ca: Path = None  # when set, senders must show a certificate it signed
    min_free_mb: float = 1024  # instances that would leave less free space on the inbox's disk are refused


class _HandshakeOnFirstRead(ssl.SSLContext):
    """pynetdicom wraps each connection in its accept loop: with the handshake there, one client that connects
    and says nothing would stop the node from accepting anyone. Deferred, it runs on the association's thread,
    under its timeouts."""

    def wrap_socket(self, sock, server_side=False, do_handshake_on_connect=True, *args, **kwargs):
        return super().wrap_socket(sock, server_side, False, *args, **kwargs)


def tls_context(options: NodeOptions):
    """The server's TLS context, or None without --tls-cert."""
    if not options.tls_cert:
        if options.tls_key or options.tls_ca:
            raise UserError("--tls-key and --tls-ca need --tls-cert: give the node's certificate too.")
        return None
    context = _HandshakeOnFirstRead(ssl.PROTOCOL_TLS_SERVER)
    try:
        _show_node_certificate(context, options)
        if options.tls_ca:
            context.load_verify_locations(options.tls_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as error:
        raise UserError(f"Cannot use the TLS files {options.tls_cert}, {options.tls_key or '(key in the certificate)'}"
                        f"{', ' + str(options.tls_ca) if options.tls_ca else ''} "
                        f"({getattr(error, 'strerror', None) or getattr(error, 'reason', None) or error}): "
                        "give PEM files, with an unencrypted key readable only by this user.") from None
    return context


def sending_tls_context(options: NodeOptions):
    """For the SEG sent back to a PACS: TLS wherever the node itself takes TLS only, as patient data never leaves it
    in the clear; it shows the node's certificate and trusts --tls-ca (else the system's CAs). None without TLS."""
    if not options.tls_cert:
        return None
    context = ssl.create_default_context(cafile=options.tls_ca)
    _show_node_certificate(context, options)  # tls_context has read these files already
    return context


def _show_node_certificate(context, options: NodeOptions):
    """TLS 1.2 at least, with the node's certificate. An encrypted key would ask for its password on the terminal:
    it is refused instead."""
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(options.tls_cert, options.tls_key, password=lambda: b"")


def _file_name(uid) -> str:
    """A UID as a file name; anything else (it comes from the network) as its hash, never a path."""
    text = str(uid or "")
    return text if is_uid(text) else "x" + hashlib.sha256(text.encode()).hexdigest()[:32]


def _transfer_syntaxes() -> list:
    """Every transfer syntax, those Slicer 5.10 decodes first: pynetdicom takes the first of these that a presentation
    context offers, so a sender offering HTJ2K and explicit VR little endian sends the latter (transcoding), and one
    offering only HTJ2K still delivers (the inbox then says why it cannot be loaded). Explicit VR little endian
    first: implicit VR files lose the value representations of private tags, which other readers of them need."""
    from pynetdicom import ALL_TRANSFER_SYNTAXES
    from pydicom.uid import ExplicitVRLittleEndian

    return sorted(ALL_TRANSFER_SYNTAXES, key=lambda uid: (uid not in DECODABLE, uid != ExplicitVRLittleEndian))


def _touch(mark: Path):
    try:
        mark.touch()
    except OSError:  # its series folder removed meanwhile (retention), or the disk full: it holds nothing then
        pass


class DicomNode:
    """A storage SCP (every storage SOP class, private and unknown ones too, any transfer syntax) and C-ECHO,
    writing into folder."""

    def __init__(self, options: NodeOptions, folder: Path, staging: Path):
        if not options.allowed:
            raise UserError("Name the PACS that may send with --allow AE_TITLE (its calling AE title): "
                            "a node that accepts everyone would take studies from anyone on the network.")
        self.options = replace(options, ae_title=check_ae_title(options.ae_title, "--ae-title"),
                               allowed=tuple(check_ae_title(a, "--allow") for a in options.allowed))
        if not 0 < options.port < 65536:
            raise UserError(f"--port {options.port} is not a TCP port: choose one from 1 to 65535 (DICOM: 104 or 11112).")
        if not options.min_free_mb >= 0:  # NaN too
            raise UserError(f"--min-free-mb {options.min_free_mb:g} is not an amount of free space: give 0 or more "
                            "MB (default 1024).")
        self.folder, self.staging = Path(folder), Path(staging)
        self._context = tls_context(self.options)
        self._ae = None
        self._received = {}  # association → instances stored, for its one log line
        self._refused = {}  # association → (instances refused for want of space, the free MB last seen)
        self._marked = {}  # association → the series folders it stored into, each with a MARK touched while it is open
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self.storing = threading.Lock()  # held while a file enters the inbox: the retention sweep waits for it

    def start(self):
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        shutil.rmtree(self.staging, ignore_errors=True)  # files cut short by a kill: never acknowledged
        private_folder(self.staging)
        private_folder(self.folder)
        for mark in self.folder.glob(f"*/*/{MARK}"):  # left by a kill; quiet, so they held nothing
            mark.unlink(missing_ok=True)
        ae = AE(ae_title=self.options.ae_title)
        syntaxes = _transfer_syntaxes()
        for context in AllStoragePresentationContexts:  # stored as sent: compressed syntaxes too
            ae.add_supported_context(context.abstract_syntax, syntaxes)
        ae.add_supported_context(Verification)
        ae.require_calling_aet = list(self.options.allowed)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_S
        handlers = [(evt.EVT_REQUESTED, self._accept_unknown_classes), (evt.EVT_C_STORE, self._store),
                    (evt.EVT_REJECTED, self._rejected),
                    (evt.EVT_RELEASED, lambda event: self._end(event.assoc)),
                    (evt.EVT_ABORTED, lambda event: self._end(event.assoc, broken=True))]
        try:
            ae.start_server((self.options.host, self.options.port), block=False, ssl_context=self._context,
                            evt_handlers=handlers)
        except OSError as error:
            raise UserError(f"Cannot listen on port {self.options.port} ({error.strerror or error}): "
                            "choose another --port, or stop the program that uses it.") from None
        self._ae = ae
        self._excepthook, threading.excepthook = threading.excepthook, self._broken_association
        self._stopped.clear()
        threading.Thread(target=self._keep_marks, name="dicom-node-marks", daemon=True).start()

    def stop(self):
        """Stops listening; associations in progress are aborted (their unacknowledged instances are resent)."""
        if self._ae:
            for association in self._ae.active_associations:
                if not association.is_established:  # pynetdicom cannot abort one still being requested
                    association.kill()
            self._ae.shutdown()
            self._ae = None
            threading.excepthook = self._excepthook
        self._stopped.set()

    def describe(self) -> str:
        return (f"DICOM node {self.options.ae_title} on port {self.options.port}"
                f"{' (TLS)' if self._context else ''}, accepting {', '.join(self.options.allowed)}")

    # -- handlers, on pynetdicom's association threads ---------------------------------------
    def _accept_unknown_classes(self, event):
        """Before negotiation: SOP classes pynetdicom does not know (a vendor's private one, such as Siemens CSA
        Non-Image in most Siemens studies, or one newer than pynetdicom) are taken as storage for this association,
        as Orthanc and storescp --promiscuous take them: refusing one fails the PACS's whole send. Registering the UID
        is what routes its C-STORE to _store; unlike pynetdicom's UNRESTRICTED_STORAGE_SERVICE switch, no other AE
        in the process changes what it accepts."""
        from pynetdicom import build_context, register_uid
        from pynetdicom.service_class import ServiceClass, StorageServiceClass
        from pynetdicom.sop_class import uid_to_service_class

        request, acceptor = event.assoc.requestor.primitive, event.assoc.acceptor
        if request.calling_ae_title.strip() not in self.options.allowed:
            return  # refused by the negotiation: nothing registered for strangers
        offered = {str(c.abstract_syntax) for c in request.presentation_context_definition_list}
        added = sorted(uid for uid in offered - {str(c.abstract_syntax) for c in acceptor.supported_contexts}
                       if is_uid(uid)
                       and uid_to_service_class(uid) in (ServiceClass, StorageServiceClass))  # registered before
        for uid in added:
            if uid_to_service_class(uid) is ServiceClass:
                register_uid(uid, "Storage_" + uid.replace(".", "_"), StorageServiceClass)
        acceptor.supported_contexts = acceptor.supported_contexts + [build_context(uid, _transfer_syntaxes())
                                                                     for uid in added]

    def _store(self, event) -> int:
        try:
            dataset = event.dataset  # elements are decoded when read: only the two UIDs are
            folder = self.folder / _file_name(dataset.StudyInstanceUID) / _file_name(dataset.SeriesInstanceUID)
            data = event.encoded_dataset()  # the bytes as sent, with their file meta
        except Exception as error:  # whatever a sender puts in a dataset: that instance is refused
            log.warning("Refused an instance from %s: it cannot be read (%s).", self._peer(event.assoc), error)
            return CANNOT_UNDERSTAND
        try:
            free = shutil.disk_usage(self.folder).free
            if free - len(data) < self.options.min_free_mb * MB:
                with self._lock:
                    refused, _ = self._refused.get(event.assoc, (0, 0))
                    self._refused[event.assoc] = (refused + 1, free / MB)
                return OUT_OF_RESOURCES
            self._write(folder / f"{_file_name(event.request.AffectedSOPInstanceUID)}.dcm", data)
        except OSError as error:
            log.error("Cannot store an instance from %s (%s): free some space; the sender may send it again.",
                      self._peer(event.assoc), error.strerror or error)
            return OUT_OF_RESOURCES
        with self._lock:
            self._received[event.assoc] = self._received.get(event.assoc, 0) + 1
            marked = self._marked.setdefault(event.assoc, set())
            if folder not in marked:
                (folder / BROKEN_OFF).unlink(missing_ok=True)  # sent again: whole, unless this one breaks off too
                marked.add(folder)
            _touch(folder / MARK)
        return SUCCESS

    def _write(self, path: Path, data: bytes):
        descriptor, temp = tempfile.mkstemp(dir=self.staging, suffix=".partial")
        try:
            with os.fdopen(descriptor, "wb") as stream:
                stream.write(data)
                stream.flush()
                os.fsync(stream.fileno())
            with self.storing:
                self._make_folder(path.parent)
                replace_when_free(temp, path)  # a resent instance replaces its earlier copy whole
                sync_folder(path.parent)
        finally:
            if os.path.exists(temp):
                os.unlink(temp)

    def _make_folder(self, folder: Path):
        if folder.is_dir():
            return
        self._make_folder(folder.parent)
        folder.mkdir(mode=PRIVATE_FOLDER, exist_ok=True)
        sync_folder(folder.parent)

    def _rejected(self, event):
        if event.assoc.requestor.ae_title.strip() in self.options.allowed:  # pynetdicom's limit, 10 at once
            log.warning("Refused an association from %s: too many are open; it may try again later.",
                        self._peer(event.assoc))
        else:
            log.warning("Refused an association from %s: only %s may send (--allow).", self._peer(event.assoc),
                        ", ".join(self.options.allowed))

    def _broken_association(self, args):
        """pynetdicom's reactor thread dies on a message that is not DICOM (its traceback went to stderr): one
        sentence instead; the association is over, and what it stored before stays."""
        if args.thread is not None and "run_reactor" in args.thread.name:
            log.warning("An association ended: its sender sent a message that is not DICOM (%s: %s).",
                        type(args.exc_value).__name__, args.exc_value)
            return
        self._excepthook(args)

    def _keep_marks(self):
        while not self._stopped.wait(MARK_INTERVAL_S):
            # pynetdicom ends an association broken by a malformed message without any event
            with self._lock:
                dead = [a for a in {*self._marked, *self._received, *self._refused} if not a.is_alive()]
            for association in dead:
                self._end(association, broken=True)
            with self._lock:  # never touched again once its association's marks were released
                for folder in set().union(*self._marked.values()):
                    _touch(folder / MARK)

    def _release_marks(self, association):
        """With self._lock held: removes the marks of association's folders that no other open one holds."""
        for folder in self._marked.pop(association, set()) - set().union(*self._marked.values()):
            (folder / MARK).unlink(missing_ok=True)

    def _end(self, association, broken: bool = False):
        """An association released, or broken (aborted, cut, timed out): its line, and nothing of it kept. A broken
        one's series are marked as such before their marks go: whatever its instance numbers say, it may lack some."""
        with self._lock:
            count = self._received.pop(association, 0)
            refused, free_mb = self._refused.pop(association, (0, 0))
            for folder in self._marked.get(association, set()) if broken else ():
                _touch(folder / BROKEN_OFF)
            self._release_marks(association)
        if count and broken:
            log.warning("Received %d instance(s) from %s, which then broke off without a release: its series may be "
                        "incomplete, and are modelled after --hold marked so; have the PACS send them again.", count,
                        self._peer(association))
        elif count:
            log.info("Received %d instance(s) from %s.", count, self._peer(association))
        if refused:
            log.warning("Refused %d instance(s) from %s: only %.0f MB free on %s (--min-free-mb %g); free some space, "
                        "then have them sent again.", refused, self._peer(association), free_mb,
                        printable(self.folder), self.options.min_free_mb)

    @staticmethod
    def _peer(association) -> str:
        requestor = association.requestor
        return f"AE '{requestor.ae_title.strip()}' at {requestor.address}"


def send_file(path: Path, destination: tuple, calling_ae: str, tls: ssl.SSLContext = None) -> str:
    """C-STORE of one DICOM file to (AE, HOST, PORT), over TLS with the tls context; "" when stored, else why not
    (one sentence)."""
    from pydicom import dcmread
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE

    title, host, port = destination
    dataset = dcmread(path)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_S
    ae.add_requested_context(dataset.SOPClassUID, sorted({dataset.file_meta.TransferSyntaxUID, ExplicitVRLittleEndian}))
    try:
        association = ae.associate(host, port, ae_title=title, tls_args=(tls, host) if tls else None)
        if not association.is_established:
            if tls:
                return (f"{title} at {host}:{port} did not accept a TLS association from {calling_ae}: check its AE "
                        "list and port, that it takes TLS, trusts this node's certificate and shows one --tls-ca "
                        "(or the system) trusts.")
            return f"{title} at {host}:{port} did not accept an association from {calling_ae}: check its AE list and port."
        try:
            status = association.send_c_store(dataset)
        finally:
            association.release()
    except (OSError, RuntimeError, ValueError) as error:  # e.g. it does not take this SOP class
        return f"sending {path.name} to {title} at {host}:{port} failed ({error})."
    if not status or status.Status != SUCCESS:
        code = f"status 0x{status.Status:04X}" if status else "no answer"
        return f"{title} at {host}:{port} did not store {path.name} ({code})."
    return ""
