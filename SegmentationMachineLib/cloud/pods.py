"""RunPod pods through RunPod's REST v2 API (`requests`, which Slicer bundles), behind one adapter.

REST v2 (https://api.runpod.io/v2, bearer key, RFC 9457 problem+json errors) is RunPod's supported
API; GraphQL retires in early 2027. Only one call still goes to GraphQL while it exists: creating a
pod with `terminateAfter`, RunPod's server-side end of a pod, which v2 has no field for. What the
adapter adds: 429s waited out (Retry-After), a create whose outcome is unknown (5xx, no answer,
"something went wrong") answered by looking the pod up over the seconds the list lags before any
retry, and one-sentence errors that never carry the key or the pod's secrets. A terminated pod,
which RunPod still lists as TERMINATED for a while, counts as gone.
"""

import functools
import json
import logging
import os
import queue
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit

from ..core.errors import UserError, causes, untrusted_certificate
from ..core.files import printable

# The default GPU must run large structures too: a whole-volume prediction on a 512x512x300 CT (autozoom, no
# torch.compile, as the pod runs it) peaked at 10.3 GB of GPU memory on an H200, CUDA context included (README,
# benchmarks/gpu_server.py): more than a 10 GB card has and within 2 GB of a 12 GB one, and autozoom's buffers
# grow with longer scans. 16 GB keeps half as much again in reserve. (Small structures peak at 5.6 GB: upstream
# recommends 10 GB.)
MIN_VRAM_GB = 16
NAME_PREFIX = "segmentation-machine-"
REST_URL = "https://api.runpod.io/v2"
GRAPHQL_URL = "https://api.runpod.io/graphql"
TIMEOUT_S = 30.0
BACKOFF_S = (5, 10, 20, 40, 60)  # between tries after a 429 without Retry-After
NETWORK_RETRIES = 2  # a read that gets a server error or no answer is tried again twice (5 s, 10 s)
LOOKUP_S = (2, 3, 5)  # after a create of unknown outcome: the pod list lags a few seconds behind
# After an action of unknown outcome (RunPod: "the action may have happened: look the pod up before trying again"),
# whether the pod (None: terminated; _UNSEEN: it could not be read) shows that it happened.
HAPPENED = {"stop": lambda pod: isinstance(pod, Pod) and pod.status == "EXITED",
            "start": lambda pod: isinstance(pod, Pod) and pod.status != "EXITED",
            "terminate": lambda pod: pod is None}
VOLUME_USD_PER_GB_MONTH = 0.20  # a stopped pod's volume
KEPT_WHILE_CREDIT = "kept while the account has credit (at $0 RunPod terminates pods without a network volume)"
LOG_LINES = 200  # a failed start's log: its last lines are enough to say why
LOG_WITHIN_S = 15.0  # RunPod streams the log and never ends the stream: reading it takes this long at most
LOG_QUIET_S = 2.0  # the backfill is over once no line came for this long (keep-alive comments do not count)
CAPACITY_MESSAGES = ("no longer any instances available", "does not have the resources to deploy",
                     "not enough free gpus")  # RunPod's 400s without capacity carry no code, only these
CAPACITY_SENTENCE = ("RunPod has no capacity for that GPU right now: choose another GPU type or cloud, "
                     "or try again later.")
WITHOUT_RUNPODS_END = ("the pod is created through its REST API, without RunPod's own end at the maximum lifetime (its "
                       "agent still ends it).")
CREATE = ("mutation Create($input: PodFindAndDeployOnDemandInput) { podFindAndDeployOnDemand(input: $input) "
          "{ id name desiredStatus costPerHr } }")

log = logging.getLogger("segmentation-machine")


class PodsError(UserError):
    """RunPod refused or failed; the message is the sentence to show."""


class CapacityError(PodsError):
    """The chosen GPU type has no capacity right now."""


class RateLimited(PodsError):
    """RunPod answered 429 to every try."""


class Forbidden(PodsError):
    """RunPod answered 403: this key may not do that (a pod's own key is documented to stop its pod, nothing more)."""


