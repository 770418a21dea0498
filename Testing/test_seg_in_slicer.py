"""DICOM SEG inside stock Slicer 5.10: pydicom 3 and highdicom sit in a private folder that only the SEG
writer's child process puts first on its path; the process that asks keeps its own pydicom (Slicer's 2.4.4).

Both test environments run these: on Slicer's pins (no highdicom) the child is the only way, on current
packages write_seg(..., packages=FOLDER) takes it all the same. The wheels come from PyPI once, into build/.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pydicom
import pytest

from conftest import JPEG2000_SERIES, UNCOMPRESSED_SERIES
from test_formats import DCMQI, dcmqi_segmentation, grid_voxels, segment_voxels
from slicer_standins import python_slicer
from SegmentationMachineLib.cli.main import main
from SegmentationMachineLib.core.errors import ExportError
from SegmentationMachineLib.dicom.volumes import load_input
from SegmentationMachineLib.mesh import dicomseg
from SegmentationMachineLib.mesh.segwriter import SegInput, dicom_lab_to_rgb, save_input
from SegmentationMachineLib.segment.dicomseg import load_dicom_seg

TESTING = Path(__file__).resolve().parent
MODULE_FOLDER = TESTING.parent / "SegmentationMachine"
CACHE = TESTING.parent / "build" / "seg-packages"  # build/ is not tracked; filled once per checkout (CI: per run)
WHEELS = CACHE / "wheels"
SLICERS_PYDICOM = "pydicom==2.4.4"  # scripts/slicer-5.10-constraints.txt
OFFLINE_PIP = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(WHEELS), "PIP_QUIET": "1",
               "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def slicers_pip_install(args):
    """slicer.util.pip_install at v5.10.0 given a list: `python -m pip install ARGS`, raising when pip fails;
    here from the wheels downloaded once."""
    subprocess.run([sys.executable, "-m", "pip", "install", *args], env={**os.environ, **OFFLINE_PIP},
                   check=True, capture_output=True, timeout=300)


@pytest.fixture(scope="session")
def wheels():
    WHEELS.mkdir(parents=True, exist_ok=True)
    for requirement in (*dicomseg.SEG_PINS, SLICERS_PYDICOM):
        name, version = requirement.split("==")
        if any(WHEELS.glob(f"{name}-{version}-*.whl")):
            continue
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                               "--no-deps", "--only-binary=:all:", "--dest", str(WHEELS), requirement],
                              capture_output=True, text=True, timeout=300)
        if done.returncode:
            why = (done.stderr.strip().splitlines() or ["no message"])[-1]
            pytest.skip(f"Could not download {requirement} from PyPI ({why}): these tests need it once.")
    return WHEELS


@pytest.fixture(scope="session")
def seg_packages(wheels) -> Path:
    """The private folder, installed as the module installs it."""
    folder = CACHE / dicomseg.seg_packages_folder().name
    return folder if folder.is_dir() else dicomseg.install_seg_packages(slicers_pip_install, folder)


@pytest.fixture(scope="session")
def slicers_site_packages(wheels) -> Path:
    """Slicer 5.10's site-packages as far as SEG goes: its pydicom 2.4.4."""
    folder = CACHE / "slicer-site-packages"
    if not folder.is_dir():
        with tempfile.TemporaryDirectory(dir=CACHE) as scratch:  # whole or not at all
            slicers_pip_install(["--target", f"{scratch}/site-packages", "--no-deps", SLICERS_PYDICOM])
            Path(scratch, "site-packages").rename(folder)
    return folder


@pytest.fixture
def inside_slicer(monkeypatch, tmp_path, slicers_site_packages) -> Path:
    """This process as Slicer 5.10's: `from slicer import app` works, and PythonSlicer on PATH is, as there, a
    CTK AppLauncher that puts Slicer's paths, its site-packages among them, before the PYTHONPATH it inherits
    (commontk/AppLauncher Base/ctkAppLauncher.cpp; Slicer's SuperBuild/python_configure_python_launcher.cmake).
    Returns the file that lists each start of PythonSlicer."""
    import slicer

    folder = tmp_path / "slicer-bin"
    folder.mkdir()
    starts = tmp_path / "PythonSlicer-starts.txt"
    python_slicer(folder, [slicers_site_packages], starts)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(slicer, "app", object(), raising=False)
    return starts


@pytest.fixture
def home(monkeypatch, tmp_path) -> Path:
    """A home folder of our own: where the private folder is looked for and installed."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def installed(home, seg_packages) -> Path:
    """The private folder at its place in home, as after the module's install."""
    folder = dicomseg.seg_packages_folder()
    folder.parent.mkdir(parents=True)
    folder.symlink_to(seg_packages, target_is_directory=True)
    return folder


@pytest.fixture
def without_highdicom_here(monkeypatch):
    """This process as Slicer 5.10's Python: highdicom does not import (a None in sys.modules stops it)."""
    monkeypatch.setitem(sys.modules, "highdicom", None)


