"""The watch queue under faults (issue 16, items 17-23): kill -9 at every step of a delivery, a full
disk, a second watcher, signals, files that resume growing, series that arrive with gaps."""

import errno
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from conftest import UNCOMPRESSED_SERIES
from SegmentationMachineLib.inbox.locks import FolderInUse
from SegmentationMachineLib.inbox.watcher import Inbox, InboxError, InboxOptions, SeriesState
from SegmentationMachineLib.core.errors import UserError
from SegmentationMachineLib.inbox import watchqueue
from SegmentationMachineLib.inbox.watchqueue import BOARD_DAYS, run_queue

REPO = Path(__file__).resolve().parents[1]
SETTLE = 0.5
SLICES = sorted(UNCOMPRESSED_SERIES.iterdir()) if UNCOMPRESSED_SERIES.is_dir() else []


def started(inbox_folder, state, **options) -> Inbox:
    options = {"settle_seconds": SETTLE, "hold_seconds": 1.5, **options}
    inbox = Inbox(InboxOptions(folder=inbox_folder, state_folder=state, **options))
    inbox.start()
    return inbox


def export(delivery, folder: Path) -> Path:
    """What the pipeline leaves in its folder: a mesh, then report.json last."""
    result = folder / "CT_model"
    result.mkdir()
    (result / "model.stl").write_bytes(b"solid model\nendsolid model\n")
    (result / "report.json").write_text(json.dumps({"files": len(delivery.series.files)}))
    return result


def queue_once(inbox_folder, state, outbox, process=export, **options) -> tuple:
    """(status.json, echoed lines) after one run of the queue until nothing is left."""
    lines = []
    inbox = started(inbox_folder, state, **options)
    try:
        run_queue(inbox, outbox, process, once=True, echo=lines.append, tick=0.05)
    finally:
        inbox.stop()
    return json.loads((outbox / "status.json").read_text()), lines


# A child process that runs the queue and SIGKILLs itself right after one chosen step of a delivery.
CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    sys.path[:0] = [sys.argv[1], sys.argv[1] + "/Testing"]
    from test_inbox_faults import export, queue_once
    from SegmentationMachineLib.inbox import watchqueue

    step, inbox, state, outbox, log = sys.argv[2:]

    def killed_after(function):
        def run(*args):
            function(*args)
            os.kill(os.getpid(), signal.SIGKILL)
        return run

    def logged_export(delivery, folder):
        with open(log, "a") as stream:
            stream.write("processed\\n")
        return (killed_after(export) if step == "export" else export)(delivery, folder)

    if step != "export":
        setattr(watchqueue, step, killed_after(getattr(watchqueue, step)))
    queue_once(Path(inbox), Path(state), Path(outbox), logged_export)