@dataclass(frozen=True)
class GpuType:
    id: str
    name: str
    memory_gb: int
    secure_price: float  # $/h on demand
    community_price: float
    in_stock: bool = True
    cuda_versions: tuple = ()  # those its hosts report, at or above the floor the catalog was asked with

    def price(self, cloud: str) -> float:
        return self.secure_price if cloud == "SECURE" else self.community_price


@dataclass
class PodSpec:
    gpu_type_id: str
    image: str = None
    template_id: str = None
    cloud: str = "SECURE"  # SECURE or COMMUNITY
    container_disk_gb: int = 40
    volume_gb: int = 50
    volume_mount: str = "/workspace"
    network_volume_id: str = None
    ports: list = field(default_factory=lambda: ["8000/http", "8001/http", "22/tcp"])
    env: dict = field(default_factory=dict)
    min_cuda_version: str = None  # v2 matches it numerically
    allowed_cuda_versions: list = None  # GraphQL matches them exactly
    name: str = field(default_factory=lambda: NAME_PREFIX + secrets.token_hex(4))
    terminate_after: str = None  # RFC 3339: RunPod terminates the pod then, whatever runs inside it
    stop_after: str = None  # RFC 3339: RunPod stops the pod then (its volume kept), whatever runs inside it


@dataclass
class Pod:
    id: str
    name: str
    status: str  # PROVISIONING, STARTING, RUNNING, ERROR, EXITED (stopped: its volume kept); TERMINATED is gone
    gpu: str  # the GPU type's id: v2 describes a pod's GPU as {id, count} only
    cost_per_hr: float  # RunPod's current rate: 0.0 once stopped (EXITED)
    uptime_s: int  # 0 unless RUNNING with a runtime: v2 has none for a pod in any other state, and may have none yet
    runtime_ready: bool  # a runtime is reported (uptime, ports); a RUNNING pod may lack one: ask the pod itself
    ports: list  # private ports listed by the runtime
    volume_gb: int = 0
    network_volume: str = ""  # the network volume's id, where the pod mounts one instead of a volume of its own
    created_at: str = ""  # RFC 3339, as RunPod reports it
    terminate_after: str = None  # when RunPod itself terminates it; known only to the create that set it

    @property
    def cost_since_started(self) -> float:
        """Rate x uptime: RunPod's uptime counts from the container's last start (a resume, a restart after a
        crash), so this is not the pod's whole cost."""
        return self.uptime_s / 3600 * self.cost_per_hr

    @property
    def volume_usd_per_month(self) -> float:
        return self.volume_gb * VOLUME_USD_PER_GB_MONTH

    def stopped_cost(self, until: str = "until it is terminated") -> str:
        """What a stopped (EXITED) pod still costs: its volume, until it is terminated; a network volume bills on its
        own, pod or no pod."""
        if self.network_volume:
            return (f"it has no volume of its own (its network volume {self.network_volume} bills apart, on RunPod's "
                    "Storage page, until you delete it there)")
        return (f"its {self.volume_gb} GB volume costs ${self.volume_usd_per_month:.2f}/month {until}, and is "
                f"{KEPT_WHILE_CREDIT}")


def spend_per_hr(pods) -> float:
    """What the pods holding a GPU cost together ($/h): all but the stopped (EXITED) ones, since a pod in ERROR
    restarts its container and bills on; v2 has no balance or spend endpoint."""
    return sum(p.cost_per_hr for p in pods if p.status not in ("EXITED", "TERMINATED"))


