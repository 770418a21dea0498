"""The real upstream nnInteractive server, started on loopback for the tests."""

import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

# Loopback must never go through a proxy.
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
TESTING = Path(__file__).resolve().parent  # on the server's path: the slow test network lives here


def _ephemeral_ports() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return range(low, high + 1)


def free_port() -> int:
    """A free port outside the ephemeral range. Not one the kernel picks (bind to port 0): the kernel gives the same
    range to every outgoing connection's local end, and one of the tests' many connections took such a port between
    this pick and a slow-starting server's bind, which then exited (CI, session 27)."""
    ephemeral = _ephemeral_ports()
    while True:
        port = random.randrange(10000, 65536)
        if port in ephemeral:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


class Server:
    """nninteractive-server on 127.0.0.1 with --no-autozoom (autozoom=True: with autozoom, as a pod runs it), CPU, an
    API key and the test model."""

    def __init__(self, model_dir: Path, api_key: str, port: int = None, *extra, autozoom: bool = False):
        self.model_dir, self.api_key, self.extra = model_dir, api_key, list(extra)
        self.autozoom = autozoom
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self, timeout: float = 180):  # 5 s here, 17 s on a loaded 2-core machine
        executable = Path(sys.executable).with_name("nninteractive-server")
        self.log = open(self.model_dir.parent / f"server-{self.port}.log", "ab")
        path = os.pathsep.join(filter(None, [str(TESTING), os.environ.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            [str(executable), "--model-dir", str(self.model_dir), "--fold", "0", "--device", "cpu",
             "--host", "127.0.0.1", "--port", str(self.port), f"--api-key={self.api_key}",  # a key may start with "-"
             "--torch-n-threads", "1", *([] if self.autozoom else ["--no-autozoom"]), *self.extra],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"})  # log lines (counted) as they happen
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the server exited: {self._log_tail()}"
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the server did not answer within {timeout} s; see {self.log.name}")

    def _log_tail(self) -> str:
        return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-15:])

    def count(self, text: str) -> int:
        """How often text occurs in the server's log (one access line per answered request, e.g.
        '"POST /claim', and one 'Added new point interaction' per point the model started on)."""
        return Path(self.log.name).read_text(errors="replace").count(text)

    def logged(self, text: str, timeout: float = 30) -> int:
        """count(text) once text is in the log, or after timeout: the server logs a failure's traceback after it
        has answered HTTP 500, so on a busy machine the client hears of it first."""
        deadline = time.monotonic() + timeout
        while not self.count(text) and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.count(text)

    def stop(self):
        # SIGTERM does not stop it during a prediction: TERM, then KILL.
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self.process:
            self.log.close()
        self.process = None
