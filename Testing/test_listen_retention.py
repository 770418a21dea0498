"""`listen` keeps its disk: received series removed once finished and quiet (--keep-received), instances refused with
0xA700 while free space is short (--min-free-mb). Real DICOM node, real pynetdicom sender, real inbox and journal."""

import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import time

import pytest

from conftest import UNCOMPRESSED_SERIES
from SegmentationMachineLib.core.errors import UserError
from SegmentationMachineLib.dicom.archives import size_text
from SegmentationMachineLib.dicom.phantom import make_phantom, write_ct_series
from SegmentationMachineLib.inbox.retention import DAY_S, Retention
from SegmentationMachineLib.inbox.watcher import LINK, Inbox, InboxOptions
from SegmentationMachineLib.pacs.dicomnode import OUT_OF_RESOURCES, DicomNode, NodeOptions
import test_listen
from test_listen import free_port, needs_dcmtk, push

listener = test_listen.listener  # the fixture that starts `listen` as a user does

OLD = time.time() - 8 * DAY_S


def series(folder, description, slices=4) -> list:
    return write_ct_series(folder, make_phantom(shape=(slices, 32, 32)).hu, 1.5,
                           [(-24.0, -24.0, 2.0 * k) for k in range(slices)], description)


def started_node(tmp_path, min_free_mb=0) -> DicomNode:
    node = DicomNode(NodeOptions("SEGMACHINE", free_port(), ("PACS",), "127.0.0.1", min_free_mb=min_free_mb),
                     folder=tmp_path / "received", staging=tmp_path / "receiving")
    node.start()
    return node


def folder_of(node, files) -> str:
    """The series folder the node stored files in."""
    [folder] = {path.parent for path in node.folder.rglob("*.dcm") if path.name in {_uid(f) for f in files}}
    return folder


def _uid(path) -> str:
    from pydicom import dcmread

    return dcmread(path, stop_before_pixels=True).SOPInstanceUID + ".dcm"


def age(folder, when=OLD):
    for path in [*folder.iterdir(), folder]:
        os.utime(path, (when, when), follow_symlinks=False)


def poll_until(inbox, count, seconds=30) -> list:
    delivered, deadline = [], time.monotonic() + seconds
    while len(delivered) < count:
        assert time.monotonic() < deadline, f"only {len(delivered)} of {count} delivered"
        delivered += inbox.poll()
        time.sleep(0.05)
    return {d.series.description: d for d in delivered}


def journal_rows(state, folder) -> int:
    with sqlite3.connect(state / "journal.sqlite") as db:
        return db.execute("SELECT count(*) FROM files WHERE path LIKE ?", (f"{folder}%",)).fetchone()[0]