class RunPodRest:
    """RunPod's REST v2 API; RUNPOD_REST_URL and RUNPOD_GRAPHQL_URL redirect it (tests: the local fake)."""

    def __init__(self, api_key: str, sleep=time.sleep):
        self._headers = {"Authorization": f"Bearer {api_key}"}  # the key travels here only
        self._sleep = sleep
        self.url = os.environ.get("RUNPOD_REST_URL", REST_URL).rstrip("/")
        self.graphql_url = os.environ.get("RUNPOD_GRAPHQL_URL", GRAPHQL_URL)

    # -- reading ---------------------------------------------------------------------------
    def gpu_types(self, min_vram_gb: int = MIN_VRAM_GB, cloud: str = "SECURE", in_stock: bool = True,
                  min_cuda_version: str = None) -> list:
        """NVIDIA types (the image's torch is CUDA) with at least min_vram_gb, cheapest first for that cloud; with
        min_cuda_version, their stock and CUDA versions are those of the hosts that can run it."""
        # Stock is per cloud: RunPod counts it for SECURE unless told otherwise.
        cuda = f"&minCudaVersion={min_cuda_version}" if min_cuda_version else ""
        catalog = self._json("GET", f"/catalog/gpus?product=POD&include=AVAILABILITY&cloud={cloud}{cuda}")
        types = [_gpu_type(g) for g in _listed(catalog, "gpus") if g.get("manufacturer") == "NVIDIA"
                 and g.get(cloud.lower())]
        return sorted((g for g in types if g.memory_gb >= min_vram_gb and g.price(cloud) > 0
                       and (g.in_stock or not in_stock)), key=lambda g: (g.price(cloud), -g.memory_gb))

    def pods(self) -> list:
        """Every pod of the account but the terminated ones; a pod created seconds ago may not be listed yet."""
        return [_pod(p) for p in _listed(self._json("GET", "/pods"), "pods") if p.get("status") != "TERMINATED"]

    def get(self, pod_id: str):
        """The pod, or None once it is terminated (listed as TERMINATED, or gone: 404)."""
        response = self._request("GET", f"/pods/{pod_id}")
        if response.status_code == 404:
            return None
        pod = _pod(_checked(response))
        return None if pod.status == "TERMINATED" else pod

    def billed(self, pod: Pod) -> float:
        """What RunPod's billing says the pod has cost since it was created, over all its starts, GPU and disk
        (v2's /billing/pods, in day buckets, the current one included)."""
        query = {"podId": pod.id, "bucketSize": "day", **({"startTime": pod.created_at} if pod.created_at else {})}
        return _billed_total(self._json("GET", f"/billing/pods?{urlencode(query)}"))

    def named(self, name: str) -> list:
        return [p for p in self.pods() if p.name == name]

    def logs(self, pod_id: str, within_s: float = LOG_WITHIN_S, quiet_s: float = LOG_QUIET_S,
             max_lines: int = LOG_LINES) -> str:
        """The last lines of the pod's log (why a start failed), read for within_s at most whatever RunPod does.

        RunPod streams the log as Server-Sent Events and keeps the stream open: a backfill, then live lines and
        keep-alive comments. Reading ends after max_lines, once no line came for quiet_s, or after within_s;
        a reader thread does the reading, so a stream that stalls cannot hold the caller."""
        found, stop = queue.Queue(), threading.Event()
        threading.Thread(target=self._read_log, args=(pod_id, max_lines, within_s, found, stop), daemon=True,
                         name=f"log of {pod_id}").start()
        lines, deadline, wait = [], time.monotonic() + within_s, within_s  # until RunPod answers: all the time
        try:
            while len(lines) < max_lines:
                item = found.get(timeout=max(0.0, min(wait, deadline - time.monotonic())))
                if item is _END or (isinstance(item, PodsError) and lines):
                    break  # a stream that breaks after some lines still told something
                if isinstance(item, PodsError):
                    raise item
                if item is not _OPEN:
                    lines.append(item)
                wait = quiet_s
        except queue.Empty:
            pass  # quiet, or out of time: what came is the log
        finally:
            stop.set()  # the reader closes the stream at its next line or keep-alive
        return masked("\n".join(lines), [self._headers["Authorization"].removeprefix("Bearer ")])

    def _read_log(self, pod_id: str, max_lines: int, within_s: float, found: queue.Queue, stop: threading.Event):
        """On the reader thread: puts _OPEN, then each line, then _END (or a PodsError) into found."""
        import requests

        try:
            with requests.get(f"{self.url}/pods/{pod_id}/logs", params={"tail": max_lines}, headers=self._headers,
                              stream=True, timeout=(TIMEOUT_S, within_s)) as response:
                if response.status_code >= 300:
                    _checked(response)
                found.put(_OPEN)
                for line in _log_lines(response):
                    if stop.is_set():  # looked at on keep-alives too: the caller has gone, the stream is closed
                        return
                    if line is not None:
                        found.put(line)
            found.put(_END)
        except PodsError as error:
            found.put(error)
        except ValueError:  # JSON that is not JSON (requests' JSONDecodeError is a RequestException too)
            found.put(PodsError("RunPod's answer for the pod's log could not be read."))
        except requests.RequestException as error:
            found.put(PodsError(unreachable(self.url, error)[0]))

    # -- changing --------------------------------------------------------------------------
    def create(self, spec: PodSpec) -> Pod:
        """Creates the pod. When the outcome is unknown the pod is looked for (the list lags) before the one
        retry, and a second pod of the same name left by that retry is terminated."""
        for attempt in range(2):
            try:
                pod = self._create_once(spec)
            except _Unknown:
                found = self.look_for(spec.name)
                if found:
                    return found[0]
                continue
            if attempt:
                for twin in self.look_for(spec.name, besides=pod.id):
                    self.terminate(twin.id)
            return pod
        raise PodsError("RunPod failed twice while creating the pod and it does not exist: try again in a minute.")

    def stop(self, pod_id: str):
        """Stops billing for the GPU; the volume (and its cost) stays until terminate. A pod already stopped (its agent
        stopped it) counts as stopped."""
        self._action(pod_id, "stop")

    def resume(self, pod_id: str):
        try:
            self._action(pod_id, "start")
        except CapacityError:  # a stopped pod is tied to its host: another GPU type or cloud is no way out
            raise CapacityError(f"The host of pod {pod_id} has no free GPU right now: try resuming it later, or "
                                "terminate it and start a new pod (which deletes its volume's files).") from None

    def terminate(self, pod_id: str):
        """Terminates the pod; one that is already terminated (404, or a 409 for a TERMINATED pod) counts as done."""
        response = self._act(pod_id, "terminate")
        if response is not None and not self._terminated(response, pod_id):
            _checked(response)

    # -- inside ----------------------------------------------------------------------------
    def _create_once(self, spec: PodSpec) -> Pod:
        secret_values = [str(v) for v in spec.env.values()]
        if spec.terminate_after or spec.stop_after:
            created = self._create_with_graphql(spec, secret_values)
            if created is not None:
                return created
        response = self._request("POST", "/pods", body=_v2_body(spec), create=True)
        if response.status_code == 404 and spec.template_id:  # the one thing a create can name that is not there
            raise PodsError(f"RunPod has no template {printable(spec.template_id)} that this API key can use: check "
                            "the template id (RunPod console → Templates).")
        return _created(response, secret_values, _pod)

    def _create_with_graphql(self, spec: PodSpec, secret_values):
        """Creates through GraphQL, the only API that takes terminateAfter and stopAfter; None once GraphQL is
        retired, or while it refuses every try (its rate limits tighten ahead of its retirement): then v2 creates
        without a server-side end, and the pod's agent alone ends it."""
        try:
            response = self._request("POST", "", body={"query": CREATE, "variables": {"input": _graphql_input(spec)}},
                                     create=True, url=self.graphql_url)
        except RateLimited:
            log.warning("RunPod's GraphQL API refuses every request (rate limit): %s", WITHOUT_RUNPODS_END)
            return None
        if response.status_code in (404, 410):
            log.warning("RunPod's GraphQL API is gone (%d): %s", response.status_code, WITHOUT_RUNPODS_END)
            return None
        answer = _created(response, secret_values)
        if answer.get("errors"):  # GraphQL says what went wrong in a 200
            message = _problem(response)
            if "something went wrong" in message.lower():
                raise _Unknown()
            _raise_for(400, message, secret_values)
        pod_id = _created(response, secret_values, _created_id)
        try:
            created = self.get(pod_id)  # described the way v2 does
        except PodsError:  # created all the same: its id is kept, so that it is recorded and ended by id
            created = None
        if created is None:  # or not readable yet: kept by its id too (a look by name could make a second pod)
            created = Pod(pod_id, spec.name, "PROVISIONING", spec.gpu_type_id, 0.0, 0, False, [])
        created.terminate_after = spec.terminate_after
        return created

    def look_for(self, name: str, besides: str = None) -> list:
        """Pods of that name (but not `besides`), asked again while the list may still lag."""
        for wait in LOOKUP_S:
            self._sleep(wait)
            found = [p for p in self.named(name) if p.id != besides]
            if found:
                return found
        return []

    def _look(self, pod_id: str):
        """The pod (None: terminated), or _UNSEEN where this key may not read it: the pod-scoped key RunPod gives a
        pod is documented to stop it, nothing more. Unseen is unknown: neither done nor not done. Any other failure
        (server errors, a revoked key) is raised: a stop must never be said done on a read that failed."""
        try:
            return self.get(pod_id)
        except Forbidden:
            return _UNSEEN

    def _terminated(self, response, pod_id: str) -> bool:
        """Whether an action's answer means the pod is terminated: gone (404), or refused (409) while it is
        still listed as TERMINATED."""
        return response.status_code == 404 or (response.status_code == 409 and self._look(pod_id) is None)

    def _action(self, pod_id: str, action: str):
        response = self._act(pod_id, action)
        if response is None:
            return
        if self._terminated(response, pod_id):
            raise PodsError(f"There is no pod {pod_id} on this account (terminated?): "
                            "`segmentation-machine pod list` shows them.")
        if action == "stop" and response.status_code == 409 and HAPPENED["stop"](self._look(pod_id)):
            return  # refused as not valid now because it is stopped already
        _checked(response)

    def _act(self, pod_id: str, action: str):
        """The action's answer, or None where an answer of unknown outcome (a server error, none, "something went
        wrong") was followed by a look at the pod that shows it happened. Sent again unless the pod shows it happened
        (or where the pod cannot be read: a second stop is refused as not valid, never done twice): a stop reported
        failed although it happened would send a user to terminate, losing the volume."""
        unsure = False
        for wait in (*BACKOFF_S[:NETWORK_RETRIES], None):
            try:
                response = self._request("POST", f"/pods/{pod_id}/action", body={"action": action}, create=True)
                if not (unsure and response.status_code == 409):
                    return response
                # refused as not valid now: it may have happened after all, and the pod shown late. A stop sent again
                # and refused so is done where the pod cannot be read: a stop is not valid once stopped.
                seen = self._look(pod_id)
                return None if HAPPENED[action](seen) or (seen is _UNSEEN and action == "stop") else response
            except _Unknown:
                unsure = True
                if HAPPENED[action](self._look(pod_id)):  # unseen: sent again
                    return None
                if wait is None:
                    raise PodsError(f"RunPod did not confirm the {action} of pod {pod_id} (server errors or no "
                                    "answer), and the pod does not show it: try again in a minute, or use the "
                                    "RunPod console.") from None
                self._sleep(wait)

    def _json(self, method: str, path: str) -> dict:
        return _checked(self._request(method, path))

    def _request(self, method: str, path: str, body: dict = None, create: bool = False, url: str = None):
        """One call: waits out 429s, tries a read again after a server error or no answer; a create or action
        (create=True) whose outcome is unknown raises _Unknown instead, for the caller to look before it tries
        again."""
        import requests

        failures, problem = 0, ""
        for wait in (*BACKOFF_S, None):
            try:
                response = requests.request(method, url or self.url + path, json=body, headers=self._headers,
                                            timeout=TIMEOUT_S)
            except requests.RequestException as error:  # its text holds no secret but is noise: our sentence
                response, (problem, at_once) = None, unreachable(url or self.url, error)
                if at_once:  # a refused connection or an unknown name is not cured by waiting
                    raise PodsError(problem) from None
            if response is not None and response.status_code == 429:
                if wait is None:
                    raise RateLimited("RunPod keeps refusing requests (rate limit): try again in a minute.")
                self._sleep(_retry_after(response, wait))
                continue
            unknown = response is None or response.status_code >= 500 or (
                create and "something went wrong" in _problem(response).lower())
            if not unknown:
                return response
            if create:
                raise _Unknown()
            failures += 1
            if failures > NETWORK_RETRIES or wait is None:
                raise PodsError(problem or f"RunPod at {_shown(url or self.url)} answered with a server error "
                                f"({response.status_code}): try again in a minute.")
            self._sleep(wait)
        raise AssertionError("unreachable")


