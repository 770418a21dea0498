"""A local fake of RunPod's GraphQL API that behaves like the real one, for the real `runpod` SDK.

The SDK reads RUNPOD_API_BASE_URL and posts GraphQL text to {base}/graphql. The fake parses that
text (graphql-core) and answers the operations the project uses, with RunPod's failure modes:
pods provision slowly (runtime, then ports, appear late), one GPU type has no capacity, a create
can answer 500 after it created the pod, some calls answer 429, a wrong key gets 401, costs accrue.
"""

import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from graphql import parse
from graphql.language import ast

NO_CAPACITY = "There are no longer any instances available with the requested specifications. Please refresh and try again."

GPU_TYPES = [
    {"id": "NVIDIA GeForce RTX 3070", "displayName": "RTX 3070", "memoryInGb": 8, "securePrice": 0.14, "communityPrice": 0.10},
    {"id": "NVIDIA GeForce RTX 4090", "displayName": "RTX 4090", "memoryInGb": 24, "securePrice": 0.69, "communityPrice": 0.34},
    {"id": "NVIDIA RTX A5000", "displayName": "RTX A5000", "memoryInGb": 24, "securePrice": 0.27, "communityPrice": 0.16},
    {"id": "NVIDIA L40S", "displayName": "L40S", "memoryInGb": 48, "securePrice": 0.86, "communityPrice": 0.79},
]


