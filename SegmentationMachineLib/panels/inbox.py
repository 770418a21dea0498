"""Qt-free state of the module's Inbox section."""

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import UserError
from ..core.files import printable
from ..dicom.series import is_quiet_skip
from ..inbox.watcher import DEFAULT_INBOX, OUTBOX_STATE, Inbox, InboxOptions
from ..pacs.dicomnode import RECEIVED
from .tasks import BackgroundTask

STOP_WAIT_S = 5.0  # Stop never hangs on a read still running: after this it is abandoned (its thread is a daemon)
# Series the inbox loaded that stay in the scene: a Slicer left watching for weeks would fill its memory (a CT is
# 100-300 MB). Older ones that nothing uses leave the scene; the DICOM database keeps them.
KEEP_LOADED = 12  # a CT study often holds 5-10 series
log = logging.getLogger("segmentation-machine")


def _referenced_ids(scene) -> set:
    """The IDs of every node another node refers to: a segmentation's or the Segment Editor's source volume, a
    module's parameters, a transform's."""
    referenced = set()
    for node in (scene.GetNthNode(index) for index in range(scene.GetNumberOfNodes())):
        for role in (node.GetNthNodeReferenceRole(n) for n in range(node.GetNumberOfNodeReferenceRoles())):
            referenced.update(node.GetNthNodeReferenceID(role, n) for n in range(node.GetNumberOfNodeReferences(role)))
    return referenced


def _used(volume, referenced: set) -> bool:
    """Whether the user works with volume: a slice view shows it, a node refers to it (referenced: _referenced_ids),
    a visible volume rendering shows it, or it was changed since it was read."""
    if volume.GetModifiedSinceRead() or volume.GetID() in referenced:
        return True
    return any(display and display.IsA("vtkMRMLVolumeRenderingDisplayNode") and display.GetVisibility()
               for display in (volume.GetNthDisplayNode(n) for n in range(volume.GetNumberOfDisplayNodes())))


def _remove_with_its_nodes(volume, scene):
    """The volume and its display and storage nodes: a display node left in the scene keeps the voxels in memory."""
    for own in [volume.GetNthDisplayNode(n) for n in range(volume.GetNumberOfDisplayNodes())] + \
               [volume.GetNthStorageNode(n) for n in range(volume.GetNumberOfStorageNodes())]:
        if own is not None:
            scene.RemoveNode(own)
    scene.RemoveNode(volume)


def default_inbox_folder() -> Path:
    """SM_INBOX where set (the pod image sets /workspace/inbox), else ~/SegmentationMachine/Inbox."""
    return Path(os.environ.get("SM_INBOX") or DEFAULT_INBOX)


def inbox_state_folder(folder: Path) -> Path:
    """Journal and scratch area of one inbox folder, outside it and apart from other inboxes': under SM_INBOX_STATE
    where set (the pod image: on its volume, so a resumed pod delivers no series twice), else in the home folder."""
    key = hashlib.sha256(str(Path(folder).expanduser().resolve()).encode()).hexdigest()[:16]
    return Path(os.environ.get("SM_INBOX_STATE") or Path.home() / ".segmentation-machine" / "inboxes") / key


def unexpected_failure(series_name: str) -> str:
    """The row of a series that a bug of ours stopped loading: what to do, and never the error's own text (it may
    quote a header value)."""
    return (f"{series_name} could not be loaded: an unexpected error stopped it (the details are in Slicer's Python "
            "console and log); please report it with the log.")


