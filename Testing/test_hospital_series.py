"""The rest of what a hospital's export holds: series the presets must not model (an MR, a topogram), images that
are no slices (a 3D screenshot, a parametric map), and series whose images no tag tells apart. Each gets a
sentence, never a junk model or a traceback."""

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from conftest import EXAMPLE_CT, EXAMPLE_LABELS, UNCOMPRESSED_SERIES
from test_cli_messages import one_sentence, run_cli, watch_once
from test_series_kinds import enhanced_from, real_slices, save, write_acquisitions
from SegmentationMachineLib.core import arrays
from SegmentationMachineLib.core.errors import InputError, UnsuitableImage
from SegmentationMachineLib.dicom.phantom import make_phantom, write_ct_series
from SegmentationMachineLib.dicom.series import choose_series, is_quiet_skip, scan_folder
from SegmentationMachineLib.dicom.slices import COLOUR_IMAGE, read_slice
from SegmentationMachineLib.dicom.volumes import load_input
from SegmentationMachineLib.segment.masks import preset_mask


def write_mr_series(folder, shape=(12, 48, 48)):
    """The phantom's anatomy in MR-like values (no Hounsfield units: air about 10, everything at or above 0)."""
    phantom = make_phantom(shape)
    signal = np.clip((phantom.hu + 1000) * 0.4, 0, 4000)
    files = write_ct_series(folder, signal, 1.5, [(-36, -36, k * 2.0) for k in range(shape[0])], "t1 vibe")
    for path in files:
        ds = pydicom.dcmread(path)
        ds.Modality, ds.SOPClassUID = "MR", "1.2.840.10008.5.1.4.1.1.4"
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.RescaleIntercept = 0
        ds.save_as(path)
    return files


def test_an_mr_given_to_the_presets_is_refused_before_it_is_loaded(tmp_path):
    """The skin preset made a 'Skin' of the whole box (an MR's air is above its threshold), the bone preset a
    scatter of bright voxels, both exported as if they were right."""
    write_mr_series(tmp_path / "mr")
    result = run_cli("model", tmp_path / "mr", "--out", tmp_path / "out", "--preset", "skin")
    one_sentence(result, "Series MR 't1 vibe' is not a CT: the presets need a CT in Hounsfield units; for MR or "
                         "other images use the AI prompt tools.")
    assert "Loaded" not in result.stdout and not (tmp_path / "out").exists()


def test_a_ct_whose_modality_an_anonymiser_left_out_is_modelled(tmp_path):
    """Read as OT ('other', as a CT's secondary capture is): the presets take it, its values tell whether it is a CT.
    Refused as 'not a CT', such a series could not be modelled at all."""
    files = write_ct_series(tmp_path / "ct", make_phantom((12, 48, 48)).hu, 1.5,
                            [(-36, -36, k * 2.0) for k in range(12)], "anonymous")
    for path in files:
        ds = pydicom.dcmread(path)
        del ds.Modality
        ds.save_as(path)
    result = run_cli("model", tmp_path / "ct", "--out", tmp_path / "out", "--preset", "skin", "--format", "stl")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert [p.suffix for p in (tmp_path / "out").rglob("*.stl")] == [".stl"]

def test_a_volume_without_hounsfield_units_or_of_one_slice_is_refused_by_the_preset_itself():
    """What the module and a NIfTI file give: no modality, so the values and the shape tell."""
    mr_like = np.clip(make_phantom((8, 32, 32)).hu + 1000, 0, None)
    with pytest.raises(UnsuitableImage, match="^'vibe' has no value below 0, so it is not a CT in Hounsfield units"):
        preset_mask("bone", mr_like, (2.0, 1.5, 1.5), "vibe")
    topogram = make_phantom((1, 32, 32)).hu
    with pytest.raises(UnsuitableImage, match=r"^'topo' is a single slice \(a localizer or a screenshot\?\)"):
        preset_mask("skin", topogram, (2.0, 1.5, 1.5), "topo")
    assert preset_mask("skin", make_phantom((8, 32, 32)).hu, (2.0, 1.5, 1.5), "ct").any()  # a CT still works


