"""The DICOM inbox with real files, real file events and real timing (settle 1 s, writers 300 ms apart)."""

import json
import os
import shutil
import stat
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import JPEG2000_SERIES, UNCOMPRESSED_SERIES, tree_digest
from SegmentationMachineLib.dicom.phantom import make_phantom, write_ct_series
from SegmentationMachineLib.inbox.watcher import Inbox, InboxError, InboxOptions, SeriesState
from SegmentationMachineLib.inbox.watchqueue import run_queue

SETTLE = 1.0
HOLD = 2.0  # how long a series that looks incomplete, or a file that looks cut short, is held


@pytest.fixture
def folders(tmp_path, untouched):
    """(inbox, state, uploaded): call uploaded() once the test's writes are done; teardown then
    asserts every file in the inbox is byte-identical to what was uploaded and none was added or removed."""
    inbox, state = tmp_path / "inbox", tmp_path / "state"
    inbox.mkdir()
    frozen = []
    yield inbox, state, lambda: frozen.append(tree_digest(inbox))
    assert frozen, "the test never said when its upload was complete"
    assert tree_digest(inbox) == frozen[-1]


def started(inbox_folder, state, **options) -> Inbox:
    options.setdefault("hold_seconds", HOLD)
    inbox = Inbox(InboxOptions(folder=inbox_folder, state_folder=state, settle_seconds=SETTLE, **options))
    inbox.start()
    return inbox


def poll_until(inbox: Inbox, seconds: float, want: int = 1) -> list:
    """Polls as the CLI does (every 0.1 s) until want deliveries arrived or seconds passed."""
    deliveries, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline and len(deliveries) < want:
        deliveries += inbox.poll()
        time.sleep(0.1)
    return deliveries


def write_result(delivery, folder: Path, name: str = "result") -> Path:
    """What the pipeline leaves in its folder: files, then report.json last."""
    result = folder / name
    result.mkdir()
    (result / "model.stl").write_bytes(b"solid model\nendsolid model\n")
    (result / "report.json").write_text(json.dumps({"files": len(delivery.series.files)}))
    return result


def slow_copy(files, targets, delay=0.3):
    """Copies each file to its target, one every delay seconds, on a thread (an upload in progress); the thread's
    last_write is when the last copy ended."""
    def run():
        for source, target in zip(files, targets):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)
            thread.last_write = time.monotonic()
            time.sleep(delay)
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_slow_upload_is_delivered_once_complete_and_only_after_it_settles(folders, shared_data, untouched):
    inbox_folder, state, uploaded = folders
    untouched(JPEG2000_SERIES)
    files = sorted(JPEG2000_SERIES.iterdir())
    inbox = started(inbox_folder, state)
    writer = slow_copy(files, [inbox_folder / "study" / "CT" / f"IM{i:04d}" for i in range(len(files))])
    early = []
    while writer.is_alive():
        early += inbox.poll()
        time.sleep(0.1)
    uploaded()
    assert early == []  # 300 ms between files is shorter than the settle time: never delivered early
    statuses = {s.state for s in inbox.statuses()}
    assert statuses <= {SeriesState.WAITING}
    deliveries = poll_until(inbox, SETTLE + 3)
    delay = time.monotonic() - writer.last_write
    assert len(deliveries) == 1 and len(deliveries[0].series.files) == 20 and not deliveries[0].is_update
    assert SETTLE - 0.1 <= delay <= SETTLE + 2.0
    assert poll_until(inbox, SETTLE + 0.5) == []  # exactly once
    inbox.stop()


