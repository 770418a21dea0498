"""Send to OrcaSlicer with a real executable stub, and the CLI as a user runs it (real processes)."""

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import zipfile
from argparse import Namespace
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest

from conftest import DATA, EXAMPLE_LABELS, LABEL_NAMES, UNCOMPRESSED_SERIES
from SegmentationMachineLib.core.errors import PrintError
from SegmentationMachineLib.core.files import UMASK
from SegmentationMachineLib.mesh.check import check_mesh
from SegmentationMachineLib.mesh.printing import find_orcaslicer, FLATPAK_IDS, send_to_orcaslicer
from SegmentationMachineLib.mesh.writers import read_stl, write_stl

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


def cube(low, size):
    """A closed, outward-facing cube: (points, triangles)."""
    points = np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], float) * size + low
    faces = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    return points, np.array([t for a, b, c, d in faces for t in ((a, b, c), (a, c, d))])


@pytest.fixture
def stl_export(tmp_path):
    """An STL-only export as `--format stl` leaves it: a bone inside the skin, lower sides apart, and its report."""
    folder = tmp_path / "stl-export"
    folder.mkdir()
    meshes = {"Bone": cube([10, 10, 30], 20), "Skin": cube([0, 0, 5], 60)}
    colors = {"Bone": [0.95, 0.84, 0.57], "Skin": [0.69, 0.48, 0.4]}
    for name, (points, triangles) in meshes.items():
        write_stl(folder / f"{name}.stl", [(points, triangles, None)])
    (folder / "report.json").write_text(json.dumps({"segmentation": "Knee & <left>", "meshes": [
        {"name": n, "color": colors[n], "stl": f"{n}.stl"} for n in meshes]}))
    return folder, meshes, colors


def threemf_parts(path):
    """(build items, the parts of the one built object: {name: (colour, points, triangles, transform)})."""
    namespace = {"m": "http://schemas.microsoft.com/3dmanufacturing/core/2015/02"}
    with zipfile.ZipFile(path) as package:
        root = ElementTree.fromstring(package.read("3D/3dmodel.model"))
    assert root.get("unit") == "millimeter"
    objects = {o.get("id"): o for o in root.iterfind("m:resources/m:object", namespace)}
    colors = [b.get("displaycolor") for b in root.iterfind("m:resources/m:basematerials/m:base", namespace)]
    items = root.findall("m:build/m:item", namespace)
    parts = {}
    for component in objects[items[0].get("objectid")].iterfind("m:components/m:component", namespace):
        mesh = objects[component.get("objectid")]
        points = np.array([[float(v.get(a)) for a in "xyz"] for v in mesh.iterfind(".//m:vertex", namespace)])
        triangles = np.array([[int(t.get(a)) for a in ("v1", "v2", "v3")]
                              for t in mesh.iterfind(".//m:triangle", namespace)])
        parts[mesh.get("name")] = (colors[int(mesh.get("pindex"))], points, triangles, component.get("transform"))
    return items, objects[items[0].get("objectid")].get("name"), parts


def test_several_stls_go_to_orcaslicer_as_one_3mf_object_with_a_part_each(tmp_path, stl_export):
    """OrcaSlicer would centre and drop each STL on its own unless the user answers a dialog: the STLs of an
    STL-only export go as one 3MF made beside them, its parts named and coloured from the report."""
    folder, meshes, colors = stl_export
    bin_dir = tmp_path / "bin"
    make_stub(bin_dir, "OrcaSlicer")
    send_to_orcaslicer(folder, env={"PATH": str(bin_dir)}, home=tmp_path)
    assert wait_for(bin_dir / "OrcaSlicer.args").split() == [str(folder / "segments.3mf")]
    items, title, parts = threemf_parts(folder / "segments.3mf")
    assert len(items) == 1 and items[0].get("transform") is None and title == "Knee & <left>"
    assert list(parts) == ["Bone", "Skin"]
    for name, (color, points, triangles, transform) in parts.items():
        assert transform is None  # identity: every part where its STL lies
        assert color == "#" + "".join(f"{round(c * 255):02X}" for c in colors[name])
        assert check_mesh(points, triangles).watertight and check_mesh(points, triangles).volume_ml > 0
        assert np.allclose(np.unique(points, axis=0), np.unique(meshes[name][0], axis=0))


