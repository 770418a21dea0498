"""A local fake of RunPod's REST v2 API (plus the one GraphQL mutation still used) that behaves like the real one.

RUNPOD_REST_URL points the client at {url}/v2 and RUNPOD_GRAPHQL_URL at {url}/graphql. The fake
answers as notes/runpod-2026.md describes: bearer key, problem+json errors (RFC 9457), lists
wrapped as {"pods": [...]}, 400 without capacity (RunPod's own sentences, no code), 402, 422, 429
with Retry-After, a 5xx after the pod was created, a pod list that lags behind a create, pods that
provision slowly (PROVISIONING, STARTING) and list their ports late, pods that fail (ERROR) or are
stopped (EXITED) on their own, a terminated pod listed as TERMINATED for a while before it answers
404, 409 for an action not valid now, terminateAfter honoured, the container log as a stream of
Server-Sent Events that never ends (a backfill, then live lines and keep-alive comments), and
RunPod's proxy to the pod's server and agent under /proxy/.
"""

import itertools
import json
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from graphql import parse
from graphql.language import ast

NO_CAPACITY = "There are no longer any instances available with the requested specifications. Please refresh and try again."
NO_RESOURCES = "This machine does not have the resources to deploy your pod."
NO_FREE_GPUS = "There are not enough free GPUs on the host machine to start this pod."
SOMETHING_WENT_WRONG = "Something went wrong. Please try again later or contact support."

