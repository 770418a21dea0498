"""A local fake of RunPod's REST v2 API (plus the one GraphQL mutation still used) that behaves like the real one.

RUNPOD_REST_URL points the client at {url}/v2 and RUNPOD_GRAPHQL_URL at {url}/graphql. The fake
answers as notes/runpod-2026.md and RunPod's published v2 schema describe: bearer key, problem+json errors
(RFC 9457, a 422 listing each violation), request bodies checked as the schema checks them (an unknown
field is a 422; the handler's own rules are 400s), templates spread into a create, v2's Pod and
catalog shapes, lists wrapped as {"pods": [...]}, 204 for a terminate, 400 without capacity (RunPod's own sentences, no code), 402, 422, 429
with Retry-After, a 5xx after the pod was created, a pod list that lags behind a create, pods that
provision slowly (PROVISIONING, STARTING) and list their ports late, pods that fail (ERROR) or are
stopped (EXITED) on their own, a terminated pod listed as TERMINATED for a while before it answers
404, 409 for an action not valid now, terminateAfter honoured, a pod's own volume (a folder stands in for it)
deleted when it is terminated and kept when it is stopped, runtime.uptime over all starts or (as an option)
since the last one, the container log as a stream of
Server-Sent Events that never ends (a backfill, then live lines and keep-alive comments), and
RunPod's proxy to the pod's server and agent under /proxy/.
"""

import itertools
import json
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

from graphql import parse
from graphql.language import ast

from loopback import LoopbackServer

NO_CAPACITY = "There are no longer any instances available with the requested specifications. Please refresh and try again."
NO_RESOURCES = "This machine does not have the resources to deploy your pod."
NO_FREE_GPUS = "There are not enough free GPUs on the host machine to start this pod."
SOMETHING_WENT_WRONG = "Something went wrong. Please try again later or contact support."

# The catalog as v2 answers GET /v2/catalog/gpus (GpuType); stock is per cloud, NONE to HIGH; "cuda": the CUDA
# versions its hosts report (their drivers'), which a create's gpu.allowedCudaVersions must name exactly or
# gpu.minCudaVersion must not exceed. The RTX 4090's hosts run drivers newer than CUDA 13.0, and a few older.
HOSTS_CUDA = ["12.4", "12.8", "13.0"]
GPU_TYPES = [
    {"id": "NVIDIA GeForce RTX 3070", "name": "RTX 3070", "manufacturer": "NVIDIA", "memory": 8,
     "price": {"secure": 0.14, "community": 0.10}, "stock": {"SECURE": "HIGH", "COMMUNITY": "HIGH"},
     "cuda": HOSTS_CUDA},
    # Between 8 and 24 GB, as references/gpu-types.mdx in runpod/docs names them: cheaper than every type that
    # holds a large structure, so a floor too low makes one of them the default.
    {"id": "NVIDIA GeForce RTX 3080", "name": "RTX 3080", "manufacturer": "NVIDIA", "memory": 10,
     "price": {"secure": 0.20, "community": 0.17}, "stock": {"SECURE": "HIGH", "COMMUNITY": "HIGH"},
     "cuda": HOSTS_CUDA},
    {"id": "NVIDIA GeForce RTX 3080 Ti", "name": "RTX 3080 Ti", "manufacturer": "NVIDIA", "memory": 12,
     "price": {"secure": 0.22, "community": 0.18}, "stock": {"SECURE": "MEDIUM", "COMMUNITY": "HIGH"},
     "cuda": HOSTS_CUDA},
    {"id": "NVIDIA GeForce RTX 4070 Ti", "name": "RTX 4070 Ti", "manufacturer": "NVIDIA", "memory": 12,
     "price": {"secure": 0.23, "community": 0.19}, "stock": {"SECURE": "HIGH", "COMMUNITY": "HIGH"},
     "cuda": HOSTS_CUDA},
    {"id": "NVIDIA GeForce RTX 4090", "name": "RTX 4090", "manufacturer": "NVIDIA", "memory": 24,
     "price": {"secure": 0.69, "community": 0.34}, "stock": {"SECURE": "MEDIUM", "COMMUNITY": "HIGH"},
     "cuda": ["12.4", "13.1", "13.2"]},
    {"id": "NVIDIA RTX A5000", "name": "RTX A5000", "manufacturer": "NVIDIA", "memory": 24,
     "price": {"secure": 0.27, "community": 0.16}, "stock": {"SECURE": "LOW", "COMMUNITY": "LOW"},
     "cuda": HOSTS_CUDA},
    {"id": "NVIDIA L40S", "name": "L40S", "manufacturer": "NVIDIA", "memory": 48,
     "price": {"secure": 0.86, "community": 0.79}, "stock": {"SECURE": "HIGH", "COMMUNITY": "MEDIUM"},
     "cuda": HOSTS_CUDA},
    {"id": "NVIDIA H100 80GB HBM3", "name": "H100 SXM", "manufacturer": "NVIDIA", "memory": 80,  # none on SECURE
     "price": {"secure": 2.69, "community": 1.99}, "stock": {"SECURE": "NONE", "COMMUNITY": "LOW"},
     "cuda": HOSTS_CUDA},
    {"id": "AMD Instinct MI300X OAM", "name": "MI300X", "manufacturer": "AMD", "memory": 192,  # cheap, large, no CUDA
     "price": {"secure": 0.20, "community": 0.20}, "stock": {"SECURE": "HIGH", "COMMUNITY": "NONE"}, "cuda": []},
]
PORT = re.compile(r"^\d{1,5}/(http|tcp)$")