def test_one_stl_goes_as_it_is_and_a_broken_one_is_one_sentence(tmp_path, stl_export):
    folder, _, _ = stl_export
    (folder / "Bone.stl").unlink()
    bin_dir = tmp_path / "bin"
    make_stub(bin_dir, "orca-slicer")
    send_to_orcaslicer(folder, env={"PATH": str(bin_dir)}, home=tmp_path)
    assert wait_for(bin_dir / "orca-slicer.args").split() == [str(folder / "Skin.stl")]
    assert not (folder / "segments.3mf").exists()
    (folder / "Bone.stl").write_text("solid not binary\nendsolid\n")
    with pytest.raises(PrintError, match=r"Bone.stl is no binary STL: send a 3MF or export"):
        send_to_orcaslicer(folder, env={"PATH": str(bin_dir)}, home=tmp_path)
    assert not (folder / "segments.3mf").exists()


def test_read_stl_gives_back_the_closed_mesh_write_stl_wrote(tmp_path):
    points, triangles = cube([1.5, -2, 3], 7.25)
    write_stl(tmp_path / "cube.stl", [(points, triangles, None)])
    read_points, read_triangles = read_stl(tmp_path / "cube.stl")
    assert len(read_points) == 8 and check_mesh(read_points, read_triangles).watertight
    assert np.array_equal(read_points[read_triangles], points[triangles])


def test_read_stl_leaves_out_triangles_whose_corners_are_one_point_in_float32(tmp_path):
    """Two corners closer than float32 tells apart are one point in the file: the 3MF made from it for OrcaSlicer
    must not hold a triangle with a corner twice (3MF Core 4.1.4.1; lib3mf refuses the whole file)."""
    points, triangles = cube([100, 100, 100], 10)
    points = np.vstack([points, points[0] + [1e-6, 0, 0]])  # one float32 point with points[0] (its step: 7.6e-6)
    write_stl(tmp_path / "cube.stl", [(points, np.vstack([triangles, [[0, 8, 1]]]), None)])
    read_points, read_triangles = read_stl(tmp_path / "cube.stl")
    assert len(read_triangles) == len(triangles) and check_mesh(read_points, read_triangles).watertight
    assert (np.diff(np.sort(read_triangles, axis=1), axis=1) > 0).all()


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
    assert find_orcaslicer(env=empty, platform="darwin", home=tmp_path).command == ["open", "-a", str(app)]
    exe = make_stub(tmp_path / "local" / "Programs" / "OrcaSlicer", "orca-slicer.exe")
    found = find_orcaslicer(env={**empty, "LOCALAPPDATA": str(tmp_path / "local")}, platform="win32", home=tmp_path / "x")
    assert found.command == [str(exe)]
    appimage = make_stub(tmp_path / "Downloads", "OrcaSlicer_Linux_V2.3.0.AppImage")
    assert find_orcaslicer(env=empty, platform="linux", home=tmp_path).command == [str(appimage)]
    configured = make_stub(tmp_path / "custom", "my-orca")
    assert find_orcaslicer(env={"SM_ORCASLICER": str(configured)}, home=tmp_path).command == [str(configured)]


def test_on_macos_the_files_are_handed_to_the_app_and_a_refusal_is_said(tmp_path, export_folder):
    """`open -n -a APP --args FILE` ran detached: 'Opened in OrcaSlicer' when macOS refused the app, and a running
    OrcaSlicer got a path with 'ä' garbled from its second instance. macOS's open hands files over by Apple Event."""
    app = tmp_path / "Applications" / "OrcaSlicer.app"
    app.mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    make_stub(bin_dir, "open")
    command = send_to_orcaslicer(export_folder, env={"PATH": str(bin_dir)}, home=tmp_path, platform="darwin")
    assert (bin_dir / "open.args").read_text().split("\n")[:-1] == command[1:] == [
        "-a", str(app), str(export_folder / "segments.3mf")]  # open has ended: no waiting for a file
    (bin_dir / "open").write_text('#!/bin/sh\necho "LSOpenURLsWithRole() failed with error -10810." >&2\nexit 1\n')
    with pytest.raises(PrintError, match=r"could not be opened \(LSOpenURLsWithRole\(\) failed with error -10810\.\): "
                                         r"open it once from the Finder"):
        send_to_orcaslicer(export_folder, env={"PATH": str(bin_dir)}, home=tmp_path, platform="darwin")


