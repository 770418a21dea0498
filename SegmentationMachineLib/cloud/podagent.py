"""The pod agent: runs inside the pod and terminates it when nobody uses it, or when its time or budget is spent.

`python -m SegmentationMachineLib.podagent`, configured by environment (RunPod sets RUNPOD_POD_ID
and a pod-scoped RUNPOD_API_KEY; the Cloud GPU panel sets the SM_* variables). Clients that are
connected (the module, `segmentation-machine pod up`) send `POST /heartbeat` with
`Authorization: Bearer <SM_HEARTBEAT_TOKEN>`; the answer says when and why the pod will end, so
they can warn their user. A laptop that sleeps stops its heartbeats, and the bill stops with them.
"""

import hmac
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .pods import PodsError, RunPodGraphQL

log = logging.getLogger("segmentation-machine.podagent")


DESKTOP_PORTS = "6080"  # noVNC: a browser showing the pod's desktop keeps its websocket open


@dataclass(frozen=True)
class AgentConfig:
    pod_id: str
    api_key: str
    heartbeat_token: str
    idle_timeout_s: float = 900.0
    max_lifetime_s: float = None
    budget_usd: float = None
    port: int = 8001
    warning_s: float = 300.0  # how long before the end connected clients are told
    poll_s: float = 60.0  # how often RunPod is asked for the pod's uptime and cost
    activity_ports: tuple = ()  # an open connection to one of these counts as a heartbeat (the browser desktop)

    @classmethod
    def from_env(cls, env=os.environ) -> "AgentConfig":
        missing = [name for name in ("RUNPOD_POD_ID", "RUNPOD_API_KEY", "SM_HEARTBEAT_TOKEN") if not env.get(name)]
        if missing:
            raise ValueError(f"The pod agent needs {', '.join(missing)} in its environment (RunPod sets the RUNPOD_ "
                             "variables; the Cloud GPU panel or the image's entrypoint sets SM_HEARTBEAT_TOKEN).")

        def number(name, default):
            text = env.get(name, "").strip()
            try:
                return float(text) if text else default
            except ValueError:
                raise ValueError(f"{name} must be a number of {'dollars' if 'USD' in name else 'seconds'}, "
                                 f"not {text!r}.") from None

        return cls(pod_id=env["RUNPOD_POD_ID"], api_key=env["RUNPOD_API_KEY"], heartbeat_token=env["SM_HEARTBEAT_TOKEN"],
                   idle_timeout_s=number("SM_IDLE_TIMEOUT_S", 900.0), max_lifetime_s=number("SM_MAX_LIFETIME_S", None),
                   budget_usd=number("SM_BUDGET_USD", None), port=int(number("SM_AGENT_PORT", 8001)),
                   warning_s=number("SM_WARNING_S", 300.0), poll_s=number("SM_AGENT_POLL_S", 60.0),
                   activity_ports=_ports(env.get("SM_ACTIVITY_PORTS", DESKTOP_PORTS if env.get("SM_MODE") == "desktop"
                                                 else "")))


@dataclass(frozen=True)
class Verdict:
    """What ends the pod first, and when: seconds left (<= 0: now)."""
    reason: str
    seconds_left: float

    def sentence(self) -> str:
        when = "now" if self.seconds_left <= 0 else f"in {self.seconds_left / 60:.1f} min"
        return f"The pod terminates {when}: {self.reason}."


def verdict(config: AgentConfig, idle_s: float, lifetime_s: float, cost_usd: float, cost_per_hr: float) -> Verdict:
    """The limit that is reached first; pure, so it is tested without clocks."""
    limits = [Verdict(f"no client has been connected for {_duration(config.idle_timeout_s)} (idle timeout)",
                      config.idle_timeout_s - idle_s)]
    if config.max_lifetime_s is not None:
        limits.append(Verdict(f"its maximum lifetime of {_duration(config.max_lifetime_s)} is reached",
                              config.max_lifetime_s - lifetime_s))
    if config.budget_usd is not None:
        rate = cost_per_hr / 3600
        left = (config.budget_usd - cost_usd) / rate if rate > 0 else float("inf")
        limits.append(Verdict(f"its budget of ${config.budget_usd:g} is spent", left))
    return min(limits, key=lambda v: v.seconds_left)


def _ports(text: str) -> tuple:
    try:
        return tuple(int(p) for p in text.replace(",", " ").split())
    except ValueError:
        raise ValueError(f"SM_ACTIVITY_PORTS must list port numbers, not {text!r}.") from None


def connected_on(ports) -> bool:
    """True while a TCP connection to one of these local ports is established (Linux /proc/net)."""
    wanted = {f"{port:04X}" for port in ports}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()  # sl, local address:port (hex), remote address, state, ...
            if fields[3] == "01" and fields[1].rpartition(":")[2] in wanted:  # 01: ESTABLISHED
                return True
    return False


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:g} s"
    return f"{seconds / 60:.3g} min" if seconds < 7200 else f"{seconds / 3600:.3g} h"


