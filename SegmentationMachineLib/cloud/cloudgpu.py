"""Cloud GPU from start to stop, one flow for the module's panel and `segmentation-machine pod`.

A pod gets fresh secrets of its own (server key, desktop and file passwords, heartbeat token),
handed over as environment and kept only in the user's pod records. A start that is interrupted
(Ctrl-C, a closed terminal, Cancel) terminates what it created before it gives up. With a maximum
lifetime, RunPod itself ends the pod at creation + start timeout + lifetime: the pod agent ends it
earlier and warns first; RunPod's end catches a pod whose agent never ran. A server pod is terminated
then (terminateAfter); a desktop pod is stopped (stopAfter), since its volume may hold the user's files
and a terminate deletes it. A desktop pod's uploaded DICOM can be wiped at its end (Limits.wipe_at_end): by its
agent, before the agent ends it; RunPod's own stop cannot wipe anything, so a stop the user asks for from here
(stop_asked) has the agent end such a pod (agentend.py), and only where it does not is the pod stopped through RunPod.
"""

import math
import os
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from ..core.credentials import SecretStore
from ..core.errors import UserError
from .agentend import ASK_TIMEOUT_S, END_WAIT_S, ask_agent_to_end, wait_until_ended
from .heartbeat import INTERVAL_S as HEARTBEAT_S
from .heartbeat import Heartbeat
from .pods import NAME_PREFIX, Pod, PodsError, PodSpec
from .podstart import (DEFAULT_TIMEOUT_S, POLL_S, PodRecords, pod_at, proxy_url, server_answers, start_pod,
                       wait_until_ready)

KEY_NAME = "runpod-api-key"
DEFAULT_IMAGE = "ghcr.io/segmentation-machine/pod:0.1.0"
SERVER_PORT, AGENT_PORT, DESKTOP_PORT, FILES_PORT = 8000, 8001, 6080, 8080
MODES = ("server", "desktop")
SECRET_NAMES = ("SM_NNI_API_KEY", "SM_VNC_PASSWORD", "SM_FILES_PASSWORD", "SM_HEARTBEAT_TOKEN")
# The image's torch is built for CUDA 12.8 (Ampere to Blackwell): hosts with older drivers cannot run it. RunPod
# matches a list of versions exactly (a host on a newer driver than the list names counts as no capacity), so the
# floor is sent where the API takes one (v2), and GraphQL gets the versions the catalog lists at or above it.
MIN_CUDA_VERSION = "12.8"
MAX_FALLBACK_PRICE = 1.5  # without capacity, a start moves on to types costing at most this times the first choice
# For a type the catalog lists none for (no host runs 12.8 or later now): RunPod then answers no capacity, as v2 does.
CUDA_VERSIONS = ("12.8", "12.9", "13.0", "13.1", "13.2")


def runpod_key(store: SecretStore = None) -> str:
    """RUNPOD_API_KEY when set, else the key saved in the keychain (or the user-only file)."""
    key = os.environ.get("RUNPOD_API_KEY") or (store or SecretStore()).load(KEY_NAME)
    if not key:
        raise UserError("No RunPod API key: enter it in the Cloud GPU panel, run `segmentation-machine pod login`, "
                        "or set RUNPOD_API_KEY (RunPod console → Settings → API Keys).")
    return key


