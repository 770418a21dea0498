"""Send to OrcaSlicer with a real executable stub, and the CLI as a user runs it (real processes)."""

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import EXAMPLE_LABELS, LABEL_NAMES
from SegmentationMachineLib.core.errors import PrintError
from SegmentationMachineLib.mesh.printing import find_orcaslicer, FLATPAK_IDS, send_to_orcaslicer

CLI = [sys.executable, "-m", "SegmentationMachineLib.cli"]


def make_stub(folder: Path, name: str) -> Path:
    """An executable that records the arguments it was started with."""
    folder.mkdir(parents=True, exist_ok=True)
    stub = folder / name
    stub.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{folder}/{name}.args"\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    return stub


def wait_for(path: Path, seconds=10) -> str:
    deadline = time.monotonic() + seconds
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    return path.read_text()


@pytest.fixture
def export_folder(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    for name in ("Bone.stl", "Skin.stl", "merged.stl", "segments.3mf"):
        (folder / name).write_bytes(b"model")
    return folder


def test_launches_orcaslicer_from_path_with_the_3mf(tmp_path, export_folder):
    bin_dir = tmp_path / "bin"
    make_stub(bin_dir, "orca-slicer")
    command = send_to_orcaslicer(export_folder, env={"PATH": str(bin_dir)}, home=tmp_path)
    assert wait_for(bin_dir / "orca-slicer.args").split() == [str(export_folder / "segments.3mf")]
    assert command[0] == str(bin_dir / "orca-slicer")


def test_orcaslicer_gets_the_environment_it_is_given_not_ours(tmp_path, export_folder, monkeypatch):
    """In Slicer, OrcaSlicer must start with Slicer's startup environment, not the launcher's library paths."""
    monkeypatch.setenv("LD_LIBRARY_PATH", "/slicer/lib")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "orca-slicer"
    stub.write_text(f'#!/bin/sh\nprintf "%s\\n" "${{LD_LIBRARY_PATH:-unset}}" > "{bin_dir}/env.txt"\n')
    stub.chmod(0o755)
    send_to_orcaslicer(export_folder, env={"PATH": str(bin_dir)}, home=tmp_path)
    assert wait_for(bin_dir / "env.txt").strip() == "unset"


def test_stls_when_there_is_no_3mf(tmp_path, export_folder):
    (export_folder / "segments.3mf").unlink()
    bin_dir = tmp_path / "bin"
    make_stub(bin_dir, "OrcaSlicer")
    send_to_orcaslicer(export_folder, env={"PATH": str(bin_dir)}, home=tmp_path)
    assert wait_for(bin_dir / "OrcaSlicer.args").split() == [str(export_folder / n) for n in ("Bone.stl", "Skin.stl")]


def test_not_installed_says_where_to_get_it(tmp_path, export_folder):
    with pytest.raises(PrintError) as error:
        send_to_orcaslicer(export_folder, env={"PATH": str(tmp_path)}, home=tmp_path, platform="linux")
    assert "OrcaSlicer was not found" in str(error.value) and "releases" in str(error.value)
    with pytest.raises(PrintError, match="not at the configured path"):
        find_orcaslicer(str(tmp_path / "missing"), env={}, home=tmp_path)
    with pytest.raises(PrintError, match="No 3MF or STL"):
        send_to_orcaslicer(tmp_path / "bin-empty-folder-that-does-not-exist", env={}, home=tmp_path)


def test_flatpak_gets_read_access_to_the_export(tmp_path, export_folder):
    bin_dir = tmp_path / "bin"
    make_stub(bin_dir, "flatpak")
    (tmp_path / ".local/share/flatpak/app" / FLATPAK_IDS[1]).mkdir(parents=True)
    send_to_orcaslicer(export_folder, env={"PATH": str(bin_dir)}, home=tmp_path, platform="linux")
    assert wait_for(bin_dir / "flatpak.args").split() == [
        "run", f"--filesystem={export_folder}:ro", FLATPAK_IDS[1], str(export_folder / "segments.3mf")]


def test_usual_install_places(tmp_path):
    empty = {"PATH": ""}
    app = tmp_path / "Applications" / "OrcaSlicer.app"
    app.mkdir(parents=True)
    assert find_orcaslicer(env=empty, platform="darwin", home=tmp_path).command[:4] == ["open", "-n", "-a", str(app)]
    exe = make_stub(tmp_path / "local" / "Programs" / "OrcaSlicer", "orca-slicer.exe")
    found = find_orcaslicer(env={**empty, "LOCALAPPDATA": str(tmp_path / "local")}, platform="win32", home=tmp_path / "x")
    assert found.command == [str(exe)]
    appimage = make_stub(tmp_path / "Downloads", "OrcaSlicer_Linux_V2.3.0.AppImage")
    assert find_orcaslicer(env=empty, platform="linux", home=tmp_path).command == [str(appimage)]
    configured = make_stub(tmp_path / "custom", "my-orca")
    assert find_orcaslicer(env={"SM_ORCASLICER": str(configured)}, home=tmp_path).command == [str(configured)]


def run_cli(*args, env=None, cwd=None):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})}, cwd=cwd, stdin=subprocess.DEVNULL)