@dataclass
class InboxPanel:
    """Polls the inbox on a worker thread; the widget loads what is delivered and reports back.

    Acknowledgements are applied between polls on the main thread, so the inbox is only ever
    used by one thread at a time.
    """

    folder: Path = field(default_factory=default_inbox_folder)
    settle_seconds: float = 5.0
    hold_seconds: float = 60.0  # how long a series that looks incomplete waits for more files
    status: str = "Press Start to watch the inbox folder."
    inbox: Inbox = None
    task: BackgroundTask = None
    state_folder: Path = None  # default: inbox_state_folder(folder)
    _acknowledgements: list = field(default_factory=list)
    # Unpacked zips that loaded series come from: Slicer's scene (and its DICOM SEG export) reads their files, so they
    # stay for the whole session, across Stop and Start, even once their zip is gone; the next session removes them.
    _in_use: set = field(default_factory=set)
    _kept: list = field(default_factory=list)  # (node ID, its unpacked folders) of what the inbox loaded, oldest first
    _said: str = ""  # what loaded() said of the series it was last told of
    # Study (DicomSeries.origin) -> the kind() of its series last offered as source volume (as_source)
    _offered: dict = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return self.inbox is not None

    def start(self):
        """Watches folder, or says in status why not. Never raises: the Start button's Qt slot would only print the
        traceback to Slicer's Python console, and the button would seem to do nothing."""
        folder = Path(self.folder).expanduser()
        state = Path(self.state_folder or inbox_state_folder(folder))
        inbox = Inbox(InboxOptions(folder=folder, state_folder=state, settle_seconds=self.settle_seconds,
                                   hold_seconds=self.hold_seconds))
        inbox.in_use = self._in_use
        if folder == default_inbox_folder().expanduser():
            with contextlib.suppress(OSError):  # not made: start() says the folder does not exist
                folder.mkdir(parents=True, exist_ok=True)  # the default inbox is ours to create
        try:
            inbox.start()
        except UserError as error:
            self.status = str(error)
            return
        self.inbox = inbox
        self.status = f"Watching {folder}: series appear here when their files have settled."

    def point_at_received(self, chosen: Path) -> bool:
        """Points the inbox at what `listen` received: chosen is its OUTBOX (or its --state folder). False, with the
        sentence as status, when chosen is neither."""
        chosen = Path(chosen).expanduser()
        for received in (chosen / OUTBOX_STATE / RECEIVED, chosen / RECEIVED):
            if received.is_dir():
                self.folder = received
                return True
        self.status = (f"{chosen} holds no {OUTBOX_STATE}/{RECEIVED} folder, so it is not where `segmentation-machine "
                       "listen` puts what it receives: choose the folder listen was given with --out (or --state).")
        return False

    def stop(self):
        if self.task:
            self.task.wait(STOP_WAIT_S)
            self.task = None
        self._apply_acknowledgements()
        if self.inbox:
            self.inbox.stop()
            self.inbox = None
        self.status = "Stopped."

    def tick(self) -> list:
        """Main thread, from a timer: returns the deliveries that became ready since the last call, the best default
        first (DicomSeries.preference: a study's axial CT before its reformats), for as_source."""
        if not self.running:
            return []
        if self.task is None:
            self._apply_acknowledgements()
            self.task = BackgroundTask(self.inbox.poll)
            return []
        if not self.task.done():
            return []
        task, self.task = self.task, None
        deliveries, problem = task.outcome()
        self._say_duplicates()
        if problem:
            self.status = problem
        return sorted(deliveries or [], key=lambda delivery: delivery.series.preference())

    def loaded(self, delivery, ok: bool, reason: str = "", notes=(), node=None):
        """The widget loaded a delivery into node (or failed to, with reason); recorded before the next poll. A loaded
        series that looks incomplete, or that the loader changed (notes, e.g. resampled to even spacing), says so in
        its row and in the status: it was loaded, but not as the scanner made it. A series that failed says why in its
        row and the status line, and in the log (no dialog: the inbox works while the user does something else)."""
        before = self.status
        if not ok:
            self.status = reason
            log.warning("%s", reason)
        else:
            reason = delivery.remarks(notes)
            if reason:
                self.status = f"{delivery.series.name} was loaded. {reason}"
            if node is not None:
                self._kept.append((node.GetID(), self.inbox.unpacked_folders(delivery) if self.inbox else set()))
                removed = self._unload_unused(node.GetScene())
                if removed:
                    left = (f"{', '.join(removed)} left the scene: the inbox keeps its {KEEP_LOADED} newest series "
                            "there; the DICOM database still has it.")
                    self.status = f"{self.status} {left}" if reason else left
        self._acknowledgements.append((delivery, ok, reason))
        self._said = self.status if self.status != before else ""  # about this series: as_source adds to it

    def as_source(self, delivery, wanted: bool, prompting: bool) -> bool:
        """After loaded(): whether the series just loaded becomes the source volume and is shown in the slice views.
        wanted: "Make each new series the source volume" is ticked; prompting: an AI prompt tool is active or a prompt
        waits or runs, which would then go to the new series: it is held back, and the status says so. A series of a
        less fit kind than its study's series offered before (a reformat or localizer after its axial CT, together
        in one tick or later) is loaded beside it, not offered: the default stays as `model` would choose it."""
        if not wanted:
            return False
        series = delivery.series
        if series.origin:
            if series.origin in self._offered and self._offered[series.origin] < series.kind():
                return False
            self._offered[series.origin] = series.kind()
        if prompting:
            held = f"Series {series.name} arrived: choose it as source volume when you are ready."
            self.status = f"{self._said} {held}".strip()
        return not prompting

    def scene_closed(self):
        """Main thread, at Close Scene: what the inbox loaded is gone with it, and the next scene's nodes get the same
        IDs (a user's own volume would have been taken for an old series and removed)."""
        self._in_use -= set().union(*(folders for _, folders in self._kept))
        self._kept.clear()
        self._offered.clear()  # its series left with the scene: the next one of the study is the source again

    def _unload_unused(self, scene) -> list:
        """Main thread: the volumes the inbox loaded before its KEEP_LOADED newest leave the scene where nothing
        uses them (no slice view shows them, no node refers to them, none was edited); returns their names."""
        removed, referenced = [], _referenced_ids(scene)
        for entry in self._kept[:-KEEP_LOADED]:
            node = scene.GetNodeByID(entry[0])
            if node is None or not _used(node, referenced):
                if node is not None:
                    removed.append(node.GetName())
                    _remove_with_its_nodes(node, scene)
                self._kept.remove(entry)
                self._in_use -= entry[1] - set().union(*(folders for _, folders in self._kept))
        return removed

    def copies_into_database(self, delivery) -> bool:
        """Whether Slicer's DICOM database should keep its own copy of delivery's files: those from an unpacked zip
        are removed in a later session, and the database must not list series whose files are gone."""
        return bool(self.inbox and self.inbox.unpacked_folders(delivery))

    def _say_duplicates(self):
        """Drops that repeat delivered files are said once, as watch says them, and the inbox's list emptied."""
        copies, self.inbox.duplicates = self.inbox.duplicates, []
        if copies:
            self.status = " ".join(f"{c.name}: {c.files} file(s) {c.reason}; not loaded again." for c in copies)

    def _apply_acknowledgements(self):
        for delivery, ok, reason in self._acknowledgements:
            if ok:
                self._in_use |= self.inbox.unpacked_folders(delivery)
            self.inbox.acknowledge(delivery, ok, reason)
        self._acknowledgements.clear()

    def rows(self) -> list:
        """(name, files, state, reason) per series, then one row per skipped file: an error, or "skipped" for what
        belongs in a DICOM export without being an image (a dose report, a CD's DICOMDIR)."""
        if not self.inbox:
            return []
        rows = [(s.name, s.files, s.state.value, s.reason) for s in self.inbox.statuses()]
        rows += [(printable(Path(str(path)).name), 1, "skipped" if is_quiet_skip(reason) else "error", reason)
                 for path, reason in self.inbox.bad_files.items()]
        return rows
