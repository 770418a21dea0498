"""Lines C libraries write straight to file descriptor 2, where Python's logging cannot filter them."""

import os
import re
import sys
import tempfile
import threading
from contextlib import contextmanager

_ONE_AT_A_TIME = threading.Lock()  # descriptor 2 is the process's: two captures at once would lose lines


@contextmanager
def dropping(noise: re.Pattern):
    """Descriptor 2's lines that match noise are dropped; the others, our own logging's from other threads included,
    are written once the block ends, in their order."""
    with _ONE_AT_A_TIME, tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = b"".join(line for line in captured if not noise.search(line))
            with os.fdopen(os.dup(2), "wb") as stderr:
                stderr.write(kept)
