"""Turn a DICOM series or a NIfTI/NRRD file into a volume node through Slicer's Volumes logic."""

import hashlib
import re
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import vtk

from ..core import arrays, native_stderr
from ..core.errors import InputError
from ..core.files import PATH_NOT_UTF8, printable, utf8_path
from ..core.scene import SceneContext
from ..core.grids import RAS_TO_LPS
from .series import MAX_GANTRY_TILT_DEGREES, DicomSeries, ScanResult, choose_series, is_volume_file, scan_folder
from .slices import MAX_TILT_DEGREES, SPACING_TOLERANCE

# vtkSlicerVolumesLogic::AddArchetypeVolume loading options (bit flags).
LABELMAP = 1
# GDCM tries its 8-bit JPEG codec on each 12-bit JPEG slice first (then decodes it with the 12-bit one): a line each.
GDCM_NOISE = re.compile(rb"^Unsupported JPEG data precision 12\s*$")


@dataclass
class LoadedVolume:
    node: object  # vtkMRMLScalarVolumeNode
    source: str  # what was loaded, for messages and reports
    series: DicomSeries = None
    notes: list = field(default_factory=list)
    path: Path = None  # the file or folder given


def load_series(ctx: SceneContext, series: DicomSeries) -> LoadedVolume:
    """Loads one series with Slicer's own reader; resamples uneven spacing.

    A gantry-tilted series keeps every slice where it was acquired: Slicer's reader (since 5.8, ITK's series
    reader without forced orthogonal directions) gives it a sheared IJK-to-RAS, as Slicer's DICOM module
    loads it, and meshes, prompts and SEGs follow that matrix."""
    if series.problem:
        raise InputError(f"Series {series.name} was not loaded: {series.problem}.")
    if series.tilt_degrees > MAX_GANTRY_TILT_DEGREES:
        raise InputError(
            f"Series {series.name} was not loaded: its slices lean {series.tilt_degrees:.1f}° from their normal, "
            f"more than a CT gantry tilts ({MAX_GANTRY_TILT_DEGREES:g}°); check the files' ImagePositionPatient.")
    gone = sum(not Path(path).is_file() for path in series.files)
    if gone:  # e.g. an inbox that `listen --keep-received` cleaned between listing and loading
        raise InputError(f"Series {series.name} was not loaded: {gone} of its {len(series.files)} files are gone from "
                         f"{Path(series.files[0]).parent} (moved or removed since they arrived); send or copy it again.")
    # Absolute names: given a relative one, the storage node keeps every file twice (relative and absolute), and a
    # DICOM SEG made from that list put its frames on the wrong images.
    files = [str(Path(path).absolute()) for path in series.files]
    file_list = vtk.vtkStringArray()
    for path in files:
        file_list.InsertNextValue(path)
    name = series.description or f"Series {series.series_number}".strip()
    with native_stderr.dropping(GDCM_NOISE) if ctx.owns_stderr else nullcontext():
        node = ctx.volumes_logic.AddArchetypeVolume(files[0], name, 0, file_list)
    if node is None or node.GetImageData() is None:
        raise InputError(f"Slicer's DICOM reader could not read series {series.name} "
                         f"(first file {series.files[0]}): check that the files are complete.")
    _check_placement(node, series)
    if series.is_uneven:
        _resample_evenly(node, series)
    _check_voxel_size(node, series)
    notes = list(series.notes)
    if series.tilt_degrees > MAX_TILT_DEGREES:
        notes.append(f"Series {series.name} was acquired with a gantry tilt of {series.tilt_degrees:.1f}°: its "
                     "slices keep their true positions (a sheared voxel grid), so the model is not distorted.")
    return LoadedVolume(node=node, source=f"DICOM series {series.name}", series=series, notes=notes)


def _check_voxel_size(node, series: DicomSeries):
    """The voxel size the reader gave must be the one the headers say: a model of the wrong size is the worst
    failure this product can have, and the reader has its own defaults (1 mm for a pixel spacing it rejects)."""
    row_spacing, column_spacing = series.pixel_spacing
    step = series.slice_spacing / np.cos(np.radians(series.tilt_degrees))  # along the tilted stack, not the normal
    expected = [column_spacing, row_spacing] + ([step] if series.slice_count > 1 else [])
    got = arrays.spacing_of(arrays.ijk_to_ras(node))[:len(expected)]
    if not np.allclose(got, expected, rtol=SPACING_TOLERANCE):
        raise InputError(f"Series {series.name} was not loaded: Slicer's reader gave it voxels of "
                         f"{' x '.join(f'{v:.4g}' for v in got)} mm where its headers say "
                         f"{' x '.join(f'{v:.4g}' for v in expected)} mm; check the files' PixelSpacing and positions.")