def test_a_configured_path_relative_to_the_current_folder_is_run_from_there(tmp_path, export_folder, monkeypatch):
    """'./orca' became 'orca', which Popen looked up on PATH: "could not be started (No such file or directory)"."""
    make_stub(tmp_path / "tools", "orca")
    monkeypatch.chdir(tmp_path / "tools")
    command = send_to_orcaslicer(export_folder, "./orca", env={"PATH": ""}, home=tmp_path)
    assert command[0] == str(tmp_path / "tools" / "orca")
    assert wait_for(tmp_path / "tools" / "orca.args").split() == [str(export_folder / "segments.3mf")]


def test_a_downloaded_appimage_that_may_not_run_is_named_not_missing(tmp_path):
    """Browsers save downloads without the permission to run them: 'not found' sent users looking elsewhere."""
    appimage = tmp_path / "Downloads" / "OrcaSlicer_Linux_AppImage_Ubuntu2404_V2.3.1.AppImage"
    appimage.parent.mkdir()
    appimage.write_text("an AppImage")
    for configured in (None, str(appimage)):
        with pytest.raises(PrintError, match=r"may not be run .*chmod \+x"):
            find_orcaslicer(configured, env={"PATH": ""}, platform="linux", home=tmp_path)


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
    (["model", "{tmp}", "--preset", ""], "Unknown preset ''"),  # not bone, silently
    (["model", "{tmp}"], "No DICOM image series found"),
    (["model", "{tmp}", "--format", "ply"], "Unknown export format 'ply'"),
    (["print", "{tmp}"], "No 3MF or STL model"),
    (["export", "{tmp}/none.nii.gz"], "is not a file"),
    # --print's needs are found before the work, not after minutes of it
    (["model", "--format", "obj,glb", "--print", "--out", "{tmp}/out"], "add 3mf or stl to --format"),
    (["model", "--print", "--orcaslicer", "{tmp}/notes.txt", "--out", "{tmp}/out"], "may not be run"),
    (["model", "--print", "--out", "{tmp}/out"], "OrcaSlicer was not found"),
])
def test_bad_input_is_one_line_exit_2_no_traceback(tmp_path, args, sentence):
    (tmp_path / "notes.txt").write_text("not DICOM")
    log_file = tmp_path / "log.txt"
    # No OrcaSlicer this machine may have: not on PATH, not in the home folder's usual places.
    result = run_cli(*[a.format(tmp=tmp_path) for a in args], "--log", log_file,
                     env={"HOME": str(tmp_path), "PATH": os.path.dirname(sys.executable)})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and sentence in lines[0] and "Traceback" not in result.stderr
    assert sentence in log_file.read_text()
    assert (tmp_path / "notes.txt").read_text() == "not DICOM"


