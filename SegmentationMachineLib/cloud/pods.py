"""RunPod pods through RunPod's REST v2 API (`requests`, which Slicer bundles), behind one adapter.

REST v2 (https://api.runpod.io/v2, bearer key, RFC 9457 problem+json errors) is RunPod's supported
API; GraphQL retires in early 2027. Only one call still goes to GraphQL while it exists: creating a
pod with `terminateAfter`, RunPod's server-side end of a pod, which v2 has no field for. What the
adapter adds: 429s waited out (Retry-After), a create whose outcome is unknown (5xx, no answer,
"something went wrong") answered by looking the pod up over the seconds the list lags before any
retry, and one-sentence errors that never carry the key or the pod's secrets.
"""

import os
import re
import secrets
import socket
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ..core.errors import UserError
from ..core.files import printable

MIN_VRAM_GB = 10  # nnInteractive's recommendation
NAME_PREFIX = "segmentation-machine-"
REST_URL = "https://api.runpod.io/v2"
GRAPHQL_URL = "https://api.runpod.io/graphql"
TIMEOUT_S = 30.0
BACKOFF_S = (5, 10, 20, 40, 60)  # between tries after a 429 without Retry-After
NETWORK_RETRIES = 2  # a read that gets a server error or no answer is tried again twice (5 s, 10 s)
LOOKUP_S = (2, 3, 5)  # after a create of unknown outcome: the pod list lags a few seconds behind
VOLUME_USD_PER_GB_MONTH = 0.20  # a stopped pod's volume
CAPACITY_MESSAGES = ("no longer any instances available", "does not have the resources to deploy",
                     "not enough free gpus")  # RunPod's 400s without capacity carry no code, only these
CAPACITY_SENTENCE = ("RunPod has no capacity for that GPU right now: choose another GPU type or cloud, "
                     "or try again later.")
CREATE = ("mutation Create($input: PodFindAndDeployOnDemandInput) { podFindAndDeployOnDemand(input: $input) "
          "{ id name desiredStatus costPerHr } }")


class PodsError(UserError):
    """RunPod refused or failed; the message is the sentence to show."""


class CapacityError(PodsError):
    """The chosen GPU type has no capacity right now."""


@dataclass(frozen=True)
class GpuType:
    id: str
    name: str
    memory_gb: int
    secure_price: float  # $/h on demand
    community_price: float
    in_stock: bool = True

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
    allowed_cuda_versions: list = None
    name: str = field(default_factory=lambda: NAME_PREFIX + secrets.token_hex(4))
    terminate_after: str = None  # RFC 3339: RunPod terminates the pod then, whatever runs inside it


@dataclass
class Pod:
    id: str
    name: str
    status: str  # PROVISIONING, RUNNING, EXITED, ERROR, TERMINATED
    gpu: str
    cost_per_hr: float
    uptime_s: int
    runtime_ready: bool  # the container runs (a runtime is reported)
    ports: list  # private ports listed by the runtime
    volume_gb: int = 0
    terminate_after: str = None  # when RunPod itself terminates it; known only to the create that set it

    @property
    def cost_so_far(self) -> float:
        return self.uptime_s / 3600 * self.cost_per_hr

    @property
    def volume_usd_per_month(self) -> float:
        return self.volume_gb * VOLUME_USD_PER_GB_MONTH


def spend_per_hr(pods) -> float:
    """What the running pods cost together ($/h): v2 has no balance or spend endpoint."""
    return sum(p.cost_per_hr for p in pods if p.status == "RUNNING")


