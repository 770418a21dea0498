"""The headless processing queue: every ready inbox series through the model pipeline, one at a time.

OUTBOX/status.json says where each series stands (waiting, processing, done, failed + reason)
and is rewritten whole after every change, so a reader never sees half of it. A series the
queue was interrupted in is not acknowledged, so the next run processes it again.
"""

import json
import os
import threading
import time
from pathlib import Path

from ..core.errors import UserError
from .watcher import Inbox, SeriesState

STATUS_NAME = "status.json"


class StatusBoard:
    def __init__(self, outbox: Path, inbox_folder: Path):
        self.path = Path(outbox) / STATUS_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._inbox = str(inbox_folder)
        self._series = {}
        if self.path.exists():  # a restart continues the same board
            try:
                self._series = {s["key"]: s for s in json.loads(self.path.read_text())["series"]}
            except (ValueError, KeyError, TypeError):
                self._series = {}

    def get(self, key: str) -> dict:
        return self._series.get(key, {})

    def set(self, key: str, name: str, files: int, state: str, reason: str = "", result: str = ""):
        entry = {"key": key, "name": name, "files": files, "state": state, "reason": reason, "result": result,
                 "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if {k: v for k, v in self.get(key).items() if k != "updated"} == {k: v for k, v in entry.items() if k != "updated"}:
            return
        self._series[key] = entry
        temporary = self.path.with_name(f".{STATUS_NAME}.partial")
        temporary.write_text(json.dumps({"inbox": self._inbox, "updated": entry["updated"],
                                         "series": list(self._series.values())}, indent=2))
        os.replace(temporary, self.path)  # our own file: replaced whole, never seen half-written


def run_queue(inbox: Inbox, outbox: Path, process, once: bool = False, echo=print,
              stop: threading.Event = None, tick: float = 0.5):
    """Processes ready series until stopped (or, with once, until nothing is left to settle or process).

    process(delivery) returns the result folder; a UserError marks the series failed with its sentence.
    """
    stop = stop or threading.Event()
    board = StatusBoard(outbox, inbox.options.folder)
    while not stop.is_set():
        deliveries = inbox.poll()
        for status in inbox.statuses():
            if status.state == SeriesState.WAITING and board.get(status.key).get("state") != "waiting":
                board.set(status.key, status.name, status.files, "waiting")
                echo(f"{status.name}: waiting for its files to settle")
        for delivery in deliveries:
            series = delivery.series
            board.set(delivery.key, series.name, len(series.files), "processing")
            echo(f"{series.name}: processing {len(series.files)} files" + (" (an update)" if delivery.is_update else ""))
            try:
                result = str(process(delivery))
            except UserError as error:
                inbox.acknowledge(delivery, False, str(error))
                board.set(delivery.key, series.name, len(series.files), "failed", str(error))
                echo(f"{series.name}: failed: {error}")
                continue
            except BaseException:
                board.set(delivery.key, series.name, len(series.files), "waiting", "interrupted; processed again on restart")
                raise
            inbox.acknowledge(delivery, True, result=result)
            board.set(delivery.key, series.name, len(series.files), "done", result=result)
            echo(f"{series.name}: done → {result}")
        if once and not deliveries and not inbox.pending():
            return board
        stop.wait(tick)
    return board
