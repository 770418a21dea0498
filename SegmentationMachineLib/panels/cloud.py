"""Qt-free state of the module's Cloud GPU section.

Every RunPod call runs on a worker thread (the GUI never blocks); the widget polls tick() from a
QTimer and shows status, the GPU list, the pods started earlier and the pod in use. When a pod's
server is ready, tick() hands back the StartedPod once, for the AI prompt section to connect to.
"""

import logging
import os
import threading
import time
from dataclasses import dataclass, field

from ..cloud import heartbeat as beats
from ..cloud.cloudgpu import (KEY_NAME, CloudGpu, Limits, StartedPod, recorded_pod, runpod_key, wipes_at_end,
                               within_reach)
from ..cloud.heartbeat import Heartbeat, used
from ..cloud.keepalive import keep_advice
from ..cloud.pods import PodsError, RunPodRest, spend_per_hr
from ..cloud.podstart import Phase, PodRecords
from ..core.credentials import SecretStore
from ..core.errors import UserError
from .tasks import BackgroundTask

PHASES = list(Phase)
QUIT_WAIT_S = 30.0  # Slicer's window waits this long at most for this session's pods to be terminated
QUIT_STOP_S = 8.0  # of which a wiping pod's agent leaves this long for RunPod's stop, where it has not ended the pod
log = logging.getLogger("segmentation-machine")


class StartWithdrawn(Exception):
    """The user pressed Cancel while a pod was starting or resuming (it is terminated or stopped again); not a
    UserError, unlike core.cancel.Cancelled: the panel words it itself."""


