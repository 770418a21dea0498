"""Export: STL/OBJ/3MF written from one set of surfaces, exact in space, watertight, never overwriting."""

import json
import zipfile
from xml.etree import ElementTree

import numpy as np
import pytest
import trimesh
import vtk
from vtkmodules.util import numpy_support

from conftest import EXAMPLE_LABELS, JPEG2000_SERIES, LABEL_NAMES, UNCOMPRESSED_SERIES
from SegmentationMachineLib.core import arrays
from SegmentationMachineLib.core.errors import ExportError
from SegmentationMachineLib.core.files import atomic_file
from SegmentationMachineLib.core.scene import create_headless_scene
from SegmentationMachineLib.dicom.volumes import load_input
from SegmentationMachineLib.mesh import writers
from SegmentationMachineLib.mesh.check import check_mesh, merged_as_float32, without_degenerate
from SegmentationMachineLib.mesh.export import export_segmentation, ExportOptions, parse_formats
from SegmentationMachineLib.mesh.surfaces import SurfaceMethod, SurfaceOptions
from SegmentationMachineLib.mesh.writers import read_stl, write_3mf
from SegmentationMachineLib.segment.presets import add_segment_from_mask, apply_preset
from SegmentationMachineLib.segment.segmentations import load_segmentation, read_label_names


def vtk_points(reader_class, path):
    reader = reader_class()
    reader.SetFileName(str(path))
    reader.Update()
    return numpy_support.vtk_to_numpy(reader.GetOutput().GetPoints().GetData())


def bounds(points):
    return np.array([points.min(axis=0), points.max(axis=0)])


def obj_objects(path) -> dict:
    """{name: trimesh} of each `o` in an OBJ, its faces taken as written (global, 1-based): faces that point at
    another object's vertices fail."""
    objects, vertices, name = {}, [], None
    for line in path.read_text().splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "o":
            name = rest
            objects[name] = []
        elif kind == "v":
            vertices.append([float(v) for v in rest.split()])
        elif kind == "f":
            objects[name].append([int(i) - 1 for i in rest.split()])
    meshes, ranges, points = {}, [], np.array(vertices)
    for name, faces in objects.items():
        faces = np.array(faces)
        low, high = faces.min(), faces.max()
        meshes[name] = trimesh.Trimesh(points[low:high + 1], faces - low, process=False)
        ranges.append((low, high))
    ranges.sort()
    assert all(a[1] < b[0] for a, b in zip(ranges, ranges[1:])), ranges  # no object uses another's vertices
    return meshes


def assert_binary_stl_facing_out(path):
    """A binary header not starting with 'solid' (readers take such a file for ASCII), and each stored normal
    the way its corners wind (outward, for a closed mesh whose volume is positive)."""
    data = path.read_bytes()
    assert not data[:5].lower().startswith(b"solid")
    record = np.dtype([("normal", "<f4", 3), ("corners", "<f4", (3, 3)), ("attribute", "<u2")])
    facets = np.frombuffer(data, record, int(np.frombuffer(data, "<u4", 1, 80)[0]), 84)
    corners = facets["corners"].astype(float)
    wound = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    lengths = np.linalg.norm(wound, axis=1)
    sizeable = lengths > 1e-6
    agreement = np.einsum("ij,ij->i", wound[sizeable] / lengths[sizeable, None], facets["normal"][sizeable])
    assert (agreement > 0.5).mean() > 0.99, agreement.min()


def read_3mf_mesh(path):
    """(points, triangles) of a 3MF's first mesh as its text holds them (trimesh merges and repairs)."""
    mesh = next(ElementTree.fromstring(zipfile.ZipFile(path).read("3D/3dmodel.model")).iterfind(".//{*}mesh"))
    points = np.array([[float(v.get(axis)) for axis in "xyz"] for v in mesh.iterfind(".//{*}vertex")])
    return points, np.array([[int(t.get(f"v{n}")) for n in (1, 2, 3)] for t in mesh.iterfind(".//{*}triangle")])


def read_3mf(path):
    scene = trimesh.load(str(path), file_type="3mf", force="scene")
    return list(scene.dump())


