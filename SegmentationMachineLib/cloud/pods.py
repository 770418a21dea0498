"""RunPod pods through the `runpod` SDK, behind one adapter.

The stable 1.x SDK speaks GraphQL, which RunPod retires in early 2027: everything RunPod-specific
lives in RunPodGraphQL, so a REST v2 backend is one more class with the same methods.
What the adapter adds to the SDK: values escaped before the SDK pastes them into GraphQL text,
back-off on 429, a 5xx or timeout on create answered by looking the pod up by name before any
retry (so no duplicate is left billing), and one-sentence errors that never carry the query
(which holds the pod's secrets) or the API key.
"""

import json
import secrets
import time
from dataclasses import dataclass, field

from ..core.errors import UserError

MIN_VRAM_GB = 10  # nnInteractive's recommendation
NAME_PREFIX = "segmentation-machine-"
BACKOFF_S = (5, 10, 20, 40, 60)  # between tries after a 429
NETWORK_RETRIES = 2  # a server error or no answer is tried again twice (5 s, 10 s), not for minutes


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
    ports: str = "8000/http,8001/http,22/tcp"
    env: dict = field(default_factory=dict)
    allowed_cuda_versions: list = None
    name: str = field(default_factory=lambda: NAME_PREFIX + secrets.token_hex(4))


@dataclass
class Pod:
    id: str
    name: str
    status: str  # RUNNING, EXITED, ...
    gpu: str
    cost_per_hr: float
    uptime_s: int
    runtime_ready: bool  # the container runs (the SDK's "runtime" appeared)
    ports: list  # private ports listed by the runtime

    @property
    def cost_so_far(self) -> float:
        return self.uptime_s / 3600 * self.cost_per_hr


def graphql_string(value) -> str:
    """Escapes a value for the inside of a GraphQL string literal (JSON's escapes are GraphQL's)."""
    return json.dumps(str(value))[1:-1]


class RunPodGraphQL:
    """RunPod's GraphQL API (runpod SDK 1.x); RUNPOD_API_BASE_URL redirects it (tests: the local fake)."""

    def __init__(self, api_key: str, sleep=time.sleep):
        import runpod

        self._runpod = runpod
        self._key = api_key
        self._sleep = sleep
        runpod.api_key = api_key  # create/stop/terminate take no key argument: the SDK's global

    # -- reading ---------------------------------------------------------------------------
    def gpu_types(self, min_vram_gb: int = MIN_VRAM_GB, cloud: str = "SECURE") -> list:
        """GPU types with at least min_vram_gb, cheapest first for that cloud."""
        data = self._query("query GpuTypes { gpuTypes { id displayName memoryInGb securePrice communityPrice } }")
        types = [GpuType(g["id"], g["displayName"], int(g["memoryInGb"] or 0), float(g["securePrice"] or 0),
                         float(g["communityPrice"] or 0)) for g in data["gpuTypes"]]
        return sorted((g for g in types if g.memory_gb >= min_vram_gb and g.price(cloud) > 0),
                      key=lambda g: (g.price(cloud), -g.memory_gb))

    def account(self) -> dict:
        """{'balance': $, 'spend_per_hr': $/h}."""
        me = self._query("query Account { myself { clientBalance currentSpendPerHr } }")["myself"]
        return {"balance": float(me["clientBalance"] or 0), "spend_per_hr": float(me["currentSpendPerHr"] or 0)}

    def pods(self) -> list:
        return [_pod(p) for p in self._call(lambda: self._runpod.get_pods(api_key=self._key))]

    def get(self, pod_id: str):
        data = self._call(lambda: self._runpod.get_pod(pod_id, api_key=self._key))
        return _pod(data) if data else None

    def find_by_name(self, name: str):
        return next((p for p in self.pods() if p.name == name), None)

    # -- changing --------------------------------------------------------------------------
    def create(self, spec: PodSpec) -> Pod:
        """Creates the pod; after a 5xx or time-out, finds it by name before trying again."""
        for attempt in range(2):
            try:
                created = self._call(lambda: self._runpod.create_pod(
                    name=spec.name, image_name=spec.image or "", gpu_type_id=spec.gpu_type_id, cloud_type=spec.cloud,
                    container_disk_in_gb=spec.container_disk_gb, volume_in_gb=spec.volume_gb,
                    volume_mount_path=spec.volume_mount, network_volume_id=spec.network_volume_id,
                    ports=spec.ports, template_id=spec.template_id, allowed_cuda_versions=spec.allowed_cuda_versions,
                    support_public_ip=False, start_ssh=True,
                    env={graphql_string(k): graphql_string(v) for k, v in spec.env.items()}), transient=True)
                return _pod(created)
            except _Transient:
                existing = self.find_by_name(spec.name)
                if existing is not None:
                    return existing  # created despite the error: no second pod
        raise PodsError("RunPod failed twice while creating the pod and it does not exist: try again in a minute.")

    def stop(self, pod_id: str):
        """Stops billing for the GPU; the volume (and its cost) stays until terminate."""
        self._call(lambda: self._runpod.stop_pod(pod_id))

    def resume(self, pod_id: str, gpu_count: int = 1):
        self._call(lambda: self._runpod.resume_pod(pod_id, gpu_count))

    def terminate(self, pod_id: str):
        self._call(lambda: self._runpod.terminate_pod(pod_id))

    # -- transport -------------------------------------------------------------------------
    def _query(self, text: str) -> dict:
        from runpod.api.graphql import run_graphql_query

        return self._call(lambda: run_graphql_query(text, api_key=self._key))["data"]

    def _call(self, action, transient: bool = False):
        """Runs an SDK call: backs off on 429, turns failures into sentences without secrets."""
        import requests
        from runpod import error

        failures = 0
        for wait in (*BACKOFF_S, None):
            try:
                return action()
            except error.AuthenticationError:
                raise PodsError("RunPod rejected the API key: check it in the Cloud GPU panel "
                                "(it needs read and write access).") from None
            except error.QueryError as failure:
                message = str(failure.message or "")
                if "rate limit" in message.lower() or "too many requests" in message.lower():
                    if wait is None:
                        raise PodsError("RunPod keeps refusing requests (rate limit): try again in a minute.") from None
                    self._sleep(wait)
                    continue
                if "no longer any instances available" in message.lower():
                    raise CapacityError("RunPod has no capacity for that GPU right now: choose another GPU type "
                                        "or cloud, or try again later.") from None
                raise PodsError(f"RunPod refused the request: {message}") from None
            except (requests.RequestException, ValueError):  # 5xx pages, time-outs, dropped connections
                if transient:
                    raise _Transient() from None
                failures += 1
                if failures > NETWORK_RETRIES or wait is None:
                    raise PodsError("RunPod did not answer properly (server error or time-out): "
                                    "try again in a minute.") from None
                self._sleep(wait)
        raise AssertionError("unreachable")


class _Transient(Exception):
    """A create whose outcome is unknown: the caller looks before it tries again."""


def _pod(data: dict) -> Pod:
    runtime = data.get("runtime") or {}
    machine = data.get("machine") or {}
    return Pod(id=data["id"], name=data.get("name", ""), status=data.get("desiredStatus", ""),
               gpu=machine.get("gpuDisplayName", ""), cost_per_hr=float(data.get("costPerHr") or 0),
               uptime_s=int(data.get("uptimeSeconds") or 0), runtime_ready=bool(data.get("runtime")),
               ports=[p["privatePort"] for p in runtime.get("ports") or []])
