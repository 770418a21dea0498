"""What a scanner's export really holds beside plain single-frame slices, built from the real GE CT series:
several acquisitions in one series, enhanced multi-frame images, non-image objects and a CD's DICOMDIR."""

import copy
import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from conftest import UNCOMPRESSED_SERIES
from SegmentationMachineLib.core import arrays
from SegmentationMachineLib.core.errors import InputError
from SegmentationMachineLib.dicom.series import choose_series, scan_folder
from SegmentationMachineLib.dicom.slices import DICOMDIR, TRUNCATED, read_slice
from SegmentationMachineLib.dicom.volumes import load_input
from SegmentationMachineLib.inbox.watcher import Inbox, InboxOptions


def real_slices():
    return [pydicom.dcmread(path) for path in sorted(UNCOMPRESSED_SERIES.iterdir())]


def save(ds, path):
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path)
    return path


def write_acquisitions(folder, keyword, values, names=None):
    """The 3 real slices once per value of keyword, all in one series; numbering restarts per acquisition and
    each acquisition's pixels are raised by 100 per step (to tell them apart). File names hide the order."""
    uid = generate_uid()
    names = names or iter(f"IMG{n:03d}" for n in (5, 2, 7, 1, 3, 8, 4, 6, 0))
    for step, value in enumerate(values):
        for ds in real_slices():
            ds.SeriesInstanceUID = uid
            setattr(ds, keyword, value)
            pixels = ds.pixel_array + 100 * step
            ds.PixelData = pixels.astype(ds.pixel_array.dtype).tobytes()
            save(ds, folder / next(names))
    return uid


@pytest.mark.parametrize("keyword, values, labels", [
    ("AcquisitionNumber", [1, 2], ["acquisition 1", "acquisition 2"]),  # multi-phase CT
    ("EchoTime", [12.3, 4.92], ["TE 12.3 ms", "TE 4.92 ms"]),  # multi-echo MR
    ("DiffusionBValue", [1000, 0], ["b=1000", "b=0"]),
    ("TemporalPositionIdentifier", [1, 2], ["time point 1", "time point 2"]),  # dynamic MR
    ("NominalPercentageOfCardiacPhase", [0, 40], ["phase 0%", "phase 40%"]),  # cardiac CT
    ("TriggerTime", [120, 480], ["trigger 120 ms", "trigger 480 ms"]),
    ("KVP", [100, 140], ["100 kV", "140 kV"]),  # dual-energy CT
    ("ImageType", [["ORIGINAL", "PRIMARY", "AXIAL"], ["DERIVED", "SECONDARY", "AXIAL"]],
     ["image type ORIGINAL/PRIMARY/AXIAL", "image type DERIVED/SECONDARY/AXIAL"]),
])
def test_acquisitions_of_the_same_region_in_one_series_become_series_of_their_own(ctx, shared_data, tmp_path, keyword,
                                                                                   values, labels):
    """They once alternated slice by slice in one volume (the first file at each position won)."""
    uid = write_acquisitions(tmp_path / "study", keyword, values)
    # in number order; the scan's own images before the ones derived from them, which are never the default
    parts = sorted(labels, key=lambda label: label.replace("4.92", "04.92").replace("b=0", "b=0000")
                   .replace("DERIVED", "~"))
    scan = scan_folder(tmp_path / "study")
    assert [(s.part, len(s.files), s.uid) for s in scan.series] == [(part, 3, uid) for part in parts]
    assert [s.key for s in scan.series] == [f"{uid}|{part}" for part in parts]  # stable: from values, not file order
    assert scan.series[0].name == f"CT 'series 2' ({parts[0]})" and not scan.skipped and not scan.notes
    assert any("one of several acquisitions" in note for note in scan.series[1].notes)
    assert choose_series(scan) is scan.series[0] and choose_series(scan, "2") is scan.series[1]
    assert choose_series(scan, scan.series[1].key) is scan.series[1]
    with pytest.raises(InputError, match=rf"^Series {uid} holds 2 acquisitions \(.*\): give the number of the one "):
        choose_series(scan, uid)  # the UID names both: not the first one silently
    reference = arrays.volume_array(load_input(ctx, UNCOMPRESSED_SERIES).node)
    for number, series in enumerate(scan.series, 1):
        voxels = arrays.volume_array(load_input(ctx, tmp_path / "study", series=str(number)).node)
        assert np.array_equal(voxels, reference + 100 * labels.index(series.part))  # one acquisition, all of it


