"""Qt-free state of the module's Presets and Export & Print sections.

The widget only binds: it asks these objects what is enabled and what the status line says,
starts their work, and polls it from a QTimer. Work runs on a worker thread so the GUI never
blocks; anything that edits the scene happens in finish(), which the widget calls on the main thread.
"""

import hashlib
import os
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from . import arrays
from .errors import UserError
from .export import DEFAULT_EXPORT_FOLDER, ExportOptions, ExportResult, export_segmentation
from .inbox import DEFAULT_INBOX, Inbox, InboxOptions
from .interactive import InteractiveSession, SegmentTarget
from .prompts import Prompt
from .presets import PRESETS, add_preset_segment, preset_mask, spacing_kji
from .printing import send_to_orcaslicer


class BackgroundTask:
    """A function on a daemon thread; poll() from the main thread says when it is done."""

    def __init__(self, function, *args):
        self.result = None
        self.error = None
        self._done = threading.Event()
        threading.Thread(target=self._run, args=(function, *args), daemon=True).start()

    def _run(self, function, *args):
        try:
            self.result = function(*args)
        except Exception as error:  # handed to the main thread, which shows or re-raises it
            self.error = error
        finally:
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float = None) -> bool:
        return self._done.wait(timeout)

    def outcome(self):
        """(result, None) on success, (None, sentence) for a user's mistake; a bug is re-raised."""
        if isinstance(self.error, UserError):
            return None, str(self.error)
        if self.error:
            raise self.error
        return self.result, None


@dataclass
class PresetsPanel:
    preset: str = "bone"
    status: str = "Choose a CT volume and a preset."
    task: BackgroundTask = None

    @property
    def presets(self) -> dict:
        return {name: preset.description for name, preset in PRESETS.items()}

    def can_apply(self, volume_node) -> bool:
        return volume_node is not None and self.task is None

    def start(self, volume_node):
        # The worker gets a copy: the user may edit or close the volume meanwhile.
        hu = arrays.volume_array(volume_node).copy()
        self.task = BackgroundTask(preset_mask, self.preset, hu, spacing_kji(volume_node), volume_node.GetName())
        self.status = f"Running the {self.preset} preset on '{volume_node.GetName()}'..."

    def finish(self, ctx, volume_node, segmentation_node=None):
        """Main thread, once task.done(): adds the segment; returns the segmentation node or None."""
        task, self.task = self.task, None
        mask, problem = task.outcome()
        if problem:
            self.status = problem
            return None
        node = add_preset_segment(ctx, volume_node, self.preset, mask, segmentation_node)
        self.status = f"Added segment '{PRESETS[self.preset].segment_name}' to '{node.GetName()}'."
        return node


@dataclass
class ExportPanel:
    formats: set = field(default_factory=lambda: {"stl", "obj", "3mf"})
    smoothing: float = 0.5
    output_folder: Path = DEFAULT_EXPORT_FOLDER
    status: str = "Choose a segmentation to export."
    last_result: ExportResult = None
    task: BackgroundTask = None

    def can_export(self, segmentation_node) -> bool:
        return segmentation_node is not None and bool(self.formats) and self.task is None

    def can_send(self) -> bool:
        return self.last_result is not None and self.task is None

    def options(self) -> ExportOptions:
        from .surfaces import SurfaceOptions

        ordered = tuple(f for f in ("stl", "obj", "3mf") if f in self.formats)
        return ExportOptions(formats=ordered, surface=SurfaceOptions(smoothing=self.smoothing))

    def start(self, segmentation_node):
        # Export only reads the segmentation; the module keeps the node alive until finish().
        self.task = BackgroundTask(export_segmentation, segmentation_node, self.output_folder, self.options())
        self.status = f"Exporting '{segmentation_node.GetName()}'..."

    def finish(self):
        task, self.task = self.task, None
        result, problem = task.outcome()
        if problem:
            self.status = problem
            return None
        self.last_result = result
        bad = result.not_watertight
        self.status = (f"Exported to {result.folder}." if not bad else
                       f"Exported to {result.folder}, but {', '.join(bad)} "
                       "is not watertight: use flying edges with smoothing, or repair it in the slicer.")
        return result

    def report_text(self) -> str:
        return "\n".join(self.last_result.summary_lines()) if self.last_result else ""

    def send_to_printer(self, configured_path: str = None):
        try:
            send_to_orcaslicer(self.last_result.folder, configured_path or None)
            self.status = "Opened in OrcaSlicer."
        except UserError as error:
            self.status = str(error)


def default_inbox_folder() -> Path:
    """SM_INBOX where set (the pod image sets /workspace/inbox), else ~/SegmentationMachine/Inbox."""
    return Path(os.environ.get("SM_INBOX") or DEFAULT_INBOX)


def inbox_state_folder(folder: Path) -> Path:
    """Journal and scratch area of one inbox folder, outside it and apart from other inboxes'."""
    key = hashlib.sha256(str(Path(folder).expanduser().resolve()).encode()).hexdigest()[:16]
    return Path.home() / ".segmentation-machine" / "inboxes" / key