@dataclass
class FakeRunPod:
    api_key: str
    boot_s: float = 1.0  # until the runtime appears (image pulled, container started)
    ports_s: float = 2.0  # until its ports are listed
    server_s: float = 3.0  # until the pod's nnInteractive server answers through the proxy
    no_capacity: set = field(default_factory=lambda: {"NVIDIA RTX A5000"})
    fail_next_create_after_creating: bool = False  # answer 500 although the pod was created
    rate_limit_every: int = 0  # every Nth request answers 429
    balance: float = 25.0
    warning: str = ""  # what the pod agent behind the proxy warns of
    clock: object = time.monotonic
    pods: dict = field(default_factory=dict)
    requests: list = field(default_factory=list)  # (operation, arguments) as received
    paths: list = field(default_factory=list)  # every URL path asked for, to prove no secret travels in one

    def __post_init__(self):
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._count = 0
        self.rate_limited = 0  # 429s answered

    # -- server ----------------------------------------------------------------------------
    def start(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                fake.paths.append(self.path)
                if self.path.startswith("/proxy/"):  # https://POD_ID-PORT.proxy.runpod.net, here as a path
                    status, payload = fake.proxy(self.path, self.headers.get("Authorization", ""))
                else:
                    status, payload = fake.handle(self.headers.get("Authorization", ""), body)
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if not isinstance(payload, str) else "text/html")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        return self

    def stop(self):
        self._server.shutdown()

    def proxy(self, path: str, authorization: str):
        """The pod's server behind RunPod's proxy: 502 until it is up, then it checks the pod's own key."""
        target, _, route = path[len("/proxy/"):].partition("/")
        pod_id, _, port = target.rpartition("-")
        pod = self.pods.get(pod_id)
        if pod is None or pod["desiredStatus"] != "RUNNING" or self._uptime(pod) < self.server_s:
            return 502, "<html><body>502 Bad Gateway</body></html>"
        if port == "8001":  # the pod agent
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

    # -- GraphQL ---------------------------------------------------------------------------
    def handle(self, authorization: str, body: bytes):
        with self._lock:
            self._count += 1
            if authorization != f"Bearer {self.api_key}":
                return 401, {"error": "Unauthorized"}
            if self.rate_limit_every and self._count % self.rate_limit_every == 0:
                self.rate_limited += 1
                return 429, {"errors": [{"message": "Too Many Requests: rate limit exceeded"}]}
            document = parse(json.loads(body)["query"])
            field_node = document.definitions[0].selection_set.selections[0]
            name = field_node.name.value
            arguments = {a.name.value: _value(a.value) for a in field_node.arguments or ()}
            self.requests.append((name, arguments))
            try:
                result = getattr(self, f"_op_{name}")(arguments.get("input", {}), field_node)
            except _Failure as failure:
                return failure.status, failure.body
            return 200, {"data": {name: result}}

    def _op_myself(self, _input, node):
        return {"id": "user-1", "pubKey": "", "networkVolumes": [], "clientBalance": round(self.balance, 4),
                "currentSpendPerHr": sum(p["costPerHr"] for p in self.pods.values() if p["desiredStatus"] == "RUNNING"),
                "pods": [self._pod_view(p) for p in self.pods.values()]}

    def _op_gpuTypes(self, query, node):
        types = [g for g in GPU_TYPES if not query.get("id") or g["id"] == query["id"]]
        return [{**g, "secureCloud": True, "communityCloud": True, "maxGpuCount": 8,
                 "lowestPrice": {"minimumBidPrice": g["communityPrice"] / 2, "uninterruptablePrice": g["communityPrice"]}}
                for g in types]

    def _op_pod(self, query, node):
        pod = self.pods.get(query.get("podId"))
        return self._pod_view(pod) if pod else None

    def _op_podFindAndDeployOnDemand(self, spec, node):
        if spec.get("gpuTypeId") in self.no_capacity:
            raise _Failure(200, {"errors": [{"message": NO_CAPACITY}]})
        gpu = next((g for g in GPU_TYPES if g["id"] == spec.get("gpuTypeId")), None)
        if gpu is None:
            raise _Failure(200, {"errors": [{"message": "Invalid GPU type"}]})
        pod_id = f"pod{next(self._ids):04d}x"
        price = gpu["securePrice"] if spec.get("cloudType") == "SECURE" else gpu["communityPrice"]
        self.pods[pod_id] = {
            "id": pod_id, "name": spec.get("name", ""), "imageName": spec.get("imageName", ""),
            "templateId": spec.get("templateId"), "gpuTypeId": gpu["id"], "gpuDisplayName": gpu["displayName"],
            "costPerHr": price, "desiredStatus": "RUNNING", "created": self.clock(), "stoppedUptime": 0.0,
            "env": {item["key"]: item["value"] for item in spec.get("env", [])}, "ports": spec.get("ports", ""),
            "volumeInGb": spec.get("volumeInGb", 0), "containerDiskInGb": spec.get("containerDiskInGb", 0),
            "volumeMountPath": spec.get("volumeMountPath", ""), "gpuCount": spec.get("gpuCount", 1),
        }
        if self.fail_next_create_after_creating:
            self.fail_next_create_after_creating = False
            raise _Failure(500, "<html><body>502 Bad Gateway</body></html>")
        return self._pod_view(self.pods[pod_id])

    def _op_podStop(self, query, node):
        pod = self._existing(query)
        pod["stoppedUptime"] += self._uptime(pod)
        pod["desiredStatus"] = "EXITED"
        return {"id": pod["id"], "desiredStatus": "EXITED"}

    def _op_podResume(self, query, node):
        pod = self._existing(query)
        pod["desiredStatus"], pod["created"] = "RUNNING", self.clock()
        return self._pod_view(pod)

    def _op_podTerminate(self, query, node):
        self._existing(query)
        del self.pods[query["podId"]]
        return None

    def _existing(self, query):
        pod = self.pods.get(query.get("podId"))
        if pod is None:
            raise _Failure(200, {"errors": [{"message": "pod not found"}]})
        return pod

    def _uptime(self, pod) -> float:
        return self.clock() - pod["created"] if pod["desiredStatus"] == "RUNNING" else 0.0

    def cost_so_far(self, pod_id) -> float:
        pod = self.pods[pod_id]
        return (pod["stoppedUptime"] + self._uptime(pod)) / 3600 * pod["costPerHr"]

    def _pod_view(self, pod):
        age = self._uptime(pod)
        runtime = None
        if pod["desiredStatus"] == "RUNNING" and age >= self.boot_s:
            ports = [{"ip": "100.65.0.2", "isIpPublic": False, "privatePort": int(p.split("/")[0]),
                      "publicPort": int(p.split("/")[0]), "type": p.split("/")[1]}
                     for p in pod["ports"].split(",") if p] if age >= self.ports_s else []
            runtime = {"uptimeInSeconds": int(age), "ports": ports}
        return {"id": pod["id"], "name": pod["name"], "imageName": pod["imageName"], "desiredStatus": pod["desiredStatus"],
                "costPerHr": pod["costPerHr"], "gpuCount": pod["gpuCount"], "ports": pod["ports"],
                "uptimeSeconds": int(pod["stoppedUptime"] + age), "volumeInGb": pod["volumeInGb"],
                "containerDiskInGb": pod["containerDiskInGb"], "volumeMountPath": pod["volumeMountPath"],
                "env": [f"{k}={v}" for k, v in pod["env"].items()], "runtime": runtime,
                "machine": {"gpuDisplayName": pod["gpuDisplayName"]}}


class _Failure(Exception):
    def __init__(self, status, body):
        super().__init__(status)
        self.status, self.body = status, body


def _value(node):
    """A GraphQL literal as Python."""
    if isinstance(node, ast.ObjectValueNode):
        return {f.name.value: _value(f.value) for f in node.fields}
    if isinstance(node, ast.ListValueNode):
        return [_value(v) for v in node.values]
    if isinstance(node, ast.IntValueNode):
        return int(node.value)
    if isinstance(node, ast.FloatValueNode):
        return float(node.value)
    if isinstance(node, ast.BooleanValueNode):
        return node.value
    if isinstance(node, ast.NullValueNode):
        return None
    return node.value  # strings (escapes decoded by the parser) and enums