@pytest.mark.parametrize("shift_mm", [0.0, 0.5])
def test_two_patients_under_one_reused_series_uid_are_never_one_volume(ctx, shared_data, tmp_path, shift_mm):
    """A faulty anonymiser gave two studies one series UID: the second's slices were dropped as duplicates (at the
    same positions) or woven between the first's (table shifted), one volume of two patients."""
    uid = generate_uid()
    for patient, step in (("A", 0), ("B", 1)):
        for number, ds in enumerate(real_slices(), 1):
            ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.PatientID = uid, f"1.2.3.{step}", patient
            ds.ImagePositionPatient[2] += step * shift_mm
            ds.PixelData = (ds.pixel_array + 100 * step).astype(ds.pixel_array.dtype).tobytes()
            save(ds, tmp_path / "export" / f"{patient}{number}.dcm")
    scan = scan_folder(tmp_path / "export")
    assert [len(s.files) for s in scan.series] == [3, 3] and not scan.skipped
    assert all(s.uid == uid and s.part.startswith("study ") and s.key == f"{uid}|{s.part}" for s in scan.series)
    assert all(any("shares its series UID with another patient's or study's images" in note for note in s.notes)
               for s in scan.series)
    reference = arrays.volume_array(load_input(ctx, UNCOMPRESSED_SERIES).node)
    steps = sorted(int(str(pydicom.dcmread(s.files[0]).StudyInstanceUID)[-1]) for s in scan.series)
    assert steps == [0, 1]
    for number, series in enumerate(scan.series, 1):
        step = int(str(pydicom.dcmread(series.files[0]).StudyInstanceUID)[-1])
        voxels = arrays.volume_array(load_input(ctx, tmp_path / "export", series=str(number)).node)
        assert np.array_equal(voxels, reference + 100 * step)  # one patient's slices, all of them


def test_acquisition_numbers_along_the_table_stay_one_volume_and_true_duplicates_are_still_dropped(shared_data,
                                                                                                   tmp_path):
    """A sequential scan numbers each rotation as an acquisition: blocks that do not overlap are one volume.
    A second copy of a slice (same position, same acquisition) is a duplicate, and a localizer stays left out."""
    uid = generate_uid()
    for number, ds in enumerate(real_slices(), 1):
        ds.SeriesInstanceUID, ds.AcquisitionNumber = uid, number
        save(ds, tmp_path / "seq" / f"{number}.dcm")
    copy_ = real_slices()[1]
    copy_.SeriesInstanceUID, copy_.AcquisitionNumber = uid, 2
    save(copy_, tmp_path / "seq" / "again.dcm")
    localizer = real_slices()[0]
    localizer.SeriesInstanceUID, localizer.ImageType = uid, ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    localizer.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    save(localizer, tmp_path / "seq" / "scout.dcm")
    # An MR acquired in two interleaved packages numbers them as two acquisitions: together, one even volume.
    packages = generate_uid()
    for number, ds in enumerate(real_slices(), 1):
        ds.SeriesInstanceUID, ds.AcquisitionNumber = packages, 1 + number % 2
        save(ds, tmp_path / "seq" / f"package{number}.dcm")
    scan = scan_folder(tmp_path / "seq")
    assert [(s.key, s.part, len(s.files)) for s in scan.series] == [(uid, "", 3), (packages, "", 3)]
    assert {s.path.name: s.reason for s in scan.skipped} == {
        "again.dcm": "same position as 2.dcm (a duplicate slice)",
        "scout.dcm": "a different orientation, size or pixel spacing from the rest of its series"}


@pytest.mark.parametrize("spacing, reason", [
    (0.9, "a different orientation, size or pixel spacing from the rest of its series"),
    (None, "a localizer, not part of the volume (the one image of image type ORIGINAL/PRIMARY/LOCALIZER in its series)")])