@pytest.mark.parametrize("series", [JPEG2000_SERIES, UNCOMPRESSED_SERIES])
def test_real_series_pipeline_all_formats_line_up(ctx, shared_data, tmp_path, untouched, series):
    untouched(series)
    volume = load_input(ctx, series).node
    segmentation = apply_preset(ctx, volume, "bone")
    apply_preset(ctx, volume, "skin", segmentation)
    result = export_segmentation(segmentation, tmp_path, ExportOptions(merged_stl=True))
    names = {p.name for p in result.folder.iterdir()}
    assert names == {"Bone.stl", "Skin.stl", "merged.stl", "segments.obj", "segments.mtl", "segments.3mf", "report.json"}
    report = json.loads((result.folder / "report.json").read_text())
    assert [m["name"] for m in report["meshes"]] == ["Bone", "Skin"] and report["coordinates"] == "LPS"

    stl_bounds = bounds(np.concatenate([vtk_points(vtk.vtkSTLReader, result.folder / f"{n}.stl") for n in ("Bone", "Skin")]))
    obj_bounds = bounds(vtk_points(vtk.vtkOBJReader, result.folder / "segments.obj"))
    parts = read_3mf(result.folder / "segments.3mf")
    assert len(parts) == 2  # one object per segment
    threemf_bounds = bounds(np.concatenate([p.vertices for p in parts]))
    for other in (obj_bounds, threemf_bounds, bounds(vtk_points(vtk.vtkSTLReader, result.folder / "merged.stl"))):
        assert np.abs(other - stl_bounds).max() < 0.5
    for part, entry in zip(parts, report["meshes"]):
        assert part.is_watertight and entry["watertight"]
        assert part.volume / 1000 == pytest.approx(entry["volume_ml"], rel=1e-3)
        assert np.allclose(part.bounds, [entry["bounds_min_mm"], entry["bounds_max_mm"]], atol=1e-3)
        assert entry["volume_difference_percent"] == pytest.approx(
            100 * (entry["volume_ml"] - entry["voxel_volume_ml"]) / entry["voxel_volume_ml"], abs=0.1)
    # Each OBJ object's faces use its own vertices (the second's pointed at the first's, and vertex bounds, all the
    # test looked at, said nothing), and it encloses the segment's volume.
    for (name, mesh), entry in zip(obj_objects(result.folder / "segments.obj").items(), report["meshes"]):
        assert name == entry["name"] and mesh.is_watertight
        assert mesh.volume / 1000 == pytest.approx(entry["volume_ml"], rel=1e-3)
    for name in ("Bone", "Skin", "merged"):
        assert_binary_stl_facing_out(result.folder / f"{name}.stl")
    # The skin lies where the volume is: inside the volume's LPS bounding box.
    ras_corners = arrays.ijk_to_ras(volume) @ np.array(
        [[i, j, k, 1] for i in (0, volume.GetImageData().GetDimensions()[0] - 1)
         for j in (0, volume.GetImageData().GetDimensions()[1] - 1)
         for k in (0, volume.GetImageData().GetDimensions()[2] - 1)]).T
    lps = ras_corners[:3].T * [-1, -1, 1]
    spacing = arrays.spacing_of(arrays.ijk_to_ras(volume)).max()
    assert (stl_bounds[0] >= lps.min(axis=0) - spacing).all() and (stl_bounds[1] <= lps.max(axis=0) + spacing).all()


def test_lines_up_with_slicers_own_export(ctx, shared_data, tmp_path):
    volume = load_input(ctx, JPEG2000_SERIES).node
    segmentation = apply_preset(ctx, volume, "bone")
    ours = export_segmentation(segmentation, tmp_path / "ours", ExportOptions(formats=("stl",)))
    (tmp_path / "slicer").mkdir()
    assert ctx.segmentations_logic.ExportSegmentsClosedSurfaceRepresentationToFiles(
        str(tmp_path / "slicer"), segmentation, None, "STL", True, 1.0, False)
    slicer_points = vtk_points(vtk.vtkSTLReader, next((tmp_path / "slicer").glob("*.stl")))
    # Both LPS; smoothing differs a little, a flip or shift would differ by centimetres.
    assert np.abs(bounds(slicer_points) - bounds(vtk_points(vtk.vtkSTLReader, ours.folder / "Bone.stl"))).max() < 1.0


def test_every_label_of_the_61_label_segmentation_exports_watertight(ctx, shared_data, tmp_path):
    names = read_label_names(LABEL_NAMES)
    segmentation = load_segmentation(ctx, EXAMPLE_LABELS, names)
    labels = np.unique(arrays.image_array(segmentation.GetSegmentation().GetNthSegment(0).GetRepresentation("Binary labelmap")))
    result = export_segmentation(segmentation, tmp_path, ExportOptions(formats=("stl", "3mf")))
    meshes = result.report["meshes"]
    assert len(meshes) == 61 == len(labels[labels > 0])
    assert {m["name"] for m in meshes} == {names[int(v)] for v in labels[labels > 0]}
    assert all(m["watertight"] for m in meshes) and not result.not_watertight
    assert len(read_3mf(result.folder / "segments.3mf")) == 61
    for entry in meshes:
        assert (result.folder / entry["stl"]).stat().st_size == 84 + 50 * entry["triangles"]


