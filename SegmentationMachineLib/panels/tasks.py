"""Work on a daemon thread that the widget polls from the main thread."""

import threading

from ..core.errors import UserError


class BackgroundTask:
    """A function on a daemon thread; poll() from the main thread says when it is done."""

    def __init__(self, function, *args):
        self.result = None
        self.error = None
        self._done = threading.Event()
        threading.Thread(target=self._run, args=(function, *args), daemon=True).start()

    def _run(self, function, *args):
        try:
            self.result = function(*args)
        except Exception as error:  # handed to the main thread, which shows or re-raises it
            self.error = error
        finally:
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float = None) -> bool:
        return self._done.wait(timeout)

    def outcome(self):
        """(result, None) on success, (None, sentence) for a user's mistake; a bug is re-raised."""
        if isinstance(self.error, UserError):
            return None, str(self.error)
        if self.error:
            raise self.error
        return self.result, None