def write_nrrd(path, values: np.ndarray, spacing_kji) -> Path:
    """values (K, J, I) as a raw little-endian float NRRD file, as a research pipeline writes one."""
    directions = " ".join(f"({','.join(str(spacing_kji[2 - a] if b == a else 0) for b in range(3))})" for a in range(3))
    header = ("NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\n"
              f"sizes: {values.shape[2]} {values.shape[1]} {values.shape[0]}\nspace directions: {directions}\n"
              "kinds: domain domain domain\nendian: little\nencoding: raw\nspace origin: (0,0,0)\n\n")
    path.write_bytes(header.encode() + values.astype("<f4").tobytes())
    return path


def test_a_preset_that_takes_the_whole_image_is_refused_and_a_ct_cropped_to_the_spine_keeps_its_bones(
        ctx, shared_data, tmp_path):
    """Skin from an intensity-normalised MR (z-scores, no value below 0 to tell) was the whole box, exported as
    'Skin: 4417.5 mL'. Refusing images without air (nothing at or below -500) would refuse a CT cropped to the spine
    too, whose bones are right: the whole box as a mask is what tells."""
    signal = np.clip((make_phantom((12, 48, 48)).hu + 1000) * 0.4, 0, 4000)
    path = write_nrrd(tmp_path / "mr_zscored.nrrd", (signal - signal.mean()) / signal.std(), (2.0, 1.5, 1.5))
    result = run_cli("model", path, "--out", tmp_path / "out", "--preset", "skin", "--format", "stl")
    one_sentence(result, "The skin preset took 100% of 'mr_zscored', the whole image: it expects a CT in Hounsfield "
                         "units with air around the body (an MR or intensity-normalised image has none, nor has a CT "
                         "cropped inside the body); for MR or other images use the AI prompt tools.")
    assert not (tmp_path / "out").exists()
    ct = arrays.volume_array(load_input(ctx, EXAMPLE_CT).node).astype(np.float32)
    labels = arrays.volume_array(load_input(ctx, EXAMPLE_LABELS).node)
    _, j, i = np.nonzero((labels >= 26) & (labels <= 50))  # the vertebrae
    spine = ct[:, j.min() - 2:j.max() + 3, i.min() - 2:i.max() + 3]
    assert np.mean(spine <= -500) < 0.01  # a few voxels of bowel gas: all but no air
    assert 0.05 < preset_mask("bone", spine, (3.0, 3.0, 3.0), "spine").mean() < 0.3
    with pytest.raises(UnsuitableImage, match=r"^The skin preset took 99% of 'spine', the whole image"):
        preset_mask("skin", spine, (3.0, 3.0, 3.0), "spine")
    assert preset_mask("skin", ct, (3.0, 3.0, 3.0), "abdomen").mean() < 0.7  # the whole CT: its skin


def test_watch_leaves_an_mr_and_a_topogram_of_the_study_aside_and_models_the_ct(shared_data, tmp_path):
    """Each series of a study was modelled: the MR into junk, the one-slice topogram into a plate."""
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    shutil.copytree(UNCOMPRESSED_SERIES, inbox / "ct")
    write_mr_series(inbox / "mr")
    topogram = real_slices()[0]
    topogram.SeriesInstanceUID, topogram.SeriesDescription = generate_uid(), "Topogram"
    topogram.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    save(topogram, inbox / "topogram" / "1.dcm")
    result = watch_once(inbox, outbox, "--format", "stl", "--hold", "600")  # held, it would time out
    assert "held for more files" not in result.stdout  # the topogram is a whole series: skipped at once
    assert result.returncode == 0, result.stderr  # nothing failed: a scheduler is not alarmed
    states = {s["name"]: s for s in json.loads((outbox / "status.json").read_text())["series"]}
    assert states["MR 't1 vibe'"]["state"] == "skipped"
    assert states["MR 't1 vibe'"]["reason"].startswith("Series MR 't1 vibe' is not a CT")
    assert states["CT 'Topogram'"]["state"] == "skipped"
    assert "is a single slice" in states["CT 'Topogram'"]["reason"]
    assert states["CT 'series 2'"]["state"] == "done"
    assert "MR 't1 vibe': skipped: Series MR 't1 vibe' is not a CT" in result.stdout
    (outbox / "status.json").write_bytes(b"")  # a power cut's: rebuilt from the journal, skipped still skipped
    assert watch_once(inbox, outbox, "--format", "stl").returncode == 0
    rebuilt = {s["name"]: s["state"] for s in json.loads((outbox / "status.json").read_text())["series"]}
    assert rebuilt == {"MR 't1 vibe'": "skipped", "CT 'Topogram'": "skipped", "CT 'series 2'": "done"}
    assert [p for p in outbox.iterdir() if p.is_dir() and not p.name.startswith(".")] == [
        Path(states["CT 'series 2'"]["result"])]