def oblique_volume(ctx):
    """A 30x20x10 volume whose IJK axes are rotated, mirrored and anisotropic in RAS."""
    angle = np.radians(30)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ np.diag([1.5, -0.8, 2.5])  # J mirrored: determinant < 0
    matrix[:3, 3] = [12.0, -40.0, 7.0]
    volume = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "oblique")
    arrays.set_volume_array(volume, np.zeros((10, 20, 30), np.int16), matrix)
    return volume, matrix


def test_meshes_sit_exactly_where_their_voxels_are_on_an_oblique_grid(ctx, tmp_path):
    volume, matrix = oblique_volume(ctx)
    mask = np.zeros((10, 20, 30), bool)
    mask[2:7, 4:15, 5:25] = True  # K 2..6, J 4..14, I 5..24
    segmentation = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "box")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    add_segment_from_mask(segmentation, mask, matrix, "box", (1, 0, 0))
    options = ExportOptions(formats=("stl",), coordinates="RAS", surface=SurfaceOptions(smoothing=0))
    result = export_segmentation(segmentation, tmp_path, options)
    points = vtk_points(vtk.vtkSTLReader, result.folder / "box.stl")
    ijk = (np.linalg.inv(matrix) @ np.c_[points, np.ones(len(points))].T)[:3].T
    # Marching cubes puts the surface half-way between inside and outside voxel centres.
    assert np.allclose(ijk.min(axis=0), [4.5, 3.5, 1.5], atol=1e-3)
    assert np.allclose(ijk.max(axis=0), [24.5, 14.5, 6.5], atol=1e-3)
    entry = result.report["meshes"][0]
    assert entry["watertight"] and entry["volume_ml"] > 0  # outward normals despite the mirrored grid
    assert entry["volume_ml"] == pytest.approx(mask.sum() * 1.5 * 0.8 * 2.5 / 1000, rel=0.05)


def test_lps_is_ras_with_x_and_y_negated(ctx, tmp_path, phantom_dir):
    segmentation = apply_preset(ctx, load_input(ctx, phantom_dir).node, "bone")
    lps = export_segmentation(segmentation, tmp_path, ExportOptions(formats=("stl",)))
    ras = export_segmentation(segmentation, tmp_path, ExportOptions(formats=("stl",), coordinates="RAS"))
    assert lps.folder != ras.folder  # a second export never reuses the first one's folder
    lps_points = vtk_points(vtk.vtkSTLReader, lps.folder / "Bone.stl")
    ras_points = vtk_points(vtk.vtkSTLReader, ras.folder / "Bone.stl")
    assert np.allclose(lps_points * [-1, -1, 1], ras_points, atol=1e-4)


def test_an_export_is_written_beside_its_folder_and_moved_in_whole(ctx, tmp_path, phantom_dir, monkeypatch):
    """Slicer quit (or a kill) mid-export left a folder with some STLs and no 3MF or report that looked finished.
    While it is written, its folder stays empty; interrupted, neither is left."""
    from SegmentationMachineLib.mesh import export as export_module

    segmentation = apply_preset(ctx, load_input(ctx, phantom_dir).node, "bone")
    seen = {}

    def interrupted(path, *args):
        seen["folders"] = sorted(p.name for p in tmp_path.iterdir())
        seen["written"] = sorted(p.name for p in path.parent.iterdir())
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module.writers, "write_3mf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_segmentation(segmentation, tmp_path, ExportOptions(formats=("stl", "3mf")))
    [visible, hidden] = sorted(seen["folders"], key=lambda name: name.startswith("."))
    assert hidden == f".{visible}.partial" and seen["written"] == ["Bone.stl"]
    assert not list(tmp_path.iterdir())
    monkeypatch.undo()
    result = export_segmentation(segmentation, tmp_path, ExportOptions(formats=("stl", "3mf")))
    assert [p.name for p in tmp_path.iterdir()] == [result.folder.name] and all(p.is_file() for p in result.files)
    assert sorted(p.name for p in result.folder.iterdir()) == ["Bone.stl", "report.json", "segments.3mf"]


