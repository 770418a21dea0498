"""A desktop pod's patient data wiped at its end (`pod up --mode desktop --wipe-at-end`), before its agent stops it.

A stopped pod keeps its volume, and the uploads on it, until `pod down`. With SM_WIPE_AT_END=1 the agent, before it
ends the pod at its idle timeout, lifetime or budget, has the uploaded DICOM and what was made of it deleted: the
inbox, the upload page's part files, the inbox's journal and unpacked zips, and Slicer's DICOM database (its copies
of imported files and its index of patients). Exports and saved scenes are the user's work and stay.

The agent runs as its own user, who may not touch the desktop user's files; this wiper runs as the desktop user, who
owns them, and does nothing else. The agent asks through a file only it may write (REQUEST), the wiper answers through
one only it may write (ANSWER); both lie on the container disk, which a stop clears, so no request outlives a start.
A link is deleted as a link, never followed: nothing outside those folders is touched.
"""

import json
import logging
import os
import secrets
import shutil
import stat
import sys
import time
from pathlib import Path

log = logging.getLogger("segmentation-machine.wipe")

# Under the pod's volume (docker/entrypoint.sh makes them, the desktop user's): emptied, themselves kept.
WIPED = ("inbox", ".uploads", ".inbox-state", os.path.join(".desktop", "SlicerDICOMDatabase"))
REQUEST = "/run/segmentation-machine/agent/wipe"  # the agent's folder
ANSWER = "/run/segmentation-machine/wiper/wiped"  # the wiper's folder
WAIT_S = 120.0  # the agent's wait for the answer; then it stops the pod all the same (the GPU bills meanwhile)


def _entries_removed(folder_fd: int) -> list:
    """Deletes every entry of the open folder; the problems, without file names (an upload's name may be a
    patient's)."""
    problems = []
    for name in os.listdir(folder_fd):
        try:
            if stat.S_ISDIR(os.stat(name, dir_fd=folder_fd, follow_symlinks=False).st_mode):
                shutil.rmtree(name, dir_fd=folder_fd)  # fd-based on Linux: never follows a link, even one swapped in
            else:
                os.unlink(name, dir_fd=folder_fd)
        except OSError as error:
            problems.append(error.strerror or type(error).__name__)
    return problems


def empty(workspace, relative: str) -> list:
    """Empties workspace/relative, reached without following a link; the problems found ([] when none)."""
    try:
        folder = os.open(workspace, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return []  # no volume
    try:
        for part in Path(relative).parts:
            try:
                inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=folder)
            except FileNotFoundError:
                return []  # never made: nothing to wipe
            except OSError as error:  # a link or a file where the folder should be: not followed, left alone
                return [f"{relative} is not a folder ({error.strerror})"]
            os.close(folder)
            folder = inner
        problems = _entries_removed(folder)
    finally:
        os.close(folder)
    entries = f"{len(problems)} entr{'y' if len(problems) == 1 else 'ies'}"
    return [f"{entries} in {relative} could not be deleted ({', '.join(sorted(set(problems)))})"] if problems else []


def wipe(workspace) -> list:
    """Empties every WIPED folder of workspace; the problems found ([] when all is gone)."""
    problems = []
    for relative in WIPED:
        try:
            problems += empty(workspace, relative)
        except OSError as error:
            problems.append(f"{relative} could not be read ({error.strerror})")
    return problems


def _write_shared(path: Path, text: str):
    """Replaces path at once, readable by the other side (the agent's and the wiper's users differ)."""
    temporary = path.with_name(path.name + ".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(descriptor, "w") as file:
        os.fchmod(file.fileno(), 0o644)  # whatever the umask
        file.write(text)
    os.replace(temporary, path)


def _read(path) -> str:
    try:
        return Path(path).read_text()
    except (FileNotFoundError, UnicodeDecodeError):
        return ""


def ask(request, answer, wait_s: float = WAIT_S, poll_s: float = 0.2):
    """The agent's side: asks the wiper to wipe and waits for its answer. (True, problems) once answered, (False,
    []) when no answer came in wait_s. Raises OSError where the request cannot be written."""
    nonce = secrets.token_hex(8)  # this request's: an answer to an earlier one is not this one's
    _write_shared(Path(request), nonce)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            answered = json.loads(_read(answer) or "{}")
        except ValueError:
            answered = {}
        if isinstance(answered, dict) and answered.get("nonce") == nonce:
            return True, [str(problem) for problem in answered.get("problems", [])]
        if time.monotonic() >= deadline:
            return False, []
        time.sleep(poll_s)


def serve(workspace, request, answer, poll_s: float = 0.5, stop=None):
    """The wiper's side: wipes once for each new request and answers it, until stop (an Event) is set."""
    done = None
    while not (stop and stop.is_set()):
        nonce = _read(request).strip()
        if nonce and nonce != done:
            problems = wipe(workspace)
            for problem in problems:
                log.error("Not wiped: %s.", problem)
            log.warning("Wiped the uploaded DICOM in %s%s.", workspace, " in part" if problems else "")
            _write_shared(Path(answer), json.dumps({"nonce": nonce, "problems": problems}))
            done = nonce
        time.sleep(poll_s)


def main() -> int:
    """`python -m SegmentationMachineLib.cloud.wipe`, as the desktop user (the image's supervisord starts it)."""
    logging.basicConfig(level=logging.INFO, format="wiper: %(levelname)s: %(message)s", stream=sys.stderr)
    serve(os.environ.get("SM_WORKSPACE") or "/workspace", os.environ.get("SM_WIPE_REQUEST") or REQUEST,
          os.environ.get("SM_WIPE_ANSWER") or ANSWER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
