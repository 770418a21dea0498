"""Times people read in logs and status files."""

import time
from datetime import datetime


def local_time(timestamp: float = None) -> str:
    """Local time with its UTC offset, to the second (time.strftime's %z gives a zone's name on Windows)."""
    return datetime.fromtimestamp(time.time() if timestamp is None else timestamp).astimezone().isoformat(
        timespec="seconds")
