"""Traceability: report.json says what was made from which files, how, by which version and when;
--save-segmentation keeps the voxels; --log keeps every step; big scans are warned about before the work."""

import hashlib
import io
import json
import re
import sys
from argparse import Namespace
from datetime import datetime, timezone
from pathlib import Path

import pydicom
import pytest

from SegmentationMachineLib import __version__
from SegmentationMachineLib.cli import main as cli
from SegmentationMachineLib.cli.common import Progress, command_record
from SegmentationMachineLib.core import memory
from SegmentationMachineLib.dicom.volumes import load_input
from SegmentationMachineLib.segment.masks import BoneOptions
from SegmentationMachineLib.segment.presets import apply_preset
from SegmentationMachineLib.segment.segmentations import load_segmentation


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_relative_input_is_recorded_by_its_absolute_path(phantom_dir, tmp_path, monkeypatch):
    """'study.zip' or 'scans' in a report says nothing a month later, from another folder."""
    monkeypatch.chdir(phantom_dir.parent)
    assert cli.main(["model", phantom_dir.name, "--out", str(tmp_path / "out"), "--quiet", "--format", "stl"]) == 0
    report = json.loads(next((tmp_path / "out").glob("*/report.json")).read_text())
    assert report["input"]["path"] == str(phantom_dir) and report["command"]["options"]["input"] == phantom_dir.name


def test_model_report_traces_input_preset_options_version_and_time(phantom_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(memory, "available_memory", lambda: 50 * 2**20)  # 50 MiB free: the phantom needs more
    log_file = tmp_path / "run.log"
    started = datetime.now(timezone.utc).replace(microsecond=0)
    assert cli.main(["model", str(phantom_dir), "--out", str(tmp_path / "out"), "--quiet", "--save-segmentation",
                     "--smoothing", "0.4", "--log", str(log_file)]) == 0
    console = capsys.readouterr()
    folder = next((tmp_path / "out").iterdir())
    report = json.loads((folder / "report.json").read_text())

    assert report["tool"] == {"name": "SegmentationMachine", "version": __version__}
    created = datetime.fromisoformat(report["created"].replace("Z", "+00:00"))
    assert created.tzinfo is not None and started <= created <= datetime.now(timezone.utc)
    slices = sorted(phantom_dir.glob("*.dcm"))
    assert report["input"]["path"] == str(phantom_dir)
    assert report["input"]["series_uid"] == pydicom.dcmread(slices[0], stop_before_pixels=True).SeriesInstanceUID
    assert sorted((f["name"], f["sha256"]) for f in report["input"]["files"]) == [(p.name, sha256(p)) for p in slices]
    assert report["presets"] == [{"name": "bone", "parameters": {**vars(BoneOptions())}}]
    assert report["options"]["smoothing"] == 0.4 and report["options"]["save_segmentation"]
    assert report["command"]["name"] == "model" and report["command"]["options"]["smoothing"] == 0.4
    assert report["command"]["options"]["input"] == str(phantom_dir)

    # The segmentation itself, as Slicer saves it: the same voxels the mesh report counted.
    saved = folder / "SegmentationMachine_CT_phantom_segmentation.seg.nrrd"
    assert saved.name in report["files"]
    from SegmentationMachineLib.core.scene import create_headless_scene
    from SegmentationMachineLib.core import arrays

    ctx = create_headless_scene()
    node = load_segmentation(ctx, saved)
    bone = node.GetSegmentation().GetNthSegment(0)
    assert bone.GetName() == "Bone"
    labelmap = bone.GetRepresentation("Binary labelmap")
    voxels = int((arrays.image_array(labelmap) == bone.GetLabelValue()).sum())
    assert voxels * 1.5 * 1.5 * 2.0 / 1000 == pytest.approx(report["meshes"][0]["voxel_volume_ml"])

    # Every step in the log file, in order, the memory warning before reading a voxel; the console keeps quiet.
    lines = log_file.read_text().splitlines()
    order = ["Scanned", "will need about", "Loaded DICOM series", "x72 voxels of 1.5x1.5x2 mm", "Preset 'bone'",
             "Mesh 'Bone'", "Wrote Bone.stl"]
    positions = [next(i for i, line in enumerate(lines) if text in line) for text in order]
    assert positions == sorted(positions)
    assert "WARNING: This scan has 1 million voxels and will need about 0.5 GiB" in log_file.read_text()
    assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d segmentation-machine: ", line) for line in lines)
    assert "will need about" in console.err and "Preset 'bone'" not in console.err


def test_the_command_record_never_holds_a_secret():
    args = Namespace(command="model", run=print, api_key_env="SM_NNI_API_KEY", api_key="rpa_SECRET",
                     token="t0k3n", dicomweb_password="hunter2", out=Path("/x"), smoothing=0.5)
    recorded = command_record(args)
    assert recorded == {"name": "model", "options": {"api_key_env": "SM_NNI_API_KEY", "out": "/x", "smoothing": 0.5}}


def test_export_report_hashes_the_segmentation_file(shared_data, tmp_path, monkeypatch):
    labels = shared_data / "dcmqi" / "liver_seg.nrrd"
    monkeypatch.chdir(labels.parent)  # given as typed, relative: recorded absolute
    assert cli.main(["export", labels.name, "--out", str(tmp_path), "--format", "stl", "--quiet"]) == 0
    report = json.loads(next(tmp_path.glob("*/report.json")).read_text())
    assert report["input"] == {"path": str(labels), "sha256": sha256(labels), "volume": None}
    assert report["presets"] == [] and report["command"]["options"]["format"] == "stl"


def test_loading_and_presets_report_progress(ctx, phantom_dir):
    calls = []
    volume = load_input(ctx, phantom_dir, progress=lambda *call: calls.append(call)).node
    files = len(list(phantom_dir.glob("*.dcm")))
    assert calls[:files] == [(n, files, f"slice{n:04d}.dcm") for n in range(1, files + 1)]  # the scan, file by file
    assert calls[files:] == [(0, 1, "72 slices"), (1, 1, "72 slices")]  # then Slicer's read
    steps = []
    apply_preset(ctx, volume, "bone", progress=lambda *call: steps.append(call))
    assert steps == [(0, 7, "body"), (1, 7, "vessels"), (2, 7, "cortex"), (3, 7, "closing"), (4, 7, "marrow"),
                     (5, 7, "outline"), (6, 7, "islands"), (1, 1, "bone")]


def test_a_step_starting_at_nought_is_drawn_with_its_name(monkeypatch):
    """tqdm draws only on progress: skin's first step (a minute on a big scan) was shown as bone's finished bar."""
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    monkeypatch.setattr(sys, "stderr", Terminal())
    with Progress("presets", quiet=False) as progress:
        progress(1, 1, "bone")
        progress(0, 3, "skin: opening")
        assert "0/3" in sys.stderr.getvalue().rsplit("\r", 1)[-1] and "skin: opening" in sys.stderr.getvalue()