def test_a_file_whose_name_is_not_utf8_is_skipped_with_its_reason_not_a_crash(shared_data, tmp_path):
    """Names from an older share or CD (Latin-1 'Müller'): Slicer's reader aborted the process (C++ logic_error) and
    the inbox's journal raised; such a file is skipped and named, its bytes shown as \\xNN."""
    folder = tmp_path / "scans"
    folder.mkdir()
    files = sorted(UNCOMPRESSED_SERIES.iterdir())
    for source in files[1:]:
        shutil.copy(source, folder / source.name)
    shutil.copy(files[0], os.fsdecode(bytes(folder) + b"/M\xfcller.dcm"))
    result = run_cli("model", folder, "--out", tmp_path / "out", "--quiet")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "M\\xfcller.dcm: its path is not UTF-8 text" in result.stderr
    watched = run_cli("watch", folder, "--out", tmp_path / "outbox", "--once", "--settle", "0.5", "--log",
                      tmp_path / "watch.log")
    assert watched.returncode == 0 and "Traceback" not in watched.stderr + (tmp_path / "watch.log").read_text()
    assert "Skipped " in watched.stderr and "M\\xfcller.dcm: its path is not UTF-8 text" in watched.stderr
    assert "done" in watched.stdout
    nifti = os.fsdecode(bytes(tmp_path) + b"/M\xfcller.nrrd")
    shutil.copy(DATA / "dcmqi" / "liver_seg.nrrd", nifti)
    refused = run_cli("model", nifti, "--out", tmp_path / "out")
    assert refused.returncode == 2 and "M\\xfcller.nrrd cannot be read: its path is not UTF-8" in refused.stderr
    latin1_folder = os.fsdecode(bytes(tmp_path) + b"/Eing\xe4nge")  # every file in it: said once, for the folder
    shutil.copytree(UNCOMPRESSED_SERIES, latin1_folder)
    for command in (["model", latin1_folder], ["watch", latin1_folder, "--out", tmp_path / "box2", "--once"]):
        result = run_cli(*command)
        assert result.returncode == 2 and "Eing\\xe4nge cannot be" in result.stderr, result.stderr
        assert "its path is not UTF-8 text" in result.stderr and "Traceback" not in result.stderr


def test_list_shows_series_and_skipped_files(shared_data):
    result = run_cli("model", shared_data / "dcmqi", "--list")
    assert result.returncode == 0
    assert result.stdout.startswith("1. CT 'series 2', 3 slices of 512x512")
    assert "liver.dcm: a DICOM SEG object, not an image slice" in result.stdout


def test_list_prints_file_names_that_hold_a_line_break_escaped(tmp_path):
    """A file name is anyone's text: printed as it is, one could forge a line of the listing."""
    (tmp_path / "notes\n1. CT 'forged', 300 slices.txt").write_text("not DICOM")
    result = run_cli("model", tmp_path, "--list")
    assert result.returncode == 0 and "notes\\n1. CT 'forged'" in result.stdout
    assert not any(line.startswith("1. CT 'forged'") for line in result.stdout.splitlines())


def test_the_cli_default_export_folder_is_the_modules():
    from SegmentationMachineLib.cli import common
    from SegmentationMachineLib.mesh import export

    assert common.DEFAULT_OUT == export.DEFAULT_EXPORT_FOLDER


def test_model_stopped_by_a_signal_leaves_no_incomplete_export(tmp_path):
    """SIGTERM (a service stop) and SIGHUP (a closed terminal) end `model` as Ctrl-C does: exit 128+signal,
    one sentence, and no folder of complete-looking meshes without their report."""
    # Two segments and every mesh format: the signal lands after the first STL and well before the report.
    process = subprocess.Popen(CLI + ["model", "--out", str(tmp_path / "out"), "--quiet", "--preset", "bone,skin",
                                      "--format", "stl,obj,3mf,glb"], stdout=subprocess.PIPE,
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


def test_a_phantom_stopped_half_way_is_never_used(tmp_path, monkeypatch):
    """Ctrl-C while the first run wrote the phantom (or a second run at that moment) left 30 of its 72 slices, and
    every later run without an input used that phantom, short of slices, with a spacing warning."""
    from SegmentationMachineLib.cli import model
    from SegmentationMachineLib.dicom import phantom

    write = phantom.write_phantom

    def stopped(folder):
        phantom.write_ct_series(folder, phantom.make_phantom(shape=(30, 8, 8)).hu, 1.0,
                                [(0, 0, k) for k in range(30)], "half")
        raise KeyboardInterrupt

    args = Namespace(input=None, out=tmp_path)
    monkeypatch.setattr(phantom, "write_phantom", stopped)
    with pytest.raises(KeyboardInterrupt):
        model._input_or_phantom(args)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(phantom, "write_phantom", write)
    folder = model._input_or_phantom(args)
    assert len(list(folder.glob("*.dcm"))) == 72 and [p.name for p in tmp_path.iterdir()] == ["phantom-ct-dicom"]
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~UMASK  # as any folder the user makes
