"""Fixtures: a headless slicer-core scene, the real scans in ../shared/data, the CT phantom, a fake RunPod, the real
nnInteractive server with a hand-set model and the oblique volume its prompts land on."""

import hashlib
import os
import types
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


def pytest_collection_modifyitems(items):
    """Without the scans (a checkout with no ../shared beside it) the tests that read them are skipped, not failed."""
    if DATA.is_dir():
        return
    for item in items:
        if _reads_scans(item):
            item.add_marker(pytest.mark.skip(reason=f"the real scans are not at {DATA}"))


def _reads_scans(item) -> bool:
    """The test, a fixture it uses or a function or class of its module names a module global that is a path under
    DATA, or it is parametrized with one."""
    module = vars(item.module)
    scans = {name for name, value in module.items() if _under_data(value)}
    if any(_under_data(value) for value in getattr(getattr(item, "callspec", None), "params", {}).values()):
        return True
    fixtures = [fixture.func for defs in item._fixtureinfo.name2fixturedefs.values() for fixture in defs]
    seen, functions = set(), [item.function, *fixtures]
    while functions:
        code = getattr(functions.pop(), "__code__", None)
        if code is None or code in seen:
            continue
        seen.add(code)
        names = _global_names(code)
        if names & scans:
            return True
        functions += [function for name in names for function in _functions(module.get(name), item.module)]
    return False


def _functions(value, module) -> list:
    """value when it is a function; the methods of a class of the test's own module (a fake server's handler)."""
    if isinstance(value, types.FunctionType):
        return [value]
    if isinstance(value, type) and value.__module__ == module.__name__:
        return [getattr(method, "__func__", method) for method in vars(value).values()]
    return []


def _under_data(value) -> bool:
    return isinstance(value, Path) and value.is_relative_to(DATA)


def _global_names(code) -> set:
    """The global names a function reads, in its own body and in the functions and lambdas defined inside it."""
    names = set(code.co_names)
    for inner in code.co_consts:
        if isinstance(inner, types.CodeType):
            names |= _global_names(inner)
    return names


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
