"""Which series of a study is the default (`model` without --series): the scan's own axial reconstruction.

An extremity CT comes with coronal and sagittal reformats that often have more slices than its axial series; the
default was the series with the most slices, so `model --preset bone` modelled an interpolated coronal MPR.
Each study here is real DICOM files (pydicom), read as a user's folder is.
"""

import subprocess
import sys

import pydicom
import pytest
from pydicom.uid import generate_uid

from test_preset_orientation import write_in_plane
from SegmentationMachineLib.dicom.phantom import make_phantom, write_ct_series
from SegmentationMachineLib.dicom.series import choose_series, scan_folder

ORIGINAL = ["ORIGINAL", "PRIMARY", "AXIAL"]
REFORMAT = ["DERIVED", "SECONDARY", "REFORMATTED"]
CLI = [sys.executable, "-m", "SegmentationMachineLib.cli"]


@pytest.fixture(scope="module")
def anatomy():
    return make_phantom((20, 40, 40), pixel_spacing=3.0, slice_spacing=3.0)  # reformats: 40 slices, axial 20


def with_image_type(files, image_type, number: int) -> list:
    for path in files:
        ds = pydicom.dcmread(path)
        if image_type is not None:  # the phantom's files have none
            ds.ImageType = image_type
        ds.SeriesNumber = number
        ds.save_as(path)
    return files


def _set(files, **tags):
    for path in files:
        ds = pydicom.dcmread(path)
        for keyword, value in tags.items():
            setattr(ds, keyword, value)
        ds.save_as(path)


def axial(folder, phantom, description, image_type, number, every: int = 1) -> list:
    """The phantom's axial series (every n-th slice: a thicker reconstruction)."""
    spacing, (slices, rows, cols) = phantom.pixel_spacing, phantom.hu.shape
    corner = (-(cols - 1) / 2 * spacing, -(rows - 1) / 2 * spacing)
    positions = [(*corner, (k - (slices - 1) / 2) * spacing) for k in range(0, slices, every)]
    files = write_ct_series(folder / description, phantom.hu[::every], spacing, positions, description)
    return with_image_type(files, image_type, number)


def reformat(folder, phantom, plane, description, image_type, number) -> list:
    return with_image_type(write_in_plane(folder / description, phantom, plane, description), image_type, number)


def names(scan) -> list:
    return [series.description for series in scan.series]