def _shown(url: str) -> str:
    """url without anything secret-looking (user:password@, a query): where, not how."""
    parts = urlsplit(url)
    return printable(f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}")


def unreachable(url: str, error: Exception) -> tuple:
    """(the sentence for a request that got no answer, whether trying again is pointless): names the URL and
    the cause (connection refused, name not found, time-out)."""
    chain, where = causes(error), _shown(url)
    if untrusted_certificate(error):  # waiting does not cure it
        return (f"Cannot reach RunPod at {where}: it shows a certificate this computer does not trust "
                f"({untrusted_certificate(error)}); behind a proxy that inspects TLS, set REQUESTS_CA_BUNDLE to your "
                "organisation's CA certificates.", True)
    if any(isinstance(c, ConnectionRefusedError) for c in chain):
        return (f"Cannot reach RunPod at {where}: the connection was refused; check the network, a proxy or "
                "firewall in between, and RUNPOD_REST_URL if it is set.", True)
    if any(isinstance(c, socket.gaierror) or type(c).__name__ == "NameResolutionError" for c in chain):
        return (f"Cannot reach RunPod at {where}: its name {urlsplit(url).hostname} was not found (DNS); check the "
                "internet connection.", True)
    if any(isinstance(c, TimeoutError) or "Timeout" in type(c).__name__ for c in chain):
        return f"RunPod at {where} did not answer within {TIMEOUT_S:g} s (time-out): try again in a minute.", False
    return (f"Cannot reach RunPod at {where} (the connection failed: {type(chain[-1]).__name__}): try again in a "
            "minute.", False)


