"""The pod agent: runs inside the pod and ends it when nobody uses it, or when its time or budget is spent.

`python -m SegmentationMachineLib.cloud.podagent`, configured by environment (RunPod sets RUNPOD_POD_ID
and a pod-scoped RUNPOD_API_KEY, whose rights beyond stopping the pod are not documented: when a
terminate is refused the agent stops the pod instead; the Cloud GPU panel sets the SM_* variables,
SM_PRICE_PER_HOUR among them, so the budget holds where the key cannot read the pod's cost). Clients that are
connected (the module, `segmentation-machine pod up`) send `POST /heartbeat` with
`Authorization: Bearer <SM_HEARTBEAT_TOKEN>`; the answer says when and why the pod will end, so
they can warn their user. A laptop that sleeps stops its heartbeats, and the bill stops with them. `POST /end`
with the heartbeat token (never the server's key) ends the pod now, as at its idle timeout: a client's Stop of a pod
started with SM_WIPE_AT_END=1 goes this way, so that its uploads are wiped first (a stop through RunPod's API could
not wipe anything).

Ending means terminating, which deletes the pod's volume; a desktop pod whose volume holds the user's files
(uploads, saved scenes, exports) is stopped instead: the GPU bill ends, the files stay. The running time of
all its starts is kept on the volume, so budget and lifetime are totals whatever RunPod's uptime counts. A desktop
pod started with SM_WIPE_AT_END=1 has its uploaded DICOM wiped first (wipe.py): only then is it stopped or, with
nothing of the user's left, terminated.
"""

import hashlib
import hmac
import io
import json
import logging
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ..core.refusals import Refusals
from . import wipe
from .heartbeat import UNUSED_HEADER
from .pods import KEPT_WHILE_CREDIT, PodsError, RunPodRest, VOLUME_USD_PER_GB_MONTH

log = logging.getLogger("segmentation-machine.podagent")


# The VNC server's port: only websockify connects there, once per browser showing the desktop. noVNC's own
# port (6080) is no sign of use: anyone can hold a socket open on it, and websockify keeps HTTP keep-alives.
DESKTOP_PORTS = "5901"
# Before a VNC client has authenticated the server sends it under 1 KiB (version, security types, a
# 16-byte challenge, the result); after, it sends the desktop itself. More than this proves a session.
AUTHENTICATED_BYTES = 4096
_ss_failed = threading.Event()
WORKSPACE = "/workspace"  # the pod's volume
# The agent's folder on the volume (the entrypoint makes it the agent's): running.json, the pod's running time
# over all its starts; notice, what the desktop shows (docker/desktop/sm-pod-notices) before the pod ends.
AGENT_FOLDER = ".pod-agent"
# What the image itself keeps on the volume (the desktop's settings included; and a file system's lost+found); any
# other file there is the user's.
IMAGE_ENTRIES = {"nninteractive", AGENT_FOLDER, ".inbox-state", ".uploads", ".desktop", ".segmentation-machine",
                 "lost+found"}
# ...but the copies Slicer's DICOM database keeps of what it imported (an unpacked zip's series) are the user's.
USER_FILES_IN_IMAGE_ENTRIES = (os.path.join(".desktop", "SlicerDICOMDatabase", "dicom"),)