def test_empty_segments_are_skipped_with_a_note_and_nothing_partial_is_left(ctx, tmp_path, phantom_dir):
    volume = load_input(ctx, phantom_dir).node
    segmentation = apply_preset(ctx, volume, "bone")
    segmentation.GetSegmentation().AddEmptySegment("", "Tumour")
    result = export_segmentation(segmentation, tmp_path)
    assert result.report["skipped"] == [{"name": "Tumour", "reason": "empty segment"}]
    assert "Tumour: skipped (empty segment)" in result.summary_lines()
    assert not list(result.folder.glob(".*"))  # no temporary files
    with pytest.raises(FileExistsError):
        with atomic_file(result.folder / "Bone.stl") as stream:
            stream.write(b"x")
    assert (result.folder / "Bone.stl").stat().st_size > 1000


def test_all_empty_or_no_segments_is_a_sentence_and_leaves_no_folder(ctx, tmp_path):
    segmentation = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "nothing")
    with pytest.raises(ExportError, match="no segments"):
        export_segmentation(segmentation, tmp_path)
    segmentation.GetSegmentation().AddEmptySegment("", "Empty")
    with pytest.raises(ExportError, match="empty: nothing to export"):
        export_segmentation(segmentation, tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_segment_erased_in_a_layer_it_shares_is_skipped_as_empty(ctx, tmp_path):
    """The Segment Editor keeps segments that do not overlap in one labelmap, each its own value: a segment erased
    there, below another that is not, has no box of its own (find_objects gives None), which the export took for a
    box: a traceback instead of the other segment's mesh and an "empty segment" note."""
    segmentation = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Shared")
    segmentation.CreateDefaultDisplayNodes()
    cube = np.zeros((8, 8, 8), bool)
    cube[2:6, 2:6, 2:6] = True
    erased, _kept = (add_segment_from_mask(segmentation, cube, np.eye(4), name, (1, 0, 0), start)
                    for name, start in (("Erased", (0, 0, 0)), ("Kept", (0, 0, 20))))
    shared = segmentation.GetSegmentation()
    shared.CollapseBinaryLabelmaps(False)
    assert shared.GetNumberOfLayers() == 1 and shared.GetSegment(erased).GetLabelValue() == 1
    values = arrays.image_array(shared.GetSegment(erased).GetRepresentation("Binary labelmap"))
    values[values == 1] = 0  # as the Segment Editor's erase leaves it
    result = export_segmentation(segmentation, tmp_path, ExportOptions(formats=("stl",)))
    assert [mesh["name"] for mesh in result.report["meshes"]] == ["Kept"]
    assert result.report["skipped"] == [{"name": "Erased", "reason": "empty segment"}]


def test_surface_nets_and_decimation_options(ctx, tmp_path, phantom_dir):
    segmentation = apply_preset(ctx, load_input(ctx, phantom_dir).node, "bone")
    base = export_segmentation(segmentation, tmp_path, ExportOptions(formats=("stl",))).report["meshes"][0]
    fewer = export_segmentation(segmentation, tmp_path, ExportOptions(
        formats=("stl",), surface=SurfaceOptions(decimation=0.5))).report["meshes"][0]
    nets = export_segmentation(segmentation, tmp_path, ExportOptions(
        formats=("stl",), surface=SurfaceOptions(method=SurfaceMethod.SURFACE_NETS))).report["meshes"][0]
    assert fewer["triangles"] < 0.6 * base["triangles"] and fewer["watertight"]
    assert nets["volume_ml"] == pytest.approx(base["volume_ml"], rel=0.1)  # its smoothing shrinks a little
    assert nets["watertight"] == (nets["boundary_edges"] == 0 and nets["non_manifold_edges"] == 0)


def test_a_decimated_bone_of_a_real_ct_is_closed_in_its_files(ctx, tmp_path):
    """vtkDecimatePro leaves a few back-to-back triangles on a real CT's bone (each of their edges had four
    triangles), and corners closer than float32 tells apart: the report, the STL and the 3MF all hold a closed mesh."""
    segmentation = apply_preset(ctx, load_input(ctx, JPEG2000_SERIES).node, "bone")
    result = export_segmentation(segmentation, tmp_path, ExportOptions(
        formats=("stl", "3mf"), surface=SurfaceOptions(decimation=0.5)))
    entry = result.report["meshes"][0]
    assert entry["watertight"] and entry["volume_ml"] == pytest.approx(entry["voxel_volume_ml"], rel=0.02)
    assert check_mesh(*read_stl(result.folder / entry["stl"])).watertight
    vertices, triangles = read_3mf_mesh(result.folder / "segments.3mf")
    assert (np.diff(np.sort(triangles, axis=1), axis=1) > 0).all()  # 3MF: three distinct corners
    assert check_mesh(vertices, triangles).watertight


def test_repeated_corners_and_back_to_back_triangles_leave_a_closed_mesh():
    points = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1 + 1e-9, 0, 0]], float)
    triangles = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [4, 2, 3], [0, 1, 2], [0, 2, 1], [1, 1, 2]])
    assert not check_mesh(points, triangles).watertight
    closed = without_degenerate(merged_as_float32(points, triangles))
    assert closed.tolist() == [[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]] and check_mesh(points, closed).watertight
    assert without_degenerate(triangles[:4]).tolist() == triangles[:4].tolist()  # nothing to leave out
    assert without_degenerate(np.array([[0, 1, 2], [0, 1, 0], [3, 3, 4], [5, 6, 6]])).tolist() == [[0, 1, 2]]
    assert without_degenerate(np.vstack([closed, closed[3:]])).tolist() == closed.tolist()  # a copy facing alike


