"""What Windows and macOS do to the library that Linux does not, reproduced here.

Windows: Python 3.12 (Slicer 5.10's) has no os.fchmod and no os.O_NOFOLLOW; file names may not hold '?', ':' or a
device name (CON, AUX); text is written in the code page (cp1252) wherever output is redirected, as by the Python
PythonSlicer starts; a file another program has open cannot be opened, and a locked byte cannot be read.
macOS: a program may not list Desktop, Documents, Downloads or an external disk until the user allows it, and its
keychain refuses while locked (over SSH, for a service)."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import UNCOMPRESSED_SERIES
from SegmentationMachineLib.core import files as file_system
from test_inbox_attacks import copy_series, deliveries_within, started
from SegmentationMachineLib.core.errors import InputError, SegmentationError
from SegmentationMachineLib.dicom.series import scan_folder
from SegmentationMachineLib.dicom.archives import extract_zip
from SegmentationMachineLib.dicom.volumes import load_input
from SegmentationMachineLib.inbox import watcher
from SegmentationMachineLib.inbox.watcher import InboxError
from SegmentationMachineLib.mesh.export import export_segmentation, ExportOptions
from SegmentationMachineLib.segment.preset_child import PresetProcess
from SegmentationMachineLib.segment.presets import apply_preset

CLI = [sys.executable, "-m", "SegmentationMachineLib.cli"]
# A redirected Windows console: stdio in cp1252, strictly; files in the locale's encoding (here ASCII, stricter)
LEGACY_CODE_PAGE = {"PYTHONIOENCODING": "cp1252", "LC_ALL": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}


@pytest.fixture
def windows_os(monkeypatch):
    for name in ("fchmod", "O_NOFOLLOW"):
        monkeypatch.delattr(os, name)


def test_every_export_format_is_written_without_posix_only_calls(windows_os, ctx, phantom_dir, tmp_path):
    """os.fchmod made every export fail on Windows, leaving its temporary file behind."""
    segmentation = apply_preset(ctx, load_input(ctx, phantom_dir).node, "bone")
    result = export_segmentation(segmentation, tmp_path, ExportOptions(formats=("stl", "obj", "3mf", "glb")))
    assert sorted(p.name for p in result.folder.iterdir()) == ["Bone.stl", "report.json", "segments.3mf",
                                                               "segments.glb", "segments.mtl", "segments.obj"]


def test_a_zip_with_names_windows_cannot_hold_unpacks_whole(windows_os, shared_data, tmp_path):
    """Without O_NOFOLLOW the whole zip was dropped silently; a name Windows cannot hold, or two members of one
    name, refused the whole archive. DICOM files are known by their content: each unpacks under a name that holds
    everywhere, and only a second member of one name is refused."""
    slices = [p.read_bytes() for p in sorted(UNCOMPRESSED_SERIES.iterdir())]
    with zipfile.ZipFile(tmp_path / "study.zip", "w") as package:
        for name, data in (("CT/IM?1.dcm", slices[0]), ("CT/aux .dcm", slices[1]), ("CT/x:y/IM3. ", slices[2]),
                           ("CT/x:y/IM3.", slices[0])):
            package.writestr(name, data)
    extraction = extract_zip(tmp_path / "study.zip", tmp_path / "out")
    unpacked = {p.relative_to(tmp_path / "out").as_posix(): p.read_bytes() for p in extraction.files}
    assert unpacked == {"CT/IM_1.dcm": slices[0], "CT/_aux .dcm": slices[1], "CT/x_y/IM3": slices[2]}
    assert extraction.refused == [("CT/x:y/IM3.", "another file in the archive has the same name here (or one "
                                                  "differing only in case or odd characters)")]


def test_cli_output_and_text_files_in_a_legacy_code_page(shared_data, tmp_path):
    """'→' and names outside cp1252 crashed watch at its first line, and the OBJ of an export whose segments are
    named in Polish or Japanese; a names file saved by Notepad (UTF-8 with a BOM) was refused."""
    (tmp_path / "inbox").mkdir()
    watch = subprocess.run(CLI + ["watch", tmp_path / "inbox", "--out", tmp_path / "outbox", "--once"],
                           capture_output=True, text=True, encoding="utf-8", timeout=300, stdin=subprocess.DEVNULL,
                           env={**os.environ, **LEGACY_CODE_PAGE})
    assert watch.returncode == 0 and "\\u2192" in watch.stdout, watch.stderr
    (tmp_path / "names.json").write_bytes(b"\xef\xbb\xbf" + json.dumps({"1": "G\u0142owa \u809d\u81d3"},
                                                                        ensure_ascii=False).encode())  # with a BOM
    export = subprocess.run(CLI + ["export", shared_data / "dcmqi" / "liver_seg.nrrd", "--labels",
                                   tmp_path / "names.json", "--format", "obj", "--out", tmp_path, "--log",
                                   tmp_path / "log.txt"],
                            capture_output=True, text=True, encoding="utf-8", timeout=300, stdin=subprocess.DEVNULL,
                            env={**os.environ, **LEGACY_CODE_PAGE})
    assert export.returncode == 0 and "Traceback" not in export.stderr, export.stderr
    assert "G\\u0142owa" in export.stdout
    obj = next(tmp_path.glob("*/segments.obj")).read_text(encoding="utf-8")
    assert "g G\u0142owa_\u809d\u81d3\n" in obj
    assert "Logging error" not in export.stderr and "Loaded" in (tmp_path / "log.txt").read_text(encoding="utf-8")


def test_a_presets_child_in_the_systems_code_page_still_names_the_series(monkeypatch, tmp_path):
    """The Python PythonSlicer starts wrote its sentence in cp1252, which Slicer (UTF-8) could not decode: a
    traceback instead of 'found nothing in Schädel'."""
    monkeypatch.setenv("PYTHONIOENCODING", "cp1252")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    with pytest.raises(SegmentationError, match="The bone preset found nothing in 'Sch\u00e4del \u80f8\u90e8'"):
        PresetProcess().run("bone", np.full((4, 8, 8), -1000, np.int16), (1.0, 1.0, 1.0), "Sch\u00e4del \u80f8\u90e8")


def test_an_inbox_file_another_program_holds_open_waits_and_is_read_once_free(shared_data, tmp_path, monkeypatch):
    """Windows refuses to open a file a copy, a PACS or a virus scanner holds open (a sharing violation): that
    slice was remembered as unreadable for good, and its series delivered without it."""
    paths = copy_series(tmp_path / "inbox" / "CT")
    held, opened = {paths[1]: 6, paths[2]: 10 ** 6}, os.open  # one freed after 6 tries, one never

    def open_unless_held(path, *args):
        if held.get(Path(path), 0) > 0:
            held[Path(path)] -= 1
            raise PermissionError(13, "Permission denied", str(path))  # as the C runtime's open says it there
        return opened(path, *args)

    monkeypatch.setattr(watcher.os, "open", open_unless_held)
    monkeypatch.setattr(file_system, "WINDOWS", True)
    inbox = started(tmp_path / "inbox", tmp_path / "state", hold_seconds=3.0)
    delivered = deliveries_within(inbox, 20)
    assert [len(d.series.files) for d in delivered] == [2] and paths[1] in delivered[0].series.files
    assert inbox.bad_files == {paths[2]: "unreadable (Permission denied): another program may hold it open"}
    inbox.stop()
    held[paths[2]] = 0
    again = started(tmp_path / "inbox", tmp_path / "state")  # the next start reads it: it was not remembered
    assert [len(d.series.files) for d in deliveries_within(again, 20)] == [3]


class MandatoryLocks:
    """msvcrt.locking as Windows locks: a locked byte cannot even be read through another descriptor."""
    LK_UNLCK, LK_LOCK, LK_NBLCK = 0, 1, 2

    def __init__(self):
        self.holders = {}  # (file, offset) -> the descriptor holding it
        self.unlocked_read = os.read

    def locking(self, descriptor, mode, count):
        key = (os.fstat(descriptor).st_ino, os.lseek(descriptor, 0, os.SEEK_CUR))
        if mode == self.LK_UNLCK:
            assert self.holders.pop(key) == descriptor  # Windows refuses to unlock what this descriptor did not lock
        elif self.holders.setdefault(key, descriptor) != descriptor:
            raise PermissionError(13, "Permission denied")

    def read(self, descriptor, count):
        inode, start = os.fstat(descriptor).st_ino, os.lseek(descriptor, 0, os.SEEK_CUR)
        if any(i == inode and start <= at < start + count and holder != descriptor
               for (i, at), holder in self.holders.items()):
            raise PermissionError(13, "Permission denied")
        return self.unlocked_read(descriptor, count)


def test_a_second_watcher_of_a_folder_is_told_who_holds_it_under_mandatory_locks(monkeypatch, tmp_path):
    """The lock was on the byte holding the holder's line, which Windows then refused to the second process: a
    traceback in Slicer, 'free some space' in the CLI, instead of naming the first."""
    from SegmentationMachineLib.cloud.podstart import PodRecords
    from SegmentationMachineLib.cloud.pods import Pod
    from SegmentationMachineLib.core import files
    from SegmentationMachineLib.inbox import locks

    windows = MandatoryLocks()
    monkeypatch.setattr(files, "fcntl", None)
    monkeypatch.setattr(files, "msvcrt", windows, raising=False)
    monkeypatch.setattr(locks.os, "read", windows.read)
    first = locks.hold_lock(tmp_path / "lock", "The outbox")
    with pytest.raises(locks.FolderInUse, match=rf"^The outbox is in use by process {os.getpid()} on "):
        locks.hold_lock(tmp_path / "lock", "The outbox")
    held = dict(windows.holders)
    records = PodRecords(tmp_path / "pods.json")  # its changes hold the same kind of lock, and release it at once
    records.add(Pod("pod0001x", "n", "RUNNING", "g", 0.69, 0, True, []), 0.0)
    records.remove("pod0002x")
    assert list(records.all()) == ["pod0001x"] and windows.holders == held
    os.close(first)


@pytest.fixture
def not_allowed(monkeypatch):
    """Folders macOS does not let this program list (the user has not allowed it): their paths go in the set."""
    refused, scandir = set(), os.scandir

    def scandir_if_allowed(path="."):
        if Path(os.fsdecode(path)) in refused:
            raise PermissionError(1, "Operation not permitted", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", scandir_if_allowed)
    monkeypatch.setattr(os, "listdir", lambda path=".": [entry.name for entry in scandir_if_allowed(path)])
    return refused


def test_a_folder_this_program_may_not_list_is_said_not_taken_for_empty(not_allowed, shared_data, tmp_path,
                                                                        monkeypatch):
    """os.walk drops listing errors: `model` said 'No DICOM image series' and exited 0, and an inbox in Documents
    stayed empty for ever without a word."""
    copy_series(tmp_path / "Documents" / "CT")
    copy_series(tmp_path / "Documents" / "Private")
    not_allowed.add(tmp_path / "Documents" / "Private")
    scan = scan_folder(tmp_path / "Documents")
    assert [len(s.files) for s in scan.series] == [3]
    assert [(s.path, s.reason) for s in scan.skipped] == [
        (tmp_path / "Documents" / "Private", "a folder that cannot be read (Operation not permitted)")]
    not_allowed.add(tmp_path / "Documents")
    with pytest.raises(InputError, match=r"Documents cannot be read \(Operation not permitted\): check that you may "
                                         r"read it, or choose another folder\.$"):
        scan_folder(tmp_path / "Documents")
    with monkeypatch.context() as mac:
        mac.setattr(sys, "platform", "darwin")
        with pytest.raises(InputError, match=r"Documents cannot be read \(Operation not permitted\): this program may "
                                             r"not list it \(macOS asks before a program reads Desktop, Documents"):
            scan_folder(tmp_path / "Documents")
    with pytest.raises(InboxError, match=r"^The inbox .*Documents cannot be read \(Operation not permitted\)"):
        started(tmp_path / "Documents", tmp_path / "state")
    not_allowed.discard(tmp_path / "Documents")
    inbox = started(tmp_path / "Documents", tmp_path / "state")
    assert [len(d.series.files) for d in deliveries_within(inbox, 20)] == [3]
    assert inbox.bad_files == {tmp_path / "Documents" / "Private": "a folder that cannot be read (Operation not "
                                                                   "permitted)"}
    inbox.stop()


def test_a_file_replaced_while_another_program_reads_it_is_replaced_once_it_is_free(monkeypatch, tmp_path):
    """Windows refuses to replace a file another program has open (a virus scanner just after it was written, a
    monitor reading status.json): the series waited for a restart, said as 'free some space'."""
    replace, refusals = os.replace, [PermissionError(13, "Access is denied")] * 3

    def replace_once_free(source, target):
        if refusals:
            raise refusals.pop()
        replace(source, target)

    monkeypatch.setattr(file_system, "WINDOWS", True)
    monkeypatch.setattr(file_system.os, "replace", replace_once_free)
    file_system.replace_private(tmp_path / "status.json", "{}")
    assert (tmp_path / "status.json").read_text() == "{}" and not refusals
    refusals[:] = [PermissionError(13, "Access is denied")] * 9  # held for good: said, nothing half-written left
    with pytest.raises(PermissionError):
        file_system.replace_private(tmp_path / "status.json", '{"new": 1}')
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


def test_a_file_this_user_may_not_read_is_said_at_once_and_read_once_allowed(shared_data, tmp_path, monkeypatch):
    """Only Windows' refusals wait: a file of another user's (mode 000) is said at once. It was remembered as
    unreadable for good, though a chmod changes neither its size nor its time."""
    paths = copy_series(tmp_path / "inbox" / "CT")
    private, opened = {paths[2]}, os.open

    def open_unless_private(path, *args):
        if Path(path) in private:
            raise PermissionError(13, "Permission denied", str(path))
        return opened(path, *args)

    monkeypatch.setattr(watcher.os, "open", open_unless_private)
    inbox = started(tmp_path / "inbox", tmp_path / "state", hold_seconds=600.0)
    assert [len(d.series.files) for d in deliveries_within(inbox, 20)] == [2]  # well before the hold time
    assert inbox.bad_files == {paths[2]: "unreadable (Permission denied)"}
    inbox.stop()
    private.clear()  # chmod 644
    again = started(tmp_path / "inbox", tmp_path / "state")
    assert [len(d.series.files) for d in deliveries_within(again, 20)] == [3]
    again.stop()