@dataclass(frozen=True)
class AgentConfig:
    pod_id: str
    api_key: str
    heartbeat_token: str
    idle_timeout_s: float = 900.0
    max_lifetime_s: float = None
    budget_usd: float = None
    price_per_hr: float = None  # $/h as RunPod quoted it at create; RunPod's own figure wins once read
    port: int = 8001
    warning_s: float = 300.0  # how long before the end connected clients are told
    poll_s: float = 60.0  # how often RunPod is asked for the pod's uptime and cost
    activity_ports: tuple = ()  # an authenticated session on one of these counts as a heartbeat (the desktop)
    server_key_sha256: str = ""  # the server's key, hashed: a heartbeat with it counts too (keepalive.py)
    workspace: str = WORKSPACE
    keeps_user_files: bool = False  # desktop mode: a volume with the user's files is stopped, never terminated
    wipe_at_end: bool = False  # desktop mode: the uploaded DICOM is wiped before the pod ends (wipe.py)
    wipe_request: str = wipe.REQUEST
    wipe_answer: str = wipe.ANSWER
    wipe_wait_s: float = wipe.WAIT_S

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
                   budget_usd=number("SM_BUDGET_USD", None), price_per_hr=number("SM_PRICE_PER_HOUR", None),
                   port=int(number("SM_AGENT_PORT", 8001)),
                   warning_s=number("SM_WARNING_S", 300.0), poll_s=number("SM_AGENT_POLL_S", 60.0),
                   activity_ports=_ports(env.get("SM_ACTIVITY_PORTS", DESKTOP_PORTS if env.get("SM_MODE") == "desktop"
                                                 else "")),
                   workspace=env.get("SM_WORKSPACE") or WORKSPACE, keeps_user_files=env.get("SM_MODE") == "desktop",
                   wipe_at_end=env.get("SM_MODE") == "desktop" and env.get("SM_WIPE_AT_END") == "1",
                   wipe_request=env.get("SM_WIPE_REQUEST") or wipe.REQUEST,
                   wipe_answer=env.get("SM_WIPE_ANSWER") or wipe.ANSWER,
                   wipe_wait_s=number("SM_WIPE_WAIT_S", wipe.WAIT_S),
                   server_key_sha256=env.get("SM_NNI_KEY_SHA256", "").lower())


@dataclass(frozen=True)
class Verdict:
    """What ends the pod first, and when: seconds left (<= 0: now); limit is idle, lifetime or budget."""
    reason: str
    seconds_left: float
    limit: str = ""

    def sentence(self, ends: str = "terminates") -> str:
        when = "now" if self.seconds_left <= 0 else f"in {self.seconds_left / 60:.1f} min"
        return f"The pod {ends} {when}: {self.reason}."


def verdict(config: AgentConfig, idle_s: float, lifetime_s: float, cost_usd: float, cost_per_hr: float) -> Verdict:
    """The limit that is reached first; pure, so it is tested without clocks."""
    limits = [Verdict(f"nothing has used it for {_duration(config.idle_timeout_s)} (idle timeout)",
                      config.idle_timeout_s - idle_s, "idle")]
    if config.max_lifetime_s is not None:
        limits.append(Verdict(f"its maximum lifetime of {_duration(config.max_lifetime_s)} is reached",
                              config.max_lifetime_s - lifetime_s, "lifetime"))
    if config.budget_usd is not None:
        rate = cost_per_hr / 3600
        left = (config.budget_usd - cost_usd) / rate if rate > 0 else float("inf")
        limits.append(Verdict(f"its budget of ${config.budget_usd:g} is spent", left, "budget"))
    return min(limits, key=lambda v: v.seconds_left)


def _ports(text: str) -> tuple:
    try:
        return tuple(int(p) for p in text.replace(",", " ").split())
    except ValueError:
        raise ValueError(f"SM_ACTIVITY_PORTS must list port numbers, not {text!r}.") from None


def sessions_on(ports) -> int:
    """Established TCP connections to these local ports that have carried more than a login's worth of data
    from our side (`ss`'s per-socket bytes_acked, readable by any user): a stranger's idle or unauthenticated
    socket does not count."""
    try:
        listing = subprocess.run(["ss", "-tinH", "state", "established"], capture_output=True, text=True,
                                 timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError) as error:  # once, not every second: the desktop then counts as idle
        if not _ss_failed.is_set():
            _ss_failed.set()
            log.error("Could not list the desktop's connections (ss, from iproute2): %s", error)
        return 0
    wanted, count, local_port = {str(port) for port in ports}, 0, None
    for line in listing.splitlines():
        if not line[:1].isspace():  # a socket: Recv-Q Send-Q local:port peer:port
            fields = line.split()
            local_port = fields[2].rpartition(":")[2] if len(fields) >= 4 else None
        elif local_port in wanted:  # its TCP details, on the next line
            acked = re.search(r"\bbytes_acked:(\d+)", line)
            count += bool(acked and int(acked.group(1)) > AUTHENTICATED_BYTES)
            local_port = None
    return count