class _Unknown(Exception):
    """A create or action whose outcome is unknown: the caller looks before it tries again."""


_OPEN, _END = object(), object()  # the log's reader: RunPod answered; the stream ended
_UNSEEN = object()  # a pod RunPod did not let us read (_look)


def _log_lines(response):
    """The lines of RunPod's answer for a pod's log: Server-Sent Events whose data is {"source", "line", "ts"}
    (None for comments such as keep-alives, ids and blank lines), or JSON {"logs": [...]} as earlier versions
    answered."""
    if "json" in response.headers.get("Content-Type", ""):
        answer = response.json()
        yield from (str(line) for line in (answer.get("logs") if isinstance(answer, dict) else None) or [])
        return
    for raw in response.iter_lines():
        text = raw.decode("utf-8", "replace")
        if not text.startswith("data:"):
            yield None
            continue
        data = text[5:].removeprefix(" ")
        try:
            event = json.loads(data)
        except ValueError:
            event = None
        if not isinstance(event, dict):  # plain text data
            yield data
        elif event.get("source", "container") == "container":
            yield str(event.get("line", ""))
        else:
            yield f"[{event['source']}] {event.get('line', '')}"


def _checked(response, secret_values=()) -> dict:
    """The JSON object of a 2xx answer; otherwise the sentence for RunPod's problem (RFC 9457)."""
    if response.status_code >= 300:
        _raise_for(response.status_code, _problem(response), secret_values)
    if not response.content:
        return {}
    try:
        answer = response.json()
    except ValueError:  # a proxy's or a maintenance page, answered 200
        answer = None
    if not isinstance(answer, dict):
        raise PodsError(f"RunPod answered {response.status_code} with something other than its API's JSON "
                        f"({printable(response.headers.get('Content-Type') or 'no content type')}): try again in a "
                        "minute.")
    return answer