@dataclass
class CloudPanel:
    store: SecretStore = field(default_factory=SecretStore)
    records: PodRecords = field(default_factory=PodRecords)
    backend_factory: object = RunPodRest  # key -> pods adapter
    status: str = "Enter your RunPod API key (RunPod console → Settings → API Keys)."
    gpus: list = field(default_factory=list)  # GpuType, cheapest first
    earlier: list = field(default_factory=list)  # (Pod, cost since its last start) started before and still there
    balance: str = ""  # what the account spends now (RunPod's API does not tell the balance itself)
    notice: str = ""  # what the last job has to say, shown with the refreshed status
    progress: object = None  # the latest podstart.Progress while starting
    pod: StartedPod = None  # the pod in use
    started_here: list = field(default_factory=list)  # ids of running pods this session started, for quit
    task: BackgroundTask = None
    heartbeat: Heartbeat = None

    def __post_init__(self):
        self._job = None
        self._cancel = threading.Event()
        self._ready = None  # a StartedPod not yet handed to the widget
        self._looked_at = -float("inf")  # when RunPod was last asked whether the pod in use is still there
        self._gone = {}  # pod id -> why it has ended, as RunPod answered that look
        self.has_key = bool(os.environ.get("RUNPOD_API_KEY") or self.store.load(KEY_NAME))  # read once: keychains are slow

    # -- the key ---------------------------------------------------------------------------
    def save_key(self, key: str):
        """Checks the key with RunPod, then stores it (keychain or user-only file) and refreshes."""
        key = key.strip()

        def check_and_save():
            self.backend_factory(key).pods()
            self.store.save(KEY_NAME, key)

        self._start("key", check_and_save, with_cloud=False)  # the key being checked is not stored yet
        self.status = "Checking the key with RunPod..."

    def forget_key(self):
        self.store.forget(KEY_NAME)
        self.has_key = bool(os.environ.get("RUNPOD_API_KEY"))
        self.gpus, self.earlier, self.balance = [], [], ""
        self.status = "The RunPod key was removed from this computer."

    # -- work ------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self.task is not None

    @property
    def starting(self) -> bool:
        return self.busy and self._job in ("start", "resume")

    def refresh(self):
        """GPU types, what runs now and pods still there from earlier starts."""
        self._start("refresh", lambda cloud: (cloud.gpu_choices(), cloud.backend.pods(), cloud.started_earlier()))
        self.status = "Asking RunPod for GPU types and your pods..."

    def start(self, gpu_id: str, mode: str, limits: Limits = Limits()):
        """Starts on gpu_id; without capacity there, on the next types that cost at most half as much again."""
        [chosen] = [g for g in self.gpus if g.id == gpu_id]
        gpus = within_reach(chosen, self.gpus)
        self._start("start", lambda cloud: _with_spending(cloud, cloud.up(gpus, mode, limits=limits,
                                                                          on_progress=self._progressed, sleep=self._sleep)))
        self.status = f"Starting a {mode} pod on {chosen.name}..."

    def cancel(self):
        self._cancel.set()
        self.status = "Cancelling: the pod being started is terminated..."

    def connect_earlier(self, pod_id: str):
        """Uses a pod started here before (e.g. before Slicer was restarted); a stopped one is resumed."""
        started = recorded_pod(self.records, pod_id)
        if started is None:
            self.status = f"Pod {pod_id} was not started from this computer: its keys are not known here."
            return
        pod = next((p for p, _cost in self.earlier if p.id == pod_id), None)
        if pod is not None and pod.status == "EXITED":
            self._start("resume", lambda cloud: _with_spending(cloud, cloud.resume(pod_id, on_progress=self._progressed,
                                                                                   sleep=self._sleep)))
            self.status = f"Resuming pod {pod_id}..."
            return
        started.pod = pod
        self._use(started)

    def stop(self):
        """Stops the pod in use: no GPU billing; its volume stays (and costs per month) until terminated. One started
        with the wipe is ended by its agent, which has the uploads wiped first (cloudgpu.CloudGpu.stop_asked)."""
        pod_id = self.pod.pod_id
        self._start("stop", lambda cloud: cloud.stop_asked(pod_id).sentence(pod_id))
        self._release()
        self._forget_started(pod_id)  # the user keeps it on purpose: quitting must not delete its volume
        wiping = (" (its agent wipes the uploads first: up to a few minutes)" if wipes_at_end(self.records, pod_id)
                  else "")
        self.status = f"Stopping pod {pod_id}{wiping}..."

    def terminate(self, pod_id: str):
        self._start("terminate", lambda cloud: cloud.terminate(pod_id))  # first: it refuses while busy
        if self.pod is not None and self.pod.pod_id == pod_id:
            self._release()
        self._forget_started(pod_id)
        self.status = f"Terminating pod {pod_id}..."

    def terminate_question(self, pod_id: str) -> str:
        """What the widget asks before Terminate (Yes/No, No the default): terminating deletes the pod's volume, where
        a desktop pod keeps the user's uploads, scenes and exports; Stop keeps them. A pod not started from this
        computer may be a desktop pod."""
        mode = self.records.get(pod_id).get("mode")
        if mode == "server":
            return (f"Terminate pod {pod_id}? Its GPU stops billing and its volume is deleted; the AI prompt tools "
                    "need a pod started again (a few minutes).")
        which = "its volume" if mode == "desktop" else "its volume (if it is a desktop pod)"
        return (f"Terminate pod {pod_id}? This deletes {which} for good: the uploads, scenes and exports on it. "
                "Stop keeps them instead (no GPU billing; the volume bills per month until you terminate it).")

    def desktops_started_here(self) -> list:
        """The ids of this session's running desktop pods: their volumes hold the user's uploads, scenes and
        exports."""
        return [pod_id for pod_id in self.started_here if self.records.get(pod_id).get("mode") == "desktop"]

    def end_started_here(self, keep_desktop_files: bool = True) -> list:
        """At Slicer's quit, on the main thread: cancels a start and ends this session's pods, all at once and within
        QUIT_WAIT_S in all (on a network that times out, one by one would hold the window for minutes). Server
        pods are terminated; desktop pods are stopped where keep_desktop_files (the GPU bill ends, the volume and
        the user's files on it stay), else terminated too; a desktop pod started with the wipe is ended by its agent,
        which has the uploads wiped first, if it does so within the wait (else RunPod stops it). Returns the failures
        as sentences."""
        deadline = time.monotonic() + QUIT_WAIT_S
        if self.starting:
            self.cancel()
            self.task.wait(QUIT_WAIT_S)  # the cancelled start terminates its own pod (first: the deadline is fresh)
            if self.task.done():  # or it had made its pod already: then it is in started_here, ended below
                self._finish(end_cancelled=False)
        self._release()
        try:
            cloud = CloudGpu(self.backend_factory(runpod_key(self.store)), self.records)
        except UserError as error:
            return [str(error)] if self.started_here else []
        outcomes = {}  # pod id -> None when ended, else why not
        stopping = set(self.desktops_started_here()) if keep_desktop_files else set()

        def end(pod_id):
            try:
                if pod_id in stopping:  # what is left after the agent's request, for RunPod's stop
                    stopped = cloud.stop_asked(pod_id, wait_s=max(1.0, deadline - time.monotonic() - QUIT_STOP_S))
                    if stopped.uploads:  # Slicer's window is closing: its log is where the user finds it
                        log.warning("Pod %s at quit: %s", pod_id, stopped.uploads)
                else:
                    cloud.terminate(pod_id)
                outcomes[pod_id] = None
            except UserError as error:  # a pod RunPod no longer has (its agent ended it) is ended all the same
                outcomes[pod_id] = None if _no_longer_there(cloud.backend, pod_id) else str(error)

        workers = [threading.Thread(target=end, args=(pod_id,), daemon=True) for pod_id in self.started_here]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        problems = []
        for pod_id in list(self.started_here):
            if pod_id not in outcomes:
                problems.append(f"{pod_id}: RunPod did not answer within {QUIT_WAIT_S:g} s")
            elif outcomes[pod_id]:
                problems.append(f"{pod_id}: {outcomes[pod_id]}")
            else:
                self.started_here.remove(pod_id)
        return problems

    # -- the main thread's poll ------------------------------------------------------------
    def tick(self):
        """Call from a QTimer; returns a StartedPod once, when its server is ready to connect to."""
        if self.task is not None and self.task.done():
            self._finish()
        if self.heartbeat is not None:
            self._watch(self.heartbeat, self.pod.pod_id)
        ready, self._ready = self._ready, None
        return ready

    def _watch(self, beat: Heartbeat, pod_id: str):
        """The agent's warning; once beats fail, whether the pod has ended: its agent's last answer said it would end
        before this beat, or RunPod (asked once per heartbeat interval) no longer has it running."""
        if not beat.problem:
            if beat.warning:
                self.status = f"Pod {pod_id}: {keep_advice(beat.warning)}"
            return
        last = beat.last
        if last.get("terminates_in_s", float("inf")) <= beats.INTERVAL_S:
            self._ended(pod_id, last.get("reason") or "its agent ended it")
        elif pod_id in self._gone:
            self._ended(pod_id, self._gone.pop(pod_id))
        else:
            self.status = f"Pod {pod_id}: {beat.problem}"
            self._look_if_gone(pod_id)

    def _look_if_gone(self, pod_id: str):
        """Asks RunPod on a thread of its own (not a job: it neither waits for nor blocks the user's presses)."""
        now = time.monotonic()
        if now - self._looked_at < beats.INTERVAL_S:
            return
        self._looked_at = now
        store, factory = self.store, self.backend_factory

        def look():
            try:
                pod = factory(runpod_key(store)).get(pod_id)
            except UserError:  # RunPod does not answer: the heartbeat's problem stays on screen, asked again later
                return
            if pod is None or pod.status == "EXITED":
                self._gone[pod_id] = "RunPod no longer has it" if pod is None else "RunPod lists it as stopped"

        threading.Thread(target=look, daemon=True).start()

    def _ended(self, pod_id: str, why: str):
        """The pod in use has ended without this panel (its agent, RunPod's console): Start is offered again. It stays
        in started_here: should it still run after all, quit ends it."""
        self._release()
        said = f"Pod {pod_id} has ended: {why}."
        if self.task is None:
            self.notice = said
            self.refresh()  # a stopped desktop pod is listed to resume
        else:
            self.status = said

    @property
    def phase_fraction(self) -> float:
        return 0.0 if self.progress is None else (PHASES.index(self.progress.phase) + 1) / len(PHASES)

    def _progressed(self, progress):
        self.progress = progress
        if not self._cancel.is_set():
            self.status = str(progress)

    def _sleep(self, seconds):
        if self._cancel.wait(seconds):
            raise StartWithdrawn()

    def _start(self, job: str, function, with_cloud: bool = True):
        """Runs function(cloud) (function() without cloud) on a worker thread, one job at a time."""
        if self.task is not None:
            raise UserError("Wait until the Cloud GPU section has finished what it is doing (or press Cancel).")
        used()  # a press here is use: the pod in use is kept its idle timeout from now
        self._cancel.clear()
        self.progress = None
        store, records, factory = self.store, self.records, self.backend_factory

        def work():
            if not with_cloud:
                return function()
            return function(CloudGpu(factory(runpod_key(store)), records))  # off the GUI thread: keychain, SDK import

        self.task = BackgroundTask(work)
        self._job = job

    def _finish(self, end_cancelled: bool = True):
        """end_cancelled: a start that made its pod although Cancel was pressed ends it (at quit the caller does)."""
        task, job, self.task = self.task, self._job, None
        if isinstance(task.error, StartWithdrawn):
            self.status = ("Cancelled: the pod was stopped again, its volume kept." if job == "resume" else
                           "Cancelled: the pod being started was terminated.")
            return
        try:
            result, problem = task.outcome()
        except Exception as error:  # a bug: say it rather than leave "Starting..." on screen
            log.error("Cloud GPU %s failed", job, exc_info=error)
            self.status = f"Cloud GPU {job} failed unexpectedly ({type(error).__name__}): see the log."
            return
        if problem:
            self.status = problem
        elif job == "key":
            self.has_key = True
            self.refresh()
        elif job == "refresh":
            self.gpus, pods, self.earlier = result
            self.balance = _spending(pods)
            status = (f"{len(self.earlier)} pod(s) started earlier are still there: connect to or terminate "
                      "them below." if self.earlier else "Choose a GPU type and press Start.")
            self.status, self.notice = f"{self.notice} {status}".strip(), ""
        elif job in ("start", "resume"):
            started, pods = result
            self.started_here.append(started.pod_id)
            if self._cancel.is_set():  # pressed as the start finished: its pod is ended, not used
                if end_cancelled:
                    self._end_cancelled(started.pod_id, job)
                return
            self._use(started)
            self.balance = _spending(pods) if pods is not None else self.balance
        else:
            self.notice = result if isinstance(result, str) else f"Done: {job}."
            self.refresh()

    def _end_cancelled(self, pod_id: str, job: str):
        """Terminates the pod a cancelled start made (it stays in started_here: should that fail, quit ends it); a
        cancelled resume stops its pod again, the volume kept (quit must not delete it)."""
        if job == "resume":
            self._forget_started(pod_id)
            self._start("stop", lambda cloud: (cloud.stop(pod_id), f"Cancelled: pod {pod_id} was stopped again, its "
                                               "volume kept.")[1])
            self.status = f"Cancelled as pod {pod_id} became ready: stopping it again..."
        else:
            self._start("terminate", lambda cloud: (cloud.terminate(pod_id), "Cancelled: the pod being started was "
                                                    "terminated.")[1])
            self.status = f"Cancelled as pod {pod_id} became ready: terminating it..."

    def _use(self, started: StartedPod):
        self._release()
        self.pod = started
        used()
        self.heartbeat = Heartbeat(started.agent_url, started.secrets["SM_HEARTBEAT_TOKEN"], watches_use=True).start()
        self._ready = started
        self.status = f"Pod {started.pod_id} is ready{started.billing}: {started.server_url}"

    def _forget_started(self, pod_id):
        if pod_id in self.started_here:
            self.started_here.remove(pod_id)

    def _release(self):
        """No pod in use any more: its heartbeats stop."""
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None
        self.pod = None


def _spending(pods) -> str:
    return f"Spending ${spend_per_hr(pods):.2f}/h now (the balance is in the RunPod console)"


def _no_longer_there(backend, pod_id: str) -> bool:
    """Whether RunPod answers that it no longer has the pod (terminated)."""
    try:
        return backend.get(pod_id) is None
    except UserError:
        return False


def _with_spending(cloud: CloudGpu, started: StartedPod) -> tuple:
    """(started, the account's pods now, the started one among them even while RunPod's list lags behind a create);
    None for the pods where RunPod does not answer: the pod is used all the same."""
    try:
        listed = [p for p in cloud.backend.pods() if p.id != started.pod_id]
    except PodsError:
        return started, None
    return started, [*listed, *filter(None, [started.pod])]