# -- RunPod's v2 request schema, encoded by hand -------------------------------------------------------
# From api-reference-v2/openapi.json in github.com/runpod/docs at 098c7fb0 (2026-08-18, "sync API reference
# from Frontdoor v2.9.0"): CreatePodRequest, CreateGpuConfig, CreateCpuConfig, Mounts, PersistentMount,
# NetworkMount, PodActionRequest. Their `unevaluatedProperties: false` / `additionalProperties: false` make an
# unknown field a 422, like a wrong type; the rules the schema leaves to the handler are 400s (_create_rules).
# Violations are listed as the real API lists them in problem+json's `errors`.

def _string(min_length=0, pattern=None):
    def check(value, at):
        if not isinstance(value, str):
            return [f"{at}: expected string"]
        if len(value) < min_length:
            return [f"{at}: length must be >= {min_length}"]
        return [f"{at}: does not match pattern {pattern}"] if pattern and not re.fullmatch(pattern, value) else []
    return check


def _integer(minimum):
    def check(value, at):
        if not isinstance(value, int) or isinstance(value, bool):
            return [f"{at}: expected integer"]
        return [f"{at}: must be >= {minimum}"] if value < minimum else []
    return check


def _boolean(value, at):
    return [] if isinstance(value, bool) else [f"{at}: expected boolean"]


def _enum(*values):
    return lambda value, at: [] if value in values else [f"{at}: value must be one of {', '.join(values)}"]


def _nullable(check):
    return lambda value, at: [] if value is None else check(value, at)


def _array(item, max_items=None):
    def check(value, at):
        if not isinstance(value, list):
            return [f"{at}: expected array"]
        if max_items is not None and len(value) > max_items:
            return [f"{at}: maximum {max_items} items"]
        return [problem for i, v in enumerate(value) for problem in item(v, f"{at}[{i}]")]
    return check


def _map(item):
    """An object whose every value is item (env)."""
    def check(value, at):
        if not isinstance(value, dict):
            return [f"{at}: expected object"]
        return [problem for k, v in value.items() for problem in item(v, f"{at}.{k}")]
    return check


def _object(fields, required=()):
    """A closed object: only these fields."""
    def check(value, at):
        if not isinstance(value, dict):
            return [f"{at}: expected object"]
        unknown = sorted(set(value) - set(fields))
        return ([f"{at}: missing property '{name}'" for name in required if name not in value]
                + ([f"{at}: additional properties {', '.join(map(repr, unknown))} not allowed"] if unknown else [])
                + [problem for name, v in value.items() if name in fields for problem in fields[name](v, f"{at}.{name}")])
    return check


CUDA_VERSION = _string(pattern=r"\d+\.\d+")
MOUNTS = _object({"persistent": _object({"size": _integer(10), "path": _string()}, ("size", "path")),
                  "network": _array(_object({"volumeId": _string(), "path": _string()}, ("volumeId", "path")), 1)})
CREATE_POD = _object({
    "name": _string(1), "image": _string(), "args": _string(), "disk": _integer(1), "env": _map(_string()),
    "ports": _array(_string()), "registry": _nullable(_string()), "cloud": _enum("SECURE", "COMMUNITY"),
    "gpu": _object({"id": _string(), "count": _integer(1), "allowedCudaVersions": _array(CUDA_VERSION),
                    "minCudaVersion": CUDA_VERSION}, ("id",)),
    "cpu": _object({"id": _string(1), "vcpuCount": _integer(2)}, ("id", "vcpuCount")),
    "dataCenterIds": _array(_string()), "globalNetworking": _boolean, "mounts": MOUNTS, "startJupyter": _boolean,
    "startSsh": _boolean, "templateId": _string(1)}, ("name",))
POD_ACTION = _object({"action": _enum("start", "stop", "restart", "terminate")}, ("action",))
# Which actions a pod's status allows (the pod's `actions`); any other is a 409.
ACTIONS = {"PROVISIONING": ["stop", "terminate"], "STARTING": ["stop", "terminate"],
           "RUNNING": ["stop", "restart", "terminate"], "EXITED": ["start", "terminate"],
           "ERROR": ["start", "terminate"], "TERMINATED": []}


def _create_rules(body) -> list:
    """What the schema's handler enforces beyond the schema itself (400s)."""
    mounts, gpu = body.get("mounts") or {}, body.get("gpu") or {}
    return [text for broken, text in [
        (("gpu" in body) == ("cpu" in body), "exactly one of gpu or cpu must be set"),
        ("persistent" in mounts and "network" in mounts, "mounts.persistent and mounts.network are mutually exclusive"),
        ("persistent" in mounts and "cpu" in body, "mounts.persistent is not allowed on a CPU pod"),
        (bool(gpu.get("allowedCudaVersions")) and "minCudaVersion" in gpu,
         "gpu.allowedCudaVersions and gpu.minCudaVersion are mutually exclusive"),
        # The schema leaves the port format to its description ("port/protocol"); we assume upstream refuses
        # another one as a broken rule.
        (not all(PORT.match(p) for p in body.get("ports") or []), "ports must be formatted as port/protocol, "
                                                                   "e.g. 8000/http")] if broken]


