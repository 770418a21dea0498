"""Heartbeats from a connected client (the module, `pod up`) to the pod agent, so the pod lives while used.

The agent answers with when and why the pod will end; `warning` holds its sentence once the end
is near, for the panel or the terminal to show.
"""

import threading
import time

INTERVAL_S = 60.0  # well inside the agent's idle timeout (default 15 min)
UNUSED_HEADER = "X-SM-Unused"  # "1": connected, but nobody used the pod lately; the agent then keeps nothing running
_last_use = [time.monotonic()]


def used():
    """Someone used the pod just now (a prompt, a press in the Cloud GPU section): the module's heartbeats keep it
    running for the pod's idle timeout from here. A Slicer left open with a pod connected kept it to its lifetime."""
    _last_use[0] = time.monotonic()


class Heartbeat:
    """Single use: start() once, stop() once."""

    def __init__(self, agent_url: str, token: str, watches_use: bool = False):
        """watches_use: beats say whether used() was called lately (the module); else each beat is a use (a CLI
        command keeps its pod for as long as it runs)."""
        self.url = f"{agent_url.rstrip('/')}/heartbeat"
        self.watches_use = watches_use
        self._headers = {"Authorization": f"Bearer {token}"}
        self.last = {}  # the agent's last answer
        self.problem = ""  # why the last heartbeat did not arrive; "" when it did
        self.refused = False  # the agent answered that the token is wrong
        self._stop = threading.Event()

    @property
    def warning(self) -> str:
        return self.last.get("warning", "")

    def beat(self) -> bool:
        import requests

        # Used within two intervals: a use is carried by the next beat, however the beats fall.
        unused = self.watches_use and time.monotonic() - _last_use[0] > 2 * INTERVAL_S
        try:
            answer = requests.post(self.url, headers={**self._headers, **({UNUSED_HEADER: "1"} if unused else {})},
                                   timeout=15.0)
        except requests.RequestException:
            self.problem = "the pod agent did not answer (the pod may still be starting, or it was terminated)"
            return False
        self.refused = answer.status_code == 401
        if answer.status_code != 200:
            self.problem = f"the pod agent answered {answer.status_code}"
            return False
        try:
            self.last, self.problem = answer.json(), ""
        except ValueError:
            self.problem = "the pod agent's answer was not JSON (is something else on its port?)"
            return False
        return True

    def start(self) -> "Heartbeat":
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def stop(self):
        self._stop.set()  # no join: a beat in flight ends by itself, and the GUI must not wait for it

    def _run(self):
        while True:
            beaten = time.monotonic()
            try:
                self.beat()
            except Exception as error:  # a surprise must not end the heartbeats: the pod would be ended as idle
                self.problem = f"heartbeat failed: {error}"
            if self.refused:  # a refused token stays refused: no log flood
                return
            while (left := INTERVAL_S - (time.monotonic() - beaten)) > 0:
                if self._stop.wait(min(1.0, left)):
                    return
                if self.watches_use and self.warning and _last_use[0] > beaten:
                    break  # used after the pod said it ends soon: told now, not up to a minute later