class PodAgent:
    def __init__(self, config: AgentConfig, backend=None, clock=time.monotonic):
        self.config = config
        self._backend = backend or RunPodGraphQL(config.api_key)
        self._clock = clock
        self._started = clock()
        self._last_heartbeat = self._started  # a fresh pod gets one idle timeout to be connected
        self._uptime_s, self._cost_per_hr, self._polled_at, self._uptime_at = 0.0, 0.0, None, self._started
        self._warned = None
        self._retry_at = 0.0  # when a failed terminate is tried again
        self.terminated = threading.Event()
        self._lock = threading.Lock()

    # -- what clients see ------------------------------------------------------------------
    def heartbeat(self) -> dict:
        self._touch()
        return self.status()

    def _touch(self):
        with self._lock:
            self._last_heartbeat = self._clock()

    def status(self) -> dict:
        current = self._verdict()
        warning = current.sentence() if current.seconds_left <= self.config.warning_s else ""
        return {"pod_id": self.config.pod_id, "terminates_in_s": round(current.seconds_left, 1),
                "reason": current.reason, "warning": warning, "idle_timeout_s": self.config.idle_timeout_s}

    def authorized(self, header: str) -> bool:
        return hmac.compare_digest(header.encode(), f"Bearer {self.config.heartbeat_token}".encode())

    # -- the watch -------------------------------------------------------------------------
    def check(self):
        """One look: refresh the pod's cost now and then, warn once per reason, terminate when due."""
        if self.terminated.is_set():
            return
        now = self._clock()
        if self.config.activity_ports and connected_on(self.config.activity_ports):
            self._touch()
        if self._polled_at is None or now - self._polled_at >= self.config.poll_s:
            self._poll_runpod(now)
        current = self._verdict()
        if current.seconds_left <= 0 and now >= self._retry_at:
            log.warning("Terminating pod %s: %s.", self.config.pod_id, current.reason)
            try:
                self._backend.terminate(self.config.pod_id)
            except PodsError as error:  # tried again after a poll interval, not flooding the log
                log.error("Terminating failed: %s", error)
                self._retry_at = now + self.config.poll_s
                return
            self.terminated.set()
        elif current.seconds_left <= self.config.warning_s and self._warned != current.reason:
            self._warned = current.reason
            log.warning("%s", current.sentence())

    def _poll_runpod(self, now):
        self._polled_at = now  # a failed poll is also retried only after poll_s
        try:
            pod = self._backend.get(self.config.pod_id)
        except PodsError as error:
            log.error("Could not read the pod's cost from RunPod: %s", error)
            return
        # None: RunPod does not (or not yet) list the pod. The watch goes on: one odd answer must not
        # leave a pod unguarded, and a really terminated pod takes this container with it anyway.
        if pod is not None:
            self._uptime_s, self._cost_per_hr, self._uptime_at = pod.uptime_s, pod.cost_per_hr, now

    def _verdict(self) -> Verdict:
        now = self._clock()
        with self._lock:
            idle = now - self._last_heartbeat
        # RunPod's uptime survives container restarts; between polls it grows with our clock.
        lifetime = max(now - self._started, self._uptime_s + now - self._uptime_at)
        return verdict(self.config, idle, lifetime, lifetime / 3600 * self._cost_per_hr, self._cost_per_hr)

    def run(self, check_every_s: float = 1.0):
        """Serves heartbeats and checks until the pod is terminated."""
        server = serve(self)
        log.info("Pod agent for %s on port %d: idle timeout %g s%s%s.", self.config.pod_id, server.server_port,
                 self.config.idle_timeout_s,
                 f", lifetime {self.config.max_lifetime_s:g} s" if self.config.max_lifetime_s is not None else "",
                 f", budget ${self.config.budget_usd:g}" if self.config.budget_usd is not None else "")
        try:
            self.check()  # the pod's cost so far is known before the first heartbeat is answered
            while not self.terminated.wait(check_every_s):
                self.check()
        finally:
            server.shutdown()


def serve(agent: PodAgent, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/healthz":  # says only that the agent runs: for the image's HEALTHCHECK
                return self._answer(404, {"detail": "not found"})
            self._answer(200, {"ok": not agent.terminated.is_set()})

        def do_POST(self):
            if self.path != "/heartbeat":
                return self._answer(404, {"detail": "not found"})
            if not agent.authorized(self.headers.get("Authorization", "")):
                log.warning("Refused a heartbeat without the pod's token from %s.", self.client_address[0])
                return self._answer(401, {"detail": "invalid heartbeat token"})
            self._answer(200, agent.heartbeat())

        def _answer(self, status, payload):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass  # the proxy logs requests; ours would only repeat them

    server = ThreadingHTTPServer((host, agent.config.port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="pod-agent: %(levelname)s: %(message)s", stream=sys.stderr)
    try:
        config = AgentConfig.from_env()
    except ValueError as error:
        log.error("%s", error)
        return 2
    PodAgent(config).run()
    log.info("Pod %s terminated; the agent stops.", config.pod_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