def test_main_job_on_the_phantom_and_send_to_printer(tmp_path):
    bin_dir = tmp_path / "bin"
    make_stub(bin_dir, "orca-slicer")
    result = run_cli("model", "--out", tmp_path / "out", "--quiet", "--print",
                     env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr
    assert "using the CT phantom" in result.stdout and "Bone:" in result.stdout and "watertight" in result.stdout
    folder = next((tmp_path / "out").glob("SegmentationMachine_CT_phantom_segmentation_*"))
    report = json.loads((folder / "report.json").read_text())
    assert report["meshes"][0]["watertight"] and report["meshes"][0]["volume_ml"] > 100
    assert wait_for(bin_dir / "orca-slicer.args").strip() == str(folder / "segments.3mf")


def test_export_command_names_labels_from_json(shared_data, tmp_path):
    result = run_cli("export", EXAMPLE_LABELS, "--labels", LABEL_NAMES, "--out", tmp_path, "--format", "stl", "--quiet")
    assert result.returncode == 0, result.stderr
    folder = next(tmp_path.iterdir())
    assert (folder / "liver.stl").exists() and len(list(folder.glob("*.stl"))) == 61


@pytest.mark.parametrize("args, sentence", [
    (["model", "{tmp}/missing"], "does not exist"),
    (["model", "{tmp}", "--preset", "lungs"], "Unknown preset 'lungs'"),
    (["model", "{tmp}"], "No DICOM image series found"),
    (["model", "{tmp}", "--format", "ply"], "Unknown export format 'ply'"),
    (["print", "{tmp}"], "No 3MF or STL model"),
    (["export", "{tmp}/none.nii.gz"], "is not a file"),
])
def test_bad_input_is_one_line_exit_2_no_traceback(tmp_path, args, sentence):
    (tmp_path / "notes.txt").write_text("not DICOM")
    log_file = tmp_path / "log.txt"
    result = run_cli(*[a.format(tmp=tmp_path) for a in args], "--log", log_file)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and sentence in lines[0] and "Traceback" not in result.stderr
    assert sentence in log_file.read_text()
    assert (tmp_path / "notes.txt").read_text() == "not DICOM"


def test_list_shows_series_and_skipped_files(shared_data):
    result = run_cli("model", shared_data / "dcmqi", "--list")
    assert result.returncode == 0
    assert result.stdout.startswith("1. CT 'series 2', 3 slices of 512x512")
    assert "liver.dcm: a DICOM SEG object, not an image slice" in result.stdout


def test_the_cli_default_export_folder_is_the_modules():
    from SegmentationMachineLib.cli import common
    from SegmentationMachineLib.mesh import export

    assert common.DEFAULT_OUT == export.DEFAULT_EXPORT_FOLDER


def test_model_stopped_by_a_signal_leaves_no_incomplete_export(tmp_path):
    """SIGTERM (a service stop) and SIGHUP (a closed terminal) end `model` as Ctrl-C does: exit 128+signal,
    one sentence, and no folder of complete-looking meshes without their report."""
    process = subprocess.Popen(CLI + ["model", "--out", str(tmp_path / "out"), "--quiet"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "out").glob("*/*.stl")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)  # until the export has written its first mesh
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr and "Interrupted: nothing was overwritten" in stderr
    assert not list((tmp_path / "out").glob("SegmentationMachine_CT_phantom_segmentation_*"))  # the phantom's DICOM stays


def test_a_full_disk_is_one_sentence_and_leaves_no_partial_export(tmp_path, monkeypatch, capsys):
    from SegmentationMachineLib.cli import main as cli
    from SegmentationMachineLib.mesh import writers

    def disk_full(path, *args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(writers, "write_3mf", disk_full)  # after the STLs and the OBJ were written
    assert cli.main(["model", "--out", str(tmp_path / "out"), "--quiet"]) == 1
    error = capsys.readouterr().err
    assert "No space left on device" in error and "free some space" in error and "Traceback" not in error
    assert not list((tmp_path / "out").glob("SegmentationMachine_CT_phantom_segmentation_*"))


def test_exported_files_get_the_users_normal_permissions(shared_data, tmp_path):
    """Exports follow the umask (0644 under the usual 022), not the 0600 of a temporary file."""
    result = subprocess.run(CLI + ["export", shared_data / "dcmqi" / "liver_seg.nrrd", "--out", tmp_path, "--quiet"],
                            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                            preexec_fn=lambda: os.umask(0o022))
    assert result.returncode == 0, result.stderr
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files and {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}
