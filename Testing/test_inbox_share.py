"""`watch` without --polling on a network share: inotify reports nothing of what other computers write to a CIFS or
NFS mount, so events mode re-lists slowly too. Simulated with a real watchdog observer that reports nothing: it
watches another folder, as inotify on a share hears nothing of the inbox."""

import time

from conftest import UNCOMPRESSED_SERIES
from SegmentationMachineLib.inbox import watcher
from SegmentationMachineLib.inbox.watcher import Inbox, InboxOptions

SETTLE = 0.5


def test_a_series_no_file_event_announced_is_delivered_within_the_relisting_bound(tmp_path, monkeypatch, shared_data):
    import shutil

    deaf = tmp_path / "elsewhere"
    deaf.mkdir()
    real_events = watcher._file_events
    monkeypatch.setattr(watcher, "_file_events", lambda folder, dirty, lock: real_events(deaf, dirty, lock))
    monkeypatch.setattr(watcher, "RELIST_EVERY_S", 2.0)  # 10 s in use: the same bound, scaled down
    (tmp_path / "share" / "older").mkdir(parents=True)
    inbox = Inbox(InboxOptions(folder=tmp_path / "share", state_folder=tmp_path / "state", settle_seconds=SETTLE,
                               hold_seconds=1.0))
    inbox.start()
    try:
        assert not inbox.polling  # events mode, as watch starts without --polling
        assert inbox.poll() == []  # the first look: an empty share
        time.sleep(0.1)
        shutil.copytree(UNCOMPRESSED_SERIES, tmp_path / "share" / "older" / "ct")  # written by another computer
        written, delivered = time.monotonic(), []
        while not delivered and time.monotonic() - written < 2 * watcher.RELIST_EVERY_S + SETTLE + 3:
            delivered = inbox.poll()
            time.sleep(0.1)
        took = time.monotonic() - written
        [delivery] = delivered
        assert len(delivery.series.files) == 3
        # seen at the next re-listing (at most RELIST_EVERY_S), read and settled after it, with a poll's slack
        assert took <= watcher.RELIST_EVERY_S + SETTLE + watcher.READ_AFTER_S + 3.0, took
    finally:
        inbox.stop()
