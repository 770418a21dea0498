"""One-click export: every segment of a segmentation to STL, OBJ, 3MF, glTF and DICOM SEG, with a mesh report.

All mesh formats are written from the same meshes, in LPS millimetres by default (what printers
and most tools expect) or RAS; glTF in metres with +Y up (gltf.py). A DICOM SEG holds the voxels
themselves. Output goes to a new timestamped folder; nothing is ever overwritten.

report.json, written last, says what was made and from what (a lab can trace every file back):
  tool {name, version}; created (UTC, ISO 8601); segmentation (its name);
  input: {path, sha256} for a volume file, {path, series_uid, files: [{name, sha256}]} for a
    DICOM series (dicom/volumes.py input_record), {path, sha256, volume} for the export command's
    segmentation file, or null where the caller does not know it (a volume made in Slicer);
  presets: [{name, parameters}] in the order run (the module: those that made the exported segments);
    command: {name, options} of the CLI (never a secret), or null;
  coordinates, units, options (formats, merged_stl and every surface option);
  meshes: per segment {name, segment_id, color, triangles, boundary_edges, non_manifold_edges,
    watertight, volume_ml (the mesh's; null when not watertight: an open mesh encloses nothing),
    voxel_volume_ml, volume_difference_percent, iso_level and sigma_voxels (the smoothing this segment
    got: lower than asked where it is too thin for it, mesh/surfaces.py), bounds_min_mm, bounds_max_mm, stl};
  skipped: [{name, reason}]; warnings: one sentence each; files: names; seconds.
"""

import json
import re
import shutil
import tempfile
import time
import unicodedata
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .. import __version__
from ..core.cancel import CancelRequest
from ..core.errors import ExportError
from ..core.files import not_a_device, publish_folder, reserved_folder, unreserve
from . import writers
from .check import check_mesh
from .dicomseg import SEG_FILE, SegInput, check_seg_export, match_sources, read_seg_input, write_seg
from .gltf import write_glb
from .surfaces import MeshJobs, SurfaceMethod, SurfaceOptions, meshes_from, read_segments

FORMATS = ("stl", "obj", "3mf", "glb", "seg")
DEFAULT_FORMATS = ("stl", "obj", "3mf")  # SEG needs the DICOM series and highdicom: on request
REPORT_NAME = "report.json"  # written last: a folder without it is an interrupted export
# Under $HOME: the Flatpak OrcaSlicer cannot read /tmp.
DEFAULT_EXPORT_FOLDER = Path.home() / "SegmentationMachine" / "Exports"
# A mesh whose volume differs more from its segment's voxels is not what was segmented: said so.
VOLUME_WARNING_PERCENT = 10.0
MERGED_STEM = "merged"  # merged.stl: all segments in one STL
MAX_NAME_BYTES = 100  # with '_2.stl' and atomic_file's temporary name, far below any file system's 255
EXPORT_CANCELLED = "Export cancelled: nothing was written."


@dataclass(frozen=True)
class ExportOptions:
    formats: tuple = DEFAULT_FORMATS
    coordinates: str = "LPS"  # or "RAS"
    merged_stl: bool = False
    surface: SurfaceOptions = field(default_factory=SurfaceOptions)
    save_segmentation: bool = False  # also <name>.seg.nrrd, written by Slicer's segmentation storage node


@dataclass
class ExportResult:
    folder: Path
    files: list
    report: dict

    @property
    def not_watertight(self) -> list:
        return [m["name"] for m in self.report["meshes"] if not m["watertight"]]

    @property
    def warnings(self) -> list:
        return self.report["warnings"]

    def summary_lines(self) -> list:
        lines = []
        for m in self.report["meshes"]:
            if m["watertight"]:
                volume = (f"{m['volume_ml']:.1f} mL (voxels {m['voxel_volume_ml']:.1f} mL, "
                          f"{m['volume_difference_percent']:+.1f}%), watertight")
            else:
                volume = (f"voxels {m['voxel_volume_ml']:.1f} mL, NOT watertight ({m['boundary_edges']} open, "
                          f"{m['non_manifold_edges']} non-manifold edges: no mesh volume)")
            lines.append(f"{m['name']}: {m['triangles']} triangles, {volume}")
        lines.extend(f"{s['name']}: skipped ({s['reason']})" for s in self.report["skipped"])
        return lines


