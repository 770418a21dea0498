"""A Cancel button's request, read by long work at its safe points (between segments, formats, instances sent).

The button's thread only sets a flag; the work stops at its next check, where nothing is half done, and says what
happened in its own sentence (Cancelled, a UserError: the panels show it as any other). A cancel the user did not
ask for (Close Scene) gives its cause, which comes before that sentence.
"""

import threading

from .errors import UserError

SCENE_CLOSED = "The scene was closed."  # the cause of a cancel at Close Scene: its work was the closed scene's


class Cancelled(UserError):
    """The work stopped because the user asked (or closed the scene); its message says what was kept, what was not."""


class CancelRequest:
    """Set from any thread (the Cancel button), checked on the worker's."""

    def __init__(self):
        self._set = threading.Event()
        self.cause = ""  # why, where the user did not press Cancel: a sentence

    def cancel(self, cause: str = ""):
        """The first cancel's cause stays (a Cancel pressed after Close Scene does not make it the user's)."""
        if not self._set.is_set():
            self.cause = cause
            self._set.set()

    @property
    def requested(self) -> bool:
        return self._set.is_set()

    def check(self, sentence: str):
        """At a safe point: raises Cancelled(sentence, after the cause) once cancel() was called."""
        if self._set.is_set():
            raise Cancelled(" ".join(filter(None, [self.cause, sentence])))