class RunPodRest:
    """RunPod's REST v2 API; RUNPOD_REST_URL and RUNPOD_GRAPHQL_URL redirect it (tests: the local fake)."""

    def __init__(self, api_key: str, sleep=time.sleep):
        self._headers = {"Authorization": f"Bearer {api_key}"}  # the key travels here only
        self._sleep = sleep
        self.url = os.environ.get("RUNPOD_REST_URL", REST_URL).rstrip("/")
        self.graphql_url = os.environ.get("RUNPOD_GRAPHQL_URL", GRAPHQL_URL)

    # -- reading ---------------------------------------------------------------------------
    def gpu_types(self, min_vram_gb: int = MIN_VRAM_GB, cloud: str = "SECURE", in_stock: bool = True) -> list:
        """NVIDIA types (the image's torch is CUDA) with at least min_vram_gb, cheapest first for that cloud."""
        catalog = self._json("GET", "/catalog/gpus?product=POD&include=AVAILABILITY")
        types = [_gpu_type(g) for g in catalog["gpus"]
                 if (g.get("manufacturer") or "").lower() == "nvidia" and g.get(_CLOUD_FLAG[cloud])]
        return sorted((g for g in types if g.memory_gb >= min_vram_gb and g.price(cloud) > 0
                       and (g.in_stock or not in_stock)), key=lambda g: (g.price(cloud), -g.memory_gb))

    def pods(self) -> list:
        """Every pod of the account; a pod created seconds ago may not be listed yet."""
        return [_pod(p) for p in self._json("GET", "/pods")["pods"]]

    def get(self, pod_id: str):
        """The pod, or None once it is gone."""
        response = self._request("GET", f"/pods/{pod_id}")
        return None if response.status_code == 404 else _pod(_checked(response))

    def named(self, name: str) -> list:
        return [p for p in self.pods() if p.name == name]

    def logs(self, pod_id: str) -> str:
        """The container's log (why a start failed)."""
        return "\n".join(self._json("GET", f"/pods/{pod_id}/logs").get("logs") or [])

    # -- changing --------------------------------------------------------------------------
    def create(self, spec: PodSpec) -> Pod:
        """Creates the pod. When the outcome is unknown the pod is looked for (the list lags) before the one
        retry, and a second pod of the same name left by that retry is terminated."""
        for attempt in range(2):
            try:
                pod = self._create_once(spec)
            except _Unknown:
                found = self._look_for(spec.name)
                if found:
                    return found[0]
                continue
            if attempt:
                for twin in self._look_for(spec.name, besides=pod.id):
                    self.terminate(twin.id)
            return pod
        raise PodsError("RunPod failed twice while creating the pod and it does not exist: try again in a minute.")

    def stop(self, pod_id: str):
        """Stops billing for the GPU; the volume (and its cost) stays until terminate."""
        self._action(pod_id, "stop")

    def resume(self, pod_id: str):
        self._action(pod_id, "start")

    def terminate(self, pod_id: str):
        """Terminates the pod; one that is already gone counts as terminated."""
        response = self._request("POST", f"/pods/{pod_id}/action", body={"action": "terminate"})
        if response.status_code != 404:
            _checked(response)

    # -- inside ----------------------------------------------------------------------------
    def _create_once(self, spec: PodSpec) -> Pod:
        secret_values = [str(v) for v in spec.env.values()]
        if spec.terminate_after:
            created = self._create_with_graphql(spec, secret_values)
            if created is not None:
                return created
        return _pod(_checked(self._request("POST", "/pods", body=_v2_body(spec), create=True), secret_values))

    def _create_with_graphql(self, spec: PodSpec, secret_values):
        """Creates through GraphQL, the only API that takes terminateAfter; None once GraphQL is retired."""
        response = self._request("POST", "", body={"query": CREATE, "variables": {"input": _graphql_input(spec)}},
                                 create=True, url=self.graphql_url)
        if response.status_code in (404, 410):
            return None  # GraphQL is gone: v2 creates without a server-side end
        answer = _checked(response, secret_values)
        if answer.get("errors"):  # GraphQL says what went wrong in a 200
            message = str(answer["errors"][0].get("message", ""))
            if "something went wrong" in message.lower():
                raise _Unknown()
            _raise_for(400, message, secret_values)
        created = self.get(answer["data"]["podFindAndDeployOnDemand"]["id"])  # described the way v2 does
        if created is None:
            raise _Unknown()
        created.terminate_after = spec.terminate_after
        return created

    def _look_for(self, name: str, besides: str = None) -> list:
        """Pods of that name (but not `besides`), asked again while the list may still lag."""
        for wait in LOOKUP_S:
            self._sleep(wait)
            found = [p for p in self.named(name) if p.id != besides]
            if found:
                return found
        return []

    def _action(self, pod_id: str, action: str):
        response = self._request("POST", f"/pods/{pod_id}/action", body={"action": action})
        if response.status_code == 404:
            raise PodsError(f"There is no pod {pod_id} on this account (terminated?): "
                            "`segmentation-machine pod list` shows them.")
        _checked(response)

    def _json(self, method: str, path: str) -> dict:
        return _checked(self._request(method, path))

    def _request(self, method: str, path: str, body: dict = None, create: bool = False, url: str = None):
        """One call: waits out 429s, tries a read again after a server error or no answer; a create whose
        outcome is unknown raises _Unknown instead, for create() to look before it tries again."""
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
                    raise PodsError("RunPod keeps refusing requests (rate limit): try again in a minute.")
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
    causes, seen = [], error
    while seen is not None and len(causes) < 10:  # requests wraps urllib3, which wraps the socket's error
        causes.append(seen)
        seen = getattr(seen, "reason", None) or seen.__cause__ or seen.__context__
    where = _shown(url)
    if any(isinstance(c, ConnectionRefusedError) for c in causes):
        return (f"Cannot reach RunPod at {where}: the connection was refused; check the network, a proxy or "
                "firewall in between, and RUNPOD_REST_URL if it is set.", True)
    if any(isinstance(c, socket.gaierror) or type(c).__name__ == "NameResolutionError" for c in causes):
        return (f"Cannot reach RunPod at {where}: its name {urlsplit(url).hostname} was not found (DNS); check the "
                "internet connection.", True)
    if any(isinstance(c, TimeoutError) or "Timeout" in type(c).__name__ for c in causes):
        return f"RunPod at {where} did not answer within {TIMEOUT_S:g} s (time-out): try again in a minute.", False
    return (f"Cannot reach RunPod at {where} (the connection failed: {type(causes[-1]).__name__}): try again in a "
            "minute.", False)