def test_a_3d_screenshot_with_a_position_is_left_aside_quietly_and_a_parametric_map_is_named(shared_data, tmp_path):
    """A colour image that carries a position (a VRT saved as secondary capture) ended in a reshape traceback; a
    float image was skipped for "'FileDataset' object has no attribute 'PixelData'"."""
    screenshot = real_slices()[0]
    screenshot.SamplesPerPixel, screenshot.PhotometricInterpretation, screenshot.PlanarConfiguration = 3, "RGB", 0
    screenshot.BitsAllocated = screenshot.BitsStored = 8
    screenshot.HighBit, screenshot.PixelRepresentation = 7, 0
    screenshot.PixelData = bytes(int(screenshot.Rows) * int(screenshot.Columns) * 3)
    path = save(screenshot, tmp_path / "vrt.dcm")
    assert read_slice(path) == (None, COLOUR_IMAGE) and is_quiet_skip(COLOUR_IMAGE)
    parametric = real_slices()[0]
    parametric.FloatPixelData = np.zeros(int(parametric.Rows) * int(parametric.Columns), np.float32).tobytes()
    parametric.BitsAllocated = 32
    del parametric.PixelData
    reason = read_slice(save(parametric, tmp_path / "adc.dcm"))[1]
    assert reason.startswith("floating-point pixel data (a parametric map")


def placeless(sop_class: str, modality: str, colour=False, frames=1):
    """A real slice made into an image without ImagePositionPatient/ImageOrientationPatient."""
    ds = real_slices()[0]
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.Modality, ds.SeriesInstanceUID = modality, generate_uid()
    del ds.ImagePositionPatient, ds.ImageOrientationPatient
    if colour or frames > 1:
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = (3, "RGB") if colour else (1, "MONOCHROME2")
        if colour:
            ds.PlanarConfiguration = 0
        ds.NumberOfFrames = frames
        ds.PixelData = bytes(int(ds.Rows) * int(ds.Columns) * ds.SamplesPerPixel * frames)
    return ds


def test_secondary_captures_without_a_position_are_left_aside_quietly_and_a_placeless_ct_is_told(shared_data,
                                                                                                tmp_path):
    """A dose screen or a scanned requisition (in most studies) was warned about as 'an image without patient position
    or orientation (a secondary capture?)', though the README says such images are left aside quietly."""
    study = tmp_path / "study"
    shutil.copytree(UNCOMPRESSED_SERIES, study / "ct")
    capture = "1.2.840.10008.5.1.4.1.1.7"
    save(placeless(capture, "OT"), study / "dose_screen")
    save(placeless(capture, "OT", colour=True), study / "requisition")
    save(placeless(capture + ".2", "OT", frames=2), study / "scanned_pages")  # Multi-frame Grayscale Byte SC
    save(placeless("1.2.840.10008.5.1.4.1.1.2", "CT"), study / "ct_without_position")
    scan = scan_folder(study)
    reasons = {s.path.name: s.reason for s in scan.skipped}
    assert reasons == {
        "dose_screen": "a secondary capture without a patient position (a dose screen or scanned document), not an "
                       "image slice",
        "requisition": COLOUR_IMAGE,
        "scanned_pages": reasons["dose_screen"],
        "ct_without_position": "an image without patient position or orientation (a secondary capture?)"}
    assert [is_quiet_skip(reasons[name]) for name in sorted(reasons)] == [False, True, True, True]
    assert scan.notes == [f"1 file(s) in {study} were skipped: {study / 'ct_without_position'}: an image without "
                          "patient position or orientation (a secondary capture?)."]
    assert len(scan.series) == 1 and len(scan.series[0].files) == 3