def test_a_localizer_in_the_series_with_the_stacks_orientation_is_left_out_as_slicer_leaves_it_out(
        ctx, shared_data, tmp_path, spacing, reason):
    """Siemens Axiom and GE volume viewer put one localizer of the volume's own orientation and size into its series;
    100 mm beyond the stack it was loaded as 100 interpolated slices of a body that is not there, and as image 1 it
    gave the series its pixel spacing (then it is left out for its spacing). Slicer's DICOM
    module prefers the series without the one image of another image type when that one is evenly spaced."""
    uid = generate_uid()
    for number, ds in enumerate(real_slices(), 1):
        ds.SeriesInstanceUID = uid
        save(ds, tmp_path / "study" / f"{number}.dcm")
    localizer = real_slices()[0]  # image 1 of its series, below the stack, over a wider field of view
    localizer.SeriesInstanceUID, localizer.ImageType = uid, ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    localizer.ImagePositionPatient = [*localizer.ImagePositionPatient[:2], localizer.ImagePositionPatient[2] - 100]
    localizer.PixelSpacing = [spacing, spacing] if spacing else localizer.PixelSpacing
    save(localizer, tmp_path / "study" / "0-overview.dcm")
    loaded = load_input(ctx, tmp_path / "study")
    assert arrays.volume_array(loaded.node).shape[0] == 3
    assert sorted(p.name for p in loaded.series.files) == ["1.dcm", "2.dcm", "3.dcm"]
    assert loaded.series.pixel_spacing == tuple(float(v) for v in real_slices()[0].PixelSpacing)
    assert any(f"0-overview.dcm: {reason}" in note for note in loaded.notes)
    assert not any("missing" in note for note in loaded.notes)


def test_a_localizer_beside_a_stack_of_two_slices_is_left_out_too(shared_data, tmp_path):
    """The localizer rule asks for the rest to be one even stack: two slices are one (a single gap), so the
    smallest series it applies to holds three images, and its localizer was then a slice 100 mm away."""
    uid = generate_uid()
    for number, ds in enumerate(real_slices()[:2], 1):
        ds.SeriesInstanceUID = uid
        save(ds, tmp_path / "study" / f"{number}.dcm")
    localizer = real_slices()[0]
    localizer.SeriesInstanceUID, localizer.ImageType = uid, ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    localizer.ImagePositionPatient = [*localizer.ImagePositionPatient[:2], localizer.ImagePositionPatient[2] - 100]
    save(localizer, tmp_path / "study" / "0-overview.dcm")
    scan = scan_folder(tmp_path / "study")
    assert [sorted(p.name for p in s.files) for s in scan.series] == [["1.dcm", "2.dcm"]]
    assert [(s.path.name, s.reason) for s in scan.skipped] == [(
        "0-overview.dcm",
        "a localizer, not part of the volume (the one image of image type ORIGINAL/PRIMARY/LOCALIZER in its series)")]
    assert not scan.series[0].is_uneven


ONE_LOCALIZER = "a localizer, not part of the volume (the one image of image type ORIGINAL/PRIMARY/LOCALIZER in its series)"


@pytest.mark.parametrize("image_type, acquisition, steps_below, reason", [
    (["ORIGINAL", "PRIMARY", "LOCALIZER"], 1, 0, ONE_LOCALIZER),  # at the second slice's position
    (["ORIGINAL", "PRIMARY", "LOCALIZER"], 1, 2, ONE_LOCALIZER),  # a step below the stack: the gaps stay even
    # No image type says so, but a single image of another acquisition at a position of the volume is no volume:
    # left out as a localizer beyond the stack is, not made a one-image 'acquisition' beside the volume.
    (["ORIGINAL", "PRIMARY", "AXIAL"], 2, 0,
     "a localizer, not part of the volume (the one image of acquisition 2 in its series)"),
])
def test_a_lone_localizer_where_the_volume_is_is_left_out_not_made_an_acquisition(
        ctx, shared_data, tmp_path, image_type, acquisition, steps_below, reason):
    """At one of the volume's positions it made the series two 'acquisitions': the volume was renamed '(image type
    ORIGINAL/PRIMARY/AXIAL)' with a warning that it is one of several, and the scout became a one-image series.
    Where it lay a step beyond the stack, its gaps even, it was loaded as a slice of the volume."""
    uid = generate_uid()
    slices = real_slices()
    for number, ds in enumerate(slices, 1):
        ds.SeriesInstanceUID, ds.AcquisitionNumber = uid, 1
        save(ds, tmp_path / "study" / f"{number}.dcm")
    step = float(slices[1].ImagePositionPatient[2]) - float(slices[0].ImagePositionPatient[2])
    localizer = real_slices()[1]
    localizer.SeriesInstanceUID, localizer.AcquisitionNumber, localizer.ImageType = uid, acquisition, image_type
    localizer.ImagePositionPatient[2] = float(localizer.ImagePositionPatient[2]) - steps_below * step
    localizer.PixelData = (localizer.pixel_array + 1000).astype(localizer.pixel_array.dtype).tobytes()
    save(localizer, tmp_path / "study" / "0-scout.dcm")
    scan = scan_folder(tmp_path / "study")
    assert [(s.name, s.part, sorted(p.name for p in s.files), s.notes) for s in scan.series] == [
        ("CT 'series 2'", "", ["1.dcm", "2.dcm", "3.dcm"], [])]
    assert [(s.path.name, s.reason) for s in scan.skipped] == [("0-scout.dcm", reason)]
    loaded = load_input(ctx, tmp_path / "study")
    reference = arrays.volume_array(load_input(ctx, UNCOMPRESSED_SERIES).node)
    assert np.array_equal(arrays.volume_array(loaded.node), reference)  # none of the scout's pixels
    assert any(f"0-scout.dcm: {reason}" in note for note in loaded.notes)


