"""Qt-free state of the module's AI prompts section."""

import threading
import time
from collections import deque
from dataclasses import dataclass, field

from ..cloud.heartbeat import Heartbeat, used
from ..cloud.keepalive import heartbeat_note, pod_heartbeat
from ..cloud.podstart import PodRecords
from ..core.errors import UserError
from ..core.scene import new_segmentation
from ..prompts.promptfile import Prompt
from ..prompts.session import InteractiveSession, PendingPrompt, SegmentTarget
from .prompttrail import PromptTrail
from .tasks import BackgroundTask

SHOW_WAIT_AFTER_S = 1.0  # quicker answers need no "waiting" line
SENDING_SCAN = "Sending the scan to the server"  # a minute on a slow uplink: prompts placed meanwhile wait


@dataclass
class PromptsPanel:
    """The AI prompts section: one server call at a time on a worker thread, prompts queued meanwhile.

    Scene reads and segment writes happen in tick() on the main thread; the worker only talks
    to the server. A prompt made while a prediction runs waits its turn: none is dropped. A
    slow prediction shows its elapsed seconds in the status line and can be cancelled. While connected to a
    pod's server it heartbeats the pod's agent (on its own thread), so the pod is not ended as idle mid-work.
    With a trail (prompttrail.PromptTrail, in Slicer) the prompts that made the segment chosen stay shown, and those
    placed and not in yet (waiting) are shown faint from the first tick on.
    """

    include: bool = True
    status: str = "Enter the server URL and key, then Connect."
    last_latency: str = ""
    session: InteractiveSession = None
    task: BackgroundTask = None
    queue: deque = field(default_factory=deque)
    clock: object = time.monotonic
    records: PodRecords = field(default_factory=PodRecords)  # pods started here: their heartbeat tokens
    heartbeat: Heartbeat = None  # while connected to a pod's server
    trail: PromptTrail = None  # the views' markups of the prompts sent; None: nothing shown (the CLI, most tests)
    _job: object = None  # what the running task is: "connect", "stage", or a PendingPrompt
    _job_started: float = 0.0
    _connecting: InteractiveSession = None
    _pod_note: str = ""  # what the pod's agent said last that the status line showed

    @property
    def connected(self) -> bool:
        return self.session is not None

    @property
    def connecting(self) -> bool:
        """A connect is on its way (a full server is waited for up to minutes): Disconnect abandons it."""
        return self._job == "connect"

    @property
    def busy(self) -> bool:
        return self.task is not None or bool(self.queue)

    @property
    def can_undo(self) -> bool:
        """Something to undo, now or once what is queued has run: the widget's Undo button is enabled."""
        return self.connected and (self.session.can_undo or self.busy)

    @property
    def can_redo(self) -> bool:
        return self.connected and (self.session.can_redo or self.busy)

    @property
    def waiting(self) -> list:
        """The prompts placed whose result is not in yet: the one on the server, then those queued, in order."""
        running = [self._job.prompt] if isinstance(self._job, PendingPrompt) else []
        return running + [item for item in self.queue if isinstance(item, Prompt)]

    @property
    def can_cancel(self) -> bool:
        """A prompt is on the server: the widget's Cancel button is enabled."""
        return isinstance(self._job, PendingPrompt)

    def connect(self, url: str, api_key: str):
        self.disconnect()
        self._connecting = InteractiveSession(url, api_key, status=self._say)
        self._start("connect", self._connecting.connect)
        self.status = f"Connecting to {url}..."

    def disconnect(self):
        """Ends the session and its heartbeats: a pod kept running only by them ends after its idle timeout.
        What was on its way or queued is dropped (an answer still to come is not written)."""
        if self.can_cancel:
            self._job.cancel()
        if self.connecting:  # its lease would hold one of the server's few slots until the server reaps it
            _close_once_connected(self.task, self._connecting)
            self.status = "Disconnected."
        self.task, self._job, self._connecting = None, None, None
        self.queue.clear()
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None
        if self.session:
            self.session.close()
            self.session = None
            self.status = "Disconnected."
        if self.trail is not None:
            self.trail.clear()

    def choose(self, volume_node, target: SegmentTarget):
        """Main thread: the volume (uploaded if its voxels are new) and the segment to prompt into."""
        if self.session:  # ahead of prompts made while connecting; after the one on the server
            self.queue.appendleft((volume_node, target))

    def submit(self, kind: str, **geometry):
        """A prompt from the viewers (RAS mm), include or exclude as the toggle says."""
        self._queue(Prompt(kind, self.include, **geometry))

    def toggle_include(self):
        self.include = not self.include

    def undo(self):
        self._queue("undo")

    def redo(self):
        self._queue("redo")

    def reset(self):
        self._queue("reset")

    def _queue(self, item):
        """Queued while connected or connecting (it then runs once connected); else the status line says so: a
        prompt placed before Connect vanished from the view with no word."""
        if self.connected or self.connecting:
            self.queue.append(item)
        else:
            self.status = "Connect to a server first: that prompt was not kept."

    def cancel(self):
        """Stops waiting for the prompt on the server and drops the prompts queued behind it. The segment
        stays as it was; the server finishes that prediction anyway, its answer is ignored, and the next
        prompt first restarts the server from the segment (once that prediction is done)."""
        if self.can_cancel:
            self._job.cancel()
            self.task, self._job = None, None
            self.queue.clear()
            self.status = "Cancelled: the segment is as it was."

    def scene_closed(self):
        """Close Scene: the prompts on the server or queued were the closed scene's segment's (shown faint, they would
        come back in the next scene until the server answered); those shown go with them."""
        dropped = self.can_cancel or bool(self.queue)
        self.cancel()
        self.queue.clear()
        if dropped:
            self.status = "The scene was closed: the prompts not yet answered were dropped."
        if self.trail is not None:
            self.trail.clear()

    def tick(self):
        """Main thread, from a timer: finishes the running job, then starts the next queued one."""
        if self.task and self.task.done():
            self._finish()
        if self.task is None and self.queue and self.session:  # prompts made while connecting wait
            self._next()
        elapsed = self.clock() - self._job_started
        if self.can_cancel and elapsed >= SHOW_WAIT_AFTER_S:
            doing = self._job.note or "the server is working on it"
            self.status = f"{self._job.prompt.kind.capitalize()}: {doing}, {elapsed:.0f} s (Cancel stops waiting)."
        if self._job == "stage" and self.status.startswith(SENDING_SCAN) and elapsed >= SHOW_WAIT_AFTER_S:
            self.status = f"{SENDING_SCAN}: {elapsed:.0f} s (prompts placed meanwhile wait for it)."
        if self.trail is not None:  # after the job: its prompt, undo or reset shows
            volume_node, prompts = self.session.prompts_shown() if self.session else (None, [])
            self.trail.show(prompts, volume_node, self.waiting)
        note = heartbeat_note(self.heartbeat)
        if note != self._pod_note:  # each once: the prompts' own lines follow
            self._pod_note = note
            self.status = note or self.status

    def _start(self, job, function):
        self._job, self._job_started = job, self.clock()
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
        try:
            self._finished(job, result, problem)
        except UserError as error:  # the segment deleted meanwhile, say
            self.status = str(error)

    def _finished(self, job, result, problem):
        if problem and getattr(job, "cut", None) is not None:  # a prompt run again on a larger region failed
            timing = self.session.keep_cut(job, problem)
            self.last_latency, self.status = str(timing), timing.warning
            return
        if problem:
            self.status = problem
            if job == "connect":
                self._connecting = None
            if job in ("connect", "stage"):
                self.queue.clear()  # what was queued behind it cannot run
            return
        if job == "connect":
            used()  # connecting is use: the pod's idle time counts from here
            self.session, self._connecting = self._connecting, None
            self.heartbeat = pod_heartbeat(self.session.url, self.session.api_key, self.records, watches_use=True)
            if self.heartbeat is not None:
                self.heartbeat.start()
            caps = self.session.capabilities
            self.status = (f"Connected: nnInteractive {caps.server_version}, prompts {caps.describe()}, "
                           f"model licence {caps.licence}.")
        elif job == "stage":
            self.status = f"Ready ({self.session.region_note}): place a point, box, scribble or lasso."
        else:
            timing = self.session.finish(job, result)
            if job.again:  # the region sent cut its result: the same prompt on a larger region
                self._start(job.again, job.again.run)
                return
            self.last_latency = str(timing)
            self.status = " ".join(filter(None, [_result(job.prompt, timing), timing.warning]))

    def _next(self):
        item = self.queue.popleft()
        if not isinstance(item, tuple):  # a prompt, an undo: use (a volume chosen may be the inbox's doing)
            used()
        if isinstance(item, tuple):  # a volume and segment chosen: read here, uploaded on the worker
            volume_node, target = item
            upload = self.session.stage_volume(volume_node)
            self.session.select_segment(target)
            self._start("stage", upload)
            self.status = f"{SENDING_SCAN} (prompts placed meanwhile wait for it)."
        elif isinstance(item, Prompt):
            try:
                pending = self.session.prepare(item)
            except UserError as error:
                self.status = str(error)
                return
            self._start(pending, pending.run)
        elif item != "reset" and not getattr(self.session, f"can_{item}"):  # Ctrl+Z works while Undo is greyed
            self.status = f"Nothing to {item}."
        else:  # undo / redo / reset touch the segment: main thread, quick
            try:
                getattr(self.session, item)()
                self.status = f"{item.capitalize()} done."
            except UserError as error:
                self.status = str(error)