def test_a_sweep_removes_only_finished_series_quiet_long_enough_and_the_inbox_does_not_notice(tmp_path, caplog):
    caplog.set_level(logging.INFO, "segmentation-machine")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.dcm").write_bytes(UNCOMPRESSED_SERIES.joinpath("01.dcm").read_bytes())
    sent = {name: series(tmp_path / name, name) for name in ("done", "modelling", "failed", "fresh", "held")}
    node = started_node(tmp_path)
    try:
        for name, files in sent.items():
            assert push(node.options.port, files if name != "held" else files[:2] + files[3:]) == [0] * (3 + (name != "held"))
        folders = {name: folder_of(node, files) for name, files in sent.items()}
        for name in ("done", "modelling", "failed", "held"):
            age(folders[name])
        (node.folder / "notes.txt").write_text("not the node's")
        os.utime(node.folder / "notes.txt", (OLD, OLD))
        (node.folder / "elsewhere").symlink_to(outside)
        inbox = Inbox(InboxOptions(node.folder, tmp_path / "state", settle_seconds=0.2, hold_seconds=60))
        inbox.start()
        retention = Retention(7, lock=node.storing)
        assert retention.sweep(inbox) == (0, 0)  # nothing read yet: nothing is known to be finished

        ready = poll_until(inbox, 4)
        assert "held" not in ready and any(s.reason.startswith("Looks incomplete") for s in inbox.statuses())
        inbox.acknowledge(ready["done"], True, result=str(tmp_path / "model"))
        inbox.acknowledge(ready["failed"], False, "no bone found")
        inbox.acknowledge(ready["fresh"], True)
        size = sum(path.stat().st_size for path in folders["done"].iterdir()) + \
            sum(path.stat().st_size for path in folders["failed"].iterdir())
        assert journal_rows(tmp_path / "state", folders["done"]) == 4

        assert retention.sweep(inbox) == (2, size)
        assert not folders["done"].exists() and not folders["failed"].exists()
        assert all(folders[name].is_dir() and len(list(folders[name].iterdir())) == (3 if name == "held" else 4)
                   for name in ("modelling", "fresh", "held"))
        assert (node.folder / "notes.txt").exists() and (outside / "keep.dcm").exists()
        assert journal_rows(tmp_path / "state", folders["done"]) == 0  # the journal does not grow forever
        assert f"Removed 2 received series ({size_text(size)}) modelled more than 7 days ago." in caplog.text

        caplog.clear()
        deadline = time.monotonic() + 1.5  # the inbox hears of the removal: nothing said, nothing delivered again
        while time.monotonic() < deadline:
            assert inbox.poll() == []
            time.sleep(0.05)
        assert inbox.bad_files == {node.folder / "elsewhere": LINK, node.folder / "notes.txt": "not a DICOM file"}
        assert inbox.duplicates == []
        assert not any(r.levelno >= logging.WARNING for r in caplog.records)

        inbox.acknowledge(ready["modelling"], True)
        assert retention.sweep(inbox)[0] == 1 and not folders["modelling"].exists()
        later = Retention(7, clock=lambda: time.time() + 8 * DAY_S)
        assert later.sweep(inbox)[0] == 1 and not folders["fresh"].exists()  # finished, and now 8 days quiet
        assert folders["held"].is_dir()  # still held for more files, however old
        assert sorted(p.name for p in node.folder.iterdir()) == sorted(
            ["elsewhere", "notes.txt", folders["held"].parent.name])

        # The PACS sends a removed series again, byte for byte: said once as already processed, not delivered again.
        assert push(node.options.port, sent["done"]) == [0] * 4
        deadline = time.monotonic() + 3
        while not inbox.duplicates and time.monotonic() < deadline:
            assert inbox.poll() == []
            time.sleep(0.05)
        time.sleep(0.5)
        assert inbox.poll() == [] and sum(c.files for c in inbox.duplicates) == 4
        assert all("already processed" in c.reason for c in inbox.duplicates)
        assert Retention(0).sweep(inbox)[0] == 1 and not folders["done"].exists()  # finished again: removed again
        inbox.stop()
    finally:
        node.stop()


def test_a_series_folder_of_a_non_image_object_goes_once_read_and_one_holding_a_folder_stays(tmp_path):
    """A dose report comes in a series of its own: nothing of it is delivered, yet it is finished once read (and
    listed as skipped); it was kept for ever. A series folder holding what the node never writes (a folder) is left
    alone, files and all, however old; so is an old folder whose file was written again lately (cp over it leaves the
    folder's time as it was)."""
    from test_series_kinds import AS_PART_10, non_image

    received, study = tmp_path / "received", "1.2.3"
    report, other, rewritten = (received / study / f"1.2.3.{n}" for n in (1, 2, 3))
    for folder in (report, other, rewritten):
        folder.mkdir(parents=True)
        non_image("1.2.840.10008.5.1.4.1.1.88.67", "SR", study).save_as(folder / "dose.dcm", **AS_PART_10)
    (other / "notes").mkdir()
    age(report), age(other), age(rewritten)
    os.utime(rewritten / "dose.dcm", (OLD + 7 * DAY_S, OLD + 7 * DAY_S))  # a day ago
    inbox = Inbox(InboxOptions(received, tmp_path / "state", settle_seconds=0.2))
    inbox.start()
    try:
        deadline = time.monotonic() + 30
        while sorted(inbox.bad_files) != [report / "dose.dcm", other / "dose.dcm", rewritten / "dose.dcm"]:
            assert time.monotonic() < deadline, inbox.bad_files
            assert inbox.poll() == []
            time.sleep(0.05)
        assert Retention(7).sweep(inbox) == (1, (other / "dose.dcm").stat().st_size)
        assert not report.exists() and sorted(p.name for p in other.iterdir()) == ["dose.dcm", "notes"]
        assert (rewritten / "dose.dcm").exists()
    finally:
        inbox.stop()

