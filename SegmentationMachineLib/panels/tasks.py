"""Work on daemon threads that the widget polls from the main thread, and the GIL lent to them.

Inside Slicer the main thread holds the GIL while Qt's event loop idles (PythonQt runs without
thread support), so a worker thread advances only while main-thread Python releases it. The
module's pump timer calls share_gil() every PUMP_INTERVAL_MS: while a task runs, the main thread
waits up to SHARE_S (events queue meanwhile), which gives the workers most of the time.
"""

import logging
import sys
import threading

from ..core.errors import UserError
from ..core.memory import out_of_memory

PUMP_INTERVAL_MS = 10
SHARE_S = 0.02  # the longest the GUI waits per tick; ticks then follow each other, so workers get most of the time
SWITCH_WHILE_SHARING_S = 0.001  # so the main thread gets the GIL back within ms, not 5 ms per try

log = logging.getLogger("segmentation-machine")
_running = 0  # BackgroundTasks not yet done
_changed = threading.Condition()


def share_gil(seconds: float = SHARE_S) -> bool:
    """Main thread, from the pump timer: lets worker threads run until none is running, for at most seconds.

    Returns whether a task is still running. Without one it returns at once."""
    with _changed:  # waiting on a condition releases the GIL
        if _running == 0:
            return False
        interval = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_WHILE_SHARING_S)
        try:
            return not _changed.wait_for(lambda: _running == 0, seconds)
        finally:
            sys.setswitchinterval(interval)


class BackgroundTask:
    """A function on a daemon thread; poll() from the main thread says when it is done."""

    def __init__(self, function, *args):
        global _running
        self.result = None
        self.error = None
        self._done = threading.Event()
        with _changed:
            _running += 1
        threading.Thread(target=self._run, args=(function, *args), daemon=True).start()

    def _run(self, function, *args):
        global _running
        try:
            self.result = function(*args)
        except Exception as error:  # handed to the main thread, which shows or re-raises it
            self.error = error
        finally:
            self._done.set()
            with _changed:
                _running -= 1
                _changed.notify_all()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float = None) -> bool:
        return self._done.wait(timeout)

    def outcome(self):
        """(result, None) on success, (None, sentence) for a user's mistake or memory running out, the sentence also
        logged (Slicer's log keeps what the status line loses at the next change); a bug is re-raised."""
        if isinstance(self.error, (UserError, MemoryError)):  # Slicer goes on: the worker's arrays are freed with it
            sentence = str(self.error) if isinstance(self.error, UserError) else out_of_memory()
            log.warning("%s", sentence)
            return None, sentence
        if self.error:
            raise self.error
        return self.result, None