class _Unknown(Exception):
    """A create whose outcome is unknown: the caller looks before it tries again."""


_CLOUD_FLAG = {"SECURE": "secureCloud", "COMMUNITY": "communityCloud"}


def _checked(response, secret_values=()) -> dict:
    """The JSON of a 2xx answer; otherwise the sentence for RunPod's problem (RFC 9457)."""
    if response.status_code < 300:
        return response.json() if response.content else {}
    _raise_for(response.status_code, _problem(response), secret_values)


# What looks like a secret in RunPod's own words: its API keys (rpa_...), bearer tokens, "key=..." pairs and
# long opaque strings (the pod secrets we generate are 32 characters or more).
SECRET_LIKE = re.compile(r"\brp[a-z]_[A-Za-z0-9]+|\bbearer\s+\S+|\b(?:api[_-]?key|token|password|secret)\s*[=:]\s*\S+"
                         r"|[A-Za-z0-9+/_=-]{32,}", re.IGNORECASE)


def redacted(detail: str, secret_values=()) -> str:
    """RunPod's text for a sentence: the pod's own secrets and anything secret-like masked, control characters
    escaped (RunPod may quote the request back)."""
    for value in secret_values:
        if len(value) >= 4:
            detail = detail.replace(value, "***")
    return printable(SECRET_LIKE.sub("***", detail))