def _created(response, secret_values, read=lambda answer: answer):
    """read(_checked(response)) for a create: a 2xx answer that cannot be read (not JSON, another shape) most likely
    created the pod, so it is _Unknown: the caller looks for the pod by name rather than leave it billing unseen."""
    if response.status_code >= 300:
        _checked(response, secret_values)  # raises the refusal's sentence
    try:
        return read(_checked(response))
    except PodsError:
        raise _Unknown() from None


def _readable(parse):
    """parse(answer), where an answer of an unexpected shape (v2 is a beta: fields may change) is a PodsError: the
    callers that watch a billing pod go on after one, and would die of a KeyError."""
    @functools.wraps(parse)
    def read(answer, *args):
        try:
            return parse(answer, *args)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            raise PodsError("RunPod answered in a form this version does not know (its API may have changed): try "
                            "again in a minute, and update SegmentationMachine if it keeps happening.") from None
    return read


# What looks like a secret in RunPod's own words: its API keys (rpa_...), bearer tokens, "key=..." pairs and
# long opaque strings (the pod secrets we generate are 32 characters or more).
SECRET_LIKE = re.compile(r"\brp[a-z]_[A-Za-z0-9]+|\bbearer\s+\S+|\b(?:api[_-]?key|token|password|secret)\s*[=:]\s*\S+"
                         r"|[A-Za-z0-9+/_=-]{32,}", re.IGNORECASE)