def parse_formats(text: str) -> tuple:
    formats = tuple(dict.fromkeys(f.strip().lower().lstrip(".") for f in text.split(",") if f.strip()))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ExportError(f"Unknown export format '{','.join(unknown) or text}': use any of {','.join(FORMATS)}.")
    return formats


def safe_name(text: str) -> str:
    """A file and OBJ-group name valid on every file system: letters, digits, '-', '_' and '.' only, at most
    MAX_NAME_BYTES of UTF-8, never a Windows device name (CON.stl cannot be made there)."""
    name = re.sub(r"[^\w.-]+", "_", unicodedata.normalize("NFC", text)).strip("._")  # NFC: as macOS hands names in
    name = name.encode()[:MAX_NAME_BYTES].decode(errors="ignore").rstrip("._") or "segment"
    return not_a_device(name)


def _unique_names(names) -> list:
    """safe_name of each, never one of another's files: also not where case tells them apart (Windows and macOS
    ignore it), and not the merged STL's."""
    taken, result = {MERGED_STEM}, []
    for name in map(safe_name, names):
        unique, number = name, 1
        while unique.casefold() in taken:
            number += 1
            unique = f"{name}_{number}"
        taken.add(unique.casefold())
        result.append(unique)
    return result


def new_output_folder(parent, stem: str) -> Path:
    """parent/stem_YYYYmmdd-HHMMSS (with -2, -3... if taken); created here, never reused."""
    parent = Path(parent).expanduser()
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ExportError(f"Cannot create the output folder {parent} ({error.strerror}): choose another folder.") from None
    base = f"{safe_name(stem)}_{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        folder = reserved_folder(parent, base)
    except OSError as error:
        raise ExportError(f"Cannot write in {parent} ({error.strerror}): choose another output folder.") from None
    if folder is None:
        raise ExportError(f"Too many exports named {base} in {parent}: choose another output folder.")
    return folder


def _to_output_coordinates(vectors: np.ndarray, coordinates: str) -> np.ndarray:
    """Points or normals from RAS; RAS -> LPS is a rotation, so triangles keep facing outward."""
    return vectors if coordinates == "RAS" else vectors * np.array([-1.0, -1.0, 1.0])


@dataclass
class PreparedExport:
    """Everything an export reads from the scene, copied out of it on the main thread."""
    name: str
    segments: MeshJobs
    file_names: dict  # segment id -> file stem
    seg: SegInput = None
    segmentation_file: bytes = None  # the .seg.nrrd's content, when asked for


def prepare_export(segmentation_node, options: ExportOptions = ExportOptions(), segment_ids=None,
                   ctx=None) -> PreparedExport:
    """Main thread (MRML belongs to it): checks the options and copies what the export needs.
    ctx: the module's scene context, so that a conversion to labelmaps pauses the views (read_segments), and
    Slicer's DICOM database finds the series of a volume its DICOM module loaded (a SEG's source)."""
    if options.coordinates not in ("LPS", "RAS"):
        raise ExportError(f"Unknown coordinate system '{options.coordinates}': use LPS or RAS.")
    dicom_database = ctx.dicom_database if ctx else None
    # before reading voxels, and minutes of work
    seg_files = check_seg_export(segmentation_node, dicom_database) if "seg" in options.formats else None
    segments = read_segments(segmentation_node, segment_ids, options.surface, ctx)
    segmentation = segmentation_node.GetSegmentation()
    ids = [job.segment_id for job in segments.jobs]
    file_names = dict(zip(ids, _unique_names(segmentation.GetSegment(i).GetName() for i in ids)))
    seg = read_seg_input(segmentation_node, ids, dicom_database, seg_files) if seg_files and ids else None
    saved = _segmentation_bytes(segmentation_node) if options.save_segmentation else None
    return PreparedExport(segmentation_node.GetName(), segments, file_names, seg, saved)