def _raise_for(status: int, detail: str, secret_values=()):
    detail = redacted(detail, secret_values)
    if status == 401:
        raise PodsError("RunPod rejected the API key: check it in the Cloud GPU panel "
                        "(it needs read and write access).")
    if status == 402:
        raise PodsError("RunPod refused: the account's balance is too low. Add credit in the RunPod console "
                        "(Billing) and try again.")
    if status == 400 and any(message in detail.lower() for message in CAPACITY_MESSAGES):
        raise CapacityError(CAPACITY_SENTENCE)
    if status == 403:
        raise PodsError(f"RunPod refused: this API key may not do that ({detail or 'forbidden'}).")
    if status == 409:
        raise PodsError(f"RunPod cannot do that to the pod now: {detail or 'conflict'}.")
    if status == 422:
        raise PodsError(f"RunPod rejected the pod's settings: {detail or 'invalid request'}.")
    raise PodsError(f"RunPod refused the request ({status}): {detail or 'no reason given'}.")


def _problem(response) -> str:
    """The human part of a problem+json answer ('' for anything else)."""
    try:
        problem = response.json()
    except ValueError:
        return ""
    if not isinstance(problem, dict):
        return ""
    return str(problem.get("detail") or problem.get("title") or "")


def _retry_after(response, default: float) -> float:
    try:
        return max(0.0, float(response.headers.get("Retry-After", "")))
    except ValueError:
        return default  # absent, or an HTTP date: our own back-off


def _v2_body(spec: PodSpec) -> dict:
    gpu = {"id": spec.gpu_type_id, "count": 1}
    if spec.allowed_cuda_versions:
        gpu["allowedCudaVersions"] = list(spec.allowed_cuda_versions)
    mount = ({"networkVolumeId": spec.network_volume_id} if spec.network_volume_id else
             {"volumeInGb": spec.volume_gb})
    body = {"name": spec.name, "cloudType": spec.cloud, "gpu": gpu, "containerDiskInGb": spec.container_disk_gb,
            "env": {str(k): str(v) for k, v in spec.env.items()}, "ports": list(spec.ports),
            "mounts": [{**mount, "mountPath": spec.volume_mount}], "supportPublicIp": False}
    body.update({"templateId": spec.template_id} if spec.template_id else {"image": spec.image or ""})
    return body


def _graphql_input(spec: PodSpec) -> dict:
    """podFindAndDeployOnDemand's input; sent as a variable, so no value is pasted into the query text."""
    given = {"name": spec.name, "cloudType": spec.cloud, "gpuTypeId": spec.gpu_type_id, "gpuCount": 1,
             "imageName": spec.image, "templateId": spec.template_id, "containerDiskInGb": spec.container_disk_gb,
             "volumeInGb": 0 if spec.network_volume_id else spec.volume_gb, "networkVolumeId": spec.network_volume_id,
             "volumeMountPath": spec.volume_mount, "ports": ",".join(spec.ports), "startSsh": True,
             "supportPublicIp": False, "allowedCudaVersions": spec.allowed_cuda_versions,
             "env": [{"key": str(k), "value": str(v)} for k, v in spec.env.items()],
             "terminateAfter": spec.terminate_after}
    return {k: v for k, v in given.items() if v is not None}


def _gpu_type(data: dict) -> GpuType:
    availability = data.get("availability") or {}
    stock = availability.get("stockStatus")
    return GpuType(data["id"], data.get("displayName") or data["id"], int(data.get("memoryInGb") or 0),
                   float(data.get("securePrice") or 0), float(data.get("communityPrice") or 0),
                   in_stock=bool(availability.get("available")) and stock not in (None, "None"))


def _pod(data: dict) -> Pod:
    runtime = data.get("runtime") or {}
    gpu = data.get("gpu") or {}
    return Pod(id=data["id"], name=data.get("name", ""), status=data.get("status", ""),
               gpu=gpu.get("displayName", ""), cost_per_hr=float(data.get("cost") or 0),
               uptime_s=int(runtime.get("uptime") or 0), runtime_ready=bool(data.get("runtime")),
               ports=[p["privatePort"] for p in runtime.get("ports") or []],
               volume_gb=int(data.get("volumeInGb") or 0))