def test_two_phases_with_a_localizer_among_them_are_still_two_series_without_it(shared_data, tmp_path):
    """The localizer is set aside before the phases are told apart: two phases of three slices each, not three
    'image types' (or a phase that loads the scout as one of its slices)."""
    uid = write_acquisitions(tmp_path / "study", "AcquisitionNumber", [1, 2])
    localizer = real_slices()[1]
    localizer.SeriesInstanceUID, localizer.AcquisitionNumber = uid, 2
    localizer.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    save(localizer, tmp_path / "study" / "scout.dcm")
    scan = scan_folder(tmp_path / "study")
    assert [(s.part, len(s.files)) for s in scan.series] == [("acquisition 1", 3), ("acquisition 2", 3)]
    assert [(s.path.name, s.series, s.reason) for s in scan.skipped] == [
        ("scout.dcm", "CT 'series 2' (acquisition 2)", ONE_LOCALIZER)]

def started_inbox(tmp_path) -> Inbox:
    (tmp_path / "inbox").mkdir(exist_ok=True)
    inbox = Inbox(InboxOptions(folder=tmp_path / "inbox", state_folder=tmp_path / "state", settle_seconds=0.3,
                               polling=True, poll_interval=0.1, hold_seconds=30))
    inbox.start()
    return inbox


def poll_for(inbox, seconds=10.0) -> list:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready = inbox.poll()
        if ready:
            return ready
        time.sleep(0.05)
    return []


def test_an_inbox_journal_of_an_older_version_still_makes_one_series_of_one_study(shared_data, tmp_path):
    """Records written before slices knew their study read back as of an unknown study: a series that gained a file
    after the upgrade was split in two, the new slice delivered alone."""
    import sqlite3

    paths = [save(ds, tmp_path / "inbox" / "CT" / f"{n}.dcm") for n, ds in enumerate(real_slices())]
    paths[2].rename(tmp_path / "later.dcm")
    inbox = started_inbox(tmp_path)
    [first] = poll_for(inbox)
    inbox.acknowledge(first, True)
    inbox.stop()
    with sqlite3.connect(tmp_path / "state" / "journal.sqlite") as journal:  # as the older version wrote them
        for path, text in journal.execute("SELECT path, slice FROM files WHERE slice IS NOT NULL").fetchall():
            older = {k: v for k, v in json.loads(text).items() if k != "origin"}
            journal.execute("UPDATE files SET slice=? WHERE path=?", (json.dumps(older), path))
    (tmp_path / "later.dcm").rename(paths[2])
    inbox = started_inbox(tmp_path)
    try:
        assert [(d.key, len(d.series.files), d.is_update) for d in poll_for(inbox)] == [(first.key, 3, True)]
        assert inbox.duplicates == []  # its older files are not read again, so not taken for a second copy
    finally:
        inbox.stop()