@dataclass(frozen=True)
class Limits:
    """What the pod agent enforces inside the pod, so a sleeping laptop does not keep billing."""
    idle_timeout_s: float = 900.0
    max_lifetime_s: float = 12 * 3600.0  # a forgotten browser tab on the desktop does not bill for days
    budget_usd: float = None
    # A desktop pod's agent wipes the uploaded DICOM before it ends the pod (cloud/wipe.py); a stop from the client
    # (Ctrl-C, `pod stop`, the panel's Stop) has the agent end it too. Not RunPod's stopAfter backstop: it stops the
    # pod as it is.
    wipe_at_end: bool = False

    def __post_init__(self):
        if not self.idle_timeout_s >= 3 * HEARTBEAT_S:  # NaN too: the agent would never find the pod idle
            raise UserError(f"The idle timeout must be at least {3 * HEARTBEAT_S:g} s: connected clients send a "
                            f"heartbeat every {HEARTBEAT_S:g} s.")
        if any(limit is not None and not 0 < limit < math.inf for limit in (self.max_lifetime_s, self.budget_usd)):
            raise UserError("The maximum lifetime and the budget must be numbers more than 0 (leave --budget out for "
                            "none).")

    def check_mode(self, mode: str):
        if self.wipe_at_end and mode != "desktop":  # a server pod keeps no uploads, and is terminated at its end
            raise UserError("Wiping the uploads at the end is for desktop pods: a server pod holds none (it is "
                            "terminated with its volume); choose the desktop mode, or leave wiping out.")

    def end_time(self, start_timeout_s: float):
        """RFC 3339 time for RunPod's own end of the pod, or None without a maximum lifetime."""
        if self.max_lifetime_s is None:
            return None
        end = datetime.fromtimestamp(time.time() + start_timeout_s + self.max_lifetime_s, timezone.utc)
        return end.strftime("%Y-%m-%dT%H:%M:%SZ")

    def environment(self) -> dict:
        env = {"SM_IDLE_TIMEOUT_S": f"{self.idle_timeout_s:g}"}
        if self.max_lifetime_s is not None:
            env["SM_MAX_LIFETIME_S"] = f"{self.max_lifetime_s:g}"
        if self.budget_usd is not None:
            env["SM_BUDGET_USD"] = f"{self.budget_usd:g}"
        if self.wipe_at_end:
            env["SM_WIPE_AT_END"] = "1"
        return env


@dataclass
class StartedPod:
    pod_id: str
    mode: str
    secrets: dict  # SECRET_NAMES → value
    pod: Pod = None  # as RunPod described it once ready (None for a pod only recorded here)

    @property
    def billing(self) -> str:
        """' on GPU at $X/h', what the pod costs while it runs ('' where not known)."""
        return f" on {self.pod.gpu} at ${self.pod.cost_per_hr:.2f}/h" if self.pod and self.pod.cost_per_hr else ""

    def url(self, port: int) -> str:
        return proxy_url(self.pod_id, port)

    @property
    def server_url(self) -> str:
        return self.url(SERVER_PORT)

    @property
    def agent_url(self) -> str:
        return self.url(AGENT_PORT)

    @property
    def desktop_url(self) -> str:
        return self.url(DESKTOP_PORT) + "/vnc.html?autoconnect=1&reconnect=true&resize=remote"  # the password is typed, never in the URL

    @property
    def files_url(self) -> str:
        return self.url(FILES_PORT)


@dataclass(frozen=True)
class Stopped:
    """What a stop the user asked for left: what still bills, and for a pod started with the wipe what became of its
    uploads."""
    still: str  # its volume, per month, and until when ("" when terminated)
    uploads: str = ""  # a sentence, for a pod started with the wipe only
    terminated: bool = False  # by its agent, with nothing of the user's left on its volume

    def sentence(self, pod_id: str, cost: str = "", then: str = "") -> str:
        """What the CLI and the panel say: cost, what the pod's run cost; then, what the user may do next."""
        uploads = f" {self.uploads}" if self.uploads else ""
        if self.terminated:
            return f"Pod {pod_id} has ended{cost}.{uploads}"
        return f"Stopped pod {pod_id}{cost}: no GPU billing; {self.still}.{uploads}" + (f" {then}" if then else "")


def wipes_at_end(records, pod_id: str) -> bool:
    """Whether the pod was started from here with its uploads to be wiped at its end (its record has the agent's
    token, through which a stop from here asks for the wipe)."""
    record = records.get(pod_id)
    return bool(record.get("wipe_at_end") and record.get("secrets"))


