"""Unpacked zips do not pile up: a zip's unpacked copy (patient data, in the state folder) is removed once the user has
removed the zip from the inbox and everything from it was acknowledged, so the scratch room limit never ends up
refusing every new zip. Real zips of a real CT series, real files, the real journal; a stepped clock."""

import sqlite3
import zipfile
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from conftest import UNCOMPRESSED_SERIES
from SegmentationMachineLib.dicom.archives import ArchiveLimits
from SegmentationMachineLib.inbox.watcher import Inbox, InboxOptions

ONE_STUDY = ArchiveLimits(max_scratch_bytes=2 * 1024 ** 2)  # the 3-slice study unpacks to 1.6 MB: room for one


@pytest.fixture
def zips(tmp_path, shared_data):
    """make(name) writes a zip of the real series under new UIDs into tmp_path, as a PACS export would."""
    def make(name) -> Path:
        uid, archive = generate_uid(), tmp_path / name
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as package:
            for path in sorted(UNCOMPRESSED_SERIES.glob("*.dcm")):
                dataset = dcmread(path)
                dataset.SeriesInstanceUID = uid
                dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
                dataset.save_as(tmp_path / "slice.dcm")
                package.write(tmp_path / "slice.dcm", path.name)
        return archive
    return make


class Stepped:
    """An inbox on a clock that a test advances: each poll is a second later."""

    def __init__(self, tmp_path, limits=ONE_STUDY):
        self.folder, self.state = tmp_path / "inbox", tmp_path / "state"
        self.folder.mkdir(exist_ok=True)
        self.now = 0.0
        self.limits = limits
        self.inbox = None
        self.start()

    def start(self):
        self.inbox = Inbox(InboxOptions(folder=self.folder, state_folder=self.state, settle_seconds=1.0, polling=True,
                                        poll_interval=0.5, hold_seconds=5.0, archive_limits=self.limits),
                           clock=lambda: self.now)
        self.inbox.start()

    def poll(self, seconds=30) -> list:
        """Polls until something is delivered, or seconds pass."""
        for _ in range(seconds):
            self.now += 1
            if delivered := self.inbox.poll():
                return delivered
        return []

    def unpacked(self) -> list:
        return sorted(p.name for p in (self.state / "extracted").iterdir())

    def journal_paths(self) -> set:
        with sqlite3.connect(self.state / "journal.sqlite") as db:
            return {row[0] for row in db.execute("SELECT path FROM files")}


def test_a_removed_zips_unpacked_copy_goes_once_acknowledged_and_the_next_zip_fits(tmp_path, zips):
    inbox = Stepped(tmp_path)
    for day in ("monday.zip", "tuesday.zip", "wednesday.zip"):  # more than the scratch room, one at a time
        zips(day).rename(inbox.folder / day)
        [delivery] = inbox.poll()
        assert inbox.inbox.bad_files == {}, day
        inbox.inbox.acknowledge(delivery, True)
        (inbox.folder / day).unlink()  # the user clears the inbox
    assert inbox.poll(3) == [] and inbox.unpacked() == []
    assert not any("/extracted/" in path for path in inbox.journal_paths())  # the journal forgot them too
    inbox.inbox.stop()


def test_a_zip_removed_while_stopped_loses_its_copy_at_the_next_start_and_a_kept_zip_keeps_it(tmp_path, zips):
    inbox = Stepped(tmp_path, ArchiveLimits())
    for day in ("kept.zip", "removed.zip"):
        zips(day).rename(inbox.folder / day)
        [delivery] = inbox.poll()
        inbox.inbox.acknowledge(delivery, True)
    inbox.poll(3)
    assert len(inbox.unpacked()) == 2
    inbox.inbox.stop()
    (inbox.folder / "removed.zip").unlink()
    inbox.start()
    assert inbox.poll(3) == []  # the kept zip is known from the journal: not delivered again
    [left] = inbox.unpacked()
    assert {Path(path).relative_to(inbox.state / "extracted").parts[0] for path in inbox.journal_paths()
            if "/extracted/" in path} == {left}  # the removed copy's files are forgotten, though never read in this run
    inbox.inbox.stop()


def test_a_delivery_not_yet_acknowledged_keeps_its_copy_though_its_zip_is_gone(tmp_path, zips):
    inbox = Stepped(tmp_path)
    zips("study.zip").rename(inbox.folder / "study.zip")
    [delivery] = inbox.poll()
    (inbox.folder / "study.zip").unlink()  # while the consumer still reads the files
    inbox.poll(3)
    assert all(Path(path).is_file() for path in delivery.series.files)
    inbox.inbox.acknowledge(delivery, False, "failed")  # a failure finishes it too
    inbox.poll(3)
    assert inbox.unpacked() == []
    inbox.inbox.stop()


def test_in_slicer_a_loaded_zips_copy_stays_for_the_session_and_the_next_session_removes_it(tmp_path, zips):
    """Slicer's scene (and its DICOM SEG export) reads the loaded series' files: kept across Stop and Start."""
    import time

    from SegmentationMachineLib.panels.inbox import InboxPanel

    def deliver(panel) -> list:
        deliveries, deadline = [], time.monotonic() + 15
        while not deliveries and time.monotonic() < deadline:
            deliveries = panel.tick()
            time.sleep(0.05)
        return deliveries

    def settle(panel):
        for _ in range(3):  # a poll after the acknowledgement, and one more
            while panel.task is None or not panel.task.done():
                panel.tick()
                time.sleep(0.05)
            panel.tick()

    (tmp_path / "inbox").mkdir()
    zips("study.zip").rename(tmp_path / "inbox" / "study.zip")
    panel = InboxPanel(folder=tmp_path / "inbox", settle_seconds=0.2, state_folder=tmp_path / "state")
    panel.start()
    [delivery] = deliver(panel)
    assert panel.copies_into_database(delivery)  # Slicer's DICOM database keeps its own copy of the zip's files
    panel.loaded(delivery, True)
    (tmp_path / "inbox" / "study.zip").unlink()
    settle(panel)
    panel.stop()
    panel.start()  # Stop and Start in the same session
    settle(panel)
    assert all(Path(path).is_file() for path in delivery.series.files)
    panel.stop()
    next_session = InboxPanel(folder=tmp_path / "inbox", settle_seconds=0.2, state_folder=tmp_path / "state")
    next_session.start()
    settle(next_session)
    assert not any(Path(path).exists() for path in delivery.series.files)
    next_session.stop()