def holds_user_files(workspace) -> bool:
    """Whether the volume holds a file of the user's: anything but what the image keeps there. A folder the agent
    may not read counts as holding some: what cannot be seen is never deleted."""
    try:
        names = [name for name in os.listdir(workspace) if name not in IMAGE_ENTRIES] + [
            name for name in USER_FILES_IN_IMAGE_ENTRIES if os.path.lexists(os.path.join(workspace, name))]
    except FileNotFoundError:
        return False  # no volume
    except OSError:
        return True
    unreadable = []
    for name in names:
        path = os.path.join(workspace, name)
        if os.path.islink(path) or not os.path.isdir(path):
            return True
        for _, _, files in os.walk(path, onerror=unreadable.append):
            if files or unreadable:
                return True
    return False


def load_running_s(path: Path, pod_id: str) -> float:
    """Seconds the pod ran before this agent started, as kept on its volume: 0 for a new pod, and for a network
    volume that another pod used before."""
    try:
        kept = json.loads(path.read_text())
        return float(kept["running_s"]) if kept.get("pod_id") == pod_id else 0.0
    except FileNotFoundError:
        return 0.0
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        log.error("Could not read the pod's running time so far (%s: %s): budget and lifetime count from now.",
                  path, error)
        return 0.0


def save_running_s(path: Path, pod_id: str, seconds: float):
    """Replaces the kept running time at once: a pod stopped mid-write keeps the last whole one."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps({"pod_id": pod_id, "running_s": round(seconds, 1)}))
    os.replace(temporary, path)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:g} s"
    return f"{seconds / 60:.3g} min" if seconds < 7200 else f"{seconds / 3600:.3g} h"


class PodAgent:
    def __init__(self, config: AgentConfig, backend=None, clock=time.monotonic, wall=time.time):
        self.config = config
        self._backend = backend or RunPodRest(config.api_key)
        self._clock, self._wall = clock, wall
        self._started = clock()
        self._last_heartbeat = self._started  # a fresh pod gets one idle timeout to be connected
        self._uptime_s, self._polled_at, self._uptime_at = 0.0, None, self._started
        self._cost_per_hr = config.price_per_hr or 0.0
        self._pod = None  # RunPod's last answer: the volume's size, for what a stopped pod costs
        self._poll_failure = ""  # why the last poll of RunPod failed, logged when it first fails so
        folder = Path(config.workspace) / AGENT_FOLDER
        self._running_file, self._notice_file = folder / "running.json", folder / "notice"
        self._ran_before_s = load_running_s(self._running_file, config.pod_id)
        self._keeping_failed = False
        self._failures = set()  # kinds of unexpected failure of check() already logged
        self._warned = None
        self._ends = "terminates"  # or "stops", decided when the end is near
        self._retry_at = 0.0  # when a failed terminate is tried again
        self._wiped = False  # asked once: a stop that failed is tried again without a second wipe
        self._end_asked = threading.Event()  # the pod's user asked to end it now (POST /end)
        self.terminated = threading.Event()  # the pod is ended: terminated, or stopped
        self._lock = threading.Lock()
        self._withdraw_notice()  # a notice left by an earlier start is not about this one

    # -- what clients see ------------------------------------------------------------------
    def heartbeat(self, used: bool = True) -> dict:
        """A connected client's beat; used=False: it is connected but nobody has used the pod through it lately (a
        Slicer left open), which keeps nothing running but is told when the pod ends."""
        if used:
            self._touch()
        return self.status()

    def _touch(self):
        with self._lock:
            self._last_heartbeat = self._clock()

    def status(self) -> dict:
        current = self._verdict()
        warning = current.sentence(self._ends) if self._near(current) else ""
        return {"pod_id": self.config.pod_id, "terminates_in_s": round(current.seconds_left, 1),
                "reason": current.reason, "warning": warning, "idle_timeout_s": self.config.idle_timeout_s}

    def end_now(self) -> dict:
        """The pod's user asked to end it: the watch ends it at its next check (within a second), wiping first where
        asked at the pod's start; answered at once, since a wipe may take longer than RunPod's proxy waits."""
        self._end_asked.set()
        return {"pod_id": self.config.pod_id, "ending": True, "wipes_first": self.config.wipe_at_end}

    def may_end(self, header: str) -> bool:
        """Only the heartbeat token, which only the pod's records on the computer that started it hold: the server's
        key (given to whoever may use the server) keeps the pod running but may not end it."""
        return hmac.compare_digest(header.encode(), f"Bearer {self.config.heartbeat_token}".encode())

    def authorized(self, header: str) -> bool:
        """The heartbeat token, or the server's key: whoever may use the server may keep the pod running (the AI
        section knows only the server's URL and key of a pod started elsewhere)."""
        key = header.removeprefix("Bearer ").encode() if header.startswith("Bearer ") else b""
        by_key = bool(key and self.config.server_key_sha256) and hmac.compare_digest(
            hashlib.sha256(key).hexdigest(), self.config.server_key_sha256)
        return hmac.compare_digest(header.encode(), f"Bearer {self.config.heartbeat_token}".encode()) or by_key

    # -- the watch -------------------------------------------------------------------------
    def check(self):
        """One look: refresh the pod's cost and keep its running time now and then, warn once per reason, end the
        pod when due."""
        if self.terminated.is_set():
            return
        now = self._clock()
        if self.config.activity_ports and sessions_on(self.config.activity_ports):
            self._touch()
        if self._polled_at is None or now - self._polled_at >= self.config.poll_s:
            self._poll_runpod(now)
            self._keep_running_time(now)
        current = self._verdict()
        if current.seconds_left <= 0 and now >= self._retry_at:
            self._keep_running_time(now)
            if self._end_pod(current.reason):
                self.terminated.set()
            else:  # tried again after a poll interval, not flooding the log
                self._retry_at = now + self.config.poll_s
        elif self._near(current):
            if self._warned != current.reason:
                self._warned = current.reason
                self._ends = "stops" if self._keeps_files() else "terminates"
                log.warning("%s", current.sentence(self._ends))
                self._post_notice(current)
        elif self._warned:  # used again: the next approach of a limit is warned of again
            self._warned = None
            self._withdraw_notice()

    def _near(self, current: Verdict) -> bool:
        """Whether clients and the log are warned now: warning_s before the end, but for a short idle timeout only in
        its second half (a 5 min timeout with a 5 min warning showed the warning on every beat of a pod in use)."""
        window = self.config.warning_s
        if current.limit == "idle":
            window = min(window, self.config.idle_timeout_s / 2)
        return current.seconds_left <= window

    def _keeps_files(self) -> bool:
        """Whether ending must stop the pod: terminating would delete the user's files with its volume. A network
        volume outlives the pod: terminating keeps them."""
        return (self.config.keeps_user_files and not (self._pod and self._pod.network_volume)
                and holds_user_files(self.config.workspace))

    def _end_pod(self, reason: str) -> bool:
        """Terminates the pod, or stops it where that would delete the user's files or is refused (a pod-scoped
        key): the GPU bill ends either way. With wipe_at_end the uploaded DICOM is wiped first."""
        if self.config.wipe_at_end and not self._wiped:
            self._wiped = True
            self._wipe()
        if self._keeps_files():
            log.warning("Stopping pod %s: %s.", self.config.pod_id, reason)
            if not self._stop("Stopping failed: %s"):
                return False
            log.warning("Stopped pod %s: the files on its volume (%s) are kept, and %s (`segmentation-machine pod down "
                        "%s` deletes them with it). A resume continues this pod's budget and lifetime; raise "
                        "SM_BUDGET_USD or SM_MAX_LIFETIME_S in its settings to use it longer (RunPod's own stop at "
                        "the maximum lifetime, set when the pod was created, does not move with them).", self.config.pod_id,
                        self.config.workspace, self._volume_cost(), self.config.pod_id)
            return True
        log.warning("Terminating pod %s: %s.", self.config.pod_id, reason)
        try:
            self._backend.terminate(self.config.pod_id)
            if self.config.keeps_user_files and self._pod and self._pod.network_volume:
                log.warning("The files in %s stay on network volume %s, which bills apart until you delete it.",
                            self.config.workspace, self._pod.network_volume)
            return True
        except PodsError as error:
            log.error("Terminating failed: %s", error)
        if not self._stop("Stopping failed too: %s"):
            return False
        log.warning("Stopped pod %s instead: %s (RunPod console or `segmentation-machine pod down %s`).",
                    self.config.pod_id, self._volume_cost(), self.config.pod_id)
        return True

    def _wipe(self):
        """Has the wiper (the desktop user's, who owns the files) delete the uploaded DICOM; whatever it answers, or
        if it does not, the pod ends next: an unanswered wipe must not keep the GPU billing."""
        try:
            answered, problems = wipe.ask(self.config.wipe_request, self.config.wipe_answer, self.config.wipe_wait_s)
        except OSError as error:
            answered, problems = False, [f"the request could not be written ({error.strerror})"]
        if answered and not problems:
            log.warning("Wiped the uploaded DICOM on the volume (%s), as asked at the pod's start.",
                        ", ".join(wipe.WIPED))
            return
        why = "; ".join(problems) if problems else f"the wiper did not answer in {_duration(self.config.wipe_wait_s)}"
        log.error("The uploaded DICOM on the volume was not all wiped (%s): `segmentation-machine pod down %s` deletes "
                  "the volume with it.", why, self.config.pod_id)

    def _stop(self, failure: str) -> bool:
        try:
            self._backend.stop(self.config.pod_id)
            return True
        except PodsError as error:
            log.error(failure, error)
            return False

    def _volume_cost(self) -> str:
        if self._pod is not None:
            return self._pod.stopped_cost()
        return (f"its volume costs ${VOLUME_USD_PER_GB_MONTH:.2f}/GB/month until it is terminated, and is "
                f"{KEPT_WHILE_CREDIT}")

    def _poll_runpod(self, now):
        self._polled_at = now  # a failed poll is also retried only after poll_s
        try:
            pod = self._backend.get(self.config.pod_id)
        except PodsError as error:
            if str(error) != self._poll_failure:  # said once, not every poll: a pod-scoped key may never read the pod
                log.error("Could not read the pod's cost from RunPod: %s", error)
            self._poll_failure = str(error)
            return
        except Exception as error:  # whatever else: the limits are still watched, with our own clock and price
            self._unexpected(error)
            return
        self._poll_failure = ""
        # None: RunPod does not (or not yet) list the pod. The watch goes on: one odd answer must not
        # leave a pod unguarded, and a really terminated pod takes this container with it anyway.
        if pod is not None:
            self._pod = pod
            self._uptime_s, self._uptime_at = pod.uptime_s, now
            self._cost_per_hr = pod.cost_per_hr or self._cost_per_hr

    def _lifetime(self, now) -> float:
        """The pod's running time over all its starts: the earlier starts' as kept on the volume, plus this one's.
        RunPod's uptime (since the last start, or since create: its docs do not say) is a floor either way; it also
        counts what ran before the agent; between polls it grows with our clock."""
        return max(self._ran_before_s + now - self._started, self._uptime_s + now - self._uptime_at)

    def _keep_running_time(self, now):
        try:
            save_running_s(self._running_file, self.config.pod_id, self._lifetime(now))
        except OSError as error:  # said once: the limits still hold for this start
            if not self._keeping_failed:
                self._keeping_failed = True
                log.error("Could not keep the pod's running time on its volume (%s): after a resume its budget and "
                          "lifetime would count from zero.", error)

    def _verdict(self) -> Verdict:
        if self._end_asked.is_set():
            return Verdict("its user asked to end it", 0.0, "asked")
        now = self._clock()
        with self._lock:
            idle = now - self._last_heartbeat
        lifetime = self._lifetime(now)
        return verdict(self.config, idle, lifetime, lifetime / 3600 * self._cost_per_hr, self._cost_per_hr)

    # -- the desktop's notice ----------------------------------------------------------------
    def _post_notice(self, current: Verdict):
        """For the desktop to show (sm-pod-notices): its first line the end as a Unix time, then what happens. Not for
        the idle timeout: a desktop that shows it is in use, which ends the idle time."""
        if current.limit == "idle" or not self.config.keeps_user_files:
            return
        ends_at = self._wall() + max(current.seconds_left, 0.0)
        files = (f"Your files in {self.config.workspace} are kept: {self._volume_cost()}." if self._ends == "stops"
                 else f"Nothing of yours is in {self.config.workspace}; it is deleted with the pod.")
        wiped = ("Your uploads (the inbox, and Slicer's DICOM database) are deleted first, as asked at the pod's "
                 "start. " if self.config.wipe_at_end else "")
        text = (f"{int(ends_at)}\n{current.sentence(self._ends)[:-1]} "
                f"(at {time.strftime('%H:%M', time.gmtime(ends_at))} UTC).\n{wiped}{files}\n")
        temporary = self._notice_file.with_name("notice.tmp")
        try:
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            with os.fdopen(descriptor, "w") as file:
                os.fchmod(file.fileno(), 0o644)  # the desktop's user reads it, whatever the umask
                file.write(text)
            os.replace(temporary, self._notice_file)
        except OSError as error:
            log.error("Could not post the notice for the desktop (%s).", error)

    def _withdraw_notice(self):
        try:
            self._notice_file.unlink(missing_ok=True)
        except OSError:
            pass  # no agent folder (no volume): there was no notice either

    def run(self, check_every_s: float = 1.0):
        """Serves heartbeats and checks until the pod is ended."""
        server = serve(self)
        log.info("Pod agent for %s on port %d: idle timeout %g s%s%s; %s.", self.config.pod_id, server.server_port,
                 self.config.idle_timeout_s,
                 f", lifetime {self.config.max_lifetime_s:g} s" if self.config.max_lifetime_s is not None else "",
                 f", budget ${self.config.budget_usd:g}" if self.config.budget_usd is not None else "",
                 f"ran {self._ran_before_s:.0f} s before this start" if self._ran_before_s else "a first start")
        try:
            self._check_come_what_may()  # the pod's cost so far is known before the first heartbeat is answered
            while not self.terminated.wait(check_every_s):
                self._check_come_what_may()
        finally:
            server.shutdown()

    def _check_come_what_may(self):
        """check(); what it did not expect is logged (once for each kind), and the watch goes on: an agent that
        died would leave the pod billing with nothing to end it."""
        try:
            self.check()
        except Exception as error:
            self._unexpected(error)

    def _unexpected(self, error: Exception):
        """Logs an error of ours (with its traceback), once for each kind."""
        if repr(error) not in self._failures:
            self._failures.add(repr(error))
            log.error("The pod agent's check failed; it goes on watching the pod.", exc_info=error)


