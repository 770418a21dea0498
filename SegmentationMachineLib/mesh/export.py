"""One-click export: every segment of a segmentation to STL, OBJ, 3MF, glTF and DICOM SEG, with a mesh report.

All mesh formats are written from the same meshes, in LPS millimetres by default (what printers
and most tools expect) or RAS; glTF in metres with +Y up (gltf.py). A DICOM SEG holds the voxels
themselves. Output goes to a new timestamped folder; nothing is ever overwritten.
"""

import json
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import ExportError
from . import writers
from .check import check_mesh
from .dicomseg import SEG_FILE, SegInput, check_seg_export, read_seg_input, write_seg
from .gltf import write_glb
from .surfaces import MeshJobs, SurfaceOptions, meshes_from, read_segments

FORMATS = ("stl", "obj", "3mf", "glb", "seg")
DEFAULT_FORMATS = ("stl", "obj", "3mf")  # SEG needs the DICOM series and highdicom: on request
REPORT_NAME = "report.json"  # written last: a folder without it is an interrupted export
# Under $HOME: the Flatpak OrcaSlicer cannot read /tmp.
DEFAULT_EXPORT_FOLDER = Path.home() / "SegmentationMachine" / "Exports"


@dataclass(frozen=True)
class ExportOptions:
    formats: tuple = DEFAULT_FORMATS
    coordinates: str = "LPS"  # or "RAS"
    merged_stl: bool = False
    surface: SurfaceOptions = field(default_factory=SurfaceOptions)


@dataclass
class ExportResult:
    folder: Path
    files: list
    report: dict

    @property
    def not_watertight(self) -> list:
        return [m["name"] for m in self.report["meshes"] if not m["watertight"]]

    def summary_lines(self) -> list:
        lines = []
        for m in self.report["meshes"]:
            flag = "watertight" if m["watertight"] else (
                f"NOT watertight ({m['boundary_edges']} open, {m['non_manifold_edges']} non-manifold edges)")
            lines.append(f"{m['name']}: {m['triangles']} triangles, {m['volume_ml']:.1f} mL, {flag}")
        lines.extend(f"{s['name']}: skipped ({s['reason']})" for s in self.report["skipped"])
        return lines


def parse_formats(text: str) -> tuple:
    formats = tuple(dict.fromkeys(f.strip().lower().lstrip(".") for f in text.split(",") if f.strip()))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ExportError(f"Unknown export format '{','.join(unknown) or text}': use any of {','.join(FORMATS)}.")
    return formats


def safe_name(text: str) -> str:
    """A file and OBJ-group name: letters, digits, '-', '_' and '.' only."""
    return re.sub(r"[^\w.-]+", "_", text).strip("._") or "segment"


def _unique_names(names) -> list:
    seen, result = {}, []
    for name in map(safe_name, names):
        seen[name] = seen.get(name, 0) + 1
        result.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return result