def _check_placement(node, series: DicomSeries):
    """The reader must put the first slice where its header says, with as many slices as the headers give: for an
    enhanced multi-frame image GDCM places the frames itself (our check of the frames is the only one)."""
    depth = node.GetImageData().GetDimensions()[2]
    origin = arrays.ijk_to_ras(node)[:3, 3]
    expected = series.first_position * RAS_TO_LPS.diagonal()[:3]  # LPS to RAS: the same flip
    if series.slice_count > 1 and depth != series.slice_count:
        raise InputError(f"Series {series.name} was not loaded: Slicer's reader gave it {depth} slices where its "
                         f"headers say {series.slice_count}; check that its files are complete.")
    if not np.allclose(origin, expected, atol=SPACING_TOLERANCE * min(series.pixel_spacing)):
        raise InputError(f"Series {series.name} was not loaded: Slicer's reader put its first slice at "
                         f"({', '.join(f'{v:.4g}' for v in origin)}) mm (RAS) where its headers say "
                         f"({', '.join(f'{v:.4g}' for v in expected)}) mm; check the files' ImagePositionPatient.")


def _resample_evenly(node, series: DicomSeries):
    """Linear interpolation between the real slices onto an even grid (what a missing slice needs)."""
    voxels = arrays.volume_array(node)
    matrix = arrays.ijk_to_ras(node)
    if voxels.shape[0] != len(series.positions):
        return  # the reader merged or split frames: nothing we can line up safely
    positions = series.positions - series.positions[0]
    step = series.slice_spacing
    count = int(round(positions[-1] / step)) + 1
    targets = np.arange(count) * step
    upper = np.clip(np.searchsorted(positions, targets, side="left"), 1, len(positions) - 1)
    lower = upper - 1
    weight = ((targets - positions[lower]) / (positions[upper] - positions[lower])).clip(0, 1)
    weight = weight.astype(np.float32)[:, None, None]
    resampled = voxels[lower] * (1 - weight) + voxels[upper] * weight
    if np.issubdtype(voxels.dtype, np.integer):
        resampled = np.rint(resampled)
    # The K column keeps its direction (a gantry tilt's lean too); only its reach along the normal becomes the step.
    normal = np.cross(matrix[:3, 0], matrix[:3, 1])
    k_column = matrix[:3, 2]
    matrix[:3, 2] = k_column * step / abs(np.dot(k_column, normal / np.linalg.norm(normal)))
    arrays.set_volume_array(node, resampled.astype(voxels.dtype), matrix)


def load_volume_file(ctx: SceneContext, path, labelmap: bool = False) -> LoadedVolume:
    path = Path(path)
    if not utf8_path(path):  # Slicer's reader aborts the process on such a name
        raise InputError(f"{printable(path)} cannot be read: {PATH_NOT_UTF8}.")
    node = ctx.volumes_logic.AddArchetypeVolume(str(path), path.name.split(".")[0],
                                               LABELMAP if labelmap else 0, None)
    if node is None or node.GetImageData() is None:
        raise InputError(f"{path} could not be read as a volume: check that it is a complete NIfTI or NRRD file.")
    return LoadedVolume(node=node, source=f"file {path.name}", path=path)


def load_input(ctx: SceneContext, path, series: str = None, scan: ScanResult = None, progress=None) -> LoadedVolume:
    """A volume from a DICOM folder (or file), or a NIfTI/NRRD file; notes say what was skipped or fixed.

    progress(done, total, item): the folder's scan file by file (unless scan is given), then the read as
    one step (Slicer's reader reports none of its own)."""
    path = Path(path)
    if path.is_file() and is_volume_file(path):
        return _reading(progress, path.name, lambda: load_volume_file(ctx, path))
    scan = scan or scan_folder(path, progress)
    if not scan.series and len(scan.volume_files) == 1:
        return _reading(progress, scan.volume_files[0].name, lambda: load_volume_file(ctx, scan.volume_files[0]))
    chosen = choose_series(scan, series)
    loaded = _reading(progress, f"{chosen.slice_count} slices", lambda: load_series(ctx, chosen))
    loaded.notes = scan.notes + loaded.notes
    loaded.path = path
    return loaded


def _reading(progress, item: str, read) -> LoadedVolume:
    if progress:
        progress(0, 1, item)
    loaded = read()
    if progress:
        progress(1, 1, item)
    return loaded


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def input_record(loaded: LoadedVolume, path=None, progress=None) -> dict:
    """What report.json says about the input, so a lab can prove which files a model came from: the path
    given (path, where it was not a local one: a DICOMweb address; a local one absolute, as typed it says nothing
    later), and SHA-256 hashes of the volume file or of every slice of the DICOM series used (names relative to the
    folder), with its SeriesInstanceUID."""
    given = str(path if path is not None else loaded.path)
    given = given if "://" in given else str(Path(given).absolute())
    if loaded.series is None:
        return {"path": given, "sha256": file_sha256(loaded.path)}
    base = loaded.path if loaded.path is not None and loaded.path.is_dir() else None
    return series_record(given, loaded.series.files, loaded.series.uid, base, progress)


def series_record(given: str, files: list, series_uid: str, base: Path = None, progress=None) -> dict:
    """input_record of a DICOM series: its files' SHA-256 hashes (names relative to base, where they lie in it)."""
    records = []
    for done, file in enumerate(map(Path, files), 1):
        name = str(file.relative_to(base)) if base is not None and base in file.parents else str(file)
        records.append({"name": name, "sha256": file_sha256(file)})
        if progress:
            progress(done, len(files), file.name)
    return {"path": given, "series_uid": series_uid, "files": records}