def test_a_3mf_whose_text_passes_zips_limit_is_written_with_zip64(tmp_path, monkeypatch):
    """Python's zipfile refuses to go on past 2 GiB in an entry opened without ZIP64 (a whole-body thin-slice CT's
    bone and skin, about 26 million triangles): the limit lowered, as a smaller mesh meets it."""
    box = trimesh.creation.box((10, 10, 10))
    points, triangles = box.vertices, box.faces
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 500)
    with pytest.raises(RuntimeError, match="force_zip64"):  # what a too large 3MF met before
        write_3mf(tmp_path / "plain.3mf", [("Cube", (1, 0, 0, 1), points, triangles)])
    monkeypatch.setattr(writers, "ZIP64_FROM", len(points) + len(triangles) - 1)
    write_3mf(tmp_path / "large.3mf", [("Cube", (1, 0, 0, 1), points, triangles)])
    monkeypatch.undo()
    assert len(zipfile.ZipFile(tmp_path / "large.3mf").read("3D/3dmodel.model")) > 500
    assert check_mesh(*read_3mf_mesh(tmp_path / "large.3mf")).watertight


def test_a_labelmap_without_a_colour_table_gets_the_same_colours_every_time(tmp_path):
    """Slicer's default labelmap colours come from a file its core lacks: they were random, another on each export."""
    colors = [[load_segmentation(create_headless_scene(), EXAMPLE_LABELS).GetSegmentation().GetNthSegment(n).GetColor()
               for n in range(5)] for _ in range(2)]
    assert colors[0] == colors[1] and len(set(colors[0])) == 5


def test_diagonal_voxels_with_surface_nets_are_flagged_not_watertight(ctx, tmp_path):
    volume, matrix = oblique_volume(ctx)
    mask = np.zeros((10, 20, 30), bool)
    mask[3:6, 5:8, 5:8] = True
    mask[3:6, 8:11, 8:11] = True  # touches the first block along an edge only
    segmentation = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "diagonal")
    add_segment_from_mask(segmentation, mask, matrix, "pair", (0, 1, 0))
    result = export_segmentation(segmentation, tmp_path, ExportOptions(
        formats=("stl",), surface=SurfaceOptions(method=SurfaceMethod.SURFACE_NETS, smoothing=0)))
    assert result.not_watertight == ["pair"]
    assert "NOT watertight" in result.summary_lines()[0]


def test_mesh_check_counts_holes_and_non_manifold_edges():
    points = np.array([[0, 0, 0], [30, 0, 0], [0, 30, 0], [0, 0, 30]], float)
    closed = np.array([[0, 2, 1], [0, 1, 3], [1, 2, 3], [0, 3, 2]])
    check = check_mesh(points, closed)
    assert check.watertight and check.volume_ml == pytest.approx(30 ** 3 / 6 / 1000)
    opened = check_mesh(points, closed[:3])
    assert not opened.watertight and opened.boundary_edges == 3
    fin = check_mesh(np.vstack([points, [[30, 30, 30]]]), np.vstack([closed, [[0, 1, 4]]]))
    assert fin.non_manifold_edges == 1 and not fin.watertight