def new_output_folder(parent, stem: str) -> Path:
    """parent/stem_YYYYmmdd-HHMMSS (with -2, -3... if taken); created here, never reused."""
    parent = Path(parent).expanduser()
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ExportError(f"Cannot create the output folder {parent} ({error.strerror}): choose another folder.") from None
    base = f"{safe_name(stem)}_{time.strftime('%Y%m%d-%H%M%S')}"
    for attempt in range(1, 1000):
        folder = parent / (base if attempt == 1 else f"{base}-{attempt}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
        except OSError as error:
            raise ExportError(f"Cannot write in {parent} ({error.strerror}): choose another output folder.") from None
    raise ExportError(f"Too many exports named {base} in {parent}: choose another output folder.")


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


def prepare_export(segmentation_node, options: ExportOptions = ExportOptions(), segment_ids=None) -> PreparedExport:
    """Main thread (MRML belongs to it): checks the options and copies what the export needs."""
    if options.coordinates not in ("LPS", "RAS"):
        raise ExportError(f"Unknown coordinate system '{options.coordinates}': use LPS or RAS.")
    if "seg" in options.formats:
        check_seg_export(segmentation_node)  # before reading voxels, and minutes of work
    segments = read_segments(segmentation_node, segment_ids, options.surface)
    segmentation = segmentation_node.GetSegmentation()
    ids = [job.segment_id for job in segments.jobs]
    file_names = dict(zip(ids, _unique_names(segmentation.GetSegment(i).GetName() for i in ids)))
    seg = read_seg_input(segmentation_node, ids) if "seg" in options.formats and ids else None
    return PreparedExport(segmentation_node.GetName(), segments, file_names, seg)


def export_segmentation(segmentation_node, out_dir, options: ExportOptions = ExportOptions(),
                        segment_ids=None, progress=None) -> ExportResult:
    """Writes the meshes of segmentation_node into a new folder under out_dir; returns files and report."""
    return write_export(prepare_export(segmentation_node, options, segment_ids), out_dir, options, progress)


def write_export(prepared: PreparedExport, out_dir, options: ExportOptions = ExportOptions(),
                 progress=None) -> ExportResult:
    """Any thread (a worker's, in the module): meshes, checks, files and the report, from prepare_export.

    The folder is new and this run's own: interrupted (Ctrl-C, a signal, a full disk), it is removed whole."""
    folder = new_output_folder(out_dir, prepared.name)
    try:
        return _write_into(folder, prepared, options, progress)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _write_into(folder: Path, prepared: PreparedExport, options: ExportOptions, progress) -> ExportResult:
    started = time.perf_counter()
    file_names = prepared.file_names

    def finish(mesh):
        """Runs on a worker thread: output coordinates, checks, and the segment's own STL."""
        points = _to_output_coordinates(mesh.points, options.coordinates)
        normals = _to_output_coordinates(mesh.normals, options.coordinates)
        entry = {"name": mesh.name, "segment_id": mesh.segment_id, "color": [round(c, 4) for c in mesh.color],
                 **check_mesh(points, mesh.triangles, normals).as_dict()}
        if "stl" in options.formats:
            entry["stl"] = f"{file_names[mesh.segment_id]}.stl"
            writers.write_stl(folder / entry["stl"], [(points, mesh.triangles, normals)], mesh.name)
        return file_names[mesh.segment_id], mesh.color, points, mesh.triangles, entry

    finished, empty = meshes_from(prepared.segments, options.surface, progress, finish)
    if not finished:
        raise ExportError(f"Every segment of '{prepared.name}' is empty: nothing to export.")
    named = [item[:4] for item in finished]
    entries = [item[4] for item in finished]
    files = [folder / e["stl"] for e in entries if "stl" in e]
    if "stl" in options.formats and options.merged_stl:
        files.append(folder / "merged.stl")
        writers.write_stl(files[-1], [(p, t, None) for _, _, p, t in named], "all segments")
    if "obj" in options.formats:
        files.append(folder / "segments.obj")
        writers.write_obj(files[-1], named)
        files.append(files[-1].with_suffix(".mtl"))
    if "3mf" in options.formats:
        files.append(folder / "segments.3mf")
        writers.write_3mf(files[-1], named)
    if "glb" in options.formats:
        files.append(folder / "segments.glb")
        write_glb(files[-1], named, options.coordinates)
    if "seg" in options.formats:
        files.append(folder / SEG_FILE)
        write_seg(files[-1], prepared.seg)
    report = {
        "segmentation": prepared.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "coordinates": options.coordinates,
        "units": "mm",
        "options": {"formats": list(options.formats), "merged_stl": options.merged_stl,
                    **{k: (v.value if hasattr(v, "value") else v) for k, v in asdict(options.surface).items()}},
        "meshes": entries,
        "skipped": [{"name": name, "reason": "empty segment"} for name in empty],
        "files": [p.name for p in files],
        "seconds": round(time.perf_counter() - started, 3),
    }
    with writers.atomic_file(folder / REPORT_NAME, "w") as stream:
        json.dump(report, stream, indent=2)
    return ExportResult(folder=folder, files=files + [folder / REPORT_NAME], report=report)
