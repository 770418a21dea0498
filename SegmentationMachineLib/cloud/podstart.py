"""Starting a GPU pod without surprises: phases, a real readiness check, a time limit, a record of what runs.

Ready means the pod answered through RunPod's proxy (cloudgpu: its agent accepted a heartbeat and
its nnInteractive server an authenticated request), not merely that RunPod says RUNNING. A start
that is not ready in time, or that RunPod reports as failed (ERROR) or stopped (EXITED), has its
container log kept (read within seconds) and is terminated (a resume: stopped again), and the reason said; a
GPU type without capacity hands over to the next one; every pod started here is recorded locally,
so the next start can list what is still there and what it has cost.
"""

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from ..core.files import locked, write_private
from .pods import CapacityError, Pod, PodsError, masked

POLL_S = 5.0  # RunPod's API is not to be polled faster
DEFAULT_TIMEOUT_S = 600.0
FAILED = ("ERROR", "EXITED")  # a start in these states will not become ready by waiting
log = logging.getLogger("segmentation-machine")


class Phase(str, Enum):
    WAITING_FOR_GPU = "waiting for a GPU"
    PULLING_IMAGE = "pulling the image"
    STARTING_SERVICES = "starting services"
    READY = "server ready"


@dataclass
class Progress:
    phase: Phase
    elapsed_s: float
    cost_so_far: float
    pod_id: str = ""
    note: str = ""

    def __str__(self):
        text = f"{self.phase.value} ({self.elapsed_s:.0f} s, ${self.cost_so_far:.3f} so far)"
        return f"{text}: {self.note}" if self.note else text


PROXY_URL = "https://{pod_id}-{port}.proxy.runpod.net"


def proxy_url(pod_id: str, port: int = 8000) -> str:
    """The public URL of a pod's port; SM_RUNPOD_PROXY_URL redirects it (tests, other deployments)."""
    return (os.environ.get("SM_RUNPOD_PROXY_URL") or PROXY_URL).format(pod_id=pod_id, port=port)


def pod_at(url: str, port: int = 8000):
    """The id of the pod whose port (its nnInteractive server, by default) is at url, RunPod's proxy address as
    proxy_url makes it; None for any other address."""
    pattern = re.escape(proxy_url("{pod_id}", port)).replace(re.escape("{pod_id}"), "([A-Za-z0-9]+)")
    found = re.fullmatch(pattern, url.strip().rstrip("/"), re.IGNORECASE)
    return found and found.group(1)


def server_answers(url: str, api_key: str, timeout: float = 10.0) -> bool:
    """True once the nnInteractive server behind url grants a session to api_key (released at once).

    False while the proxy answers 502, 503 (its own page) or nothing; a rejected key is an error, not a wait.
    """
    import requests

    try:
        claim = requests.post(f"{url}/claim", headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout)
    except requests.RequestException:
        return False
    if claim.status_code == 401:
        raise PodsError("The pod's server rejected the key it was started with: terminate the pod and start a new one.")
    if claim.status_code == 503:  # full, but up and checking keys; or the proxy's page while it routes
        return _at_capacity(claim)
    if claim.status_code != 200:
        return False
    token = claim.json().get("lease_token", "")
    try:
        requests.post(f"{url}/release", headers={"Authorization": f"Bearer {api_key}", "X-Lease-Token": token},
                      timeout=timeout)
    except requests.RequestException:
        pass  # the lease expires by itself
    return True


def _at_capacity(answer) -> bool:
    """Whether a 503 is upstream's own (JSON: "server is at capacity (3 sessions)"), not the proxy's HTML page."""
    try:
        return "at capacity" in str(answer.json().get("detail", ""))
    except (ValueError, AttributeError):
        return False