def test_format_parsing():
    assert parse_formats("STL, .3mf,stl") == ("stl", "3mf")
    with pytest.raises(ExportError, match="Unknown export format 'ply'"):
        parse_formats("stl,ply")


def test_obj_and_3mf_text_written_in_chunks_is_the_text_written_at_once(tmp_path, monkeypatch):
    """The writers format a few thousand rows per call, so a worker never holds the GIL (Slicer's GUI) for long:
    chunk edges must neither lose nor repeat a row."""
    import zipfile

    from SegmentationMachineLib.mesh import writers

    rng = np.random.default_rng(0)
    meshes = [("Bone", (0.9, 0.8, 0.6), rng.normal(size=(10, 3)) * 100, rng.integers(0, 10, (8, 3))),
              ("Skin", (0.9, 0.6, 0.5), rng.normal(size=(5, 3)), rng.integers(0, 5, (3, 3)))]
    written = {}
    for rows in (10 ** 9, 3):
        monkeypatch.setattr(writers, "ROWS_PER_CHUNK", rows)
        folder = tmp_path / str(rows)
        folder.mkdir()
        writers.write_obj(folder / "segments.obj", meshes)
        writers.write_3mf(folder / "segments.3mf", meshes, "CT")
        with zipfile.ZipFile(folder / "segments.3mf") as package:
            written[rows] = (folder / "segments.obj").read_text(), package.read("3D/3dmodel.model")
    assert written[3] == written[10 ** 9]
    assert written[3][0].count("\nv ") == 15 and written[3][1].count(b"<triangle ") == 11


def test_every_segment_gets_its_own_file_on_every_file_system_and_its_own_name_inside(ctx, tmp_path):
    """Names once shared a file ('a', 'a', 'a_2'; 'Bone' and 'bone' where case is ignored; a segment 'merged'
    and merged.stl), failed the export (300 characters), could not be made on Windows (CON), and parts were named
    after the files (Left_femur); a control character made slicers refuse the whole 3MF."""
    volume, matrix = oblique_volume(ctx)
    segmentation = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Bone & \x1bcase")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    names = ["Bone", "bone", "a", "a", "a_2", "merged", "CON", 'Left femur & "skin" <L>', "L" * 300, "Mu\u0308ller",
             "CT \x1b$B9|HX", "nul.old"]
    for index, name in enumerate(names):
        mask = np.zeros((10, 20, 30), bool)
        mask[2:5, 2:5, 2 * index + 1:2 * index + 2] = True  # each its own voxels: each file must hold its own
        add_segment_from_mask(segmentation, mask, matrix, name, (1, 0, 0))
    options = ExportOptions(formats=("stl", "obj", "3mf", "glb"), merged_stl=True, surface=SurfaceOptions(smoothing=0))
    result = export_segmentation(segmentation, tmp_path, options)
    stems = [entry["stl"][:-len(".stl")] for entry in result.report["meshes"]]
    assert stems == ["Bone", "bone_2", "a", "a_2", "a_2_2", "merged_2", "_CON", "Left_femur_skin_L", "L" * 100,
                     "M\u00fcller", "CT_B9_HX", "_nul.old"]
    assert [entry["name"] for entry in result.report["meshes"]] == names
    assert sorted(p.name for p in result.folder.glob("*.stl")) == sorted([f"{s}.stl" for s in stems] + ["merged.stl"])
    assert all(entry["voxel_volume_ml"] == pytest.approx(9 * 1.5 * 0.8 * 2.5 / 1000) for entry in result.report["meshes"])
    readable = [name.replace("\x1b", "") for name in names]  # XML 1.0 has no ESC
    with zipfile.ZipFile(result.folder / "segments.3mf") as package:
        model = ElementTree.fromstring(package.read("3D/3dmodel.model"))  # expat: refuses what XML forbids
    assert [o.get("name") for o in model.findall(".//{*}object")] == [*readable, "Bone & case"]  # and the whole
    for name, inside in (("segments.3mf", readable), ("segments.glb", names)):  # trimesh numbers repeats: a, a_1
        geometry = trimesh.load(str(result.folder / name), force="scene").geometry
        assert len(geometry) == len(names) and set(inside) <= set(geometry)
    glb = (result.folder / "segments.glb").read_bytes()
    assert [node["name"] for node in json.loads(glb[20:20 + int.from_bytes(glb[12:16], "little")])["nodes"]] == names
    obj = (result.folder / "segments.obj").read_text()
    assert [line.split(" ", 1)[1] for line in obj.splitlines() if line.startswith("g ")] == stems