def test_inbox_delivers_each_acquisition_once_under_a_stable_key(shared_data, tmp_path):
    """The first acquisition alone is the series itself (key: its UID, as before); when a second one of the same
    region arrives it is delivered as its own series, and the first is not delivered again. Echoes numbered in
    turn (1, 3, 5 and 2, 4, 6) are not held as 'instance numbers missing'."""
    inbox = started_inbox(tmp_path)
    try:
        uid = write_acquisitions(tmp_path / "inbox" / "first", "AcquisitionNumber", [1])
        first = poll_for(inbox)
        assert [(d.key, len(d.series.files)) for d in first] == [(uid, 3)]
        inbox.acknowledge(first[0], True)
        for ds in real_slices():
            ds.SeriesInstanceUID, ds.AcquisitionNumber = uid, 2
            save(ds, tmp_path / "inbox" / "second" / f"{ds.InstanceNumber}.dcm")
        second = poll_for(inbox)
        assert [(d.key, d.series.name, len(d.series.files), d.is_update) for d in second] == [
            (f"{uid}|acquisition 2", "CT 'series 2' (acquisition 2)", 3, False)]
        inbox.acknowledge(second[0], True)
        assert poll_for(inbox, 1.0) == []
        assert {s.key: s.state.value for s in inbox.statuses()} == {uid: "loaded", f"{uid}|acquisition 2": "loaded"}

        echoes = generate_uid()
        for echo, time_ in enumerate((4.92, 12.3)):
            for index, ds in enumerate(real_slices()):
                ds.SeriesInstanceUID, ds.EchoTime, ds.EchoNumbers = echoes, time_, echo + 1
                ds.InstanceNumber = 2 * index + echo + 1
                save(ds, tmp_path / "inbox" / "echoes" / f"{ds.InstanceNumber}.dcm")
            if echo == 0:  # alone, the first echo lacks numbers 2 and 4: held, waiting for them
                assert poll_for(inbox, 1.0) == []
                assert inbox.statuses()[-1].key == echoes and "held for more files" in inbox.statuses()[-1].reason
        started = time.monotonic()
        delivered = poll_for(inbox) + poll_for(inbox, 1.0)
        assert time.monotonic() - started < 10 and not any(d.incomplete for d in delivered)
        assert sorted(d.series.part for d in delivered) == ["echo 1, TE 4.92 ms", "echo 2, TE 12.3 ms"]
        assert echoes not in {s.key for s in inbox.statuses()}  # no stale 'waiting' row for the series as one
    finally:
        inbox.stop()


# -- enhanced and legacy-converted multi-frame images ------------------------------------------------------------