READ_BACK = """
import sys
import highdicom, numpy as np, pydicom
assert pydicom.__version__.startswith("3."), pydicom.__version__
seg = highdicom.seg.segread(sys.argv[1])
voxels = {}
for description in seg.SegmentSequence:
    read = seg.get_volume(segment_numbers=[description.SegmentNumber], combine_segments=True)
    s, r, c = np.nonzero(read.array)  # highdicom's affine maps (slice, row, column) to LPS
    voxels[description.SegmentLabel] = (read.affine @ np.c_[s, r, c, np.ones(len(s))].T)[:3].T
np.savez(sys.argv[2], **voxels)
"""


def highdicom_voxels_in_a_child(path, packages, volume, tmp_path) -> dict:
    """{segment label: voxels}, placed by highdicom's own reading of the SEG, run from the private folder."""
    done = subprocess.run([sys.executable, "-c", READ_BACK, str(path), str(tmp_path / "read.npz")],
                          env={**os.environ, "PYTHONPATH": str(packages)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(tmp_path / "read.npz") as read:
        return {label: grid_voxels(read[label] * [-1, -1, 1], volume) for label in read.files}


def test_inside_slicer_a_child_with_its_own_pydicom_writes_the_seg_voxel_for_voxel(
        ctx, shared_data, tmp_path, installed, inside_slicer):
    volume, node = dcmqi_segmentation(ctx)
    segmentation = node.GetSegmentation()
    seg = dicomseg.read_seg_input(node, [segmentation.GetNthSegmentID(i) for i in range(3)])
    path = tmp_path / "segmentation.dcm"
    dicomseg.write_seg(path, seg, packages=installed)  # the child even where highdicom imports here
    assert "-m pip" not in inside_slicer.read_text() and str(path) in inside_slicer.read_text()  # PythonSlicer
    written = pydicom.dcmread(path)  # this process's pydicom: Slicer's 2.4.4 in the first test stage
    source = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(UNCOMPRESSED_SERIES.glob("*.dcm"))]
    assert written.SOPClassUID == dicomseg.SEGMENTATION_STORAGE
    assert written.StudyInstanceUID == source[0].StudyInstanceUID
    referenced = written.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == source[0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} == {
        d.SOPInstanceUID for d in source}
    assert [d.SegmentLabel for d in written.SegmentSequence] == ["Liver", "spine", "Heart"]
    for index, description in enumerate(written.SegmentSequence):
        color = dicom_lab_to_rgb(description.RecommendedDisplayCIELabValue)
        assert np.allclose(color, segmentation.GetNthSegment(index).GetColor(), atol=1 / 255)
    read_back = highdicom_voxels_in_a_child(path, installed, volume, tmp_path)
    for index, label in enumerate(["Liver", "spine", "Heart"]):
        expected = segment_voxels(node, index, volume)
        assert expected and read_back[label] == expected, label


def test_where_highdicom_does_not_import_the_export_says_so_then_uses_the_installed_folder(
        ctx, shared_data, tmp_path, home, seg_packages, without_highdicom_here, capsys):
    (tmp_path / "labels.json").write_text('{"1": "Liver"}')
    out = tmp_path / "out"
    export = ["export", str(DCMQI / "liver_seg.nrrd"), "--volume", str(UNCOMPRESSED_SERIES), "--labels",
              str(tmp_path / "labels.json"), "--format", "stl,seg", "--out", str(out), "--quiet"]
    assert main(export) == 2
    assert capsys.readouterr().err.splitlines() == [
        "segmentation-machine: ERROR: DICOM SEG export needs highdicom and the pydicom 3 it needs: pip install -e "
        "'.[hospital]' in the SegmentationMachine folder (in 3D Slicer, the export installs both once, after asking, "
        "into a folder of their own)."]
    assert not list(out.glob("*/*")) and not home.joinpath(".segmentation-machine").exists()  # before any work
    folder = dicomseg.seg_packages_folder()
    folder.parent.mkdir(parents=True)
    folder.symlink_to(seg_packages, target_is_directory=True)
    assert main(export) == 0
    volume = load_input(ctx, UNCOMPRESSED_SERIES).node
    ours = segment_voxels(load_dicom_seg(ctx, next(out.glob("*/segmentation.dcm"))), 0, volume)
    assert len(ours) == 107098 and ours == segment_voxels(load_dicom_seg(ctx, DCMQI / "liver.dcm"), 0, volume)


def test_a_broken_private_folder_is_one_sentence_and_the_log_has_the_childs_traceback(
        ctx, shared_data, tmp_path, installed, slicers_site_packages, caplog):
    volume, node = dcmqi_segmentation(ctx)
    seg = dicomseg.read_seg_input(node, [node.GetSegmentation().GetNthSegmentID(0)])
    with pytest.raises(ExportError) as raised:  # pydicom 2.4.4 first: no highdicom imports with it
        dicomseg.write_seg(tmp_path / "segmentation.dcm", seg, packages=slicers_site_packages)
    message = str(raised.value)
    assert message.startswith("Writing the DICOM SEG failed (exit code 1;") and "\n" not in message
    assert "Error:" not in message  # the child's last line (a library's words may quote a header value): the log's
    assert message.endswith(f"delete {slicers_site_packages} so that the next SEG export installs its packages again.")
    assert "Traceback" in caplog.text and not list(tmp_path.glob("*segmentation.dcm*"))  # nothing half-written


def test_the_childs_own_sentence_reaches_the_user(shared_data, tmp_path, seg_packages):
    anonymised = sorted(JPEG2000_SERIES.iterdir())[0]  # blank study and series UIDs
    seg = SegInput([str(anonymised)], np.eye(4), np.ones((1, 2, 2), np.uint16), [("Bone", (1.0, 0.9, 0.8))], "bone")
    with pytest.raises(ExportError, match=r"^\S+ has no StudyInstanceUID or SeriesInstanceUID \(an anonymiser "
                                          r"removed it\), so a DICOM SEG could not refer to it: export STL"):
        dicomseg.write_seg(tmp_path / "segmentation.dcm", seg, packages=seg_packages)


ONLY_SLICER_AND_THE_FOLDER = """
import sys
sys.path[:0] = [{packages!r}, {testing!r}]
from slicer_standins import SLICER_5_10_BUNDLED
allowed = SLICER_5_10_BUNDLED | set(sys.stdlib_module_names) | {{"pydicom", "highdicom", "SegmentationMachineLib"}}


class NotInSlicer:  # what Slicer 5.10 does not bundle cannot be imported (optional imports then go without)
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in allowed:
            raise ModuleNotFoundError(f"No module named {{name!r}} in Slicer 5.10", name=name)


sys.meta_path.insert(0, NotInSlicer())
from SegmentationMachineLib.mesh import segwriter
sys.exit(segwriter.main(*sys.argv[1:]))
"""


def test_the_writer_needs_nothing_but_what_slicer_bundles_and_the_private_folder(shared_data, tmp_path, seg_packages):
    pixels = np.zeros((3, 512, 512), np.uint16)
    pixels[1, 100:200, 150:300] = 1
    series = sorted(UNCOMPRESSED_SERIES.glob("*.dcm"))
    save_input(tmp_path, SegInput([str(p) for p in series], np.eye(4), pixels, [("Liver", (0.9, 0.5, 0.4))], "liver"))
    code = ONLY_SLICER_AND_THE_FOLDER.format(packages=str(seg_packages), testing=str(TESTING))
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(tmp_path / "segmentation.dcm")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    written = pydicom.dcmread(tmp_path / "segmentation.dcm")
    assert written.NumberOfFrames == 1 and written.SegmentSequence[0].SegmentLabel == "Liver"


ENSURE_SEG = """
import shutil, subprocess, sys, types
sys.path[:0] = [{testing!r}, {module_folder!r}]  # Slicer puts the module's folder on sys.path
sys.modules["highdicom"] = None  # Slicer 5.10 has none (and its pydicom 2.4 could not run one)
from slicer_standins import install_import_only_slicer
install_import_only_slicer()
import qt, slicer

qt.Qt = types.SimpleNamespace(WaitCursor=3)
slicer.app = types.SimpleNamespace(setOverrideCursor=lambda cursor: None, restoreOverrideCursor=lambda: None,
                                   testingEnabled=lambda: True)
answers = [False, True]


def confirm(text, *args, **kwargs):
    print("asked:", text)
    return answers.pop(0)


def pip_install(requirements):  # Base/Python/slicer/util.py at v5.10.0, given a list
    subprocess.run([shutil.which("PythonSlicer"), "-m", "pip", "install", *requirements], check=True)


slicer.util.confirmOkCancelDisplay, slicer.util.pip_install = confirm, pip_install
from SegmentationMachineWidgets import packages
print("ensured:", [packages.ensureSeg() for _ in range(3)])
"""


def test_the_module_installs_the_seg_packages_after_asking_and_leaves_slicers_pydicom_alone(
        tmp_path, home, inside_slicer, wheels):
    code = ENSURE_SEG.format(testing=str(TESTING), module_folder=str(MODULE_FOLDER))
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **OFFLINE_PIP}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    asked = [line for line in done.stdout.splitlines() if line.startswith("asked:")]
    folder = home / ".segmentation-machine" / "seg-packages" / "pydicom-3.0.2_highdicom-0.28.2"
    assert asked == [f"asked: DICOM SEG export needs pydicom==3.0.2, highdicom==0.28.2. Install them now (about 40 MB, "
                     f"needs the internet) into {folder}? Slicer's own packages stay as they are."] * 2
    assert done.stdout.splitlines()[-1] == "ensured: [False, True, True]"  # declined; installed; there
    assert {p.name for p in folder.iterdir()} - {"bin"} == {
        "pydicom", "pydicom-3.0.2.dist-info", "highdicom", "highdicom-0.28.2.dist-info"}
    assert "-m pip install --target" in inside_slicer.read_text()  # through PythonSlicer, as Slicer's pip_install
    here = subprocess.run([sys.executable, "-c", "import pydicom; print(pydicom.__version__)"], capture_output=True,
                          text=True, timeout=60)
    assert here.stdout.strip() == pydicom.__version__  # Slicer's own pydicom (2.4.4 in the first stage) stays