def within_reach(first, gpus: list, cloud: str = "SECURE", limit: float = None) -> list:
    """first, then the other types of gpus that cost at most limit ($/h; by default MAX_FALLBACK_PRICE times first's
    rate): what a start tries in turn, never moving on to a much dearer type without being asked."""
    limit = first.price(cloud) * MAX_FALLBACK_PRICE if limit is None else limit
    return [first, *(g for g in gpus if g.id != first.id and g.price(cloud) <= limit)]


def recorded_pod(records: PodRecords, pod_id: str):
    """The StartedPod of a pod started from this computer (None for any other pod)."""
    record = records.get(pod_id)
    return StartedPod(pod_id, record["mode"], record["secrets"]) if record.get("secrets") else None


def recorded_pod_at(records: PodRecords, server_url: str):
    """The recorded pod whose server is at server_url, or None."""
    pod_id = pod_at(server_url, SERVER_PORT)
    return recorded_pod(records, pod_id) if pod_id else None


def _ready_check(pod_secrets: dict):
    """is_ready for start_pod: the pod agent accepted a heartbeat (the pod is guarded) and the server grants
    a session to the pod's key. The heartbeats also keep a slow first start (the weights are downloaded
    once) from being taken for an idle pod."""
    def ready(pod) -> bool:
        heartbeat = Heartbeat(proxy_url(pod.id, AGENT_PORT), pod_secrets["SM_HEARTBEAT_TOKEN"])
        accepted = heartbeat.beat()
        if heartbeat.refused:
            raise PodsError("The pod's agent rejected the heartbeat token it was started with: terminate the pod "
                            "and start a new one.")
        served = server_answers(proxy_url(pod.id, SERVER_PORT), pod_secrets["SM_NNI_API_KEY"])
        return accepted and served

    return ready


def ports(mode: str) -> list:
    desktop = [f"{DESKTOP_PORT}/http", f"{FILES_PORT}/http"] if mode == "desktop" else []
    return [f"{SERVER_PORT}/http", f"{AGENT_PORT}/http", *desktop, "22/tcp"]


def _display_time(rfc3339: str) -> str:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).strftime("%Y-%m-%d %H:%M UTC")