def test_slices_of_another_pixel_spacing_in_the_series_are_left_out_not_stretched(shared_data, tmp_path):
    slices = real_slices()
    for number, ds in enumerate(slices):
        ds.SeriesInstanceUID = slices[0].SeriesInstanceUID
        if number == 1:
            ds.PixelSpacing = [1.2, 1.2]
        save(ds, tmp_path / "study" / f"{number}.dcm")
    scan = scan_folder(tmp_path / "study")
    assert sorted(p.name for p in scan.series[0].files) == ["0.dcm", "2.dcm"]
    assert [(s.path.name, s.reason) for s in scan.skipped] == [
        ("1.dcm", "a different orientation, size or pixel spacing from the rest of its series")]


@pytest.mark.parametrize("keyword, values", [
    ("ContentTime", ["101500", "101600"]),  # no tag we split on
    ("TriggerTime", None),  # a trigger time that follows the heart beat, slice by slice: it cannot tell them apart
])
def test_images_at_the_same_positions_that_no_tag_tells_apart_are_refused_not_mixed(ctx, shared_data, tmp_path,
                                                                                  keyword, values):
    """Cardiac phases differing only so were one volume mixing them slice by slice (the first file at each position
    won, the rest were 'duplicates'). A slice sent again under a new UID is still a duplicate (test_series_kinds)."""
    if values is None:
        names = iter(f"IMG{n}" for n in range(6))
        uid = generate_uid()
        for phase in range(2):
            for number, ds in enumerate(real_slices()):
                ds.SeriesInstanceUID, ds.TriggerTime = uid, 100 + 400 * phase + 7 * number
                ds.PixelData = (ds.pixel_array + 100 * phase).astype(ds.pixel_array.dtype).tobytes()
                save(ds, tmp_path / "study" / next(names))
    else:
        write_acquisitions(tmp_path / "study", keyword, values)
    scan = scan_folder(tmp_path / "study")
    series = scan.series[0]
    assert series.problem == ("3 of its images lie where others do, and no tag tells them apart (cardiac phases, "
                              "energies or two reconstructions in one series?): have each exported as a series of its own")
    assert "(cannot be loaded: 3 of its images" in series.summary()
    assert all(s.reason.endswith("(another image, not a copy of it)") for s in scan.skipped)
    with pytest.raises(InputError, match=rf"^Series {series.name} was not loaded: 3 of its images lie where"):
        load_input(ctx, tmp_path / "study")