GPU_TYPES = [
    {"id": "NVIDIA GeForce RTX 3070", "displayName": "RTX 3070", "manufacturer": "Nvidia", "memoryInGb": 8,
     "securePrice": 0.14, "communityPrice": 0.10, "stock": "High"},
    {"id": "NVIDIA GeForce RTX 4090", "displayName": "RTX 4090", "manufacturer": "Nvidia", "memoryInGb": 24,
     "securePrice": 0.69, "communityPrice": 0.34, "stock": "Medium"},
    {"id": "NVIDIA RTX A5000", "displayName": "RTX A5000", "manufacturer": "Nvidia", "memoryInGb": 24,
     "securePrice": 0.27, "communityPrice": 0.16, "stock": "Low"},
    {"id": "NVIDIA L40S", "displayName": "L40S", "manufacturer": "Nvidia", "memoryInGb": 48,
     "securePrice": 0.86, "communityPrice": 0.79, "stock": "High"},
    {"id": "NVIDIA H100 80GB HBM3", "displayName": "H100 SXM", "manufacturer": "Nvidia", "memoryInGb": 80,
     "securePrice": 2.69, "communityPrice": 1.99, "stock": "None"},  # listed, but none to be had
    {"id": "AMD Instinct MI300X OAM", "displayName": "MI300X", "manufacturer": "AMD", "memoryInGb": 192,
     "securePrice": 0.20, "communityPrice": 0.20, "stock": "High"},  # cheap and large, but no CUDA
]
PORT = re.compile(r"^\d{1,5}/(http|tcp)$")


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
    rate_limit_every: int = 0  # every Nth API request answers 429
    retry_after_s: int = 1
    balance: float = 25.0  # at 0, creates answer 402
    graphql_retired: bool = False  # /graphql answers 404, as it will in 2027
    limited_keys: set = field(default_factory=set)  # keys that may read and stop pods but not terminate them
    agent_answers: bool = True  # the pod agent behind the proxy (port 8001) answers heartbeats
    warning: str = ""  # what the pod agent behind the proxy warns of
    fails_as: str = None  # "ERROR" (the container keeps failing) or "EXITED" (stopped): new pods end so once booted
    terminated_listed_s: float = 3.0  # a terminated pod is still listed (TERMINATED) this long, then 404
    log_ping_s: float = 0.5  # the log stream's keep-alive comment when no line came
    logs_as_json: bool = False  # the log as one finished JSON answer {"logs": [...]}, as RunPod answered earlier
    stalled: bool = False  # while set, API requests get no answer (a network that times out)
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
                    status, payload, headers = *fake.proxy(self.path, authorization), {}
                else:
                    while fake.stalled and not fake._closing.is_set():
                        time.sleep(0.05)
                    status, payload, headers = fake.handle(method, self.path, authorization, body)
                if isinstance(payload, _LogStream):
                    return self._stream_log(payload)
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                kind = ("text/html" if isinstance(payload, str) else
                        "application/problem+json" if status >= 400 and "status" in payload else "application/json")
                self.send_response(status)
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

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        return self

    def stop(self):
        self._closing.set()
        self._server.shutdown()

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
            return 502, "<html><body>502 Bad Gateway</body></html>"
        if port == "8001":  # the pod agent
            if not self.agent_answers:
                return 502, "<html><body>502 Bad Gateway</body></html>"
            if authorization != f"Bearer {pod['env'].get('SM_HEARTBEAT_TOKEN')}":
                return 401, {"detail": "invalid heartbeat token"}
            pod["heartbeats"] = pod.get("heartbeats", 0) + 1
            return 200, {"pod_id": pod_id, "terminates_in_s": 900.0, "reason": "idle timeout", "warning": self.warning}
        if authorization != f"Bearer {pod['env'].get('SM_NNI_API_KEY')}":
            return 401, {"detail": "invalid API key"}
        return 200, {"lease_token": "lease-1"} if route == "claim" else {}

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
            if not authorization.startswith("Bearer ") or key not in {self.api_key, *self.limited_keys}:
                return (*_problem(401, "Invalid or missing API key."), {})
            if self.rate_limit_every and self._count % self.rate_limit_every == 0:
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
        if parts[0] != "v2":
            raise _Failure(404, "No such endpoint.")
        if method == "GET" and parts[1:] == ["catalog", "gpus"]:
            return 200, {"gpus": [_catalog_entry(g) for g in GPU_TYPES]}
        if parts[1:2] != ["pods"]:
            raise _Failure(404, "No such endpoint.")
        if len(parts) == 2:
            if method == "GET":
                listed = [p for p in [*self.pods.values(), *self.ended.values()]
                          if self.clock() - p["created_at"] >= self.list_lag_s]
                return 200, {"pods": [self._view(p) for p in listed]}
            return 201, self._view(self._create_from_v2(body if isinstance(body, dict) else {}))
        pod = self.pods.get(parts[2]) or self.ended.get(parts[2])
        if pod is None:
            raise _Failure(404, f"Pod {parts[2]} not found.")
        if method == "GET" and len(parts) == 3:
            return 200, self._view(pod)
        if method == "GET" and parts[3:] == ["logs"]:  # ?tail=N lines of backfill, 100 when omitted
            tail = parse_qs(urlsplit(path).query).get("tail", ["100"])[0]
            tail = min(5000, int(tail) if tail.isdigit() else 100)
            if self.logs_as_json:
                return 200, {"logs": [_entry(e)[1] for e in pod["log"]][-tail:] if tail else []}
            return 200, _LogStream(pod["id"], tail)
        if method == "DELETE" and len(parts) == 3:
            return self._act(pod, "terminate", key)
        if method == "POST" and parts[3:] == ["action"]:
            return self._act(pod, (body or {}).get("action"), key)
        raise _Failure(404, "No such endpoint.")

    def _act(self, pod, action, key):
        if pod["status"] == "TERMINATED":
            raise _Failure(409, f"Pod {pod['id']} is terminated.")
        if action == "stop":
            if pod["status"] != "RUNNING":
                raise _Failure(409, f"Pod {pod['id']} is not running.")
            pod["stoppedUptime"] += self._uptime(pod)
            pod["status"] = "EXITED"
        elif action == "start":
            if pod["status"] == "RUNNING":
                raise _Failure(409, f"Pod {pod['id']} is already running.")
            if self.no_capacity_on_resume:
                raise _Failure(400, NO_FREE_GPUS)
            pod["status"], pod["started"] = "RUNNING", self.clock()
        elif action == "terminate":
            if key in self.limited_keys:
                raise _Failure(403, "This API key may not terminate pods.")
            self._terminate(pod)
            return 200, {}
        else:
            raise _Failure(422, "action must be one of stop, start, terminate.")
        return 200, self._view(pod)

    def _create_from_v2(self, body):
        gpu, env, ports, mounts = body.get("gpu"), body.get("env", {}), body.get("ports", []), body.get("mounts", [])
        problems = [text for broken, text in [
            (not isinstance(body.get("name"), str), "name must be a string"),
            (not isinstance(gpu, dict) or not isinstance(gpu.get("id"), str), "gpu.id must be a string"),
            (not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()),
             "env must be an object of strings"),
            (not isinstance(ports, list) or not all(PORT.match(str(p)) for p in ports),
             "ports must be a list like [\"8000/http\"]"),
            (not isinstance(mounts, list) or len(mounts) > 1, "mounts must be a list of at most one mount"),
            (not (body.get("image") or body.get("templateId")), "image or templateId is required"),
            (body.get("cloudType") not in ("SECURE", "COMMUNITY"), "cloudType must be SECURE or COMMUNITY")]
            if broken]
        if problems:
            raise _Failure(422, "; ".join(problems))
        mount = mounts[0] if mounts else {}
        return self._create(body["name"], gpu["id"], body["cloudType"], env, ports, body.get("image", ""),
                            body.get("templateId"), mount.get("volumeInGb", 0), mount.get("mountPath", ""), None)

    def _create(self, name, gpu_id, cloud, env, ports, image, template_id, volume_gb, mount_path, terminate_after):
        if gpu_id in self.no_capacity:
            raise _Failure(400, self.capacity_message)
        gpu = next((g for g in GPU_TYPES if g["id"] == gpu_id), None)
        if gpu is None:
            raise _Failure(400, f"There is no GPU type {gpu_id}.")
        if self.balance <= 0:
            raise _Failure(402, "Your balance is too low to deploy this pod.")
        pod_id = f"pod{next(self._ids):04d}x"
        now = self.clock()
        self.pods[pod_id] = {
            "id": pod_id, "name": name, "image": image, "templateId": template_id, "gpuTypeId": gpu["id"],
            "gpuDisplayName": gpu["displayName"], "cloud": cloud, "status": "RUNNING", "created_at": now,
            "started": now, "stoppedUptime": 0.0, "env": dict(env), "ports": list(ports), "volumeInGb": volume_gb,
            "volumeMountPath": mount_path, "terminateAfter": terminate_after,
            "cost": gpu["securePrice"] if cloud == "SECURE" else gpu["communityPrice"],
            "log": [("system", f"pulling image {image or template_id}"), "starting the container"],
            "fails_as": self.fails_as,
        }
        if self.create_fault:
            fault, self.create_fault = self.create_fault, None
            raise _Failure(*fault)
        return self.pods[pod_id]

    def _graphql(self, body):
        """podFindAndDeployOnDemand, the one mutation still used (for terminateAfter)."""
        if self.graphql_retired:
            raise _Failure(404, "GraphQL has been retired: use https://api.runpod.io/v2.")
        operation = parse(body["query"]).definitions[0].selection_set.selections[0]
        if operation.name.value != "podFindAndDeployOnDemand":
            return 200, {"errors": [{"message": f"Cannot query field {operation.name.value}."}]}
        [argument] = operation.arguments
        spec = _value(argument.value, body.get("variables") or {})
        terminate_after = spec.get("terminateAfter")
        try:
            if terminate_after:
                datetime.fromisoformat(terminate_after.replace("Z", "+00:00"))
            pod = self._create(spec.get("name", ""), spec.get("gpuTypeId"), spec.get("cloudType"),
                               {e["key"]: e["value"] for e in spec.get("env", [])},
                               [p for p in spec.get("ports", "").split(",") if p], spec.get("imageName", ""),
                               spec.get("templateId"), spec.get("volumeInGb", 0), spec.get("volumeMountPath", ""),
                               terminate_after)
        except _Failure as failure:
            if failure.status >= 500:
                raise
            return 200, {"errors": [{"message": failure.detail}]}
        except ValueError:
            return 200, {"errors": [{"message": "terminateAfter must be an RFC 3339 date-time."}]}
        return 200, {"data": {"podFindAndDeployOnDemand": {"id": pod["id"], "name": pod["name"],
                                                           "desiredStatus": "RUNNING", "costPerHr": pod["cost"]}}}

    def _advance(self):
        """Time passes: terminateAfter ends pods whatever runs inside, a failing pod fails once booted, and a
        terminated pod drops off the list."""
        for pod in list(self.pods.values()):
            end = pod["terminateAfter"]
            if end and datetime.fromisoformat(end.replace("Z", "+00:00")).timestamp() <= self.wall():
                self._terminate(pod)
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

    def _uptime(self, pod) -> float:
        return self.clock() - pod["started"] if pod["status"] in ("RUNNING", "ERROR") else 0.0

    def cost_so_far(self, pod_id) -> float:
        pod = self.pods[pod_id]
        return (pod["stoppedUptime"] + self._uptime(pod)) / 3600 * pod["cost"]

    def _view(self, pod):
        age = self._uptime(pod)
        runtime, status = None, pod["status"]
        if status == "RUNNING" and age < self.boot_s:
            status = "PROVISIONING" if age < self.boot_s / 2 else "STARTING"
        elif status == "RUNNING":
            ports = [{"ip": "100.65.0.2", "isIpPublic": False, "privatePort": int(p.split("/")[0]),
                      "publicPort": int(p.split("/")[0]), "type": p.split("/")[1]}
                     for p in pod["ports"]] if age >= self.ports_s else []
            runtime = {"uptime": int(pod["stoppedUptime"] + age), "ports": ports}
        return {"id": pod["id"], "name": pod["name"], "status": status, "cost": pod["cost"],
                "gpu": {"id": pod["gpuTypeId"], "displayName": pod["gpuDisplayName"], "count": 1},
                "image": pod["image"], "ports": pod["ports"], "volumeInGb": pod["volumeInGb"], "runtime": runtime}


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
    def __init__(self, status, detail):
        super().__init__(status)
        self.status, self.detail = status, detail

    @property
    def answer(self):
        return (*_problem(self.status, self.detail), {})


def _problem(status: int, detail: str):
    """An RFC 9457 problem: (status, body)."""
    return status, {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status, "detail": detail}


def _catalog_entry(gpu: dict) -> dict:
    entry = {k: v for k, v in gpu.items() if k != "stock"}
    return {**entry, "secureCloud": True, "communityCloud": gpu["manufacturer"] == "Nvidia",
            "availability": {"stockStatus": gpu["stock"], "available": gpu["stock"] != "None"}}


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