# A thread per connection: silent sockets (anyone can open them through the proxy) must not hold threads for
# ever, nor crowd out the owner's heartbeats. A connection is closed once the time-out has passed, however it
# dribbles its bytes; beyond the cap new connections are closed at once and the client's next beat (every 30 s)
# gets in.
CONNECTION_TIMEOUT_S = 10
MAX_CONNECTIONS = 64


class _BoundedServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # socketserver's 5 would drop connections while the cap sorts them out

    def __init__(self, address, handler):
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _ReadsUntil(io.RawIOBase):
    """A socket's reads that all end by one deadline: a client sending a byte every few seconds is dropped too
    (a time-out per read never ended it)."""

    def __init__(self, connection, seconds: float):
        super().__init__()
        self.connection, self.deadline = connection, time.monotonic() + seconds

    def readable(self):
        return True

    def readinto(self, buffer):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request took longer than the agent allows")
        self.connection.settimeout(left)
        return self.connection.recv_into(buffer)


def serve(agent: PodAgent, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    refusals = Refusals(log, "heartbeat(s) without the pod's token")
    end_refusals = Refusals(log, "request(s) to end the pod without the pod's heartbeat token")

    class Handler(BaseHTTPRequestHandler):
        timeout = CONNECTION_TIMEOUT_S  # bounds the answer's writes; setup() bounds all reads by one deadline

        def setup(self):
            super().setup()
            self.rfile = io.BufferedReader(_ReadsUntil(self.connection, CONNECTION_TIMEOUT_S))

        def do_GET(self):
            if self.path != "/healthz":  # says only that the agent runs: for the image's HEALTHCHECK
                return self._answer(404, {"detail": "not found"})
            self._answer(200, {"ok": not agent.terminated.is_set()})

        def do_POST(self):
            if self.path == "/end":
                if not agent.may_end(self.headers.get("Authorization", "")):
                    end_refusals.refused(self.client_address[0])
                    return self._answer(401, {"detail": "invalid heartbeat token"})
                return self._answer(202, agent.end_now())
            if self.path != "/heartbeat":
                return self._answer(404, {"detail": "not found"})
            if not agent.authorized(self.headers.get("Authorization", "")):
                refusals.refused(self.client_address[0])
                return self._answer(401, {"detail": "invalid heartbeat token"})
            self._answer(200, agent.heartbeat(used=self.headers.get(UNUSED_HEADER) != "1"))

        def _answer(self, status, payload):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass  # the proxy logs requests; ours would only repeat them

    server = _BoundedServer((host, agent.config.port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


ALONE_LIFETIME_S = 12 * 3600  # the image's default (render_config.py), for a pod whose preparation failed


def alone_env(env) -> dict:
    """The pod's own environment, made usable where the entrypoint failed before preparing it (--alone): a limit
    that is not a number is dropped (its default holds), the lifetime defaults to the image's, and without a
    heartbeat token a random one is made (no client can keep the pod then: it ends at its idle timeout)."""
    usable = dict(env)
    for name in [n for n in usable if n.startswith("SM_") and n.endswith(("_S", "_USD", "_PER_HOUR", "_PORT"))]:
        try:
            if not float(usable[name]) > 0:  # NaN too
                raise ValueError
        except ValueError:
            log.warning("Ignoring %s=%r: not a number above 0.", name, usable.pop(name))
    usable.setdefault("SM_MAX_LIFETIME_S", str(ALONE_LIFETIME_S))
    usable["SM_HEARTBEAT_TOKEN"] = usable.get("SM_HEARTBEAT_TOKEN") or secrets.token_urlsafe(24)
    return usable


def main(argv=None) -> int:
    """`python -m SegmentationMachineLib.cloud.podagent [--alone]`: --alone where the entrypoint failed."""
    logging.basicConfig(level=logging.INFO, format="pod-agent: %(levelname)s: %(message)s", stream=sys.stderr)
    alone = "--alone" in (sys.argv[1:] if argv is None else argv)
    try:
        config = AgentConfig.from_env(alone_env(os.environ) if alone else os.environ)
    except ValueError as error:
        log.error("%s", error)
        return 2
    PodAgent(config).run()
    log.info("Pod %s ended; the agent stops.", config.pod_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