def test_the_free_space_guard_refuses_with_a700_writes_nothing_and_says_so_once_per_association(tmp_path, caplog):
    files = sorted(UNCOMPRESSED_SERIES.glob("*.dcm"))
    free_mb = shutil.disk_usage(tmp_path).free / 1024 ** 2
    node = started_node(tmp_path, min_free_mb=free_mb + 1e6)  # more than this disk has: every instance is refused
    try:
        assert push(node.options.port, files) == [OUT_OF_RESOURCES] * 3
        assert push(node.options.port, files[:1]) == [OUT_OF_RESOURCES]
    finally:
        node.stop()
    assert list(node.folder.rglob("*")) == [] and list(node.staging.iterdir()) == []
    refusals = [r.getMessage() for r in caplog.records if "Refused" in r.getMessage()]
    assert [r.split(":")[0] for r in refusals] == ["Refused 3 instance(s) from AE 'PACS' at 127.0.0.1",
                                                   "Refused 1 instance(s) from AE 'PACS' at 127.0.0.1"]
    assert f" MB free on {node.folder} (--min-free-mb {free_mb + 1e6:g}); free some space, then have them sent " \
           "again." in refusals[0]
    assert all(r.levelno == logging.WARNING for r in caplog.records if "Refused" in r.getMessage())

    node = started_node(tmp_path, min_free_mb=1)  # a sane limit: the same send is stored
    try:
        assert push(node.options.port, files) == [0, 0, 0]
    finally:
        node.stop()
    assert len(list(node.folder.rglob("*.dcm"))) == 3


def test_an_instance_that_would_take_the_disk_below_the_minimum_is_refused_though_the_minimum_is_free_now(tmp_path,
                                                                                                      monkeypatch):
    """The guard counts the instance's own bytes (an enhanced multi-frame image may be gigabytes): with half a slice
    free above --min-free-mb the slice is refused, with two slices' worth it is stored. The disk's free space as this
    test says it, for the inbox's folder alone: other programs' writes would move the real one."""
    from SegmentationMachineLib.pacs.dicomnode import MB

    files, real = sorted(UNCOMPRESSED_SERIES.glob("*.dcm")), shutil.disk_usage
    size, above = files[0].stat().st_size, [0]
    node = started_node(tmp_path, min_free_mb=100)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=100 * MB + above[0])
                        if os.path.samefile(path, node.folder) else real(path))
    try:
        above[0] = size // 2
        assert push(node.options.port, files[:1]) == [OUT_OF_RESOURCES]
        above[0] = 2 * size
        assert push(node.options.port, files[:1]) == [0]
    finally:
        node.stop()
    assert len(list(node.folder.rglob("*.dcm"))) == 1

@needs_dcmtk
def test_dcmtk_storescu_hears_out_of_resources_and_stops_sending(tmp_path, caplog):
    files = sorted(UNCOMPRESSED_SERIES.glob("*.dcm"))
    node = started_node(tmp_path, min_free_mb=1e12)
    try:
        sent = subprocess.run(["storescu", "-v", "-aet", "PACS", "-aec", "SEGMACHINE", "127.0.0.1",
                               str(node.options.port), *map(str, files)], capture_output=True, text=True, timeout=60)
    finally:
        node.stop()
    assert sent.returncode != 0 and "Received Store Response (Refused: OutOfResources)" in sent.stdout + sent.stderr
    assert list(node.folder.rglob("*")) == []  # storescu halts at the first refusal: one instance, one line
    assert [r.getMessage().split(":")[0] for r in caplog.records if "Refused" in r.getMessage()] == [
        "Refused 1 instance(s) from AE 'PACS' at 127.0.0.1"]