def _segmentation_bytes(segmentation_node) -> bytes:
    """The .seg.nrrd Slicer's own storage node writes (so Slicer opens it as it saved it), read back into
    memory: the export folder does not exist yet, and write_export may run on another thread."""
    storage = segmentation_node.CreateDefaultStorageNode()
    with tempfile.TemporaryDirectory() as scratch:  # private (0700): the voxels are patient data
        path = Path(scratch) / "segmentation.seg.nrrd"
        storage.SetFileName(str(path))
        if not storage.WriteData(segmentation_node) or not path.is_file():
            raise ExportError(f"Slicer could not save segmentation '{segmentation_node.GetName()}' as .seg.nrrd: "
                              "export without --save-segmentation, or save it from Slicer's Data module.")
        return path.read_bytes()


def export_segmentation(segmentation_node, out_dir, options: ExportOptions = ExportOptions(), progress=None,
                        provenance: dict = None) -> ExportResult:
    """Writes the meshes of segmentation_node into a new folder under out_dir; returns files and report."""
    return write_export(prepare_export(segmentation_node, options), out_dir, options, progress, provenance)


def write_export(prepared: PreparedExport, out_dir, options: ExportOptions = ExportOptions(),
                 progress=None, provenance: dict = None, cancel: CancelRequest = None) -> ExportResult:
    """Any thread (a worker's, in the module): meshes, checks, files and the report, from prepare_export.

    provenance: the report's input, presets and command, where the caller knows them.
    The folder is new and this run's own, written as a hidden .NAME.partial beside it and renamed once whole:
    interrupted (Ctrl-C, a signal, a full disk), both are removed; killed (or Slicer quit mid-export), the folder
    is left empty, never with some of its files and no report. Earlier exports are other folders: never touched.
    cancel: checked before and after each segment and before each format; once requested the export stops there,
    removes both folders and raises Cancelled(EXPORT_CANCELLED). Once renamed, the export is whole and is returned:
    a cancel that comes later loses nothing."""
    check = (lambda: cancel.check(EXPORT_CANCELLED)) if cancel else (lambda: None)
    check()
    if prepared.seg is not None:  # the series' headers first: where a SEG cannot refer to them, say so before any work
        prepared = replace(prepared, seg=match_sources(prepared.seg))
    folder = new_output_folder(out_dir, prepared.name)
    partial = folder.with_name(f".{folder.name}.partial")
    try:
        partial.mkdir()
        written = _write_into(partial, prepared, options, progress, provenance or {}, check)
        check()  # the last moment a cancel takes effect: after the rename the export is whole
        publish_folder(partial, folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        unreserve(folder)
        raise
    return replace(written, folder=folder, files=[folder / path.name for path in written.files])


def _volume_entry(check: dict, mesh) -> dict:
    """The mesh's volume beside its voxels'; an open mesh encloses no volume, so it has none."""
    volume = check["volume_ml"] if check["watertight"] else None
    difference = None
    if volume is not None and mesh.voxel_volume_ml > 0:
        difference = round(100.0 * (volume - mesh.voxel_volume_ml) / mesh.voxel_volume_ml, 1)
    return {"volume_ml": volume, "voxel_volume_ml": round(mesh.voxel_volume_ml, 4),
            "volume_difference_percent": difference,
            "iso_level": None if mesh.iso_level is None else round(float(mesh.iso_level), 4),
            "sigma_voxels": round(mesh.sigma_voxels, 4)}


def _volume_warning(entry: dict, surface: SurfaceOptions) -> str:
    difference = entry["volume_difference_percent"]
    if difference is None or abs(difference) <= VOLUME_WARNING_PERCENT:
        return None
    if surface.method == SurfaceMethod.SURFACE_NETS:
        remedy = "export with flying_edges, which keeps thin parts' volume"
    elif surface.smoothing == 0:  # marching cubes cuts the voxels' corners
        remedy = "export with some smoothing, which keeps thin parts' volume"
    else:  # already the lowest level and sigma surfaces.py allows: single voxels, specks
        remedy = "parts of it are a voxel or two across, too small for any surface: remove specks from the segment"
    return (f"{entry['name']}: the mesh holds {entry['volume_ml']:.1f} mL where its voxels hold "
            f"{entry['voxel_volume_ml']:.1f} mL ({difference:+.0f}%): {remedy}, or check it before printing.")


class _Part(NamedTuple):
    """One segment's finished mesh, in output coordinates, and its report entry."""
    stem: str  # its files' name
    name: str  # the segment's own
    rgba: tuple
    points: np.ndarray
    triangles: np.ndarray
    entry: dict


def _write_into(folder: Path, prepared: PreparedExport, options: ExportOptions, progress,
                provenance: dict, check) -> ExportResult:
    started = time.perf_counter()
    file_names = prepared.file_names

    def finish(mesh):
        """Runs on a worker thread: output coordinates, checks, and the segment's own STL."""
        points = _to_output_coordinates(mesh.points, options.coordinates)
        normals = _to_output_coordinates(mesh.normals, options.coordinates)
        check = check_mesh(points, mesh.triangles, normals).as_dict()
        entry = {"name": mesh.name, "segment_id": mesh.segment_id, "color": [round(c, 4) for c in mesh.color],
                 "opacity": round(mesh.opacity, 4),
                 **check, **_volume_entry(check, mesh)}
        if "stl" in options.formats:
            entry["stl"] = f"{file_names[mesh.segment_id]}.stl"
            writers.write_stl(folder / entry["stl"], [(points, mesh.triangles, normals)], mesh.name)
        return _Part(file_names[mesh.segment_id], mesh.name, (*mesh.color[:3], mesh.opacity), points,
                     mesh.triangles, entry)

    finished, empty = meshes_from(prepared.segments, options.surface, progress, finish, check)
    if not finished:
        raise ExportError(f"Every segment of '{prepared.name}' is empty: nothing to export.")
    # OBJ statements end at a space: its groups take the file names; 3MF and glTF parts the segments' own names
    by_file_name = [(part.stem, part.rgba, part.points, part.triangles) for part in finished]
    named = [(part.name, part.rgba, part.points, part.triangles) for part in finished]
    entries = [part.entry for part in finished]
    files = [folder / e["stl"] for e in entries if "stl" in e]
    check()  # between formats: a cancel stops here (write_export removes what was written)
    if "stl" in options.formats and options.merged_stl:
        files.append(folder / f"{MERGED_STEM}.stl")
        writers.write_stl(files[-1], [(part.points, part.triangles, None) for part in finished], "all segments")
    check()
    if "obj" in options.formats:
        files.append(folder / "segments.obj")
        writers.write_obj(files[-1], by_file_name)
        files.append(files[-1].with_suffix(".mtl"))
    check()
    if "3mf" in options.formats:
        files.append(folder / "segments.3mf")
        writers.write_3mf(files[-1], named, prepared.name)
    check()
    if "glb" in options.formats:
        files.append(folder / "segments.glb")
        write_glb(files[-1], named, options.coordinates)
    check()
    if "seg" in options.formats:
        files.append(folder / SEG_FILE)
        write_seg(files[-1], prepared.seg)
    check()
    if prepared.segmentation_file is not None:
        files.append(folder / f"{safe_name(prepared.name)}.seg.nrrd")
        with writers.atomic_file(files[-1]) as stream:
            stream.write(prepared.segmentation_file)
    report = {
        "tool": {"name": "SegmentationMachine", "version": __version__},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "segmentation": prepared.name,
        "input": provenance.get("input"),
        "presets": list(provenance.get("presets", [])),
        "command": provenance.get("command"),
        "coordinates": options.coordinates,
        "units": "mm",
        "options": {"formats": list(options.formats), "merged_stl": options.merged_stl,
                    "save_segmentation": options.save_segmentation,
                    **{k: (v.value if hasattr(v, "value") else v) for k, v in asdict(options.surface).items()}},
        "meshes": entries,
        "skipped": [{"name": name, "reason": "empty segment"} for name in empty],
        "warnings": [w for w in (_volume_warning(e, options.surface) for e in entries) if w],
        "files": [p.name for p in files],
        "seconds": round(time.perf_counter() - started, 3),
    }
    with writers.atomic_file(folder / REPORT_NAME, "w") as stream:
        json.dump(report, stream, indent=2)
    return ExportResult(folder=folder, files=files + [folder / REPORT_NAME], report=report)