def masked(text: str, secret_values) -> str:
    """text with each of secret_values (the key, the pod's own secrets) replaced by ***."""
    for value in secret_values:
        if len(value) >= 4:
            text = text.replace(value, "***")
    return text


def redacted(detail: str, secret_values=()) -> str:
    """RunPod's text for a sentence: the pod's own secrets and anything secret-like masked, control characters
    escaped (RunPod may quote the request back)."""
    return printable(SECRET_LIKE.sub("***", masked(detail, secret_values)))


def _raise_for(status: int, detail: str, secret_values=()):
    detail = redacted(detail, secret_values).rstrip(".")  # the sentence ends with its own full stop
    if status == 401:
        raise PodsError("RunPod rejected the API key: check it in the Cloud GPU panel "
                        "(it needs read and write access).")
    if status == 402 or "balance is too low" in detail.lower():  # GraphQL says so in an error of a 200
        raise PodsError("RunPod refused: the account's balance is too low. Add credit in the RunPod console "
                        "(Billing) and try again.")
    if status == 400 and any(message in detail.lower() for message in CAPACITY_MESSAGES):
        raise CapacityError(CAPACITY_SENTENCE)
    if status == 403:
        raise Forbidden(f"RunPod refused: this API key may not do that ({detail or 'forbidden'}).")
    if status == 409:
        raise PodsError(f"RunPod cannot do that to the pod now: {detail or 'conflict'}.")
    if status == 422:
        raise PodsError(f"RunPod rejected the pod's settings: {detail or 'invalid request'}.")
    raise PodsError(f"RunPod refused the request ({status}): {detail or 'no reason given'}.")


def _problem(response) -> str:
    """The human part of a problem+json answer ('' for anything else): its detail, and for a 422 the violations
    it lists (the detail alone says only "Request validation failed."); for GraphQL, its errors' messages."""
    try:
        problem = response.json()
    except ValueError:
        return ""
    if not isinstance(problem, dict):
        return ""
    detail = str(problem.get("detail") or problem.get("title") or "")
    errors = problem.get("errors") if isinstance(problem.get("errors"), list) else []
    errors = [str(e.get("message") or e) if isinstance(e, dict) else str(e) for e in errors]  # GraphQL's: messages
    return "; ".join(filter(None, [detail.rstrip("."), *errors])) if errors else detail


def _retry_after(response, default: float) -> float:
    try:
        return max(0.0, float(response.headers.get("Retry-After", "")))
    except ValueError:
        return default  # absent, or an HTTP date: our own back-off