def test_the_axial_series_is_the_default_beside_reformats_and_a_localizer_with_more_slices(anatomy, tmp_path):
    study = tmp_path / "knee"
    reformat(study, anatomy, "coronal", "Cor MPR", REFORMAT, 3)
    reformat(study, anatomy, "sagittal", "Sag MPR", REFORMAT, 4)
    axial(study, anatomy, "Axial 3mm", ORIGINAL, 2)
    scout = write_ct_series(study / "scout", anatomy.hu[:2, :, :].copy(), 3.0, [(0, 0, 0), (0, 0, 50)], "Scout")
    with_image_type(scout, ["ORIGINAL", "PRIMARY", "LOCALIZER"], 1)
    scan = scan_folder(study)
    assert [(s.description, s.slice_count) for s in scan.series] == [
        ("Axial 3mm", 20), ("Cor MPR", 40), ("Sag MPR", 40), ("Scout", 2)]
    assert choose_series(scan).description == "Axial 3mm"
    # The CLI lists it first and models it; --series still picks a reformat.
    listed = subprocess.run(CLI + ["model", str(study), "--list"], capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0 and listed.stdout.startswith("1. CT 'Axial 3mm', 20 slices of 40x40"), listed.stdout
    assert "\n2. CT 'Cor MPR', 40 slices of 20x40" in listed.stdout
    modelled = subprocess.run(CLI + ["model", str(study), "--preset", "bone", "--format", "stl", "--quiet",
                                     "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert modelled.returncode == 0, modelled.stderr
    assert modelled.stdout.startswith("Loaded DICOM series CT 'Axial 3mm': 40x40x20 voxels"), modelled.stdout
    assert choose_series(scan, "2").description == "Cor MPR"


@pytest.mark.parametrize("first, second", [
    # (description, image type, how it is written), the default first
    (("axial", None, "axial"), ("coronal", None, "coronal")),  # no ImageType: axial, though it has fewer slices
    (("axial", ORIGINAL, "axial"), ("sagittal", ORIGINAL, "sagittal")),
    (("thin", ORIGINAL, "axial"), ("thick", ORIGINAL, "axial 2")),  # both axial: the most slices
    (("original", ORIGINAL, "axial 2"), ("derived", ["DERIVED", "PRIMARY", "AXIAL"], "axial")),  # more slices, derived
    (("original", ORIGINAL, "axial 2"), ("secondary", ["ORIGINAL", "SECONDARY", "AXIAL"], "axial")),
    (("coronal acquisition", ORIGINAL, "coronal"), ("axial MPR", REFORMAT, "axial")),  # the scanner's own first
    (("axial MPR", REFORMAT, "axial"), ("monitoring", ORIGINAL, "one slice")),  # a lone slice after any stack
    (("CT", ORIGINAL, "axial 2"), ("PET", ORIGINAL, "PET")),  # the presets need a CT: more slices do not count
    (("thick", ORIGINAL, "axial 2"), ("two in one", ORIGINAL, "two in one")),  # one that cannot be loaded: last
])
def test_the_default_of_two_series(anatomy, tmp_path, first, second):
    for number, (description, image_type, written) in enumerate((second, first), 1):  # the default written last
        if written in ("axial", "axial 2", "PET"):
            files = axial(tmp_path, anatomy, description, image_type, number, every=2 if written == "axial 2" else 1)
            if written == "PET":
                _set(files, Modality="PT")
        elif written == "one slice":
            axial(tmp_path, anatomy, description, image_type, number, every=len(anatomy.hu))
        elif written == "two in one":  # two reconstructions under one series UID, at the same positions
            files = axial(tmp_path, anatomy, description, image_type, number)
            uid = pydicom.dcmread(files[0]).SeriesInstanceUID
            other = anatomy.hu + 100  # other pixels: not copies of the same image
            spacing, (slices, rows, cols) = anatomy.pixel_spacing, other.shape
            positions = [(-(cols - 1) / 2 * spacing, -(rows - 1) / 2 * spacing, (k - (slices - 1) / 2) * spacing)
                         for k in range(slices)]
            for path in with_image_type(write_ct_series(tmp_path / f"{description} 2", other, spacing, positions,
                                                        description), image_type, number):
                ds = pydicom.dcmread(path)
                ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, generate_uid()
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                ds.save_as(path)
        else:
            reformat(tmp_path, anatomy, written, description, image_type, number)
    scan = scan_folder(tmp_path)
    assert names(scan) == [first[0], second[0]]
    assert choose_series(scan).description == first[0]


def test_the_inbox_makes_a_studys_axial_series_the_source_volume_and_loads_its_reformats_beside_it(anatomy, tmp_path):
    """With "Make each new series the source volume" the last series loaded took it: a reformat as often as not.
    Every series is still delivered and loaded; only which one the slice views show changes."""
    import time

    from SegmentationMachineLib.panels.inbox import InboxPanel

    def deliver(panel) -> list:
        deliveries, deadline = [], time.monotonic() + 30
        while not deliveries and time.monotonic() < deadline:
            deliveries = panel.tick()
            time.sleep(0.05)
        return deliveries

    def sources(panel, deliveries, prompting=False) -> list:
        """What the widget does with each delivery: load it, then ask whether it becomes the source volume."""
        chosen = []
        for delivery in deliveries:
            panel.loaded(delivery, True)
            chosen += [delivery.series.description] * panel.as_source(delivery, True, prompting)
        return chosen

    inbox = tmp_path / "inbox"
    reformat(inbox, anatomy, "coronal", "Cor MPR", REFORMAT, 3)
    reformat(inbox, anatomy, "sagittal", "Sag MPR", REFORMAT, 4)
    axial(inbox, anatomy, "Axial 3mm", ORIGINAL, 2)
    panel = InboxPanel(folder=inbox, settle_seconds=0.2, state_folder=tmp_path / "state")
    panel.start()
    try:
        deliveries = deliver(panel)
        assert [d.series.description for d in deliveries] == ["Axial 3mm", "Cor MPR", "Sag MPR"]
        assert sources(panel, deliveries) == ["Axial 3mm"]
        # Later: another reformat of the study stays beside the axial series; its next axial series is shown.
        reformat(inbox / "later", anatomy, "coronal", "Cor MPR 2", REFORMAT, 5)
        assert sources(panel, deliver(panel)) == []
        axial(inbox / "later", anatomy, "Axial 6mm", ORIGINAL, 6, every=2)
        assert sources(panel, deliver(panel)) == ["Axial 6mm"]
        # After Close Scene its axial series is gone: a reformat arriving alone is shown.
        panel.scene_closed()
        reformat(inbox / "third", anatomy, "sagittal", "Sag MPR 3", REFORMAT, 7)
        assert sources(panel, deliver(panel)) == ["Sag MPR 3"]
        # While the user prompts nothing is switched, and the status names the axial series, not its reformat.
        reformat(inbox / "fourth", anatomy, "coronal", "Cor MPR 4", REFORMAT, 8)
        axial(inbox / "fourth", anatomy, "Axial 1", ORIGINAL, 9)
        assert sources(panel, deliver(panel), prompting=True) == []
        assert panel.status.endswith("Series CT 'Axial 1' arrived: choose it as source volume when you are ready.")
    finally:
        panel.stop()