class CloudGpu:
    def __init__(self, backend, records: PodRecords = None):
        self.backend = backend
        self.records = records or PodRecords()

    def gpu_choices(self, gpu: str = None, cloud: str = "SECURE", max_price: float = None) -> list:
        """The GPU types to try in order: the one asked for (in stock or not: the create decides), else every
        type in stock with enough VRAM, cheapest first; none above max_price ($/h)."""
        if gpu is None:
            chosen = self.backend.gpu_types(cloud=cloud, min_cuda_version=MIN_CUDA_VERSION)
            if not chosen:
                raise UserError(f"RunPod has no NVIDIA GPU type with enough memory in stock on the {cloud.lower()} "
                                "cloud right now: try the other cloud, or again in a few minutes.")
        else:
            chosen = [g for g in self.backend.gpu_types(min_vram_gb=0, cloud=cloud, in_stock=False,
                                                        min_cuda_version=MIN_CUDA_VERSION) if gpu in (g.id, g.name)]
            if not chosen:
                raise UserError(f"RunPod has no GPU type {gpu!r}: `segmentation-machine pod gpus` lists them.")
        affordable = [g for g in chosen if max_price is None or g.price(cloud) <= max_price]
        if not affordable:
            cheapest = min(g.price(cloud) for g in chosen)
            raise UserError(f"No {'such ' if gpu else ''}GPU type costs at most ${max_price:g}/h on the "
                            f"{cloud.lower()} cloud right now (the cheapest: ${cheapest:.2f}/h): raise --max-price.")
        return affordable

    def started_earlier(self) -> list:
        """(Pod, cost since its last start) for pods started here that still run: offered for termination at each
        start."""
        return self.records.still_running(self.backend)

    def up(self, gpus: list, mode: str = "server", image: str = None, template_id: str = None,
           cloud: str = "SECURE", limits: Limits = Limits(), timeout_s: float = DEFAULT_TIMEOUT_S,
           on_progress=lambda progress: None, sleep=time.sleep, volume: dict = None) -> StartedPod:
        """Starts a pod on the first GPU type with capacity and waits until its server answers.

        volume: PodSpec's volume_gb / network_volume_id, when not the default.
        Any exception, KeyboardInterrupt included, terminates the pod this call created.
        """
        volume = volume or {}
        if mode not in MODES:
            raise UserError(f"The mode must be server or desktop, not {mode!r}.")
        limits.check_mode(mode)
        pod_secrets = {name: secrets.token_urlsafe(24) for name in SECRET_NAMES}
        name = NAME_PREFIX + secrets.token_hex(4)  # one name for all tries: an interrupted start is found by it
        env = {"SM_MODE": mode, **pod_secrets, **limits.environment()}
        image = None if template_id else (image or os.environ.get("SM_POD_IMAGE") or DEFAULT_IMAGE)
        end = limits.end_time(timeout_s)
        ends = {"stop_after": end} if mode == "desktop" else {"terminate_after": end}
        # The price goes along: the agent's budget holds even where the pod's key cannot read the pod's cost.
        specs = [PodSpec(g.id, image=image, template_id=template_id, cloud=cloud, ports=ports(mode), name=name,
                         env={**env, "SM_PRICE_PER_HOUR": f"{g.price(cloud):g}"}, min_cuda_version=MIN_CUDA_VERSION,
                         allowed_cuda_versions=list(g.cuda_versions or CUDA_VERSIONS),
                         **ends, **volume) for g in gpus]
        try:
            # Its record says whether it wipes: a stop from here then goes through its agent (stop_asked).
            wipes = {"wipe_at_end": True} if limits.wipe_at_end else {}
            pod = start_pod(self.backend, specs, _ready_check(pod_secrets), self.records, on_progress, timeout_s,
                            POLL_S, sleep=sleep, details={"mode": mode, "secrets": pod_secrets, **wipes})
        except BaseException as error:
            try:
                ended = self._terminate_named(name, lagging=not isinstance(error, PodsError))
            except PodsError as failure:
                raise PodsError(f"Starting failed, and so did terminating what it started ({failure}): check "
                                "`segmentation-machine pod list` and terminate what is left.") from None
            if not ended and not isinstance(error, PodsError):  # a create in flight may have made one
                raise PodsError(f"The start was interrupted before RunPod said which pod it made, and no pod named "
                                f"{name} shows yet, but it may be running: check `segmentation-machine pod list` (or "
                                "RunPod's console) in a minute and end it with `segmentation-machine pod down "
                                "POD_ID`.") from None
            raise
        return StartedPod(pod.id, mode, pod_secrets, pod)

    def resume(self, pod_id: str, timeout_s: float = DEFAULT_TIMEOUT_S, on_progress=lambda progress: None,
               sleep=time.sleep) -> StartedPod:
        """Resumes a stopped pod started from this computer and waits until its server answers again."""
        started = recorded_pod(self.records, pod_id)
        if started is None:
            raise UserError(f"Pod {pod_id} was not started from this computer, so its keys are not known here: "
                            "terminate it and start a new one.")
        try:
            self.backend.resume(pod_id)
            started.pod = wait_until_ready(self.backend, self.backend.get(pod_id), _ready_check(started.secrets),
                                           self.records, on_progress, timeout_s, POLL_S, sleep=sleep, keep_volume=True)
        except PodsError:
            raise  # not resumed, already stopped again (time-out) or gone
        except BaseException:  # interrupted or cancelled, the start sent or not: stopped again, the volume kept
            try:
                self.backend.stop(pod_id)  # an answer, or a look at the pod, confirms it
            except PodsError as failure:
                raise PodsError(f"The resume was interrupted and pod {pod_id} could not be stopped again "
                                f"({str(failure).rstrip('.')}), so it may be running: stop it with "
                                f"`segmentation-machine pod stop {pod_id}` or in RunPod's console.") from None
            raise
        return started

    def existing(self, pod_id: str):
        """The pod as RunPod has it now; one that is gone is forgotten here and said."""
        pod = self.backend.get(pod_id)
        if pod is None:
            self.records.remove(pod_id)
            raise UserError(f"There is no pod {pod_id} on this account: `segmentation-machine pod list` shows them.")
        return pod

    def stop(self, pod_id: str, pod=None) -> str:
        """Stops the pod's GPU billing (pod: as existing() just read it); returns what still bills: its volume, per
        month, and until when."""
        pod = pod or self.existing(pod_id)
        self.backend.stop(pod_id)
        return pod.stopped_cost(self._until(pod_id))

    def wipes_at_end(self, pod_id: str) -> bool:
        return wipes_at_end(self.records, pod_id)

    def stop_asked(self, pod_id: str, pod=None, wait_s: float = END_WAIT_S, sleep=time.sleep,
                   clock=time.monotonic) -> Stopped:
        """A stop the user asked for (`pod stop`, Ctrl-C on `pod up`, the panel's Stop, Slicer's quit). A running pod
        started with the wipe is ended by its agent, which has the uploads wiped first; where the agent does not take
        the request, or has not ended the pod within wait_s, the pod is stopped through RunPod all the same (the GPU
        bill ends whatever happens) and the user told that the uploads were not wiped."""
        pod = pod or self.existing(pod_id)
        if not (self.wipes_at_end(pod_id) and pod.status == "RUNNING"):
            return Stopped(self.stop(pod_id, pod))
        deadline = clock() + wait_s
        token = self.records.get(pod_id)["secrets"]["SM_HEARTBEAT_TOKEN"]
        if ask_agent_to_end(proxy_url(pod_id, AGENT_PORT), token, min(ASK_TIMEOUT_S, wait_s)):
            ended, now = wait_until_ended(self.backend, pod_id, deadline, POLL_S, sleep, clock)
            if ended and now is None:
                self.records.remove(pod_id)
                return Stopped("", "Its agent had the uploaded DICOM wiped and, with nothing of yours left on its "
                                   "volume, terminated the pod, volume and all: nothing of it bills any more.",
                               terminated=True)
            if ended:
                return Stopped(now.stopped_cost(self._until(pod_id)),
                               "Its agent asked for the uploaded DICOM to be wiped before it ended the pod; the "
                               "pod's log says whether all of it was deleted.")
            why = f"its agent had not ended the pod after {wait_s:.0f} s, so it was stopped through RunPod"
        else:
            why = "its agent did not answer, so it was stopped through RunPod"
        try:
            still = self.stop(pod_id, pod)
        except PodsError:
            if self.backend.get(pod_id) is not None:
                raise
            self.records.remove(pod_id)  # the agent terminated it just now
            return Stopped("", "Its agent terminated the pod as it was being stopped: nothing of it bills any more.",
                           terminated=True)
        return Stopped(still, f"The uploads on its volume were NOT wiped ({why}): `segmentation-machine pod down "
                              f"{pod_id}` deletes them, with the volume.")

    def _until(self, pod_id: str) -> str:
        end = self.records.get(pod_id).get("terminate_after")
        return (f"until RunPod terminates the pod at {_display_time(end)} (its maximum lifetime)" if end else
                "until the pod is terminated")

    def terminate(self, pod_id: str):
        self.backend.terminate(pod_id)
        self.records.remove(pod_id)

    def _terminate_named(self, name: str, lagging: bool = False) -> set:
        """Terminates every pod of that name: the recorded ones first (a list that fails must not leave them running),
        then any other the list shows; returns their ids. lagging: a create may have been in flight, so without a
        recorded pod the list is asked again over the seconds it lags behind a create."""
        recorded = {pod_id for pod_id, record in self.records.all().items() if record.get("name") == name}
        for pod_id in recorded:
            self.terminate(pod_id)
        listed = self.backend.look_for(name) if lagging and not recorded else self.backend.named(name)
        others = {p.id for p in listed} - recorded
        for pod_id in others:
            self.terminate(pod_id)
        return recorded | others
