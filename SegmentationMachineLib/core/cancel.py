"""A Cancel button's request, read by long work at its safe points (between segments, formats, instances sent).

The button's thread only sets a flag; the work stops at its next check, where nothing is half done, and says what
happened in its own sentence (Cancelled, a UserError: the panels show it as any other).
"""

import threading

from .errors import UserError


class Cancelled(UserError):
    """The work stopped because the user asked; its message says what was kept and what was not."""


class CancelRequest:
    """Set from any thread (the Cancel button), checked on the worker's."""

    def __init__(self):
        self._set = threading.Event()

    def cancel(self):
        self._set.set()

    @property
    def requested(self) -> bool:
        return self._set.is_set()

    def check(self, sentence: str):
        """At a safe point: raises Cancelled(sentence) once cancel() was called."""
        if self._set.is_set():
            raise Cancelled(sentence)