def test_images_no_tag_tells_apart_are_one_warning_for_their_series_and_each_is_named_in_the_log(shared_data,
                                                                                               tmp_path):
    """watch printed a WARNING per file ('Skipped .../b0: same position as a0 (another image, not a copy of it)'):
    300 lines for a 300-slice series. One line for the series and reason now; the --log file names each file."""
    write_acquisitions(tmp_path / "inbox" / "study", "ContentTime", ["101500", "101600"])
    result = watch_once(tmp_path / "inbox", tmp_path / "outbox", "--format", "stl", "--log", tmp_path / "watch.log")
    assert result.returncode == 1, result.stderr  # the series was refused: a failure a scheduler learns about
    skipped = [line for line in result.stderr.splitlines() if "Skipped" in line]
    assert skipped == ["segmentation-machine: WARNING: Skipped 3 files of CT 'series 2': same position as another "
                       "image (not a copy of it)"]
    logged = [line.split(": INFO: ", 1)[1] for line in (tmp_path / "watch.log").read_text().splitlines()
              if ": INFO: Skipped" in line]
    assert len(logged) == 3 and all(line.endswith("(another image, not a copy of it)") for line in logged)
    assert len({line.split(": ")[0] for line in logged}) == 3  # each file once, by its path
    # model: the same sentence, in its one line of what the scan skipped (here before the series' refusal)
    result = run_cli("model", tmp_path / "inbox" / "study", "--out", tmp_path / "out", "--log", tmp_path / "m.log")
    one_sentence(result, "Series CT 'series 2' was not loaded: 3 of its images lie where others do")
    scan = scan_folder(tmp_path / "inbox" / "study")
    assert scan.notes == [f"3 file(s) in {tmp_path / 'inbox' / 'study'} were skipped: 3 files of CT 'series 2': "
                          "same position as another image (not a copy of it)."]
    assert (tmp_path / "m.log").read_text().count("(another image, not a copy of it)") == 3


def test_two_positions_each_with_two_images_no_tag_tells_apart_are_refused_and_one_position_is_a_slice(shared_data,
                                                                                                    tmp_path):
    """The smallest series that mixes them: two slices, each with a second phase at its place. One position with two
    images is no volume to mix: its first image is loaded as a slice, the other skipped with its reason."""
    for count in (2, 1):
        uid = generate_uid()
        for phase in range(2):
            for number, ds in enumerate(real_slices()[:count]):
                ds.SeriesInstanceUID, ds.ContentTime = uid, f"10{phase}500"
                ds.PixelData = (ds.pixel_array + 100 * phase).astype(ds.pixel_array.dtype).tobytes()
                save(ds, tmp_path / f"study{count}" / f"P{phase}S{number}.dcm")
        scan = scan_folder(tmp_path / f"study{count}")
        [series] = scan.series
        assert (len(series.files), len(scan.skipped)) == (count, count)
        assert series.problem == ("" if count == 1 else "2 of its images lie where others do, and no tag tells them "
                                  "apart (cardiac phases, energies or two reconstructions in one series?): have each "
                                  "exported as a series of its own")

def per_frame_rescale(slices):
    ds = enhanced_from(slices)
    transformation = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence
    del ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence
    for index, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        frame.PixelValueTransformationSequence = pydicom.sequence.Sequence([copy.deepcopy(transformation[0])])
        frame.PixelValueTransformationSequence[0].RescaleSlope = 2 if index == 2 else 1
    return ds


@pytest.mark.parametrize("build, reason", [
    (per_frame_rescale, "a multi-frame image whose frames are scaled differently (a rescale per frame), which "
                        "Slicer's reader would load with wrong values: export the series as single-frame images"),
    (lambda s: enhanced_from([s[0], s[2], s[1]], positions=[s[k].ImagePositionPatient for k in (0, 2, 1)]),
     "a multi-frame image whose frames are not stored in slice order, which Slicer's reader would stack wrongly: "
     "export the series as single-frame images"),
])
def test_a_multi_frame_image_slicer_would_load_wrongly_is_refused_for_its_cause(shared_data, tmp_path, build, reason):
    """Loaded with wrong values silently (rescale), or refused with a sentence that blamed the headers (order)."""
    assert read_slice(save(build(real_slices()), tmp_path / "frames.dcm")) == (None, reason)  # others: test_series_kinds


def test_uneven_spacing_that_is_no_missing_slice_is_said_as_it_is(tmp_path):
    """Two zones of spacing were called 'a slice is probably missing'."""
    hu = make_phantom((6, 16, 16)).hu
    write_ct_series(tmp_path / "zones", hu, 1.0, [(0, 0, z) for z in (0, 1, 2, 3, 5, 7)], "zones")
    note = next(n for n in scan_folder(tmp_path / "zones").series[0].notes if "uneven" in n)
    assert "(2 of its 5 gaps differ from 1.00 mm, from 1.00 to 2.00 mm)" in note and "missing" not in note


