"""DICOM folders and volume files → volume nodes, and every kind of bad input → one clear sentence."""

import shutil
import subprocess
from contextlib import nullcontext

import numpy as np
import pydicom
import pytest

from conftest import EXAMPLE_CT, JPEG2000_SERIES, UNCOMPRESSED_SERIES
from SegmentationMachineLib.core import arrays
from SegmentationMachineLib.core.errors import InputError
from SegmentationMachineLib.dicom.phantom import make_phantom, write_ct_series
from SegmentationMachineLib.dicom.series import choose_series, scan_folder
from SegmentationMachineLib.dicom.volumes import load_input, load_series


def first_position_ras(path):
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    return np.array([-x, -y, z])


@pytest.mark.parametrize("series, shape, spacing", [
    (JPEG2000_SERIES, (20, 512, 512), (0.9765625, 0.9765625, 2.0)),
    (UNCOMPRESSED_SERIES, (3, 512, 512), (0.810547, 0.810547, 1.0)),
])
def test_real_series_load_through_slicers_reader(ctx, shared_data, untouched, series, shape, spacing):
    untouched(series)
    loaded = load_input(ctx, series)
    voxels = arrays.volume_array(loaded.node)
    assert voxels.shape == shape
    matrix = arrays.ijk_to_ras(loaded.node)
    assert np.allclose(arrays.spacing_of(matrix), spacing, atol=1e-3)
    # Voxel 0 sits at the lowest slice's position (LPS in the file, RAS in the scene).
    lowest = min(scan_folder(series).series[0].files, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    assert np.allclose(matrix[:3, 3], first_position_ras(lowest), atol=1e-2)
    assert -3100 <= voxels.min() and voxels.max() < 4000  # Hounsfield units, rescale applied
    assert (voxels > 300).sum() > 1000  # bone is there: the pixels were really decoded


def test_any_nesting_any_names_recognised_by_content(ctx, shared_data, tmp_path):
    for index, source in enumerate(sorted(UNCOMPRESSED_SERIES.iterdir())):
        target = tmp_path / "upload" / f"level{index}" / "deeper" / f"IMG{index:03d}"  # no extension
        target.parent.mkdir(parents=True)
        shutil.copy(source, target)
    (tmp_path / "upload" / "README.txt").write_text("not an image")
    (tmp_path / "upload" / "scan.dcm").write_bytes(b"\x00" * 50)  # a .dcm name is not enough
    scan = scan_folder(tmp_path / "upload")
    assert len(scan.series) == 1 and len(scan.series[0].files) == 3
    assert {s.path.name: s.reason for s in scan.skipped} == {"README.txt": "not a DICOM file", "scan.dcm": "not a DICOM file"}
    assert arrays.volume_array(load_input(ctx, tmp_path / "upload").node).shape == (3, 512, 512)


def test_several_series_listed_chosen_by_number_or_uid_default_most_ct_slices(ctx, shared_data, tmp_path, phantom_dir):
    shutil.copytree(UNCOMPRESSED_SERIES, tmp_path / "study" / "a")
    shutil.copytree(phantom_dir, tmp_path / "study" / "b")
    scan = scan_folder(tmp_path / "study")
    assert [len(s.files) for s in scan.series] == [72, 3]
    assert choose_series(scan).description == "SegmentationMachine CT phantom"
    assert choose_series(scan, "2") is scan.series[1]
    assert choose_series(scan, scan.series[1].uid) is scan.series[1]
    for number in ("9", "0"):  # "0" once chose the last series: list numbers start at 1
        with pytest.raises(InputError, match=f"^No series '{number}' in .*: run with --list"):
            choose_series(scan, number)
    assert arrays.volume_array(load_input(ctx, tmp_path / "study", series="2").node).shape[0] == 3


def test_nifti_and_nrrd_files_load(ctx, shared_data):
    assert arrays.volume_array(load_input(ctx, EXAMPLE_CT).node).shape == (112, 101, 122)
    nrrd = load_input(ctx, shared_data / "dcmqi" / "liver_seg.nrrd")
    assert arrays.volume_array(nrrd.node).max() > 0


def test_no_dicom_at_all_is_one_sentence(ctx, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError) as error:
        load_input(ctx, tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message and "No DICOM image series" in message and "\n" not in message


def test_a_series_compressed_with_loss_says_so(ctx, tmp_path):
    """A PACS that stored JPEG baseline, or a series decompressed from it (its header keeps saying so): the model is
    made, and its notes (the log, report.json) say its values are not the scanner's. Lossless JPEG 2000 says nothing."""
    from SegmentationMachineLib.dicom.transfer_syntaxes import lossy_compression

    files = write_ct_series(tmp_path / "series", make_phantom(shape=(6, 32, 32)).hu, 1.5,
                            [(0.0, 0.0, 2.0 * k) for k in range(6)], "once JPEG")
    for path in files[:2]:
        dataset = pydicom.dcmread(path)
        dataset.LossyImageCompression = "01"
        dataset.save_as(path)
    loaded = load_input(ctx, tmp_path / "series")
    assert [n for n in loaded.notes if "compressed with loss" in n] == [
        "Series CT 'once JPEG' was compressed with loss (a lossy compression): its values are not quite the scanner's, nor "
        "are its surfaces; ask for the original images where that matters."]
    assert lossy_compression("1.2.840.10008.1.2.4.50", None) == "JPEG baseline"
    assert lossy_compression("1.2.840.10008.1.2.4.91", "01") == "JPEG 2000"
    assert lossy_compression("1.2.840.10008.1.2.4.90", "00") == ""
    assert not any("compressed with loss" in n for n in load_input(ctx, JPEG2000_SERIES).notes)


@pytest.mark.skipif(not shutil.which("dcmcjpeg"), reason="dcmtk's dcmcjpeg is not installed: apt-get install dcmtk")
def test_a_12_bit_jpeg_series_loads_without_gdcms_line_per_slice_on_stderr(ctx, tmp_path, capfd):
    """GDCM tries its 8-bit codec on each 12-bit JPEG slice first, and its C code printed 'Unsupported JPEG data
    precision 12' for every one (160 lines for a 20-slice series) on the CLI's stderr."""
    hu = make_phantom(shape=(6, 32, 32)).hu
    files = write_ct_series(tmp_path / "raw", hu, 1.5, [(0.0, 0.0, 2.0 * k) for k in range(6)], "twelve bits")
    (tmp_path / "jpeg").mkdir()
    for path in files:  # 12 bits stored, as such archives keep CT: JPEG extended takes at most 12
        dataset = pydicom.dcmread(path)
        dataset.PixelData = (np.clip(dataset.pixel_array.astype(np.int32) + 1024, 0, 4095)).astype(np.uint16).tobytes()
        dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 12, 11, 0
        dataset.RescaleIntercept = -1024
        dataset.save_as(path)
        subprocess.run(["dcmcjpeg", "+ee", "+q", "95", str(path), str(tmp_path / "jpeg" / path.name)], check=True)
    capfd.readouterr()
    loaded = load_input(ctx, tmp_path / "jpeg")
    assert "Unsupported JPEG" not in capfd.readouterr().err
    assert any("compressed with loss (JPEG extended)" in note for note in loaded.notes)
    original = arrays.volume_array(load_input(ctx, tmp_path / "raw").node).astype(np.int32)
    assert np.abs(arrays.volume_array(loaded.node) - original).max() < 60 < np.ptp(original)  # decoded, with its loss


def test_truncated_and_foreign_files_among_slices_are_skipped_with_reasons(ctx, shared_data, tmp_path, untouched):
    files = sorted(JPEG2000_SERIES.iterdir())
    folder = tmp_path / "series"
    folder.mkdir()
    for path in files:
        shutil.copy(path, folder / path.name)
    truncated = folder / files[7].name
    truncated.write_bytes(truncated.read_bytes()[:40000])
    (folder / "Thumbs.db").write_bytes(b"\x01\x02" * 300)
    untouched(folder)
    loaded = load_input(ctx, folder)
    scan = scan_folder(folder)
    reasons = {s.path.name: s.reason for s in scan.skipped}
    assert reasons[truncated.name].startswith("truncated") and reasons["Thumbs.db"] == "not a DICOM file"
    assert any(truncated.name in note and "truncated" in note for note in loaded.notes)
    # The truncated slice leaves a gap: resampled to even spacing over the same extent.
    assert any("uneven slice spacing" in note for note in loaded.notes)
    assert arrays.volume_array(loaded.node).shape == (20, 512, 512)


def write_phantom_slices(folder, keep=None):
    phantom = make_phantom(shape=(12, 64, 64))
    positions = [(-47.25, -47.25, k * 2.0) for k in range(12)]
    keep = list(range(12)) if keep is None else keep
    write_ct_series(folder, phantom.hu[keep], 1.5, [positions[k] for k in keep], "test series")
    return phantom


def test_missing_slice_is_resampled_onto_the_true_positions(ctx, tmp_path):
    phantom = write_phantom_slices(tmp_path, keep=[k for k in range(12) if k != 5])
    loaded = load_input(ctx, tmp_path)
    note = next(n for n in loaded.notes if "uneven" in n)
    assert "4.00 mm" in note and "slice0005.dcm" in note and "resampled" in note
    voxels = arrays.volume_array(loaded.node)
    matrix = arrays.ijk_to_ras(loaded.node)
    assert voxels.shape == (12, 64, 64) and np.isclose(matrix[2, 2], 2.0)
    assert np.array_equal(voxels[6], phantom.hu[6])  # real slices stay where they were
    expected = np.rint((phantom.hu[4].astype(float) + phantom.hu[6]) / 2)
    assert np.abs(voxels[5] - expected).max() <= 1  # the gap is interpolated


def test_missing_input_path(ctx, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_input(ctx, tmp_path / "nope")


@pytest.mark.parametrize("attribute, value, reason", [
    ("PixelSpacing", [0, 0], "its pixel spacing is 0, 0 mm, not two positive sizes (the model's size would be wrong)"),
    ("PixelSpacing", [-0.810547, 0.810547], "its pixel spacing is -0.810547, 0.810547 mm, not two positive sizes"),
    ("PixelSpacing", ["NaN", "NaN"], "its pixel spacing is nan, nan mm, not two positive sizes"),
    ("PixelSpacing", ["inf", 0.810547], "its pixel spacing is inf, 0.810547 mm, not two positive sizes"),
    ("PixelSpacing", None, "its pixel spacing is missing, not two positive sizes"),
    ("ImageOrientationPatient", [1, 0, 0, 0, "NaN", 0], "its image orientation (1, 0, 0, 0, nan, 0) is not two "
                                                        "perpendicular unit directions"),
    ("ImageOrientationPatient", [1, 0, 0, 1, 0, 0], "its image orientation (1, 0, 0, 1, 0, 0) is not two"),
    ("ImageOrientationPatient", [2, 0, 0, 0, 1, 0], "its image orientation (2, 0, 0, 0, 1, 0) is not two"),
    ("ImagePositionPatient", [0, 0, "inf"], "its image position (0, 0, inf) is not finite"),
])
def test_a_slice_of_untrustworthy_geometry_is_refused_with_its_reason(ctx, shared_data, tmp_path, untouched,
                                                                     attribute, value, reason):
    """Slicer's reader once took PixelSpacing 0, negative or NaN as 1 mm (a model 23% too large, exit 0)."""
    folder = tmp_path / "series"
    shutil.copytree(UNCOMPRESSED_SERIES, folder)

    def spoil(name):
        ds = pydicom.dcmread(folder / name)
        if value is None:
            del ds[attribute]
        else:
            setattr(ds, attribute, value)
        ds.save_as(folder / name)

    with pytest.warns(UserWarning) if any(v in ("NaN", "inf") for v in value or []) else nullcontext():
        spoil("02.dcm")
    scan = scan_folder(folder)
    assert {s.path.name: s.reason for s in scan.skipped}["02.dcm"].startswith(reason)
    assert sorted(p.name for p in scan.series[0].files) == ["01.dcm", "03.dcm"]
    # On every slice: the series is refused in one sentence that says why.
    with pytest.warns(UserWarning) if any(v in ("NaN", "inf") for v in value or []) else nullcontext():
        spoil("01.dcm")
        spoil("03.dcm")
    untouched(folder)
    with pytest.raises(InputError) as error:
        load_input(ctx, folder)
    message = str(error.value)
    assert message.startswith(f"No DICOM image series found in {folder} (3 file(s) looked at, none a usable image "
                              f"slice; the first: {folder / '01.dcm'}: {reason}")
    assert "\n" not in message


def test_a_reader_that_disagrees_with_the_headers_on_voxel_size_is_refused(ctx, tmp_path):
    write_phantom_slices(tmp_path)
    series = choose_series(scan_folder(tmp_path))
    series.pixel_spacing = (1.0, 1.0)  # as if the reader had read 1.5 mm pixels where the headers said 1 mm
    with pytest.raises(InputError, match=r"^Series CT 'test series' was not loaded: Slicer's reader gave it voxels "
                                         r"of 1\.5 x 1\.5 x 2 mm where its headers say 1 x 1 x 2 mm;"):
        load_series(ctx, series)


def test_a_reader_that_places_the_slices_elsewhere_than_the_headers_is_refused(ctx, tmp_path):
    """GDCM places an enhanced image's frames itself (at 1 mm pixels and the first frame in file order, where they
    are unevenly spaced): the headers' first position and slice count are checked after every read."""
    write_phantom_slices(tmp_path)
    series = choose_series(scan_folder(tmp_path))
    series.first_position = series.first_position + [0, 0, 2.0]  # as if the reader had dropped the lowest slice
    with pytest.raises(InputError, match=r"^Series CT 'test series' was not loaded: Slicer's reader put its first slice "
                                         r"at \(47\.25, 47\.25, 0\) mm \(RAS\) where its headers say "
                                         r"\(47\.25, 47\.25, 2\) mm;"):
        load_series(ctx, series)
    series = choose_series(scan_folder(tmp_path))
    series.positions = np.append(series.positions, series.positions[-1] + 2.0)  # a frame the reader left out
    with pytest.raises(InputError, match=r"Slicer's reader gave it 12 slices where its headers say 13;"):
        load_series(ctx, series)
