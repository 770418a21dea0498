"""The module's section bindings (Qt), in a package: Slicer loads every .py file directly in a module folder
as a module of its own, so only SegmentationMachine.py sits there."""

import contextlib


@contextlib.contextmanager
def errorsShown(message: str, waitCursor: bool = False):
    """Shows an error as slicer.util.tryWithErrorDisplay does, then carries on: that one re-raises
    (Base/Python/slicer/util.py), which would skip the rest of a timer tick or a button's update."""
    import slicer

    try:
        with slicer.util.tryWithErrorDisplay(message, waitCursor=waitCursor):
            yield
    except Exception:  # already shown to the user, with its details
        pass


def timer(interval_ms: int, slot):
    """A QTimer that calls slot every interval_ms once started."""
    import qt

    result = qt.QTimer()
    result.setInterval(interval_ms)
    result.timeout.connect(slot)
    return result