def test_a_slice_sent_again_then_replaced_under_its_name_by_another_phase_is_compared_again(shared_data, tmp_path):
    """The pixel comparison was remembered by path: a watch that once saw copies under new UIDs took two phases
    written later under the same names for copies, and mixed them."""
    names = iter(f"IM{n:04d}" for n in range(6))
    uid = generate_uid()
    for step in range(2):
        for ds in real_slices():
            ds.SeriesInstanceUID = uid
            save(ds, tmp_path / "study" / next(names))  # new UIDs, same pixels: copies
    assert not scan_folder(tmp_path / "study").series[0].problem
    for number, path in enumerate(sorted((tmp_path / "study").iterdir())):
        ds = pydicom.dcmread(path)
        ds.PixelData = (ds.pixel_array + 100 * (number >= 3)).astype(ds.pixel_array.dtype).tobytes()
        ds.save_as(path)
    assert scan_folder(tmp_path / "study").series[0].problem.startswith("3 of its images lie where others do")


def test_what_splits_and_what_stays_one_volume(shared_data, tmp_path):
    """Two fields of view of one region (acquisition 1 and 2) stay two series (pixel spacing only chooses the stack
    within a part); blocks of a sequential scan with a trigger time each, touching at their ends, stay one volume;
    images all at one position (bolus tracking) are one slice, no problem; a clean CT beside a series that cannot
    be loaded is chosen."""
    uid = generate_uid()
    for acquisition, spacing in ((1, None), (2, [0.5, 0.5])):
        for number, ds in enumerate(real_slices()):
            ds.SeriesInstanceUID, ds.AcquisitionNumber = uid, acquisition
            ds.PixelSpacing = spacing or ds.PixelSpacing
            save(ds, tmp_path / "fov" / f"{acquisition}-{number}.dcm")
    assert [s.part for s in scan_folder(tmp_path / "fov").series] == ["acquisition 1", "acquisition 2"]

    hu = make_phantom((9, 16, 16)).hu
    blocks = [(0, 1, 2), (2, 3, 4), (4, 5, 6)]  # each block's last position is the next one's first
    files = write_ct_series(tmp_path / "blocks", hu[[k for block in blocks for k in block]], 1.0,
                            [(0, 0, 2.0 * k) for block in blocks for k in block], "sequential")
    for index, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.TriggerTime = 350 + 3 * (index // 3)
        ds.save_as(path)
    [series] = scan_folder(tmp_path / "blocks").series
    assert series.part == "" and series.slice_count == 7

    monitoring = write_ct_series(tmp_path / "monitoring", hu[:4], 1.0, [(0, 0, 0)] * 4, "monitoring")
    [series] = scan_folder(tmp_path / "monitoring").series
    assert (series.slice_count, series.problem) == (1, "") and len(monitoring) == 4

    write_acquisitions(tmp_path / "both" / "phases", "ContentTime", ["101500", "101600"])
    write_ct_series(tmp_path / "both" / "clean", hu[:2], 1.0, [(0, 0, 0), (0, 0, 2)], "clean")
    scan = scan_folder(tmp_path / "both")
    # The one that cannot be loaded has more slices: listed after the default, never chosen
    assert scan.series[1].problem and choose_series(scan) is scan.series[0] and scan.series[0].description == "clean"
    assert scan.series[1].slice_count > scan.series[0].slice_count


def test_positions_rounded_in_the_headers_are_said_as_such(tmp_path):
    hu = make_phantom((21, 16, 16)).hu
    write_ct_series(tmp_path / "rounded", hu, 1.0, [(0, 0, round(0.625 * k, 2)) for k in range(21)], "rounded")
    note = next(n for n in scan_folder(tmp_path / "rounded").series[0].notes if "uneven" in n)
    assert "(gaps from 0.620 to 0.630 mm: positions rounded in the headers?)" in note