@dataclass
class InboxPanel:
    """Polls the inbox on a worker thread; the widget loads what is delivered and reports back.

    Acknowledgements are applied between polls on the main thread, so the inbox is only ever
    used by one thread at a time.
    """

    folder: Path = field(default_factory=default_inbox_folder)
    settle_seconds: float = 5.0
    status: str = "Press Start to watch the inbox folder."
    inbox: Inbox = None
    task: BackgroundTask = None
    state_folder: Path = None  # default: inbox_state_folder(folder)
    _acknowledgements: list = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.inbox is not None

    def start(self):
        folder = Path(self.folder).expanduser()
        if folder == default_inbox_folder().expanduser():
            folder.mkdir(parents=True, exist_ok=True)  # the default inbox is ours to create
        inbox = Inbox(InboxOptions(folder=folder, state_folder=self.state_folder or inbox_state_folder(folder),
                                   settle_seconds=self.settle_seconds))
        try:
            inbox.start()
        except UserError as error:
            self.status = str(error)
            return
        self.inbox = inbox
        self.status = f"Watching {folder}: series appear here when their files have settled."

    def stop(self):
        if self.task:
            self.task.wait()
            self.task = None
        self._apply_acknowledgements()
        if self.inbox:
            self.inbox.stop()
            self.inbox = None
        self.status = "Stopped."

    def tick(self) -> list:
        """Main thread, from a timer: returns the deliveries that became ready since the last call."""
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
        if problem:
            self.status = problem
        return deliveries or []

    def loaded(self, delivery, ok: bool, reason: str = ""):
        """The widget loaded a delivery (or failed to, with reason); recorded before the next poll."""
        self._acknowledgements.append((delivery, ok, reason))

    def _apply_acknowledgements(self):
        for delivery, ok, reason in self._acknowledgements:
            self.inbox.acknowledge(delivery, ok, reason)
        self._acknowledgements.clear()

    def rows(self) -> list:
        """(name, files, state, reason) per series, then one error row per skipped file."""
        if not self.inbox:
            return []
        rows = [(s.name, s.files, s.state.value, s.reason) for s in self.inbox.statuses()]
        rows += [(Path(str(path)).name, 1, "error", reason) for path, reason in self.inbox.bad_files.items()]
        return rows


@dataclass
class PromptsPanel:
    """The AI prompts section: one server call at a time on a worker thread, prompts queued meanwhile.

    Scene reads and segment writes happen in tick() on the main thread; the worker only talks
    to the server. A prompt made while a prediction runs waits its turn: none is dropped.
    """

    include: bool = True
    status: str = "Enter the server URL and key, then Connect."
    last_latency: str = ""
    session: InteractiveSession = None
    task: BackgroundTask = None
    queue: deque = field(default_factory=deque)
    _job: object = None  # what the running task is: "connect", "stage", or a PendingPrompt
    _connecting: InteractiveSession = None

    @property
    def connected(self) -> bool:
        return self.session is not None

    @property
    def busy(self) -> bool:
        return self.task is not None or bool(self.queue)

    def connect(self, url: str, api_key: str):
        if self.session:
            self.session.close()
            self.session = None
        self._connecting = InteractiveSession(url, api_key, status=self._say)
        self._start("connect", self._connecting.connect)
        self.status = f"Connecting to {url}..."

    def choose(self, volume_node, target: SegmentTarget):
        """Main thread: the volume (uploaded if its voxels are new) and the segment to prompt into."""
        if not self.session:
            return
        stage_volume = self.session.stage_volume(volume_node)
        stage_segment = self.session.stage_segment(target)
        self.queue.appendleft(("stage", lambda: (stage_volume(), stage_segment())))

    def submit(self, kind: str, **geometry):
        """A prompt from the viewers (RAS mm), include or exclude as the toggle says."""
        self.queue.append(Prompt(kind, self.include, **geometry))

    def toggle_include(self):
        self.include = not self.include

    def undo(self):
        self.queue.append("undo")

    def redo(self):
        self.queue.append("redo")

    def reset(self):
        self.queue.append("reset")

    def tick(self):
        """Main thread, from a timer: finishes the running job, then starts the next queued one."""
        if self.task and self.task.done():
            self._finish()
        if self.task is None and self.queue and self.session:  # prompts made while connecting wait
            self._next()

    def _start(self, job, function):
        self._job = job
        self.task = BackgroundTask(function)

    def _say(self, sentence: str):
        self.status = sentence  # from the worker while waiting or resuming: a plain assignment

    def _finish(self):
        task, job, self.task, self._job = self.task, self._job, None, None
        try:
            result, problem = task.outcome()
        except Exception:
            self.queue.clear()
            raise
        if problem:
            self.status = problem
            if job == "connect":
                self._connecting = None
            if job in ("connect", "stage"):
                self.queue.clear()  # what was queued behind it cannot run
            return
        if job == "connect":
            self.session, self._connecting = self._connecting, None
            caps = self.session.capabilities
            self.status = (f"Connected: nnInteractive {caps.server_version}, prompts {', '.join(caps.prompt_types)}, "
                           f"model licence {caps.licence}.")
        elif job == "stage":
            self.status = "Ready: place a point, box, scribble or lasso."
        else:
            timing = self.session.finish(job, result)
            self.last_latency = str(timing)
            self.status = f"{job.prompt.kind.capitalize()} applied in {timing}."

    def _next(self):
        item = self.queue.popleft()
        if isinstance(item, tuple):
            self._start(*item)
        elif isinstance(item, Prompt):
            try:
                pending = self.session.prepare(item)
            except UserError as error:
                self.status = str(error)
                return
            self._start(pending, pending.run)
        else:  # undo / redo / reset touch the segment: main thread, quick
            try:
                getattr(self.session, item)()
                self.status = f"{item.capitalize()} done."
            except UserError as error:
                self.status = str(error)