def _result(prompt: Prompt, timing) -> str:
    """The status line's sentence on a prompt's result. One that changed nothing still counts: the server keeps it."""
    if timing.changed:
        return f"{prompt.kind.capitalize()} applied in {timing}."
    return (f"{prompt.kind.capitalize()} sent in {timing}: it changed nothing in the segment, but the AI keeps it for "
            "the prompts that follow (Undo takes it back).")


def new_segment(volume_node, segmentation_node=None) -> tuple:
    """Main thread: (segmentation node, segment id) of a new empty segment to prompt into, as the Segment Editor's
    Add makes one, in segmentation_node or, where none is chosen, in a new segmentation on volume_node's grid."""
    if volume_node is None:
        raise UserError("There is no volume to segment: load one (or drop a series in the inbox), then add a segment.")
    if segmentation_node is None:
        name = volume_node.GetScene().GenerateUniqueName(f"{volume_node.GetName()} segmentation")
        segmentation_node = new_segmentation(volume_node, name)
    return segmentation_node, segmentation_node.GetSegmentation().AddEmptySegment()  # named and coloured by Slicer


def _close_once_connected(task: BackgroundTask, session: InteractiveSession):
    """Gives back the lease of a connect the user abandoned, once it is made (upstream's client keeps it alive)."""
    threading.Thread(target=lambda: (task.wait(), session.close()), daemon=True).start()