def test_listen_refuses_when_the_disk_is_short_and_keep_received_0_removes_each_series_once_modelled(
        listener, shared_data):
    files = sorted(UNCOMPRESSED_SERIES.glob("*.dcm"))
    node = listener("--format", "stl", "--keep-received", "0", "--min-free-mb", "1e12")
    assert push(node.port, files) == [OUT_OF_RESOURCES] * 3
    node.wait_for(lambda: "Refused 3 instance(s) from AE 'PACS' at 127.0.0.1: only " in node.err())
    assert "(--min-free-mb 1e+12); free some space, then have them sent again." in node.err()
    assert node.instances() == [] and node.series() == []
    assert node.stop() == 128 + signal.SIGTERM

    node.command[-1] = "100"  # the PACS sends again once there is room
    node.start()
    assert push(node.port, files) == [0, 0, 0]
    node.wait_for(lambda: node.done() and "Removed 1 received series" in node.err())
    assert node.instances() == [] and list(node.received.iterdir()) == []  # the study folder too
    [entry] = node.done()  # status.json keeps the result
    assert entry["files"] == 3 and os.path.isdir(entry["result"])
    assert "B) modelled more than 0 days ago." in node.err()

    assert push(node.port, files) == [0, 0, 0]  # sent again byte for byte: known, not modelled again, removed again
    node.wait_for(lambda: node.err().count("Removed 1 received series") == 2)
    assert "already processed: the same files as an earlier delivery; not processed again" in node.out()
    assert node.out().count("processing") == 1 and node.instances() == []
    assert node.stop() == 128 + signal.SIGTERM
    assert "Traceback" not in node.err() and "Skipped" not in node.err()


def test_the_modules_inbox_says_one_sentence_when_a_series_is_removed_before_it_is_loaded(ctx, tmp_path, caplog):
    """The Slicer module's Inbox pointed at listen's received folder: listen removed the series between the listing
    and the loading. One sentence (in the status line, and logged once), the series marked failed, nothing delivered
    again, no other warning."""
    from SegmentationMachineLib.dicom.volumes import load_series
    from SegmentationMachineLib.panels.inbox import InboxPanel

    received = tmp_path / "outbox" / ".segmentation-machine" / "received"
    files = series(received / "1.2.3" / "1.2.3.4", "removed")
    panel = InboxPanel(settle_seconds=0.3, state_folder=tmp_path / "module-state")
    assert panel.point_at_received(tmp_path / "outbox")
    panel.start()
    try:
        delivered, deadline = [], time.monotonic() + 30
        while not delivered and time.monotonic() < deadline:
            delivered += panel.tick()
            time.sleep(0.05)
        [delivery] = delivered
        shutil.rmtree(files[0].parent.parent)  # what the retention sweep does
        with pytest.raises(UserError) as error:
            load_series(ctx, delivery.series)
        assert str(error.value) == (f"Series {delivery.series.name} was not loaded: 4 of its 4 files are gone from "
                                    f"{files[0].parent} (moved or removed since they arrived); send or copy it again.")
        panel.loaded(delivery, False, str(error.value))
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            assert panel.tick() == []
            time.sleep(0.05)
        assert panel.rows() == [(delivery.series.name, 4, "error", str(error.value))]
        assert panel.status == str(error.value)
    finally:
        panel.stop()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [str(error.value)]


@pytest.mark.parametrize("keep_days, swept_at", [(7, [0, 3600, 7200]), (0, [0, 20, 7200])])
def test_a_sweep_runs_at_start_then_hourly_and_with_0_days_as_soon_as_something_happened(tmp_path, keep_days,
                                                                                         swept_at):
    (tmp_path / "received").mkdir()
    inbox = Inbox(InboxOptions(tmp_path / "received", tmp_path / "state", settle_seconds=60, polling=True,
                               poll_interval=0))
    inbox.start()
    inbox.poll()  # as the queue does: a poll, then the tick
    now, swept = [0.0], []
    retention = Retention(keep_days, timer=lambda: now[0])
    retention.sweep = lambda inbox: swept.append(now[0])  # when, not what: the sweeps themselves are tested above

    def tick_at(seconds):
        now[0] = seconds
        retention.tick(inbox)

    try:
        tick_at(0)
        tick_at(10)
        series(tmp_path / "received" / "1.2" / "1.2.3", "arriving", slices=1)  # the inbox gets busy with a file
        inbox.poll()
        for seconds in (20, 3599, 3600, 7200):
            tick_at(seconds)
    finally:
        inbox.stop()
    assert swept == swept_at