def test_two_series_interleaved_in_nested_folders(folders, shared_data, tmp_path, untouched):
    inbox_folder, state, uploaded = folders
    phantom_dir = tmp_path / "phantom"
    write_ct_series(phantom_dir, make_phantom(shape=(12, 64, 64)).hu, 1.5,
                    [(-47.25, -47.25, 2.0 * k) for k in range(12)], "small phantom")
    untouched(UNCOMPRESSED_SERIES, phantom_dir)
    sources = sorted(UNCOMPRESSED_SERIES.iterdir()) + sorted(phantom_dir.iterdir())
    interleaved = [p for pair in zip(sources[:3], sources[3:6]) for p in pair] + sources[6:]
    targets = [inbox_folder / "upload" / ("x" if i % 2 else "y") / f"file{i}" for i in range(len(interleaved))]
    inbox = started(inbox_folder, state)
    slow_copy(interleaved, targets, delay=0.05).join()
    uploaded()
    deliveries = poll_until(inbox, SETTLE + 3, want=2)
    assert sorted(len(d.series.files) for d in deliveries) == [3, 12]
    inbox.stop()


def test_truncated_non_dicom_and_still_written_files(folders, shared_data):
    inbox_folder, state, uploaded = folders
    files = sorted(JPEG2000_SERIES.iterdir())
    folder = inbox_folder / "series"
    folder.mkdir()
    for path in files[:-1]:
        shutil.copy(path, folder / path.name)
    (folder / "broken.dcm").write_bytes(files[3].read_bytes()[:30000])
    (folder / "report.pdf").write_bytes(b"%PDF-1.4 not an image")
    inbox = started(inbox_folder, state)
    # The last slice arrives in chunks with pauses shorter than the settle time.
    data = files[-1].read_bytes()
    with open(folder / files[-1].name, "wb") as stream:
        for start in range(0, len(data), len(data) // 4 + 1):
            stream.write(data[start:start + len(data) // 4 + 1])
            stream.flush()
            assert inbox.poll() == []
            time.sleep(0.3)
    uploaded()
    deliveries = poll_until(inbox, SETTLE + 3)
    assert len(deliveries) == 1 and len(deliveries[0].series.files) == 20  # the chunked file is whole
    reasons = {path.name: reason for path, reason in inbox.bad_files.items()}
    assert reasons["broken.dcm"].startswith("truncated") and reasons["report.pdf"] == "not a DICOM file"
    inbox.stop()


def test_zip_is_extracted_to_scratch_and_dangerous_members_refused(folders, shared_data, tmp_path):
    inbox_folder, state, uploaded = folders
    archive = inbox_folder / "upload.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as package:
        for path in sorted(UNCOMPRESSED_SERIES.iterdir()):
            package.write(path, f"study/{path.name}")
        package.writestr("../../escape.dcm", b"outside")
        package.writestr("/etc/absolute.dcm", b"outside")
        link = zipfile.ZipInfo("study/link")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        package.writestr(link, "/etc/passwd")
        package.writestr("bomb.bin", b"\0" * (4 * 1024 * 1024))
    uploaded()
    before = {p for p in tmp_path.rglob("*")}
    inbox = started(inbox_folder, state)
    deliveries = poll_until(inbox, SETTLE + 4)
    assert len(deliveries) == 1 and len(deliveries[0].series.files) == 3
    assert all(state in Path(f).parents for f in deliveries[0].series.files)  # read from scratch
    refused = {str(path).split("!")[1]: reason for path, reason in inbox.bad_files.items() if "!" in str(path)}
    assert "outside the archive" in refused["../../escape.dcm"] and "outside the archive" in refused["/etc/absolute.dcm"]
    assert "link" in refused["study/link"] and "zip bomb" in refused["bomb.bin"]
    created = {p for p in tmp_path.rglob("*")} - before
    assert all(state in p.parents or p == state for p in created)  # nothing written beside the user's files
    assert not (tmp_path / "escape.dcm").exists() and not (inbox_folder / "study").exists()
    inbox.stop()


def test_a_finder_zip_loads_without_a_line_for_each_of_its_hidden_files(folders, shared_data):
    """macOS Finder's Compress adds __MACOSX/._name beside every file with extended attributes, and .DS_Store."""
    inbox_folder, state, uploaded = folders
    with zipfile.ZipFile(inbox_folder / "study.zip", "w") as package:
        for path in sorted(UNCOMPRESSED_SERIES.iterdir()):
            package.write(path, f"study/{path.name}")
            package.writestr(f"__MACOSX/study/._{path.name}", b"\0\5\26\7 AppleDouble")
        package.writestr("study/.DS_Store", b"Bud1")
    uploaded()
    inbox = started(inbox_folder, state)
    deliveries = poll_until(inbox, SETTLE + 4)
    assert len(deliveries) == 1 and len(deliveries[0].series.files) == 3 and inbox.bad_files == {}
    inbox.stop()


@pytest.mark.parametrize("polling", [False, True], ids=["file events", "polling"])
def test_files_written_under_hidden_names_then_renamed_are_one_delivery(folders, shared_data, polling):
    """rsync (and scp -r to a temporary name, and our pod's files page) writes each file under a hidden name and
    renames it once complete: between two files nothing visible changes for as long as a file takes, which took
    the files so far as a settled series, then again as an update for every file after."""
    inbox_folder, state, uploaded = folders
    target = inbox_folder / "study"
    target.mkdir()

    def rsync():
        for path in sorted(UNCOMPRESSED_SERIES.iterdir()):
            data, temporary = path.read_bytes(), target / f".{path.name}.Xa81Qz"
            with open(temporary, "wb") as out:
                for start in range(0, len(data), len(data) // 8 + 1):  # 8 writes over 1.6 x the settle time
                    out.write(data[start:start + len(data) // 8 + 1])
                    out.flush()
                    time.sleep(SETTLE / 5)
            os.rename(temporary, target / path.name)

    inbox = started(inbox_folder, state, polling=polling, poll_interval=0.2)
    writer = threading.Thread(target=rsync)
    writer.start()
    deliveries = []
    while writer.is_alive():
        deliveries += inbox.poll()
        time.sleep(0.1)
    uploaded()
    deliveries += poll_until(inbox, SETTLE + 3)
    assert [len(d.series.files) for d in deliveries] == [3]
    inbox.stop()


def test_same_upload_twice_is_not_delivered_twice_and_a_completed_series_is_an_update(folders, shared_data):
    inbox_folder, state, uploaded = folders
    files = sorted(JPEG2000_SERIES.iterdir())
    (inbox_folder / "first").mkdir()
    for path in files[:10]:
        shutil.copy(path, inbox_folder / "first" / path.name)
    inbox = started(inbox_folder, state)
    [first] = poll_until(inbox, SETTLE + 3)
    assert len(first.series.files) == 10
    inbox.acknowledge(first, True, result="out/1")
    shutil.copytree(inbox_folder / "first", inbox_folder / "again")  # the same files, uploaded again
    assert poll_until(inbox, SETTLE + 1.5) == []
    for path in files[10:]:  # the rest of the series arrives later
        shutil.copy(path, inbox_folder / "first" / path.name)
    uploaded()
    [update] = poll_until(inbox, SETTLE + 3)
    assert update.is_update and len(update.series.files) == 20
    inbox.acknowledge(update, True)
    inbox.stop()
    # After a restart: nothing is delivered again, and unchanged files are not even re-read.
    inbox = started(inbox_folder, state)
    assert inbox.poll() == [] and not inbox.pending()
    inbox.stop()


def test_polling_mode_for_shares_without_file_events(folders, shared_data):
    inbox_folder, state, uploaded = folders
    inbox = started(inbox_folder, state, polling=True, poll_interval=0.2)
    shutil.copytree(UNCOMPRESSED_SERIES, inbox_folder / "share")
    uploaded()
    deliveries = poll_until(inbox, SETTLE + 3)
    assert len(deliveries) == 1 and len(deliveries[0].series.files) == 3
    inbox.stop()


def test_a_quiet_polled_inbox_stats_a_share_of_its_settled_files_each_interval(folders, monkeypatch):
    """Polling is for network shares, where each lstat costs about a millisecond: once 1,200 files have settled,
    an interval looks at POLL_STATS of them in turn (and the folders), and a file written again is still found."""
    from SegmentationMachineLib.inbox import watcher

    inbox_folder, state, uploaded = folders
    hu = np.zeros((1200, 4, 4), np.int16)
    write_ct_series(inbox_folder / "big", hu, 1.0, [(0, 0, z) for z in range(len(hu))], "Quiet")
    uploaded()
    clock = [0.0]
    inbox = Inbox(InboxOptions(folder=inbox_folder, state_folder=state, settle_seconds=SETTLE, polling=True,
                               poll_interval=2.0), clock=lambda: clock[0])
    inbox.start()
    while not inbox.poll() or inbox.pending():  # read and delivered
        clock[0] += 1.0
    statted = []
    monkeypatch.setattr(watcher.os, "lstat", lambda path, real=os.lstat: statted.append(path) or real(path))
    clock[0] += 2.0
    assert inbox.poll() == []
    assert watcher.POLL_STATS <= len(statted) <= watcher.POLL_STATS + 2  # the share, the inbox and its one folder
    rewritten = sorted((inbox_folder / "big").iterdir())[-1]
    os.utime(rewritten, ns=(rewritten.stat().st_atime_ns, rewritten.stat().st_mtime_ns + 10 ** 9))
    for _ in range(-(-1200 // watcher.POLL_STATS)):  # every settled file's turn comes within these intervals
        clock[0] += 2.0
        inbox.poll()
        if inbox.pending():  # found changed: read again once it settles
            break
    assert inbox.pending()
    inbox.stop()


def test_without_watchdog_as_in_a_stock_slicer_the_inbox_polls(folders, shared_data, monkeypatch):
    for name in ("watchdog", "watchdog.events", "watchdog.observers"):
        monkeypatch.setitem(sys.modules, name, None)  # importing it now raises ImportError
    inbox_folder, state, uploaded = folders
    inbox = Inbox(InboxOptions(folder=inbox_folder, state_folder=state, settle_seconds=SETTLE, poll_interval=0.2))
    inbox.start()
    assert inbox.polling
    shutil.copytree(UNCOMPRESSED_SERIES, inbox_folder / "later")  # after the start: only polling can see it
    uploaded()
    deliveries = poll_until(inbox, SETTLE + 3)
    assert len(deliveries) == 1 and len(deliveries[0].series.files) == 3
    inbox.stop()


def test_restart_mid_queue_continues_where_it_stopped(folders, shared_data, tmp_path):
    inbox_folder, state, uploaded = folders
    shutil.copytree(UNCOMPRESSED_SERIES, inbox_folder / "a")
    write_ct_series(inbox_folder / "b", make_phantom(shape=(12, 64, 64)).hu, 1.5,
                    [(-47.25, -47.25, 2.0 * k) for k in range(12)], "small phantom")
    uploaded()
    processed = []

    def process_then_crash(delivery, folder):
        if processed:
            (folder / "half-written").mkdir()
            raise KeyboardInterrupt  # Ctrl-C while the second series is processing
        processed.append(delivery.series.name)
        return write_result(delivery, folder)

    inbox = started(inbox_folder, state)
    with pytest.raises(KeyboardInterrupt):
        run_queue(inbox, tmp_path / "outbox", process_then_crash, once=True, echo=lambda line: None, tick=0.1)
    inbox.stop()
    board = (tmp_path / "outbox" / "status.json").read_text()
    assert '"processing"' not in board and "interrupted" in board
    second = []
    inbox = started(inbox_folder, state)
    run_queue(inbox, tmp_path / "outbox", lambda d, folder: second.append(d.series.name) or write_result(d, folder),
              once=True, echo=lambda line: None, tick=0.1)
    inbox.stop()
    assert len(processed) == 1 and len(second) == 1 and processed != second
    # The interrupted export left nothing behind: two results, each whole, and the board.
    assert sorted(p.name for p in (tmp_path / "outbox").iterdir()) == [".status.lock", "result", "result-2", "status.json"]


def test_a_missing_inbox_or_a_state_folder_inside_it_is_one_sentence(tmp_path):
    with pytest.raises(InboxError, match="does not exist: create it"):
        Inbox(InboxOptions(folder=tmp_path / "none", state_folder=tmp_path / "state")).start()
    with pytest.raises(InboxError, match="is inside the inbox"):
        Inbox(InboxOptions(folder=tmp_path, state_folder=tmp_path / "state")).start()


def test_watch_command_status_json_ctrl_c_and_restart(folders, shared_data, tmp_path):
    import json
    import os
    import signal
    import subprocess
    import sys

    inbox_folder, state, uploaded = folders
    outbox = tmp_path / "outbox"
    shutil.copytree(UNCOMPRESSED_SERIES, inbox_folder / "first")
    command = [sys.executable, "-m", "SegmentationMachineLib.cli", "watch", str(inbox_folder), "--out", str(outbox),
               "--settle", "1", "--hold", "2", "--format", "stl"]
    watcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while '"done"' not in ((outbox / "status.json").read_text() if (outbox / "status.json").exists() else ""):
        assert time.monotonic() < deadline and watcher.poll() is None, watcher.stderr.read() if watcher.poll() else ""
        time.sleep(0.2)
    watcher.send_signal(signal.SIGINT)
    out, err = watcher.communicate(timeout=30)
    assert watcher.returncode == 130 and "Traceback" not in err
    assert "CT 'series 2': processing 3 files" in out and "CT 'series 2': done" in out and "Stopped; run" in out

    write_ct_series(inbox_folder / "second", make_phantom(shape=(12, 64, 64)).hu, 1.5,
                    [(-47.25, -47.25, 2.0 * k) for k in range(12)], "small phantom")
    (inbox_folder / "notes.txt").write_text("not an image")
    uploaded()
    again = subprocess.run(command + ["--once"], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                           env={**os.environ})
    assert again.returncode == 0, again.stderr
    assert "small phantom" in again.stdout and "series 2" not in again.stdout  # continues, never redoes
    assert "notes.txt: not a DICOM file" in again.stderr
    board = json.loads((outbox / "status.json").read_text())
    assert sorted((s["name"], s["state"]) for s in board["series"]) == [
        ("CT 'series 2'", "done"), ("CT 'small phantom'", "done")]
    assert all(Path(s["result"], "report.json").exists() for s in board["series"])


def test_files_deleted_from_the_inbox_leave_the_journal_and_those_of_a_share_that_dropped_out_stay(folders,
                                                                                                  shared_data):
    """Their rows stayed for good: about 750 bytes a slice, 1.5 GB a year for a busy lab's watch. A share that drops
    out (its mount point empty) keeps them: its files come back, and reading them all again would be for nothing."""
    inbox_folder, state, uploaded = folders
    for name in ("a", "b"):
        shutil.copytree(UNCOMPRESSED_SERIES, inbox_folder / name)
    inbox = started(inbox_folder, state)
    try:
        poll_until(inbox, SETTLE + 5)
        rows = lambda: inbox.journal._db.execute("SELECT COUNT(*) FROM files").fetchone()[0]  # noqa: E731
        assert rows() == 6

        def polled_until(count, seconds=15):
            deadline = time.monotonic() + seconds
            while rows() != count and time.monotonic() < deadline:
                inbox.poll()
                time.sleep(0.1)
            return rows()

        shutil.rmtree(inbox_folder / "a")  # the user's delete
        assert polled_until(3) == 3
        shutil.rmtree(inbox_folder / "b")  # what an unmounted share looks like: an empty mount point
        uploaded()
        assert polled_until(0, seconds=3) == 3
    finally:
        inbox.stop()