""")


@pytest.mark.parametrize("step, processed", [("export", 2), ("_reserve", 2), ("_commit", 1), ("publish_folder", 1)])
def test_a_kill_at_any_step_of_a_delivery_leaves_exactly_one_result_and_a_true_board(
        tmp_path, shared_data, step, processed):
    inbox_folder, state, outbox, log = tmp_path / "inbox", tmp_path / "state", tmp_path / "outbox", tmp_path / "log"
    inbox_folder.mkdir()
    for path in SLICES:
        (inbox_folder / path.name).write_bytes(path.read_bytes())
    child = subprocess.run([sys.executable, "-c", CHILD, str(REPO), step, str(inbox_folder), str(state), str(outbox),
                            str(log)], capture_output=True, text=True, timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stderr
    # The next start reconciles with the journal, then processes what was not committed.
    board, _ = queue_once(inbox_folder, state, outbox, lambda d, f: log.open("a").write("processed\n") and export(d, f))
    assert log.read_text().count("processed") == processed
    [entry] = board["series"]
    assert entry["state"] == "done" and Path(entry["result"]).is_absolute()
    assert sorted(p.name for p in outbox.iterdir()) == [".status.lock", "CT_model", "status.json"]
    assert sorted(p.name for p in Path(entry["result"]).iterdir()) == ["model.stl", "report.json"]


def test_a_result_an_older_version_staged_and_committed_before_a_kill_is_published(tmp_path, shared_data):
    """Versions before 2026-11-27 staged results in OUTBOX/.staging: one committed there before a kill had no result
    after the upgrade, and its patient data stayed behind."""
    inbox_folder, state, outbox, log = tmp_path / "inbox", tmp_path / "state", tmp_path / "outbox", tmp_path / "log"
    inbox_folder.mkdir()
    for path in SLICES:
        (inbox_folder / path.name).write_bytes(path.read_bytes())
    child = subprocess.run([sys.executable, "-c", CHILD, str(REPO), "publish_folder", str(inbox_folder), str(state),
                            str(outbox), str(log)], capture_output=True, text=True, timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stderr
    (outbox / ".segmentation-machine-staging").rename(outbox / ".staging")  # where the older version staged it
    board, _ = queue_once(inbox_folder, state, outbox, lambda d, f: log.open("a").write("processed\n") and export(d, f))
    [entry] = board["series"]
    assert log.read_text().count("processed") == 1 and entry["state"] == "done"
    assert sorted(p.name for p in Path(entry["result"]).iterdir()) == ["model.stl", "report.json"]
    assert sorted(p.name for p in outbox.iterdir()) == [".status.lock", "CT_model", "status.json"]


def test_a_full_disk_fails_one_series_with_one_sentence_and_the_queue_goes_on(tmp_path, shared_data):
    inbox_folder, state, outbox = tmp_path / "inbox", tmp_path / "state", tmp_path / "outbox"
    for folder in ("a", "b"):  # two series: the same slices, told apart by folder when UIDs are blank
        (inbox_folder / folder).mkdir(parents=True)
    for path in SLICES:
        (inbox_folder / "a" / path.name).write_bytes(path.read_bytes())
    from SegmentationMachineLib.dicom.phantom import make_phantom, write_ct_series
    write_ct_series(inbox_folder / "b", make_phantom(shape=(4, 32, 32)).hu, 1.5,
                    [(0, 0, 2.0 * k) for k in range(4)], "second")

    def export_to_a_full_disk(delivery, folder):
        if "second" not in delivery.series.name:
            with open("/dev/full", "wb") as disk:  # the kernel's own "No space left on device"
                disk.write(b"mesh")
                disk.flush()
        return export(delivery, folder)

    board, lines = queue_once(inbox_folder, state, outbox, export_to_a_full_disk)
    states = {entry["name"]: (entry["state"], entry["reason"]) for entry in board["series"]}
    assert states["CT 'second'"] == ("done", "")
    [(state_, reason)] = [v for k, v in states.items() if k != "CT 'second'"]
    assert state_ == "failed" and reason == "The disk is full: free some space, then restart watch to process this series again."
    assert not (outbox / ".segmentation-machine-staging").exists() and len([p for p in outbox.iterdir() if p.is_dir()]) == 1
    assert not any("Traceback" in line for line in lines)
    # As the sentence says: space freed, a restart processes it (a full disk is not remembered as the series' failure).
    board, lines = queue_once(inbox_folder, state, outbox)
    assert sorted((entry["state"], entry["reason"]) for entry in board["series"]) == [("done", ""), ("done", "")]
    assert [line for line in lines if ": processing" in line] == ["CT 'series 2': processing 3 files"]  # only it


def test_a_second_watcher_on_the_same_folders_is_refused_naming_the_first(tmp_path):
    inbox_folder, state = tmp_path / "inbox", tmp_path / "state"
    inbox_folder.mkdir()
    first = started(inbox_folder, state)
    with pytest.raises(FolderInUse, match=rf"The inbox state folder .* is in use by process {os.getpid()} on "):
        started(inbox_folder, state)
    first.stop()
    started(inbox_folder, state).stop()  # released at stop (and by the OS when a process dies)


def watch_command(inbox_folder, outbox, *extra) -> list:
    return [sys.executable, "-m", "SegmentationMachineLib.cli", "watch", str(inbox_folder), "--out", str(outbox),
            "--settle", "0.5", "--hold", "1", "--format", "stl", *extra]


@pytest.mark.parametrize("signal_number", [signal.SIGHUP, signal.SIGTERM])
def test_watch_ends_on_a_closed_terminal_or_a_service_stop_like_ctrl_c(tmp_path, signal_number):
    inbox_folder, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox_folder.mkdir()
    (inbox_folder / "evil\n\x1b[31mname.txt").write_text("not an image")
    log = tmp_path / "watch.log"
    watcher = subprocess.Popen(watch_command(inbox_folder, outbox, "--log", str(log)), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL, cwd=REPO)
    assert watcher.stdout.readline().startswith("Watching ")
    if signal_number == signal.SIGHUP:  # meanwhile, a second watch on the same folders is refused
        second = subprocess.run(watch_command(inbox_folder, outbox, "--once"), capture_output=True, text=True,
                                timeout=60, cwd=REPO)
        assert second.returncode == 2 and f"is in use by process {watcher.pid} on " in second.stderr
    deadline = time.monotonic() + 60
    while "Skipped " not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.1)  # the junk file reported
    watcher.send_signal(signal_number)
    out, err = watcher.communicate(timeout=30)
    assert watcher.returncode == 128 + signal_number and "Traceback" not in err and "Stopped; run" in out
    assert "Skipped " in err and "evil\\n\\x1b[31mname.txt: not a DICOM file" in err and "\x1b" not in err


def test_a_series_with_gaps_is_held_then_delivered_marked_incomplete(tmp_path, shared_data):
    inbox_folder, state, outbox = tmp_path / "inbox", tmp_path / "state", tmp_path / "outbox"
    inbox_folder.mkdir()
    for path in SLICES[0], SLICES[2]:  # instance numbers 1 and 3: the middle slice has not arrived
        (inbox_folder / path.name).write_bytes(path.read_bytes())
    inbox = started(inbox_folder, state)
    started_at, deliveries = time.monotonic(), []
    while not deliveries and time.monotonic() - started_at < 5:
        deliveries = inbox.poll()
        time.sleep(0.05)
        if not deliveries and time.monotonic() - started_at > SETTLE + 0.6:
            [status] = inbox.statuses()
            assert status.state == SeriesState.WAITING and status.reason == (
                "Looks incomplete (1 instance number(s) between 1 and 3 are missing): held for more files")
    assert time.monotonic() - started_at >= 1.5  # the hold
    [delivery] = deliveries
    assert delivery.incomplete == "1 instance number(s) between 1 and 3 are missing"
    inbox.acknowledge(delivery, True)
    inbox.stop()
    # Through the queue: the result is marked, in the board and in what is printed.
    board, lines = queue_once(inbox_folder, tmp_path / "state2", outbox)
    [entry] = board["series"]
    assert entry["state"] == "done" and entry["reason"] == "Looks incomplete: 1 instance number(s) between 1 and 3 are missing."
    assert any(line.endswith("(looks incomplete: 1 instance number(s) between 1 and 3 are missing)") for line in lines)


def test_a_series_that_looks_incomplete_is_held_from_its_last_file_and_a_single_slice_is_held_too(tmp_path,
                                                                                                  shared_data):
    """On a clock the test advances, a second a poll: the first slice alone is held (a single slice so far); a slice
    with a gap before it arrives 8 s later, and the hold runs from that one, not from the first (which delivered a
    series still arriving, slice by slice over more than the hold, as incomplete)."""
    inbox_folder = tmp_path / "inbox"
    inbox_folder.mkdir()
    now = [0.0]
    inbox = Inbox(InboxOptions(folder=inbox_folder, state_folder=tmp_path / "state", settle_seconds=1.0, polling=True,
                               poll_interval=0.5, hold_seconds=10.0), clock=lambda: now[0])
    inbox.start()

    def polls_until(second) -> list:
        delivered = []
        while now[0] < second:
            now[0] += 1
            delivered += inbox.poll()
        return delivered

    try:
        (inbox_folder / SLICES[0].name).write_bytes(SLICES[0].read_bytes())
        assert polls_until(8) == []
        assert [(s.state, s.reason) for s in inbox.statuses()] == [
            (SeriesState.WAITING, "Looks incomplete (it has a single slice so far): held for more files")]
        (inbox_folder / SLICES[2].name).write_bytes(SLICES[2].read_bytes())  # instance 3: 2 has not arrived
        assert polls_until(17) == []  # 10 s after the first slice, 9 s after the last
        assert [(s.state, s.reason) for s in inbox.statuses()] == [(SeriesState.WAITING, "Looks incomplete (1 "
                                                                   "instance number(s) between 1 and 3 are missing): "
                                                                   "held for more files")]
        [delivery] = polls_until(21)  # the hold ran out 10 s after the last slice was seen, at 19
        assert delivery.incomplete == "1 instance number(s) between 1 and 3 are missing"
    finally:
        inbox.stop()

def test_a_topogram_is_not_held_for_more_files_and_a_lone_ct_slice_still_is(tmp_path, shared_data):
    """A CT study's one-image topogram (ImageType LOCALIZER) was held the whole hold time as 'a single slice so far',
    then skipped as a single slice: nearly every study waited a minute for it. On a clock the test advances."""
    inbox_folder = tmp_path / "inbox"
    # As a Siemens scanner writes a topogram: LOCALIZER is not always the last value
    for name, image_type in (("topogram", ["ORIGINAL", "PRIMARY", "LOCALIZER", "CT_SOM5 TOP"]),
                             ("lone", ["ORIGINAL", "PRIMARY", "AXIAL"])):
        ds = pydicom.dcmread(SLICES[0])
        ds.SeriesInstanceUID, ds.SeriesDescription, ds.ImageType = generate_uid(), name, image_type
        (inbox_folder / name).mkdir(parents=True)
        ds.save_as(inbox_folder / name / "1.dcm")
    now = [0.0]
    inbox = Inbox(InboxOptions(folder=inbox_folder, state_folder=tmp_path / "state", settle_seconds=1.0, polling=True,
                               poll_interval=0.5, hold_seconds=60.0), clock=lambda: now[0])
    inbox.start()
    try:
        delivered = []
        while now[0] < 5:
            now[0] += 1
            delivered += inbox.poll()
        [topogram] = delivered  # within the settle time, not after the 60 s hold
        assert (topogram.series.name, topogram.incomplete) == ("CT 'topogram'", "")
        assert [(s.name, s.state, s.reason) for s in inbox.statuses() if s.name != "CT 'topogram'"] == [
            ("CT 'lone'", SeriesState.WAITING, "Looks incomplete (it has a single slice so far): held for more files")]
    finally:
        inbox.stop()


def test_polling_rereads_a_file_that_resumes_growing_and_a_partial_file_is_not_called_truncated(tmp_path, shared_data):
    inbox_folder, state = tmp_path / "inbox", tmp_path / "state"
    inbox_folder.mkdir()
    for path in SLICES[:2]:
        (inbox_folder / path.name).write_bytes(path.read_bytes())
    last = SLICES[2].read_bytes()
    growing = inbox_folder / SLICES[2].name
    growing.write_bytes(last[:len(last) // 2])  # the upload pauses halfway
    inbox = started(inbox_folder, state, polling=True, poll_interval=0.2)
    deadline = time.monotonic() + 1.2  # within the hold: an upload in progress, not a bad file
    while time.monotonic() < deadline:
        assert inbox.poll() == [] and growing not in inbox.bad_files
        time.sleep(0.05)
    first = []
    while not first and time.monotonic() < deadline + 3:  # the hold is over: the two whole slices go
        first = inbox.poll()
        time.sleep(0.05)
    assert [len(d.series.files) for d in first] == [2] and inbox.bad_files[growing].startswith("truncated")
    inbox.acknowledge(first[0], True)
    with open(growing, "ab") as stream:  # the upload resumes long after the pause
        stream.write(last[len(last) // 2:])
    update = []
    deadline = time.monotonic() + 4
    while not update and time.monotonic() < deadline:
        update = inbox.poll()
        time.sleep(0.05)
    assert [(len(d.series.files), d.is_update) for d in update] == [(3, True)] and growing not in inbox.bad_files
    inbox.stop()


def test_status_json_paths_are_absolute_whatever_the_working_directory(tmp_path, shared_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("inbox").mkdir()
    for path in SLICES:
        (Path("inbox") / path.name).write_bytes(path.read_bytes())
    board, _ = queue_once(Path("inbox"), Path("state"), Path("outbox"))
    assert board["inbox"] == str(tmp_path / "inbox") and board["series"][0]["result"] == str(tmp_path / "outbox" / "CT_model")


def test_an_unexpected_error_fails_that_series_once_and_the_queue_goes_on(tmp_path, shared_data, caplog):
    """A bug (ours or a library's) in one series marks it failed, says so, and is not retried on every restart. Its
    words (a library's may quote a header value) reach the log only, not status.json nor the journal."""
    inbox_folder, state, outbox = tmp_path / "inbox", tmp_path / "state", tmp_path / "outbox"
    from SegmentationMachineLib.dicom.phantom import make_phantom, write_ct_series
    for name in ("first", "second"):
        write_ct_series(inbox_folder / name, make_phantom(shape=(4, 32, 32)).hu, 1.5,
                        [(0, 0, 2.0 * k) for k in range(4)], name)
    attempts = []

    def export_with_a_bug(delivery, folder):
        attempts.append(delivery.series.name)
        if "first" in delivery.series.name:
            raise AttributeError("'FileDataset' object has no attribute 'PatientBirthDate'")
        return export(delivery, folder)

    board, lines = queue_once(inbox_folder, state, outbox, export_with_a_bug)
    states = {entry["name"]: (entry["state"], entry["reason"]) for entry in board["series"]}
    assert states["CT 'second'"] == ("done", "")
    assert states["CT 'first'"][0] == "failed"
    assert states["CT 'first'"][1] == watchqueue.UNEXPECTED and f"CT 'first': failed: {watchqueue.UNEXPECTED}" in lines
    assert "An unexpected error stopped series CT 'first'" in caplog.text and "PatientBirthDate" in caplog.text
    board, _ = queue_once(inbox_folder, state, outbox, export_with_a_bug)  # a restart does not retry it
    assert attempts.count("CT 'first'") == 1


def test_an_os_error_without_the_systems_words_is_an_unexpected_one(tmp_path, shared_data, caplog):
    """An OSError a library raised with a message of its own (no errno): its words went to status.json."""
    from SegmentationMachineLib.dicom.phantom import make_phantom, write_ct_series
    inbox_folder, state, outbox = tmp_path / "inbox", tmp_path / "state", tmp_path / "outbox"
    write_ct_series(inbox_folder / "a", make_phantom(shape=(4, 32, 32)).hu, 1.5, [(0, 0, 2.0 * k) for k in range(4)], "a")

    def quoting(delivery, folder):
        raise OSError("cannot decode the value Privacy^Jane")

    board, _ = queue_once(inbox_folder, state, outbox, quoting)
    assert [entry["reason"] for entry in board["series"]] == [watchqueue.UNEXPECTED]
    assert "Privacy^Jane" in caplog.text


def test_an_older_versions_words_on_an_unexpected_error_leave_status_json_and_the_journal(tmp_path, shared_data):
    """Versions before 2026-11-28 kept the library's words in both: the next start replaces them with ours."""
    from SegmentationMachineLib.dicom.phantom import make_phantom, write_ct_series
    inbox_folder, state, outbox = tmp_path / "inbox", tmp_path / "state", tmp_path / "outbox"
    write_ct_series(inbox_folder / "a", make_phantom(shape=(4, 32, 32)).hu, 1.5, [(0, 0, 2.0 * k) for k in range(4)], "a")
    older = f"{watchqueue.OLDER_UNEXPECTED}ValueError: bad value Privacy^Jane); please report it with the log"

    def as_an_older_version(delivery, folder):
        raise UserError(older)  # what _failure_reason returned then, through the same path

    queue_once(inbox_folder, state, outbox, as_an_older_version)
    journal = sqlite3.connect(state / "journal.sqlite")
    assert journal.execute("SELECT reason FROM deliveries").fetchall() == [(older,)]
    journal.close()
    board, _ = queue_once(inbox_folder, state, outbox)  # the next start: nothing to process again
    assert [entry["reason"] for entry in board["series"]] == [watchqueue.UNEXPECTED]
    journal = sqlite3.connect(state / "journal.sqlite")
    assert journal.execute("SELECT reason FROM deliveries").fetchall() == [(watchqueue.UNEXPECTED,)]
    journal.close()
    assert not any(b"Privacy" in path.read_bytes() for path in state.glob("journal.sqlite*"))  # nor on its disk
    (outbox / "status.json").unlink()  # rebuilt from the journal
    board, _ = queue_once(inbox_folder, state, outbox)
    assert [entry["reason"] for entry in board["series"]] == [watchqueue.UNEXPECTED]


def test_without_once_a_series_a_full_disk_stopped_waits_and_is_processed_again_once_there_is_space(
        tmp_path, shared_data, monkeypatch):
    """It stayed 'processing' in status.json, and was processed again only after a restart."""
    from SegmentationMachineLib.inbox import watchqueue
    monkeypatch.setattr(watchqueue, "DISK_RETRY_S", 0.2)
    free = iter([100, 100, 100, 5000])  # at the failure; twice still full (looked at, not processed); space freed
    monkeypatch.setattr(watchqueue, "_free_bytes", lambda folder: next(free))
    inbox_folder, state, outbox = tmp_path / "inbox", tmp_path / "state", tmp_path / "outbox"
    inbox_folder.mkdir()
    for path in SLICES:
        (inbox_folder / path.name).write_bytes(path.read_bytes())
    attempts, boards, lines, stop = [], [], [], threading.Event()

    def full_then_free(delivery, folder):
        attempts.append(delivery)
        if len(attempts) == 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        stop.set()
        return export(delivery, folder)

    inbox = started(inbox_folder, state)
    try:
        run_queue(inbox, outbox, full_then_free, echo=lines.append, tick=0.05, stop=stop,
                  polled=lambda: boards.append(json.loads((outbox / "status.json").read_text())["series"]))
    finally:
        inbox.stop()
    waiting = "the disk is full: free some space; it is processed again once there is more"
    assert [{"state": "waiting", "reason": waiting}] in [[{k: e[k] for k in ("state", "reason")} for e in board]
                                                        for board in boards]
    assert f"CT 'series 2': waiting: {waiting}" in lines
    [entry] = json.loads((outbox / "status.json").read_text())["series"]
    assert entry["state"] == "done" and len(attempts) == 2 and next(free, None) is None  # not processed while full
    assert sorted(p.name for p in Path(entry["result"]).iterdir()) == ["model.stl", "report.json"]


def test_an_empty_status_json_a_power_cut_left_is_rebuilt_from_the_journal(tmp_path, shared_data):
    """watch refused to start ('not watch's status file'): an unattended service stayed down."""
    inbox_folder, state, outbox = tmp_path / "inbox", tmp_path / "state", tmp_path / "outbox"
    inbox_folder.mkdir()
    for path in SLICES:
        (inbox_folder / path.name).write_bytes(path.read_bytes())
    queue_once(inbox_folder, state, outbox)
    (outbox / "status.json").write_bytes(b"")
    board, _ = queue_once(inbox_folder, state, outbox)
    [entry] = board["series"]
    assert entry["state"] == "done" and Path(entry["result"]).is_dir()


def test_status_json_drops_series_finished_a_month_ago_and_the_journal_still_knows_them(tmp_path, shared_data):
    """A watch running for months rewrote an ever longer status.json at every change."""
    inbox_folder, state, outbox = tmp_path / "inbox", tmp_path / "state", tmp_path / "outbox"
    (inbox_folder / "first").mkdir(parents=True)
    for path in SLICES:
        (inbox_folder / "first" / path.name).write_bytes(path.read_bytes())
    board, _ = queue_once(inbox_folder, state, outbox)
    [entry] = board["series"]
    month_ago = datetime.now().astimezone() - timedelta(days=BOARD_DAYS + 1)
    (outbox / "status.json").write_text(json.dumps({**board, "series": [{**entry, "updated": month_ago.isoformat()}]}))
    with sqlite3.connect(state / "journal.sqlite") as journal:
        journal.execute("UPDATE deliveries SET updated = ?", (month_ago.timestamp(),))
    journal.close()
    board, _ = queue_once(inbox_folder, state, outbox)
    assert board["series"] == [] and Path(entry["result"]).is_dir()
    shutil.copytree(inbox_folder / "first", inbox_folder / "again")
    board, lines = queue_once(inbox_folder, state, outbox)
    assert board["series"] == [] and any("not processed again" in line for line in lines), lines


def test_a_result_is_on_disk_before_the_journal_says_it_is_done(tmp_path, shared_data, monkeypatch):
    """The journal committed without a sync (a power cut could lose the last deliveries, processed twice then), and
    the staged files were never synced (a power cut could leave 'done' with empty files)."""
    inbox_folder, state, outbox = tmp_path / "inbox", tmp_path / "state", tmp_path / "outbox"
    inbox_folder.mkdir()
    for path in SLICES:
        (inbox_folder / path.name).write_bytes(path.read_bytes())
    events, sync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(os.readlink(f"/proc/self/fd/{fd}")) or sync(fd))
    acknowledge = Inbox.acknowledge
    monkeypatch.setattr(Inbox, "acknowledge", lambda self, *a, **k: events.append("commit") or acknowledge(self, *a, **k))
    board, _ = queue_once(inbox_folder, state, outbox)
    staged = [e for e in events[:events.index("commit")] if "staging" in e]
    assert {Path(e).name for e in staged} >= {"model.stl", "report.json", "CT_model"}
    inbox = started(inbox_folder, state)
    try:
        assert inbox.journal._db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    finally:
        inbox.stop()


def test_another_export_named_in_the_same_second_never_takes_the_series_result(tmp_path, shared_data, monkeypatch):
    """A `model --out OUTBOX` (or a Slicer export) naming its folder as watch's result between watch's check of the
    name and its rename: the rename replaced that empty folder, the other run wrote its meshes into watch's result,
    and status.json said this series' result was the other patient's folder."""
    from SegmentationMachineLib.inbox import watchqueue
    from SegmentationMachineLib.mesh import export as exports

    inbox_folder, state, outbox = tmp_path / "inbox", tmp_path / "state", tmp_path / "outbox"
    inbox_folder.mkdir()
    for path in SLICES:
        (inbox_folder / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(exports.time, "strftime", lambda *_: "20261127-101500")  # both in the same second
    other, sync = [], watchqueue.sync_tree

    def synced_while_another_run_names_its_folder(folder):
        sync(folder)
        other.append(exports.new_output_folder(outbox, "CT"))
        (other[0] / "model.stl").write_text("the other run's patient")

    def process(delivery, folder):
        made = exports.new_output_folder(folder, "CT")
        (made / "model.stl").write_text("this series")
        return made

    monkeypatch.setattr(watchqueue, "sync_tree", synced_while_another_run_names_its_folder)
    board, _ = queue_once(inbox_folder, state, outbox, process)
    [entry] = board["series"]
    assert entry["state"] == "done" and Path(entry["result"]).name == "CT_20261127-101500"
    assert (Path(entry["result"]) / "model.stl").read_text() == "this series"
    assert other[0].name == "CT_20261127-101500-2" and (other[0] / "model.stl").read_text() == "the other run's patient"


def test_a_full_disk_at_start_gives_back_the_state_folders_lock(tmp_path, monkeypatch):
    """The lock's owner line could not be written (a full disk): start() said so, and the next Start, with space back,
    was refused as 'in use by another process', which was this one, until it ended."""
    from SegmentationMachineLib.inbox import locks

    def full(descriptor, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    (tmp_path / "in").mkdir()
    options = InboxOptions(folder=tmp_path / "in", state_folder=tmp_path / "state", polling=True)
    with monkeypatch.context() as patched:
        patched.setattr(locks.os, "write", full)
        with pytest.raises(InboxError, match=r"could not open its records .* \(No space left on device\)"):
            Inbox(options).start()
    again = Inbox(options)
    again.start()
    again.stop()