def _v2_body(spec: PodSpec) -> dict:
    """CreatePodRequest as RunPod's v2 schema has it (Frontdoor v2.9.0): a field it does not know is a 422.
    With a template, RunPod spreads its settings into the pod; the fields given here override them."""
    gpu = {"id": spec.gpu_type_id, "count": 1}
    if spec.min_cuda_version:  # not both: the API refuses them together
        gpu["minCudaVersion"] = spec.min_cuda_version
    elif spec.allowed_cuda_versions:
        gpu["allowedCudaVersions"] = list(spec.allowed_cuda_versions)
    mounts = ({"network": [{"volumeId": spec.network_volume_id, "path": spec.volume_mount}]} if spec.network_volume_id
              else {"persistent": {"size": spec.volume_gb, "path": spec.volume_mount}})
    body = {"name": spec.name, "cloud": spec.cloud, "gpu": gpu, "disk": spec.container_disk_gb,
            "env": {str(k): str(v) for k, v in spec.env.items()}, "ports": list(spec.ports), "mounts": mounts,
            "startSsh": True}  # PUBLIC_KEY: the account's SSH keys, as GraphQL's create asks for too
    body.update({"templateId": spec.template_id} if spec.template_id else {"image": spec.image})
    return body


def _graphql_input(spec: PodSpec) -> dict:
    """podFindAndDeployOnDemand's input; sent as a variable, so no value is pasted into the query text."""
    given = {"name": spec.name, "cloudType": spec.cloud, "gpuTypeId": spec.gpu_type_id, "gpuCount": 1,
             "imageName": spec.image, "templateId": spec.template_id, "containerDiskInGb": spec.container_disk_gb,
             "volumeInGb": 0 if spec.network_volume_id else spec.volume_gb, "networkVolumeId": spec.network_volume_id,
             "volumeMountPath": spec.volume_mount, "ports": ",".join(spec.ports), "startSsh": True,
             "supportPublicIp": _needs_public_ip(spec), "allowedCudaVersions": spec.allowed_cuda_versions,
             "env": [{"key": str(k), "value": str(v)} for k, v in spec.env.items()],
             "terminateAfter": spec.terminate_after, "stopAfter": spec.stop_after}
    return {k: v for k, v in given.items() if v is not None}


def _needs_public_ip(spec: PodSpec) -> bool:
    """Whether GraphQL's create must ask for a public IP: RunPod exposes TCP ports (22/tcp for SSH) on the community
    cloud only with one (the secure cloud has them anyway). v2's create has no such field."""
    return spec.cloud == "COMMUNITY" and any(port.endswith("/tcp") for port in spec.ports)


@_readable
def _listed(answer: dict, key: str) -> list:
    """answer[key], a list of objects, as v2 wraps its lists ({"pods": [...]})."""
    items = answer[key]
    if not all(isinstance(item, dict) for item in items):
        raise TypeError(key)
    return items


@_readable
def _created_id(answer: dict) -> str:
    return str(answer["data"]["podFindAndDeployOnDemand"]["id"])


@_readable
def _billed_total(answer: dict) -> float:
    """ListPodBillingResponse: the totals over its records, in USD."""
    return float(answer["metadata"]["totals"]["totalAmount"])


@_readable
def _gpu_type(data: dict) -> GpuType:
    """A v2 catalog entry (GpuType); availability is NONE, LOW, MEDIUM or HIGH."""
    price = data.get("price") or {}
    return GpuType(data["id"], data.get("name") or data["id"], int(data.get("memory") or 0),
                   float(price.get("secure") or 0), float(price.get("community") or 0),
                   in_stock=data.get("availability") in ("LOW", "MEDIUM", "HIGH"),
                   cuda_versions=tuple(str(v["version"]) for v in data.get("cudaVersions") or []))


@_readable
def _pod(data: dict) -> Pod:
    """A v2 Pod: gpu is {id, count}; runtime is null (or empty) until the container runs; cost is 0 once stopped."""
    runtime = data.get("runtime") or {}
    mounts = data.get("mounts") or {}
    persistent, network = mounts.get("persistent") or {}, mounts.get("network") or [{}]  # a network volume bills apart
    return Pod(id=data["id"], name=data.get("name", ""), status=data.get("status", ""),
               gpu=(data.get("gpu") or {}).get("id", ""), cost_per_hr=float(data.get("cost") or 0),
               uptime_s=int(runtime.get("uptime") or 0), runtime_ready=bool(runtime),
               ports=[p["private"] for p in runtime.get("ports") or []], volume_gb=int(persistent.get("size") or 0),
               network_volume=str(network[0].get("volumeId") or ""), created_at=str(data.get("createdAt") or ""))