def enhanced_from(slices, positions=None, orientations=None) -> Dataset:
    """A Legacy Converted Enhanced CT image built with pydicom alone (stage 1 has no highdicom): the slices'
    pixels as frames, their geometry in functional groups (per frame where given, else shared)."""
    ds = copy.deepcopy(slices[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.2"
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([Dataset()])
    shared.PixelMeasuresSequence[0].PixelSpacing = ds.PixelSpacing
    shared.PixelMeasuresSequence[0].SliceThickness = ds.SliceThickness
    shared.PixelValueTransformationSequence = Sequence([Dataset()])
    shared.PixelValueTransformationSequence[0].RescaleIntercept = ds.RescaleIntercept
    shared.PixelValueTransformationSequence[0].RescaleSlope = ds.RescaleSlope
    shared.PixelValueTransformationSequence[0].RescaleType = "HU"
    if orientations is None:
        shared.PlaneOrientationSequence = Sequence([Dataset()])
        shared.PlaneOrientationSequence[0].ImageOrientationPatient = ds.ImageOrientationPatient
    frames = []
    positions = positions or [s.ImagePositionPatient for s in slices]
    for index in range(len(slices)):
        frame = Dataset()
        frame.PlanePositionSequence = Sequence([Dataset()])
        frame.PlanePositionSequence[0].ImagePositionPatient = positions[index]
        if orientations is not None:
            frame.PlaneOrientationSequence = Sequence([Dataset()])
            frame.PlaneOrientationSequence[0].ImageOrientationPatient = orientations[index]
        frames.append(frame)
    for name in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
                 "RescaleIntercept", "RescaleSlope", "SliceLocation"):
        if name in ds:
            delattr(ds, name)
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.NumberOfFrames = len(slices)
    ds.PixelData = b"".join(s.PixelData for s in slices)
    ds.SeriesInstanceUID = generate_uid()
    return ds


def test_an_enhanced_multi_frame_image_is_one_series_loaded_like_its_slices(ctx, shared_data, tmp_path, untouched):
    """It was refused as 'an image without patient position or orientation (a secondary capture?)'."""
    slices = real_slices()
    path = save(enhanced_from(slices[::-1]), tmp_path / "enhanced" / "frames.dcm")  # frames from the top down
    untouched(tmp_path / "enhanced")
    scan = scan_folder(tmp_path / "enhanced")
    series = choose_series(scan)
    assert (series.files, series.slice_count, series.shape) == ([path], 3, (512, 512)) and not scan.skipped
    assert "3 slices in 1 file of 512x512, 0.811x0.811x1 mm" in series.summary()
    loaded = load_input(ctx, path)
    reference = load_input(ctx, UNCOMPRESSED_SERIES)
    assert np.array_equal(arrays.volume_array(loaded.node), arrays.volume_array(reference.node))
    assert np.allclose(arrays.ijk_to_ras(loaded.node), arrays.ijk_to_ras(reference.node), atol=1e-4)


def test_highdicom_legacy_converted_enhanced_ct_loads(ctx, shared_data, tmp_path):
    highdicom = pytest.importorskip("highdicom")
    with pytest.warns(UserWarning, match="person name"):  # the GE series' single-component patient name
        image = highdicom.legacy.LegacyConvertedEnhancedCTImage(
            real_slices(), series_instance_uid=highdicom.UID(), series_number=5, sop_instance_uid=highdicom.UID(),
            instance_number=1)
    image.save_as(tmp_path / "enhanced.dcm")
    loaded = load_input(ctx, tmp_path / "enhanced.dcm")
    reference = load_input(ctx, UNCOMPRESSED_SERIES)
    assert np.array_equal(arrays.volume_array(loaded.node), arrays.volume_array(reference.node))
    assert np.allclose(arrays.ijk_to_ras(loaded.node), arrays.ijk_to_ras(reference.node), atol=1e-4)


def shifted(slices, index, axis, mm):
    positions = [[float(v) for v in s.ImagePositionPatient] for s in slices]
    positions[index][axis] += mm
    return positions


@pytest.mark.parametrize("build, reason", [
    (lambda s: enhanced_from(s, positions=shifted(s, 2, 2, -1.0)),  # GDCM gives 1 mm pixels for this one
     "a multi-frame image whose frames are unevenly spaced (1 to 2 mm; a frame is missing?), which Slicer's reader "
     "would load at the wrong size"),
    (lambda s: enhanced_from(s, positions=shifted(s, 2, 2, 1.0)),
     "a multi-frame image with several frames at one position (several stacks in one file: echoes, phases or time "
     "points), which cannot be loaded as one volume: export each echo or phase as a series of its own from the "
     "scanner or PACS (single-frame images, or one file each)"),
    (lambda s: enhanced_from(s, orientations=[[1, 0, 0, 0, 1, 0]] * 2 + [[0, 1, 0, 0, 0, -1]]),
     "a multi-frame image whose frames differ in orientation or pixel size (several stacks in one file), which "
     "cannot be loaded as one volume: export each stack as a series of its own from the scanner or PACS "
     "(single-frame images, or one file each)"),
    (lambda s: enhanced_from(s, positions=[[p[0], p[1] + 0.3 * k, p[2]] for k, p in  # 0.3 mm per 1 mm: atan 0.3
                                           enumerate(shifted(s, 0, 0, 0))]),
     "a multi-frame image whose frames lean 16.7° from their normal (a gantry tilt), which Slicer's reader would "
     "load distorted"),
])
def test_a_multi_frame_image_that_is_not_one_even_stack_is_refused_in_one_sentence(ctx, shared_data, tmp_path, build,
                                                                                  reason):
    path = save(build(real_slices()), tmp_path / "frames.dcm")
    assert read_slice(path) == (None, reason)
    with pytest.raises(InputError) as error:
        load_input(ctx, path)
    advice = "" if "several stacks" in reason else "; give a DICOM image file or folder, or a NIfTI/NRRD volume"
    assert str(error.value) == f"{path} is not a usable image: {reason}{advice}."


def test_echoes_in_one_enhanced_file_are_refused_with_how_to_export_them_not_check_the_folder(ctx, shared_data,
                                                                                            tmp_path):
    """Two echoes interleaved in one enhanced MR file (frames two by two at one position) ended in 'check the
    folder': the folder is fine, the file needs exporting otherwise."""
    slices = real_slices()
    for ds in slices:
        ds.Modality, ds.EchoTime = "MR", 4.92
    echoes = [s for ds in slices for s in (ds, copy.deepcopy(ds))]
    enhanced = enhanced_from(echoes)
    enhanced.SOPClassUID = enhanced.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"  # Enhanced MR
    path = save(enhanced, tmp_path / "study" / "MF0001")
    with pytest.raises(InputError) as error:
        load_input(ctx, tmp_path / "study")
    assert str(error.value) == (
        f"No DICOM image series found in {tmp_path / 'study'} (1 file(s) looked at, none a usable image slice): the "
        f"first, {path}, is a multi-frame image with several frames at one position (several stacks in one file: "
        "echoes, phases or time points), which cannot be loaded as one volume: export each echo or phase as a series "
        "of its own from the scanner or PACS (single-frame images, or one file each).")
    (tmp_path / "study" / "A_notes.txt").write_text("not DICOM")  # read first, its reason without advice
    with pytest.raises(InputError, match=r"; the first: .*A_notes.txt: not a DICOM file\): check the folder\.$"):
        load_input(ctx, tmp_path / "study")



def test_a_multi_frame_image_whose_pixel_data_is_shorter_than_its_frames_is_truncated(shared_data, tmp_path):
    """A file's size check counted one frame of an enhanced image: with its last frame missing it was read as whole
    (an upload still being written would have been delivered), and GDCM left to fail on it or read past its end."""
    ds = enhanced_from(real_slices())
    ds.PixelData = ds.PixelData[:len(ds.PixelData) * 2 // 3]  # two of its three frames
    assert read_slice(save(ds, tmp_path / "frames.dcm")) == (None, "truncated (its pixel data is shorter than its "
                                                                   "size says)")

# -- non-image objects and cut files -----------------------------------------------------------------------------

def non_image(sop_class: str, modality: str, study_uid: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study_uid, generate_uid(), modality
    ds.ContentSequence = Sequence([Dataset()])
    ds.ContentSequence[0].ValueType = "TEXT"
    ds.ContentSequence[0].TextValue = "x" * 70000  # more than one read's worth: read to its very end
    return ds


AS_PART_10 = {"enforce_file_format": True} if pydicom.__version__ >= "3" else {"write_like_original": False}
NON_IMAGES = {
    "dose.dcm": ("1.2.840.10008.5.1.4.1.1.88.67", "SR", "not an image (X-Ray Radiation Dose SR Storage)"),
    "kos.dcm": ("1.2.840.10008.5.1.4.1.1.88.59", "KO", "not an image (Key Object Selection Document Storage)"),
    "gsps.dcm": ("1.2.840.10008.5.1.4.1.1.11.1", "PR",
                 "not an image (Grayscale Softcopy Presentation State Storage)"),
    "csa.dcm": ("1.3.12.2.1107.5.9.1", "CT", "not an image (Siemens CSA Non-Image Storage)"),
    "plan.dcm": ("1.2.840.10008.5.1.4.1.1.481.5", "RTPLAN", "not an image (RT Plan Storage)"),
    "rtstruct.dcm": ("1.2.840.10008.5.1.4.1.1.481.3", "RTSTRUCT", "not an image (RT Structure Set Storage)"),
}


def write_study_with_non_images(folder):
    shutil.copytree(UNCOMPRESSED_SERIES, folder)
    study = real_slices()[0].StudyInstanceUID
    for name, (sop_class, modality, _) in NON_IMAGES.items():
        non_image(sop_class, modality, study).save_as(folder / name, **AS_PART_10)


def test_non_image_objects_are_named_and_left_aside_quietly_and_a_file_cut_before_its_pixels_is_truncated(
        ctx, shared_data, tmp_path):
    """They were 'truncated or not an image (no pixel data)', and their presence was a warning on every load."""
    write_study_with_non_images(tmp_path / "study")
    data = (UNCOMPRESSED_SERIES / "02.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[:data.rindex(b"\xe0\x7f\x10\x00")])  # ends where its pixel data began
    scan = scan_folder(tmp_path / "study")
    assert {s.path.name: s.reason for s in scan.skipped} == {name: reason for name, (*_, reason) in NON_IMAGES.items()}
    assert [len(s.files) for s in scan.series] == [3] and scan.notes == []
    assert read_slice(tmp_path / "cut.dcm") == (None, TRUNCATED)
    loaded = load_input(ctx, tmp_path / "study")
    assert loaded.notes == [] and arrays.volume_array(loaded.node).shape == (3, 512, 512)


def test_inbox_delivers_a_study_with_non_image_objects_without_holding_it(shared_data, tmp_path):
    """The inbox once held the series for its full hold time, taking a dose report for a file still growing."""
    inbox = started_inbox(tmp_path)
    try:
        write_study_with_non_images(tmp_path / "inbox" / "study")
        delivered = poll_for(inbox, 10.0)  # the hold is 30 s
        assert [len(d.series.files) for d in delivered] == [3] and not delivered[0].incomplete
        assert {p.name: r for p, r in inbox.bad_files.items()} == {n: r for n, (*_, r) in NON_IMAGES.items()}
    finally:
        inbox.stop()


def test_the_inbox_panel_lists_non_images_as_skipped_not_as_errors(shared_data, tmp_path):
    import time

    from SegmentationMachineLib.panels.inbox import InboxPanel

    (tmp_path / "inbox").mkdir()
    panel = InboxPanel(folder=tmp_path / "inbox", settle_seconds=0.2, state_folder=tmp_path / "state")
    panel.start()
    try:
        write_study_with_non_images(tmp_path / "inbox" / "study")
        deliveries, deadline = [], time.monotonic() + 15
        while not deliveries and time.monotonic() < deadline:
            deliveries = panel.tick()
            time.sleep(0.05)
        assert len(deliveries) == 1
        rows = {row[0]: row[2:] for row in panel.rows()}
        assert {name: rows[name] for name in NON_IMAGES} == {n: ("skipped", r) for n, (*_, r) in NON_IMAGES.items()}
    finally:
        panel.stop()


# -- a CD's DICOMDIR ---------------------------------------------------------------------------------------------

def write_cd(folder):
    from pydicom.fileset import FileSet
    fileset = FileSet()
    for ds in real_slices():
        fileset.add(ds)
    fileset.write(folder)
    (folder / "AUTORUN.INF").write_text("[autorun]\nopen=viewer.exe\n")
    return folder / "DICOMDIR"


def test_a_dicomdir_given_reads_the_files_it_lists_and_met_in_a_folder_is_left_aside(ctx, shared_data, tmp_path):
    """`model /cd/DICOMDIR` once failed: 'DICOMDIR is not a usable image: truncated or not an image'."""
    dicomdir = write_cd(tmp_path / "cd")
    scan = scan_folder(dicomdir)
    assert [len(s.files) for s in scan.series] == [3] and scan.skipped == [] and scan.folder == tmp_path / "cd"
    assert arrays.volume_array(load_input(ctx, dicomdir).node).shape == (3, 512, 512)
    folder_scan = scan_folder(tmp_path / "cd")
    assert {s.path.name: s.reason for s in folder_scan.skipped} == {"DICOMDIR": DICOMDIR,
                                                                    "AUTORUN.INF": "not a DICOM file"}
    assert [len(s.files) for s in folder_scan.series] == [3] and "DICOMDIR" not in " ".join(folder_scan.notes)
    # Copied off the CD with lower-case names, the DICOMDIR's paths miss: its folder is read instead.
    (tmp_path / "cd" / "PT000000").rename(tmp_path / "cd" / "pt000000")
    assert [len(s.files) for s in scan_folder(dicomdir).series] == [3]


def test_cli_lists_the_series_of_a_dicomdir(shared_data, tmp_path):
    dicomdir = write_cd(tmp_path / "cd")
    result = subprocess.run([sys.executable, "-m", "SegmentationMachineLib.cli", "model", str(dicomdir), "--list"],
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("1. CT 'series 2', 3 slices of 512x512, 0.811x0.811x1 mm"), result.stdout
