"""Fixtures: a headless slicer-core scene, the real scans in ../shared/data, the CT phantom, a fake RunPod, the real
nnInteractive server with a hand-set model and the oblique volume its prompts land on."""

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from fake_runpod import FakeRunPod
from interactive_parts import KEY, oblique_matrix, SHAPE, SLOW_S

from SegmentationMachineLib.cloud.pods import RunPodRest
from SegmentationMachineLib.core import arrays
from SegmentationMachineLib.core.scene import create_headless_scene
from SegmentationMachineLib.dicom.phantom import make_phantom, write_phantom
from SegmentationMachineLib.prompts.session import headless_editor

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SM_SHARED_DATA", REPO.parent / "shared" / "data"))
JPEG2000_SERIES = DATA / "totalsegmentator" / "example_ct_dicom"
UNCOMPRESSED_SERIES = DATA / "dcmqi" / "ct-3slice"
EXAMPLE_CT = DATA / "totalsegmentator" / "example_ct.nii.gz"
EXAMPLE_LABELS = DATA / "totalsegmentator" / "example_seg_fast_force_split.nii.gz"
LABEL_NAMES = DATA / "totalsegmentator" / "labels_total.json"
BONE_LABELS = [*range(25, 51), *range(69, 79), *range(91, 117)]
RUNPOD_KEY = "rpa_TESTKEY0123456789abcdef"


@pytest.fixture
def shared_data():
    if not DATA.is_dir():
        pytest.skip(f"the real scans are not at {DATA} (they sit beside the repository in CI)")
    return DATA


@pytest.fixture
def ctx():
    return create_headless_scene()


@pytest.fixture(scope="session")
def phantom():
    return make_phantom()


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory, phantom):
    folder = tmp_path_factory.mktemp("phantom") / "dicom"
    write_phantom(folder, phantom)
    return folder


def tree_digest(folder: Path) -> dict:
    """{relative path: sha256} of every file under folder, to prove inputs were left untouched."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture
def untouched():
    """Call with folders; at teardown asserts not a byte in them changed."""
    watched = []

    def watch(*folders):
        watched.extend((Path(f), tree_digest(f)) for f in folders)

    yield watch
    for folder, digest in watched:
        assert tree_digest(folder) == digest, f"files under {folder} were changed"


@pytest.fixture
def fake(monkeypatch):
    """A fake RunPod (REST v2, and GraphQL's create) on loopback; the client is pointed at it."""
    running = FakeRunPod(RUNPOD_KEY).start()
    for name, value in running.environment().items():
        monkeypatch.setenv(name, value)
    yield running
    running.stop()


@pytest.fixture
def backend(fake):
    """The pods adapter on the fake; its pauses are recorded, not slept."""
    sleeps = []
    adapter = RunPodRest(RUNPOD_KEY, sleep=sleeps.append)
    adapter.sleeps = sleeps
    return adapter


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """The folder tempfile uses during the test: to see that temporary copies of patient data are removed."""
    import tempfile

    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


# The AI prompt tests' server (test_interactive*.py): the real upstream nnInteractive server on loopback, one for the
# whole run; a test module with its own server or scene_parts fixture uses that instead. The model needs torch, which
# only .venv has (scripts/test.sh, step 2): elsewhere the tests that use these are skipped.
@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    pytest.importorskip("torch")
    from nninteractive_model import write_model_folder

    return write_model_folder(tmp_path_factory.mktemp("nni") / "model")


@pytest.fixture(scope="session")
def server(model_dir):
    from nninteractive_server import Server

    running = Server(model_dir, KEY).start()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def slow_server(tmp_path_factory):
    pytest.importorskip("torch")
    from nninteractive_model import write_model_folder
    from nninteractive_server import Server

    running = Server(write_model_folder(tmp_path_factory.mktemp("slow") / "model", delay_s=SLOW_S), KEY).start()
    yield running
    running.stop()


@pytest.fixture
def scene_parts(ctx):
    """(the oblique volume, a segmentation on its grid, its empty segment "target", a Segment Editor logic)."""
    volume = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "oblique")
    image = (np.random.default_rng(1).normal(0, 100, SHAPE)).astype(np.int16)
    arrays.set_volume_array(volume, image, oblique_matrix())
    segmentation = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    target = segmentation.GetSegmentation().AddEmptySegment("", "target")
    editor = headless_editor(ctx.scene, ctx.app_logic, segmentation, volume)
    return volume, segmentation, target, editor
