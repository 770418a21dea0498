"""Fixtures: a headless slicer-core scene, the real scans in ../shared/data, the CT phantom, a fake RunPod."""

import hashlib
import os
from pathlib import Path

import pytest

from fake_runpod import FakeRunPod

from SegmentationMachineLib.cloud.pods import RunPodRest
from SegmentationMachineLib.core.scene import create_headless_scene
from SegmentationMachineLib.dicom.phantom import make_phantom, write_phantom

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
