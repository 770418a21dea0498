"""Whoever can drop a file in the inbox must not hang, exhaust or steer the watcher (issue 16, items 4-10).

Real FIFOs, sockets, links, sparse multi-GB files and zip bombs in a real inbox, read by the real watcher.
"""

import hashlib
import json
import os
import socket
import sqlite3
import stat
import threading
import time
import tracemalloc
import zipfile
from pathlib import Path

from conftest import JPEG2000_SERIES, UNCOMPRESSED_SERIES
from SegmentationMachineLib.cli.main import main
from SegmentationMachineLib.core.files import printable
from SegmentationMachineLib.dicom.archives import ArchiveLimits
from SegmentationMachineLib.inbox.watcher import LINK, NOT_REGULAR, Inbox, InboxOptions
from SegmentationMachineLib.inbox.watchqueue import run_queue

SETTLE = 0.5


def started(inbox_folder, state, **options) -> Inbox:
    options = {"settle_seconds": SETTLE, "hold_seconds": 1.0, **options}
    inbox = Inbox(InboxOptions(folder=inbox_folder, state_folder=state, **options))
    inbox.start()
    return inbox


def bounded(function, seconds: float = 15.0):
    """function's result, or a failure if it has not returned within seconds (a hang is a failure, not a stuck suite)."""
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(function()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{function} did not return within {seconds} s"
    return outcome[0]


def deliveries_within(inbox: Inbox, seconds: float, want: int = 1) -> list:
    def run():
        found, deadline = [], time.monotonic() + seconds
        while time.monotonic() < deadline and len(found) < want:
            found += inbox.poll()
            time.sleep(0.05)
        return found
    return bounded(run, seconds + 10)


def copy_series(folder: Path, source: Path = UNCOMPRESSED_SERIES) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        (folder / path.name).write_bytes(path.read_bytes())
    return sorted(folder.iterdir())


def journal_hashes(state: Path) -> set:
    with sqlite3.connect(state / "journal.sqlite") as db:
        return {row[0] for row in db.execute("SELECT sha256 FROM files")}


def test_fifos_sockets_and_links_are_refused_with_reasons_and_nothing_blocks(tmp_path, shared_data, monkeypatch):
    inbox_folder, state, elsewhere = tmp_path / "inbox", tmp_path / "state", tmp_path / "elsewhere"
    series = copy_series(inbox_folder / "study")
    outside = copy_series(elsewhere / "other-study", JPEG2000_SERIES)
    secret = elsewhere / "shadow"
    secret.write_text("root:$6$secret")
    os.mkfifo(inbox_folder / "pipe.dcm")
    listener = socket.socket(socket.AF_UNIX)
    monkeypatch.chdir(inbox_folder)  # a relative name: a long TMPDIR cannot take it past the 107 bytes a socket has
    listener.bind("socket.dcm")
    (inbox_folder / "zero.dcm").symlink_to("/dev/zero")
    (inbox_folder / "shadow.dcm").symlink_to(secret)
    (inbox_folder / "slice.dcm").symlink_to(outside[0])
    (inbox_folder / "linked-study").symlink_to(elsewhere / "other-study", target_is_directory=True)
    inbox = bounded(lambda: started(inbox_folder, state))
    [delivery] = deliveries_within(inbox, SETTLE + 3)
    assert sorted(delivery.series.files) == series  # only the real files, under their real paths
    reasons = {path.name: reason for path, reason in inbox.bad_files.items()}
    assert reasons == {"pipe.dcm": NOT_REGULAR, "socket.dcm": NOT_REGULAR, "zero.dcm": LINK, "shadow.dcm": LINK,
                       "slice.dcm": LINK, "linked-study": LINK}
    never_read = {hashlib.sha256(p.read_bytes()).hexdigest() for p in outside + [secret]}
    assert not never_read & journal_hashes(state)
    inbox.acknowledge(delivery, True)
    bounded(inbox.stop, 10)
    # At every restart the same: no hang, the same reasons, nothing delivered twice.
    inbox = bounded(lambda: started(inbox_folder, state))
    assert bounded(inbox.poll) == [] and {p.name for p in inbox.bad_files} == set(reasons)
    bounded(inbox.stop, 10)
    listener.close()


def test_a_file_swapped_for_a_link_after_it_was_listed_is_not_followed(tmp_path, shared_data):
    inbox_folder, state = tmp_path / "inbox", tmp_path / "state"
    inbox_folder.mkdir()
    secret = tmp_path / "secret.dcm"
    secret.write_bytes(sorted(UNCOMPRESSED_SERIES.iterdir())[0].read_bytes())
    (inbox_folder / "upload.dcm").write_bytes(b"placeholder")
    inbox = started(inbox_folder, state, polling=True, poll_interval=60)  # no event, no rescan: only the read
    assert inbox.poll() == []  # listed, not read yet
    (inbox_folder / "swap").symlink_to(secret)
    os.replace(inbox_folder / "swap", inbox_folder / "upload.dcm")
    time.sleep(0.6)
    inbox.poll()
    assert inbox.bad_files == {inbox_folder / "upload.dcm": LINK}
    inbox.stop()


def test_huge_files_are_classified_from_their_first_bytes_without_reading_them(tmp_path):
    inbox_folder, state = tmp_path / "inbox", tmp_path / "state"
    inbox_folder.mkdir()
    with open(inbox_folder / "video.mp4", "wb") as video:  # sparse: 6 GiB that take no disk
        video.write(b"\0\0\0\x20ftypisom")
        video.truncate(6 * 1024 ** 3)
    with open(inbox_folder / "huge.dcm", "wb") as huge:
        huge.write(b"\0" * 128 + b"DICM")
        huge.truncate(3 * 1024 ** 3)
    inbox = started(inbox_folder, state)
    tracemalloc.start()
    deliveries_within(inbox, SETTLE + 1.5, want=2)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 32 * 1024 ** 2, f"{peak / 1024 ** 2:.0f} MiB allocated while looking at the files"
    reasons = {path.name: reason for path, reason in inbox.bad_files.items()}
    assert reasons == {"video.mp4": "not a DICOM file", "huge.dcm": "too big for a DICOM file (3.2 GB)"}
    inbox.stop()


def zip_of(path: Path, members: dict, compression=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as package:
        for name, data in members.items():
            package.writestr(name, data)
    return path


def series_members(prefix: str = "study/") -> dict:
    return {prefix + p.name: p.read_bytes() for p in sorted(UNCOMPRESSED_SERIES.iterdir())}


def scratch_entries(state: Path) -> list:
    return sorted(p.name for p in (state / "extracted").iterdir())


def test_a_zip_bomb_split_into_small_members_is_refused_whole_before_anything_is_written(tmp_path, shared_data):
    inbox_folder, state = tmp_path / "inbox", tmp_path / "state"
    inbox_folder.mkdir()
    megabyte = b"\0" * 1024 ** 2  # each member alone is under the per-member checks
    bomb = zip_of(inbox_folder / "bomb.zip", {**series_members(), **{f"part{i}.bin": megabyte for i in range(300)}})
    assert bomb.stat().st_size < 2 * 1024 ** 2
    inbox = started(inbox_folder, state)
    assert deliveries_within(inbox, SETTLE + 1.5) == []
    [reason] = [r for p, r in inbox.bad_files.items() if str(p).endswith("!*")]
    assert "the archive was refused: it unpacks to over" in reason and "like a zip bomb" in reason
    assert scratch_entries(state) == []  # nothing extracted, nothing half-extracted
    inbox.stop()


def test_a_refused_archive_leaves_no_partial_extraction(tmp_path, shared_data):
    inbox_folder, state = tmp_path / "inbox", tmp_path / "state"
    inbox_folder.mkdir()
    archive = zip_of(inbox_folder / "damaged.zip", {**series_members(), "zz-last.bin": b"x" * 5000},
                     zipfile.ZIP_STORED)
    data = bytearray(archive.read_bytes())
    data[data.index(b"x" * 5000) + 100] ^= 0xFF  # the last member fails its CRC after the series was written
    archive.write_bytes(bytes(data))
    inbox = started(inbox_folder, state)
    assert deliveries_within(inbox, SETTLE + 1.5) == []
    [reason] = [r for p, r in inbox.bad_files.items() if str(p).endswith("!*")]
    assert "cannot be read" in reason and "CRC" in reason
    assert scratch_entries(state) == []
    inbox.stop()


def with_member_headers_patched(archive: Path, field_offsets: tuple, value: int) -> Path:
    """archive with a 2-byte field set in every local (PK\\3\\4) and central (PK\\1\\2) header, as another zip
    tool would have written it."""
    data = bytearray(archive.read_bytes())
    for signature, offset in zip((b"PK\3\4", b"PK\1\2"), field_offsets):
        start = data.find(signature)
        while start >= 0:
            data[start + offset:start + offset + 2] = value.to_bytes(2, "little")
            start = data.find(signature, start + 4)
    archive.write_bytes(bytes(data))
    return archive


def test_zips_python_cannot_unpack_say_why_and_what_to_drop_instead(tmp_path, shared_data):
    """Windows compresses folders over 2 GB with Deflate64 (method 9), which zipfile cannot read ('compression method
    not supported'); a password-protected zip raised RuntimeError, which nothing caught."""
    inbox_folder, state = tmp_path / "inbox", tmp_path / "state"
    inbox_folder.mkdir()
    with_member_headers_patched(zip_of(inbox_folder / "windows.zip", series_members()), (8, 10), 9)
    with_member_headers_patched(zip_of(inbox_folder / "locked.zip", series_members("locked/")), (6, 8), 1)
    with_member_headers_patched(zip_of(inbox_folder / "7zip.zip", series_members("7zip/")), (8, 10), 98)  # PPMd
    aes = with_member_headers_patched(zip_of(inbox_folder / "aes.zip", series_members("aes/")), (8, 10), 99)
    with_member_headers_patched(aes, (6, 8), 1)  # WinZip's AES: method 99, encrypted
    inbox = started(inbox_folder, state)
    assert deliveries_within(inbox, SETTLE + 1.5) == []
    refused = {Path(str(p).split("!")[0]).name: r for p, r in inbox.bad_files.items() if str(p).endswith("!*")}
    assert "compressed with Deflate64, as Windows compresses folders over 2 GB" in refused["windows.zip"]
    assert "password-protected: drop the unzipped folder instead" in refused["locked.zip"]
    assert "password-protected: drop the unzipped folder instead" in refused["aes.zip"]
    assert "compressed with method 98, which cannot be unpacked here" in refused["7zip.zip"]
    inbox.stop()


def test_a_zip_read_while_it_is_written_under_its_name_is_held_and_forgotten_once_whole(tmp_path, shared_data):
    """scp, an SMB copy or a browser write a zip under its final name: read in a pause, it has no directory at its end
    yet. It was said to be unreadable, and that line stayed after the zip arrived and its series was delivered."""
    inbox_folder, state = tmp_path / "inbox", tmp_path / "state"
    inbox_folder.mkdir()
    whole = zip_of(tmp_path / "study.zip", series_members()).read_bytes()
    inbox = started(inbox_folder, state, hold_seconds=5.0)
    with open(inbox_folder / "study.zip", "wb") as upload:
        upload.write(whole[:len(whole) // 2])
        upload.flush()
        assert deliveries_within(inbox, 3 * SETTLE) == [] and inbox.bad_files == {}  # a stall: read, held, not said
        upload.write(whole[len(whole) // 2:])
    [delivery] = deliveries_within(inbox, SETTLE + 3)
    assert len(delivery.series.files) == 3 and inbox.bad_files == {}
    inbox.stop()


def test_nested_archives_are_unpacked_only_so_deep_and_within_the_scratch_room(tmp_path, shared_data):
    inbox_folder, state = tmp_path / "inbox", tmp_path / "state"
    inbox_folder.mkdir()
    inner = zip_of(tmp_path / "level1.zip", series_members())
    for level in range(2, 6):  # 5 deep
        inner = zip_of(tmp_path / f"level{level}.zip", {f"level{level - 1}.zip": inner.read_bytes()})
    (inbox_folder / "nested.zip").write_bytes(inner.read_bytes())
    (inbox_folder / "shallow.zip").write_bytes((tmp_path / "level2.zip").read_bytes())
    inbox = started(inbox_folder, state, archive_limits=ArchiveLimits(max_depth=3))
    [delivery] = deliveries_within(inbox, SETTLE + 2)  # shallow.zip: 2 deep, unpacked
    assert len(delivery.series.files) == 3
    deadline = time.monotonic() + 3  # nested.zip is unpacked one level per poll
    while not inbox.bad_files and time.monotonic() < deadline:
        inbox.poll()
        time.sleep(0.05)
    reasons = {Path(str(p)).name: r for p, r in inbox.bad_files.items()}
    assert reasons == {"level2.zip": "an archive nested more than 3 deep (not unpacked)"}  # inside nested.zip
    inbox.stop()
    # A scratch folder with no room left refuses new archives whole, and keeps nothing of them.
    state2 = tmp_path / "state2"
    inbox = started(inbox_folder, state2, archive_limits=ArchiveLimits(max_scratch_bytes=200_000))
    assert deliveries_within(inbox, SETTLE + 1.5) == []
    assert any("kB left for unpacked archives (removing processed zips from the inbox frees their room)" in r
               for r in inbox.bad_files.values())
    assert scratch_entries(state2) == []
    inbox.stop()


def test_status_json_never_follows_a_planted_link_and_state_is_owner_only(tmp_path, shared_data):
    inbox_folder, state, outbox = tmp_path / "inbox", tmp_path / "state", tmp_path / "outbox"
    inbox_folder.mkdir()
    zip_of(inbox_folder / "upload.zip", series_members())
    outbox.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's own file")
    for name in (".status.json.partial", "status.json"):  # the old fixed temporary name, and the board itself
        (outbox / name).symlink_to(victim)
    inbox = started(inbox_folder, state)

    def export(delivery, folder):
        (folder / "model").mkdir()
        return folder / "model"

    run_queue(inbox, outbox, export, once=True, echo=lambda line: None, tick=0.05)
    inbox.stop()
    assert victim.read_text() == "the user's own file"
    assert not (outbox / "status.json").is_symlink() and json.loads((outbox / "status.json").read_text())["series"]
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode)
             for p in [state, *state.rglob("*"), outbox / "status.json"]}
    assert {m for p, m in modes.items() if Path(tmp_path, p).is_dir()} == {0o700}, modes
    assert {m for p, m in modes.items() if not Path(tmp_path, p).is_dir()} == {0o600}, modes
    assert any(p.endswith("journal.sqlite") for p in modes) and sum("extracted/" in p for p in modes) >= 4


def test_the_log_file_is_owner_only_and_printed_names_cannot_forge_lines(tmp_path, capsys):
    log = tmp_path / "watch.log"
    assert main(["watch", str(tmp_path / "no\nsuch\x1b[2J inbox"), "--out", str(tmp_path / "out"), "--log", str(log)]) == 2
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    err = capsys.readouterr().err
    assert "\x1b" not in err and err.count("\n") == 1 and "no\\nsuch\\x1b[2J inbox" in err
    assert printable("a\r\nb\x07\x9b") == "a\\r\\nb\\x07\\x9b"


def test_crafted_and_cut_headers_are_reasons_never_a_crash(tmp_path, shared_data):
    inbox_folder, state = tmp_path / "inbox", tmp_path / "state"
    series = copy_series(inbox_folder / "study")
    data = series[0].read_bytes()
    number = data.index(b"\x20\x00\x13\x00")  # InstanceNumber, implicit VR: tag, 4-byte length, value
    (inbox_folder / "crafted.dcm").write_bytes(data[:number + 8] + b"xx" + data[number + 10:])
    (inbox_folder / "cut.dcm").write_bytes(data[:141])  # pydicom raises BytesLengthException here
    inbox = started(inbox_folder, state, hold_seconds=0.5)
    [delivery] = deliveries_within(inbox, SETTLE + 3)
    assert sorted(delivery.series.files) == series
    deadline = time.monotonic() + 2
    while len(inbox.bad_files) < 2 and time.monotonic() < deadline:  # cut.dcm: after the hold for uploads
        inbox.poll()
        time.sleep(0.05)
    reasons = {path.name: reason for path, reason in inbox.bad_files.items()}
    assert reasons == {"crafted.dcm": "malformed image attributes (invalid literal for int() with base 10: 'xx')",
                       "cut.dcm": "unreadable DICOM (its header is malformed)"}
    inbox.stop()