class PodRecords:
    """Pods this computer started and has not seen terminated: a JSON file only the user can read. A read, change and
    write at a time, across processes too (two Slicers, Slicer and `pod up`): the operating system's lock on a file
    beside it; pods are terminated in parallel at quit, so threads take it too."""

    def __init__(self, path: Path = None):
        self.path = Path(path or Path.home() / ".segmentation-machine" / "pods.json")

    @property
    def _lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def all(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def add(self, pod: Pod, started_at: float, **details):
        """details: what reconnecting needs later (mode, the pod's own secrets); the file is the user's only."""
        end = {"terminate_after": pod.terminate_after} if pod.terminate_after else {}
        with locked(self._lock_path):
            self._write({**self.all(), pod.id: {"name": pod.name, "gpu": pod.gpu, "started_at": started_at, **end,
                                                **details}})

    def get(self, pod_id: str) -> dict:
        return self.all().get(pod_id, {})

    def remove(self, pod_id: str):
        with locked(self._lock_path):
            records = self.all()
            records.pop(pod_id, None)
            self._write(records)

    def still_running(self, backend) -> list:
        """(Pod, cost since its last start) for recorded pods that still exist, running or stopped (EXITED: its volume
        still bills); forgets the terminated ones.

        Each is asked for by id: RunPod's list lags behind a create, and would make a new pod look gone."""
        result = []
        for pod_id in list(self.all()):
            pod = backend.get(pod_id)
            if pod is None:
                self.remove(pod_id)
            else:
                result.append((pod, pod.cost_since_started))
        return result

    def save_log(self, pod_id: str, text: str) -> Path:
        """Keeps a failed start's container log beside the records (it may name the pod's files)."""
        path = self.path.parent / "logs" / f"{pod_id}.log"
        write_private(path, text)
        return path

    def _write(self, records: dict):
        write_private(self.path, json.dumps(records, indent=2))


def start_pod(backend, specs, is_ready, records: PodRecords, on_progress=lambda progress: None,
              timeout_s: float = DEFAULT_TIMEOUT_S, poll_s: float = POLL_S, clock=time.monotonic,
              sleep=time.sleep, details: dict = None) -> Pod:
    """Starts the first spec whose GPU has capacity and waits until is_ready(pod).

    specs: PodSpecs in order of preference (e.g. the cheapest GPU types first).
    A start not ready within timeout_s is terminated before the error is raised.
    details: kept in the pod's record (see PodRecords.add).
    """
    started = clock()
    tried = []
    for spec in specs:
        on_progress(Progress(Phase.WAITING_FOR_GPU, clock() - started, 0.0, note=spec.gpu_type_id))
        try:
            pod = backend.create(spec)
        except CapacityError:
            tried.append(spec.gpu_type_id)
            continue
        records.add(pod, time.time(), **(details or {}))
        return wait_until_ready(backend, pod, is_ready, records, on_progress, timeout_s, poll_s, clock, sleep,
                                note=f"no capacity for {', '.join(tried)}" if tried else "")
    raise CapacityError(f"No capacity right now for {', '.join(tried)}: try the community cloud, "
                        "another GPU type, or again in a few minutes.")


def wait_until_ready(backend, pod: Pod, is_ready, records, on_progress, timeout_s, poll_s=POLL_S, clock=time.monotonic,
                     sleep=time.sleep, note="", keep_volume=False) -> Pod:
    """Polls until is_ready(pod). Past timeout_s, or once RunPod reports the pod failed (ERROR) or stopped (EXITED),
    the pod is terminated (stopped when keep_volume: a resume) and the reason raised."""
    started = clock()
    phase = Phase.PULLING_IMAGE
    rate = pod.cost_per_hr
    while True:
        current = backend.get(pod.id)
        if current is None:
            records.remove(pod.id)
            raise PodsError(f"Pod {pod.id} was terminated while starting (elsewhere, or by RunPod): start a new one.")
        elapsed = clock() - started
        rate = current.cost_per_hr or rate  # a pod in ERROR is reported without a rate, but bills on
        cost = elapsed / 3600 * rate
        if current.status in FAILED:
            raise _given_up(backend, records, current, f"RunPod reports the pod as {current.status} while "
                            f"{phase.value}", cost, keep_volume)
        # RUNNING is enough to ask the pod itself: v2 may report a running pod's runtime (uptime, ports) late or never
        # (its schema allows null), and the proxy's answer, anything but 200 until the pod is routed, says the rest.
        if current.status == "RUNNING" or current.runtime_ready:
            phase = Phase.STARTING_SERVICES
            if is_ready(current):
                on_progress(Progress(Phase.READY, elapsed, cost, current.id, note))
                return current
        on_progress(Progress(phase, elapsed, cost, current.id, note))
        if elapsed >= timeout_s:
            raise _given_up(backend, records, current, f"The pod was not ready after {timeout_s / 60:.0f} min "
                            f"(still {phase.value})", cost, keep_volume)
        sleep(poll_s)


def _given_up(backend, records: PodRecords, pod: Pod, why: str, cost: float, keep_volume: bool) -> PodsError:
    """Keeps the log of a start that failed (read within seconds: RunPod may serve no log once a pod is gone),
    then ends its bill (terminated; a resume stopped); the error to raise."""
    kept = _keep_log(backend, records, pod.id, records.get(pod.id).get("secrets", {}).values())
    if keep_volume:
        try:
            if pod.status != "EXITED":  # stopped already
                backend.stop(pod.id)
        except PodsError as error:  # e.g. RunPod refuses to stop a pod in ERROR
            return PodsError(f"{why}, and it could not be stopped ({str(error).rstrip('.')}): terminate it with "
                             f"`segmentation-machine pod down {pod.id}` or in the RunPod console.")
        return PodsError(f"{why}: it was stopped again, its volume kept{kept}; try again later or terminate it.")
    backend.terminate(pod.id)
    records.remove(pod.id)
    return PodsError(f"{why}: it was terminated (cost ${cost:.2f}){kept}; try another GPU type or again later.")


def _keep_log(backend, records: PodRecords, pod_id: str, secret_values=()) -> str:
    """Saves the log of a start that failed; the clause that says where ('' without one). Never raises: the log
    is a help, and the sentence about the pod matters more."""
    try:
        text = masked(backend.logs(pod_id), list(secret_values))
        return f"; its container log is in {records.save_log(pod_id, text)}" if text else ""
    except PodsError as error:
        log.warning("The log of pod %s was not kept: %s", pod_id, error)
    except Exception as error:  # a bug, a full disk: said in the log, not instead of the sentence
        log.warning("The log of pod %s was not kept (%s).", pod_id, type(error).__name__)
    return ""
