"""Refused requests said in a log at most once a minute, with their number."""

import threading
import time


class Refusals:
    """A stranger's requests must not flood a pod's log, where its start prints the generated credentials once."""

    def __init__(self, log, what: str, every_s: float = 60.0):
        self.log, self.what, self.every_s = log, what, every_s
        self.lock, self.said_at, self.unsaid = threading.Lock(), None, 0

    def refused(self, address: str):
        with self.lock:
            self.unsaid += 1
            if self.said_at is not None and time.monotonic() - self.said_at < self.every_s:
                return
            count, self.unsaid, self.said_at = self.unsaid, 0, time.monotonic()
        self.log.warning("Refused %d %s (the last from %s).", count, self.what, address)
