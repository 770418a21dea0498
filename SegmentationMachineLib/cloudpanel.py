"""Qt-free state of the module's Cloud GPU section.

Every RunPod call runs on a worker thread (the GUI never blocks); the widget polls tick() from a
QTimer and shows status, the GPU list, the pods started earlier and the pod in use. When a pod's
server is ready, tick() hands back the StartedPod once, for the AI prompt section to connect to.
"""

import threading
from dataclasses import dataclass, field

from .cloudgpu import KEY_NAME, CloudGpu, Limits, StartedPod, recorded_pod, runpod_key
from .credentials import SecretStore
from .heartbeat import Heartbeat
from .panels import BackgroundTask
from .podstart import Phase, PodRecords
from .pods import RunPodGraphQL

PHASES = list(Phase)


class Cancelled(Exception):
    """The user pressed Cancel while a pod was starting (its pod is terminated)."""


@dataclass
class CloudPanel:
    store: SecretStore = field(default_factory=SecretStore)
    records: PodRecords = field(default_factory=PodRecords)
    backend_factory: object = RunPodGraphQL  # key -> pods adapter
    status: str = "Enter your RunPod API key (RunPod console → Settings → API Keys)."
    gpus: list = field(default_factory=list)  # GpuType, cheapest first
    earlier: list = field(default_factory=list)  # (Pod, cost so far) started before and still running
    balance: str = ""
    progress: object = None  # the latest podstart.Progress while starting
    pod: StartedPod = None  # the pod in use
    started_here: list = field(default_factory=list)  # pod ids this Slicer session started, for quit
    task: BackgroundTask = None
    heartbeat: Heartbeat = None

    def __post_init__(self):
        self._job = None
        self._cancel = threading.Event()
        self._ready = None  # a StartedPod not yet handed to the widget

    # -- the key ---------------------------------------------------------------------------
    @property
    def has_key(self) -> bool:
        return bool(self.store.load(KEY_NAME))

    def save_key(self, key: str):
        """Checks the key with RunPod, then stores it (keychain or user-only file) and refreshes."""
        key = key.strip()
        self._start("key", lambda: (self.backend_factory(key).account(), self.store.save(KEY_NAME, key)))
        self.status = "Checking the key with RunPod..."

    def forget_key(self):
        self.store.forget(KEY_NAME)
        self.gpus, self.earlier, self.balance = [], [], ""
        self.status = f"The RunPod key was removed from {self.store.where}."

    # -- work ------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self.task is not None

    @property
    def starting(self) -> bool:
        return self.busy and self._job == "start"

    def refresh(self):
        """GPU types, balance and pods still running from earlier starts."""
        def look(cloud: CloudGpu):
            return cloud.gpu_choices(), cloud.backend.account(), cloud.started_earlier()

        self._start("refresh", look, needs_cloud=True)
        self.status = "Asking RunPod for GPU types and your balance..."

    def start(self, gpu_id: str, mode: str, limits: Limits = Limits()):
        chosen = [g for g in self.gpus if g.id == gpu_id]
        rest = [g for g in self.gpus if g.id != gpu_id]  # no capacity: the next cheapest with enough memory
        self._cancel.clear()
        self.progress = None

        def sleep(seconds):
            if self._cancel.wait(seconds):
                raise Cancelled()

        self._start("start", lambda cloud: cloud.up(chosen + rest, mode, limits=limits, on_progress=self._progressed,
                                                    sleep=sleep), needs_cloud=True)
        self.status = f"Starting a {mode} pod on {gpu_id}..."

    def cancel(self):
        self._cancel.set()
        self.status = "Cancelling: the pod being started is terminated..."

    def connect_earlier(self, pod_id: str):
        """Uses a pod started here before (e.g. before Slicer was restarted)."""
        started = recorded_pod(self.records, pod_id)
        if started is not None:
            self._use(started)

    def stop(self):
        """Stops the pod in use: no GPU billing; its volume stays (and costs a little) until terminate."""
        pod_id = self._release()
        self._start("stop", lambda cloud: cloud.backend.stop(pod_id), needs_cloud=True)
        self.status = f"Stopping pod {pod_id}..."

    def terminate(self, pod_id: str = None):
        pod_id = pod_id or self._release()
        if self.pod and self.pod.pod_id == pod_id:
            self._release()
        self._start("terminate", lambda cloud: cloud.terminate(pod_id), needs_cloud=True)
        self.status = f"Terminating pod {pod_id}..."

    def terminate_started_here(self) -> list:
        """At Slicer's quit, on the main thread: terminates this session's pods; returns failures as sentences."""
        self._release()
        cloud = CloudGpu(self.backend_factory(runpod_key(self.store)), self.records)
        problems = []
        for pod_id in list(self.started_here):
            try:
                cloud.terminate(pod_id)
                self.started_here.remove(pod_id)
            except Exception as error:  # say it and go on with the others
                problems.append(f"{pod_id}: {error}")
        return problems

    # -- the main thread's poll ------------------------------------------------------------
    def tick(self):
        """Call from a QTimer; returns a StartedPod once, when its server is ready to connect to."""
        if self.task is not None and self.task.done():
            self._finish()
        if self.heartbeat is not None and self.heartbeat.warning:
            self.status = f"Pod {self.pod.pod_id}: {self.heartbeat.warning}"
        ready, self._ready = self._ready, None
        return ready

    @property
    def phase_fraction(self) -> float:
        return 0.0 if self.progress is None else (PHASES.index(self.progress.phase) + 1) / len(PHASES)

    def _progressed(self, progress):
        self.progress = progress
        self.status = str(progress)

    def _start(self, job: str, function, needs_cloud: bool = False):
        if needs_cloud:
            cloud = CloudGpu(self.backend_factory(runpod_key(self.store)), self.records)
            self.task = BackgroundTask(function, cloud)
        else:
            self.task = BackgroundTask(function)
        self._job = job

    def _finish(self):
        task, job, self.task = self.task, self._job, None
        if isinstance(task.error, Cancelled):
            self.status = "Cancelled: the pod being started was terminated."
            return
        result, problem = task.outcome()
        if problem:
            self.status = problem
        elif job == "key":
            self.refresh()
        elif job == "refresh":
            self.gpus, account, self.earlier = result
            self.balance = f"Balance ${account['balance']:.2f}, spending ${account['spend_per_hr']:.2f}/h"
            self.status = (f"{len(self.earlier)} pod(s) started earlier still run: terminate them below if unused."
                           if self.earlier else "Choose a GPU type and press Start.")
        elif job == "start":
            self.started_here.append(result.pod_id)
            self._use(result)
        else:
            self.status = f"Done: {job}."
            self.refresh()

    def _use(self, started: StartedPod):
        self.pod = started
        self.heartbeat = Heartbeat(started.agent_url, started.secrets["SM_HEARTBEAT_TOKEN"]).start()
        self._ready = started
        self.status = f"Pod {started.pod_id} is ready: {started.server_url}"

    def _release(self) -> str:
        """Stops the heartbeats of the pod in use; returns its id (or None)."""
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None
        pod, self.pod = self.pod, None
        return pod.pod_id if pod else None