@dataclass
class FakeRunPod:
    api_key: str
    boot_s: float = 1.0  # until the runtime appears (image pulled, container started)
    ports_s: float = 2.0  # until its ports are listed
    server_s: float = 3.0  # until the pod's nnInteractive server answers through the proxy
    list_lag_s: float = 2.0  # a new pod is missing from GET /pods this long
    no_capacity: set = field(default_factory=lambda: {"NVIDIA RTX A5000"})
    capacity_message: str = NO_CAPACITY
    no_capacity_on_resume: bool = False
    create_fault: tuple = None  # (status, detail): the next create answers this although it created the pod
    action_fault: tuple = None  # (status, detail): the next action answers this although it was done
    rate_limit_every: int = 0  # every Nth API request answers 429
    graphql_rate_limited: bool = False  # /graphql answers every request 429 (RunPod rate-limits it ahead of retiring it)
    retry_after_s: int = 1
    balance: float = 25.0  # at 0, creates answer 402
    graphql_retired: int = 0  # once set, the status /graphql answers: 410 Gone (a retired API) or 404
    limited_keys: set = field(default_factory=set)  # keys that may read and stop pods but not terminate them
    # keys that may stop a pod and nothing else (403), reading it included: all that RunPod documents of the pod-scoped
    # RUNPOD_API_KEY it gives a pod
    stop_only_keys: set = field(default_factory=set)
    templates: dict = field(default_factory=dict)  # id → a Template's settings (image, ports, env, disk, mounts...)
    agent_answers: bool = True  # the pod agent behind the proxy (port 8001) answers heartbeats
    routing_status: int = 502  # the proxy's page until the pod's server answers (also 503 or 504 while it routes)
    server_full: bool = False  # the pod's server answers claims as upstream's does with every session in use
    warning: str = ""  # what the pod agent behind the proxy warns of
    agent_ends_in_s: float = 900.0  # when the pod agent behind the proxy says the pod ends (its terminates_in_s)
    fails_as: str = None  # "ERROR" (the container keeps failing) or "EXITED" (stopped): new pods end so once booted
    terminated_listed_s: float = 3.0  # a terminated pod is still listed (TERMINATED) this long, then 404
    log_ping_s: float = 0.5  # the log stream's keep-alive comment when no line came
    logs_as_json: bool = False  # the log as one finished JSON answer {"logs": [...]}, as RunPod answered earlier
    stalled: bool = False  # while set, API requests get no answer (a network that times out)
    # runtime.uptime since the container's last start, as v2's schema says (PodRuntime.uptime), or over all starts
    uptime_per_start: bool = True
    # False: a RUNNING pod answers runtime null, as v2's schema allows ("live utilization metrics", nullable): no
    # uptime, no ports; its proxy routes all the same
    runtime_reported: bool = True
    # GET /v2/pods/{id} off its schema: "page" (a maintenance page, answered 200) or "renamed" (v2 is a beta: its
    # runtime's port entries with a field renamed)
    reads_as: str = None
    volumes: dict = field(default_factory=dict)  # pod id → a folder standing in for its /workspace
    clock: object = time.monotonic  # provisioning and the list's lag
    wall: object = time.time  # terminateAfter
    pods: dict = field(default_factory=dict)
    requests: list = field(default_factory=list)  # (method, path, JSON body) of every API request
    paths: list = field(default_factory=list)  # every URL asked for, to prove no secret travels in one

    def __post_init__(self):
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._count = 0
        self.rate_limited = 0  # 429s answered
        self.ended = {}  # terminated pods, still listed as TERMINATED for terminated_listed_s
        self.log_streams = 0  # log streams open now: a client that gives up must close its stream
        self._closing = threading.Event()

    # -- server ----------------------------------------------------------------------------
    def start(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # as Cloudflare answers: keep-alive, streams chunked

            def do_GET(self):
                self._serve("GET")

            def do_POST(self):
                self._serve("POST")

            def do_DELETE(self):
                self._serve("DELETE")

            def _serve(self, method):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                fake.paths.append(self.path)
                authorization = self.headers.get("Authorization", "")
                if self.path.startswith("/proxy/"):  # https://POD_ID-PORT.proxy.runpod.net, here as a path
                    status, payload, headers = (*fake.proxy(self.path, authorization), {})[:3]
                else:
                    while fake.stalled and not fake._closing.is_set():
                        time.sleep(0.05)
                    status, payload, headers = fake.handle(method, self.path, authorization, body)
                if isinstance(payload, _LogStream):
                    return self._stream_log(payload)
                data = (b"" if payload is None else payload.encode() if isinstance(payload, str) else
                        json.dumps(payload).encode())
                kind = ("text/html" if isinstance(payload, str) else
                        "application/problem+json" if status >= 400 and "status" in payload else "application/json")
                self.send_response(status)
                if payload is not None:  # 204: no body
                    self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def _stream_log(self, stream):
                """RunPod's log stream: the backfill, then live lines or a keep-alive comment, until the client
                disconnects (or the fake stops); chunked, as a stream of unknown length is over HTTP/1.1."""
                self.send_response(200)
                for name, value in (("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"),
                                    ("Transfer-Encoding", "chunked")):
                    self.send_header(name, value)
                self.end_headers()
                self.close_connection = True
                with fake._lock:
                    fake.log_streams += 1
                sent = max(0, len(fake.log_of(stream.pod_id)) - stream.tail)
                try:
                    while True:
                        lines = fake.log_of(stream.pod_id)
                        events = "".join(_event(line) for line in lines[sent:])
                        sent = len(lines)
                        data = (events or ": ping\n\n").encode()
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                        self.wfile.flush()
                        if fake._closing.wait(fake.log_ping_s):
                            break
                except OSError:
                    pass  # the client went away
                finally:
                    with fake._lock:
                        fake.log_streams -= 1

            def log_message(self, *args):
                pass

        self._server = LoopbackServer(Handler)
        self.url = self._server.url
        return self

    def stop(self):
        self._closing.set()
        self._server.close()

    def log_of(self, pod_id) -> list:
        """The pod's log so far (a terminated pod's too, while it is listed)."""
        with self._lock:
            pod = self.pods.get(pod_id) or self.ended.get(pod_id)
            return list(pod["log"]) if pod else []

    def environment(self) -> dict:
        """What points a client (or a pod agent) at the fake."""
        return {"RUNPOD_REST_URL": self.url + "/v2", "RUNPOD_GRAPHQL_URL": self.url + "/graphql"}

    def proxy(self, path: str, authorization: str):
        """The pod's server behind RunPod's proxy: 502 until it is up, then it checks the pod's own key."""
        target, _, route = path[len("/proxy/"):].partition("/")
        pod_id, _, port = target.rpartition("-")
        with self._lock:
            self._advance()
            pod = self.pods.get(pod_id)
        if pod is None or pod["status"] != "RUNNING" or self._uptime(pod) < self.server_s:
            page = f"{self.routing_status} {HTTPStatus(self.routing_status).phrase}"
            return self.routing_status, f"<html><body>{page}</body></html>"
        if port == "8001":  # the pod agent
            if not self.agent_answers:
                return 502, "<html><body>502 Bad Gateway</body></html>"
            if authorization != f"Bearer {pod['env'].get('SM_HEARTBEAT_TOKEN')}":
                return 401, {"detail": "invalid heartbeat token"}
            pod["heartbeats"] = pod.get("heartbeats", 0) + 1
            return 200, {"pod_id": pod_id, "terminates_in_s": self.agent_ends_in_s, "reason": "idle timeout",
                         "warning": self.warning}
        if authorization != f"Bearer {pod['env'].get('SM_NNI_API_KEY')}":
            return 401, {"detail": "invalid API key"}
        # As upstream's server (nnInteractive 2.6, inference/server/app.py) answers a claim, at its defaults
        if self.server_full and route == "claim":
            return 503, {"detail": "server is at capacity (3 sessions)"}, {"Retry-After": "10"}
        if route == "claim":
            return 200, {"lease_token": "lease-1", "idle_timeout_seconds": 600.0, "liveness_timeout_seconds": 60.0,
                         "max_sessions": 3}
        return 200, {"released": True} if route == "release" else {}

    def proxy_template(self) -> str:
        """For SM_RUNPOD_PROXY_URL: the fake's stand-in for https://{pod_id}-{port}.proxy.runpod.net."""
        return self.url + "/proxy/{pod_id}-{port}"

    # -- the API ---------------------------------------------------------------------------
    def handle(self, method: str, path: str, authorization: str, body: bytes):
        """(status, payload, headers) for one API request."""
        with self._lock:
            self._count += 1
            try:
                payload = json.loads(body) if body else None
            except ValueError:
                return (*_problem(400, "The body is not JSON."), {})
            self.requests.append((method, path, payload))
            key = authorization.removeprefix("Bearer ")
            if not authorization.startswith("Bearer ") or key not in {self.api_key, *self.limited_keys,
                                                                      *self.stop_only_keys}:
                return (*_problem(401, "Invalid or missing API key."), {})
            stops = (method == "POST" and re.fullmatch(r"/v2/pods/[^/?]+/action", path)
                     and isinstance(payload, dict) and payload.get("action") == "stop")
            if key in self.stop_only_keys and not stops:
                return (*_problem(403, "This API key may only stop its pod."), {})
            if (self.rate_limit_every and self._count % self.rate_limit_every == 0
                    or self.graphql_rate_limited and path == "/graphql"):
                self.rate_limited += 1
                return (*_problem(429, "Too many requests."), {"Retry-After": str(self.retry_after_s)})
            self._advance()
            try:
                if path == "/graphql":
                    return (*self._graphql(payload or {}), {})
                return (*self._route(method, path, payload, key), {})
            except _Failure as failure:
                return failure.answer

    def _route(self, method, path, body, key):
        parts = urlsplit(path).path.strip("/").split("/")  # v2, pods, ID, action
        query = parse_qs(urlsplit(path).query)
        if parts[0] != "v2":
            raise _Failure(404, "No such endpoint.")
        if method == "GET" and parts[1:] == ["catalog", "gpus"]:
            return 200, {"gpus": _catalog(query)}
        if method == "GET" and parts[1:] == ["billing", "pods"]:
            return 200, self._pod_billing(query)
        if parts[1:2] != ["pods"]:
            raise _Failure(404, "No such endpoint.")
        if len(parts) == 2:
            if method == "GET":
                listed = [p for p in [*self.pods.values(), *self.ended.values()]
                          if self.clock() - p["created_at"] >= self.list_lag_s]
                return 200, {"pods": [self._view(p) for p in listed]}
            if method == "POST":
                return 201, self._view(self._create_from_v2(body))
            raise _Failure(405, f"{method} is not allowed here.")
        pod = self.pods.get(parts[2]) or self.ended.get(parts[2])
        if pod is None:
            raise _Failure(404, f"Pod {parts[2]} not found.")
        if method == "GET" and len(parts) == 3:
            view = self._view(pod)
            if self.reads_as == "page":
                return 200, "<html><body>Down for maintenance</body></html>"
            if self.reads_as == "renamed" and view["runtime"]:
                view["runtime"]["ports"] = [{"privatePort": p["private"]} for p in view["runtime"]["ports"]]
            return 200, view
        if method == "GET" and parts[3:] == ["logs"]:  # ?tail=N lines of backfill (0 to 5000), 100 when omitted
            tail = query.get("tail", ["100"])[0]
            if not tail.isdigit() or int(tail) > 5000:
                raise _Failure(422, "Request validation failed.", ["tail: must be an integer from 0 to 5000"])
            tail = int(tail)
            if self.logs_as_json:
                return 200, {"logs": [_entry(e)[1] for e in pod["log"]][-tail:] if tail else []}
            return 200, _LogStream(pod["id"], tail)
        if method == "DELETE" and len(parts) == 3:
            return self._act(pod, "terminate", key)
        if method == "POST" and parts[3:] == ["action"]:
            _valid(POD_ACTION, body)
            answer = self._act(pod, body["action"], key)
            if self.action_fault:
                fault, self.action_fault = self.action_fault, None
                raise _Failure(*fault)
            return answer
        raise _Failure(404, "No such endpoint.")

    def _act(self, pod, action, key):
        status = self._view(pod)["status"]
        if action not in ACTIONS[status]:
            raise _Failure(409, f"Pod {pod['id']} is {status}: {action} is not valid now.")
        if action == "stop":
            pod["stoppedUptime"] += self._uptime(pod)
            pod["status"] = "EXITED"
        elif action == "start":
            if self.no_capacity_on_resume:
                raise _Failure(400, NO_FREE_GPUS)
            pod["status"], pod["started"] = "RUNNING", self.clock()
        elif action == "restart":
            pod["started"] = self.clock()
        else:
            if key in self.limited_keys:
                raise _Failure(403, "This API key may not terminate pods.")
            self._terminate(pod)
            return 204, None
        return 200, self._view(pod)

    def _create_from_v2(self, body):
        """POST /v2/pods: the body checked as RunPod's schema and handler check it, a template spread into it."""
        _valid(CREATE_POD, body)
        if "templateId" not in body and "image" not in body:  # the schema's if/then
            raise _Failure(422, "Request validation failed.", ["$: missing property 'image'"])
        broken = _create_rules(body)
        if broken:
            raise _Failure(400, "; ".join(broken))
        return self._create(self._spread(body))

    def _spread(self, body) -> dict:
        """The body with its template's settings under it: the body's own fields win, env is merged per key, and
        either CUDA field replaces the template's constraint."""
        if "templateId" not in body:
            return body
        template = self.templates.get(body["templateId"])
        if template is None:
            raise _Failure(404, f"Template {body['templateId']} not found.")
        if template.get("serverless"):
            raise _Failure(422, f"Template {body['templateId']} is a serverless template.")
        spread = {k: v for k, v in template.items() if k in ("image", "args", "disk", "ports", "registry", "mounts")}
        gpu = dict(body.get("gpu") or {})
        if not {"allowedCudaVersions", "minCudaVersion"} & set(gpu) and template.get("allowedCudaVersions"):
            gpu["allowedCudaVersions"] = template["allowedCudaVersions"]
        return {**spread, **body, "gpu": gpu, "env": {**template.get("env", {}), **body.get("env", {})}}

    def _create(self, settings, terminateAfter=None, stopAfter=None, public_ip=False):
        """A pod from v2-shaped settings (a template already spread into them). Its TCP ports get a public port on the
        secure cloud; on the community cloud only where GraphQL's create asked for supportPublicIp (the note: "community
        cloud needs supportPublicIp"); v2's create has no such field, so we assume none there."""
        gpu_id, cloud = settings["gpu"]["id"], settings.get("cloud", "SECURE")
        if gpu_id in self.no_capacity:
            raise _Failure(400, self.capacity_message)
        gpu = next((g for g in GPU_TYPES if g["id"] == gpu_id), None)
        if gpu is None:
            raise _Failure(400, f"There is no GPU type {gpu_id}.")
        if not hosts_for(gpu, settings["gpu"]):  # no host reports a CUDA version the pod accepts
            raise _Failure(400, NO_CAPACITY)
        if self.balance <= 0:
            raise _Failure(402, "Your balance is too low to deploy this pod.")  # the words are ours, not RunPod's
        if "image" not in settings:
            raise _Failure(400, "The template has no image.")
        pod_id = f"pod{next(self._ids):04d}x"
        now = self.clock()
        self.pods[pod_id] = {
            "id": pod_id, "name": settings["name"], "image": settings["image"], "gpu": dict(settings["gpu"]),
            "templateId": settings.get("templateId"), "cloud": cloud, "disk": settings.get("disk", 50),
            "mounts": settings.get("mounts", {}), "status": "RUNNING", "created_at": now, "started": now,
            "stoppedUptime": 0.0, "env": dict(settings.get("env", {})), "ports": list(settings.get("ports", [])),
            "startSsh": settings.get("startSsh", False), "terminateAfter": terminateAfter, "stopAfter": stopAfter,
            "cost": gpu["price"][cloud.lower()], "log": [("system", f"pulling image {settings['image']}"),
                                                         "starting the container"],
            "publicIp": cloud == "SECURE" or public_ip, "fails_as": self.fails_as,
            # RunPod takes any host that matches; the oldest is the worst case, so a create that drops its CUDA floor
            # lands on a driver the image's torch cannot use
            "cudaVersion": hosts_for(gpu, settings["gpu"])[0],
        }
        if self.create_fault:
            fault, self.create_fault = self.create_fault, None
            raise _Failure(*fault)
        return self.pods[pod_id]

    # PodFindAndDeployOnDemandInput's fields, as runpod-python 1.12's mutation sends them, and the two ends: GraphQL
    # refuses any other field before it runs anything.
    GRAPHQL_INPUT = {"name", "imageName", "cloudType", "startSsh", "gpuTypeId", "supportPublicIp", "gpuCount",
                     "volumeInGb", "minVcpuCount", "minMemoryInGb", "allowedCudaVersions", "dataCenterId", "dockerArgs",
                     "countryCode", "containerDiskInGb", "ports", "volumeMountPath", "env", "templateId",
                     "networkVolumeId", "minDownload", "minUpload", "terminateAfter", "stopAfter"}

    def _graphql(self, body):
        """podFindAndDeployOnDemand, the one mutation still used (for terminateAfter)."""
        if self.graphql_retired:
            raise _Failure(self.graphql_retired, "GraphQL has been retired: use https://api.runpod.io/v2.")
        operation = parse(body["query"]).definitions[0].selection_set.selections[0]
        if operation.name.value != "podFindAndDeployOnDemand":
            return 200, {"errors": [{"message": f"Cannot query field {operation.name.value}."}]}
        [argument] = operation.arguments
        spec = _value(argument.value, body.get("variables") or {})
        unknown = sorted(set(spec) - self.GRAPHQL_INPUT)
        if unknown:
            return 400, {"errors": [{"message": f'Variable "$input" got invalid value; Field "{unknown[0]}" is not '
                                                'defined by type "PodFindAndDeployOnDemandInput".'}]}
        ends = {"terminateAfter": spec.get("terminateAfter"), "stopAfter": spec.get("stopAfter")}
        mount = spec.get("volumeMountPath", "/workspace")
        gpu = {"id": spec.get("gpuTypeId"), **({"allowedCudaVersions": spec["allowedCudaVersions"]}
                                                if spec.get("allowedCudaVersions") else {})}
        settings = {"name": spec.get("name", ""), "gpu": gpu,
                    "cloud": spec.get("cloudType", "SECURE"), "env": {e["key"]: e["value"] for e in spec.get("env", [])},
                    "ports": [p for p in spec.get("ports", "").split(",") if p], "disk": spec.get("containerDiskInGb", 50),
                    "mounts": ({"network": [{"volumeId": spec["networkVolumeId"], "path": mount}]}
                               if spec.get("networkVolumeId") else
                               {"persistent": {"size": spec["volumeInGb"], "path": mount}} if spec.get("volumeInGb")
                               else {}),
                    "startSsh": spec.get("startSsh", False)}
        settings.update({"templateId": spec["templateId"]} if spec.get("templateId") else
                        {"image": spec.get("imageName", "")})
        try:
            for end in filter(None, ends.values()):
                datetime.fromisoformat(end.replace("Z", "+00:00"))
            pod = self._create(self._spread(settings), public_ip=bool(spec.get("supportPublicIp")), **ends)
        except _Failure as failure:
            if failure.status >= 500:
                raise
            return 200, {"errors": [{"message": failure.detail}]}
        except ValueError:
            return 200, {"errors": [{"message": "terminateAfter and stopAfter must be RFC 3339 date-times."}]}
        return 200, {"data": {"podFindAndDeployOnDemand": {"id": pod["id"], "name": pod["name"],
                                                           "desiredStatus": "RUNNING", "costPerHr": pod["cost"]}}}

    def _advance(self):
        """Time passes: terminateAfter and stopAfter end pods whatever runs inside, a failing pod fails once
        booted, and a terminated pod drops off the list."""
        def due(end) -> bool:
            return bool(end) and datetime.fromisoformat(end.replace("Z", "+00:00")).timestamp() <= self.wall()

        for pod in list(self.pods.values()):
            if due(pod["terminateAfter"]):
                self._terminate(pod)
            elif due(pod["stopAfter"]) and pod["status"] == "RUNNING":
                pod["stopAfter"] = None  # once: a resume runs on
                self._fail(pod, "EXITED")
            elif pod["fails_as"] and pod["status"] == "RUNNING" and self._uptime(pod) >= self.boot_s:
                self._fail(pod, pod["fails_as"])
        for pod_id, pod in list(self.ended.items()):
            if self.clock() - pod["terminated_at"] >= self.terminated_listed_s:
                del self.ended[pod_id]

    def _fail(self, pod, status):
        if status == "EXITED":  # stopped: no GPU billing
            pod["stoppedUptime"] += self._uptime(pod)
            pod["log"].append(("system", "pod stopped"))
        else:  # RunPod restarts the failing container: it bills on
            pod["log"] += ["Traceback (most recent call last):", "RuntimeError: CUDA error: no kernel image is "
                           "available for execution on the device", ("system", "container exited with code 1")]
        pod["status"] = status

    def _terminate(self, pod):
        pod["stoppedUptime"] += self._uptime(pod)
        pod["status"], pod["terminated_at"] = "TERMINATED", self.clock()
        pod["log"].append(("system", "pod terminated"))
        self.ended[pod["id"]] = self.pods.pop(pod["id"])
        volume = self.volumes.pop(pod["id"], None)
        # RunPod: the pod's own volume "is deleted when the Pod is terminated"; a network volume stays.
        if volume is not None and not pod["mounts"].get("network"):
            shutil.rmtree(volume)

    def _pod_billing(self, query: dict) -> dict:
        """GET /v2/billing/pods (ListPodBillingResponse): one record per pod in the current day bucket, its GPU time
        over all its starts at its rate (the fake bills no disk); podId narrows it to one pod."""
        bucket = query.get("bucketSize", ["day"])[0]
        if bucket not in ("hour", "day", "week", "month", "year"):
            raise _Failure(422, "Request validation failed.", ["bucketSize: value not allowed"])
        if "lastN" in query and ({"startTime", "endTime"} & set(query)):
            raise _Failure(400, "lastN is mutually exclusive with startTime and endTime.")
        wanted = query.get("podId", [None])[0]
        records = []
        for pod in [*self.pods.values(), *self.ended.values()]:
            if wanted in (None, pod["id"]):
                amount = round((pod["stoppedUptime"] + self._uptime(pod)) / 3600 * pod["cost"], 6)
                records.append({"startTime": _iso(self.clock()), "endTime": _iso(self.clock() + 86400),
                                "podId": pod["id"], "totalAmount": amount, "gpuAmount": amount, "cpuAmount": 0,
                                "diskAmount": 0})
        totals = {name: round(sum(r[name] for r in records), 6)
                  for name in ("totalAmount", "gpuAmount", "cpuAmount", "diskAmount")}
        return {"records": records, "metadata": {"query": {"bucketSize": bucket, "podId": wanted},
                                                 "recordCount": len(records), "uniquePodCount": len(records),
                                                 "totals": totals}}

    def _uptime(self, pod) -> float:
        return self.clock() - pod["started"] if pod["status"] in ("RUNNING", "ERROR") else 0.0

    def cost_so_far(self, pod_id) -> float:
        pod = self.pods[pod_id]
        return (pod["stoppedUptime"] + self._uptime(pod)) / 3600 * pod["cost"]

    def _view(self, pod):
        """The pod as v2's Pod schema describes it (every required field): runtime null until RUNNING (and while
        RUNNING without runtime_reported), cost 0.0
        once EXITED or TERMINATED, no link to a template it was created from."""
        age = self._uptime(pod)
        runtime, status = None, pod["status"]
        if status == "RUNNING" and age < self.boot_s:
            status = "PROVISIONING" if age < self.boot_s / 2 else "STARTING"
        elif status == "RUNNING" and self.runtime_reported:
            public = [not p.endswith("/http") and pod["publicIp"] for p in pod["ports"]]  # TCP, where the host has one
            ports = [{"private": int(p.split("/")[0]), "public": 40000 + i if public[i] else None,
                      "type": p.split("/")[1], "ip": "100.65.0.2" if public[i] else None}
                     for i, p in enumerate(pod["ports"])] if age >= self.ports_s else []
            runtime = {"uptime": int(age if self.uptime_per_start else pod["stoppedUptime"] + age), "ports": ports}
        proxy = {"host": "ssh.runpod.io", "port": 22, "username": f"{pod['id']}-64411eb2",
                 "command": f"ssh {pod['id']}-64411eb2@ssh.runpod.io"}
        return {"id": pod["id"], "name": pod["name"], "status": status, "actions": ACTIONS[status],
                "image": pod["image"], "args": "", "disk": pod["disk"], "mounts": pod["mounts"], "ports": pod["ports"],
                "env": pod["env"], "registry": None, "gpu": {"id": pod["gpu"]["id"], "count": 1}, "cloud": pod["cloud"],
                "dataCenterId": "EU-RO-1", "cudaVersion": pod["cudaVersion"], "ssh": {"proxy": proxy, "direct": None},
                "template": None, "cost": 0.0 if status in ("EXITED", "TERMINATED") else pod["cost"],
                "locked": False, "globalNetworking": {"enabled": False}, "runtime": runtime,
                "createdAt": _iso(pod["created_at"]), "startedAt": _iso(pod["started"]) if status == "RUNNING" else None}


@dataclass
class _LogStream:
    """GET /v2/pods/{id}/logs: answered by the handler as a stream that stays open."""
    pod_id: str
    tail: int


def _entry(entry) -> tuple:
    """(source, line) of a pod's log entry: a plain string is the container's."""
    return entry if isinstance(entry, tuple) else ("container", entry)


def _event(entry) -> str:
    """One log line as RunPod's SSE event: id is its timestamp, data {"source", "line", "ts"}."""
    source, line = _entry(entry)
    ts = datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")
    return f"id: {ts}\ndata: {json.dumps({'source': source, 'line': line, 'ts': ts})}\n\n"


class _Failure(Exception):
    def __init__(self, status, detail, errors=None):
        super().__init__(status)
        self.status, self.detail, self.errors = status, detail, errors

    @property
    def answer(self):
        return (*_problem(self.status, self.detail, self.errors), {})


def _problem(status: int, detail: str, errors=None):
    """An RFC 9457 problem: (status, body); errors lists a 422's violations."""
    return status, {"title": HTTPStatus(status).phrase, "status": status, "detail": detail,
                    **({"errors": errors} if errors else {})}


def _valid(schema, body):
    """Raises the 422 the real API answers for a body its schema refuses."""
    errors = schema(body, "$")
    if errors:
        raise _Failure(422, "Request validation failed.", errors)


def _iso(monotonic: float) -> str:
    """A time of the fake's clock as the API's date-time."""
    return datetime.fromtimestamp(time.time() - time.monotonic() + monotonic, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _catalog(query: dict) -> list:
    """GET /v2/catalog/gpus: availability only with include=AVAILABILITY, which needs product; stock per cloud
    (SECURE unless cloud says otherwise)."""
    include, product, cloud = query.get("include", [""])[0], query.get("product", [""])[0], query.get("cloud", [""])[0]
    if include not in ("", "AVAILABILITY") or product not in ("", "POD", "CLUSTER", "SERVERLESS") or cloud not in (
            "", "SECURE", "COMMUNITY"):
        raise _Failure(422, "Request validation failed.", ["include, product or cloud: value not allowed"])
    if bool(include) != bool(product) or (cloud and not include):
        raise _Failure(400, "include=AVAILABILITY requires product, and product and cloud are valid only with it.")
    floor, exact = query.get("minCudaVersion", [None])[0], query.get("cudaVersions", [None])[0]
    if (floor or exact) and not include or floor and exact:
        raise _Failure(400, "minCudaVersion and cudaVersions are valid only with include=AVAILABILITY, and not both.")
    if floor and not re.fullmatch(r"\d+(\.\d+)?", floor):
        raise _Failure(422, "Request validation failed.", ["minCudaVersion: must be major or major.minor"])
    entries = []
    for gpu in GPU_TYPES:
        entry = {k: v for k, v in gpu.items() if k not in ("stock", "cuda")}
        entry.update(pool=None, secure=True, community=gpu["stock"]["COMMUNITY"] != "NONE",
                     maxCount={"secure": 8, "community": 4})
        if include:  # availability and CUDA versions scoped by the CUDA filters
            offered = [v for v in gpu["cuda"] if (not floor or _cuda(v) >= _cuda(floor))
                       and (not exact or v in exact.split(","))]
            stock = gpu["stock"][cloud or "SECURE"] if offered else "NONE"
            entry["availability"] = stock
            if offered:  # absent for a type none of whose hosts reports a version (AMD)
                entry["cudaVersions"] = [{"version": v, "available": stock != "NONE"} for v in offered]
        entries.append(entry)
    return entries


def _cuda(version: str) -> tuple:
    """A CUDA version compared numerically, as RunPod compares it (12.11 is above 12.2)."""
    return tuple(int(part) for part in version.split("."))


def hosts_for(gpu_type: dict, gpu: dict) -> list:
    """The CUDA versions of the type's hosts that a create's gpu settings accept: allowedCudaVersions exactly,
    minCudaVersion numerically, either or none."""
    allowed, floor = gpu.get("allowedCudaVersions") or None, gpu.get("minCudaVersion")
    return [v for v in gpu_type["cuda"] if (allowed is None or v in allowed)
            and (floor is None or _cuda(v) >= _cuda(floor))]


def _value(node, variables):
    """A GraphQL literal or variable as Python."""
    if isinstance(node, ast.VariableNode):
        return variables.get(node.name.value)
    if isinstance(node, ast.ObjectValueNode):
        return {f.name.value: _value(f.value, variables) for f in node.fields}
    if isinstance(node, ast.ListValueNode):
        return [_value(v, variables) for v in node.values]
    if isinstance(node, ast.IntValueNode):
        return int(node.value)
    if isinstance(node, ast.FloatValueNode):
        return float(node.value)
    if isinstance(node, ast.BooleanValueNode):
        return node.value
    if isinstance(node, ast.NullValueNode):
        return None
    return node.value  # strings (escapes decoded by the parser) and enums


def ends_within(seconds: float, function, *args, **kwargs):
    """function(*args, **kwargs) on a thread that must end within seconds: a call that would hang fails the test
    instead of hanging it. Returns what it returned, or raises what it raised."""
    outcome = {}

    def call():
        try:
            outcome["value"] = function(*args, **kwargs)
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{getattr(function, '__name__', function)} still running after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
