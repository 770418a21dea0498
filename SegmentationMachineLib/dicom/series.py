"""Find DICOM image series in a folder tree: recognised by content, grouped by series, ordered in space.

Reads files only; never moves, edits or deletes them. Every file that is not used is reported
with its reason, and every geometry problem with what was done about it.
"""

import io
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from ..core.errors import InputError

VOLUME_FILE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
# Slices whose stacking direction leans more than this from the slice normal are sheared (gantry tilt).
MAX_TILT_DEGREES = 0.5
# CT gantries tilt up to about 30°: a stack leaning more has positions that are wrong, not tilted.
MAX_GANTRY_TILT_DEGREES = 30.0
# Relative difference between slice gaps that counts as uneven spacing (a missing slice).
SPACING_TOLERANCE = 0.01
# How far ImageOrientationPatient's two directions may be from unit length and from perpendicular.
ORIENTATION_TOLERANCE = 1e-3
# SOP classes that are DICOM but not image slices we can stack (SEG, SR, RTSTRUCT, ...).
NON_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "a DICOM SEG object",
    "1.2.840.10008.5.1.4.1.1.481.3": "an RT structure set",
    "1.2.840.10008.5.1.4.1.1.88.11": "a structured report",
    "1.2.840.10008.5.1.4.1.1.88.22": "a structured report",
    "1.2.840.10008.5.1.4.1.1.88.33": "a structured report",
}


@dataclass
class SkippedFile:
    path: Path
    reason: str

    def __str__(self):
        return f"{self.path}: {self.reason}"


@dataclass
class DicomSlice:
    path: Path
    series_key: str
    series_uid: str
    modality: str
    description: str
    series_number: str
    position: np.ndarray
    orientation: np.ndarray  # row direction (3) then column direction (3), LPS
    pixel_spacing: tuple
    shape: tuple  # rows, columns
    instance_number: int
    frames: int
    images_in_acquisition: int = 0  # (0020,1002) where the header gives it: how many slices to expect


@dataclass
class DicomSeries:
    key: str
    uid: str
    modality: str
    description: str
    series_number: str
    files: list  # ordered along the slice normal
    positions: np.ndarray  # distance of each slice along the normal, mm
    shape: tuple
    pixel_spacing: tuple
    notes: list = field(default_factory=list)  # warnings about this series, one sentence each
    tilt_degrees: float = 0.0

    @property
    def name(self) -> str:
        label = self.description or f"series {self.series_number or '?'}"
        return f"{self.modality} '{label}'"

    @property
    def slice_spacing(self) -> float:
        gaps = np.diff(self.positions)
        return float(np.median(gaps)) if len(gaps) else 1.0

    @property
    def is_uneven(self) -> bool:
        gaps = np.diff(self.positions)
        return len(gaps) > 1 and float(gaps.max() - gaps.min()) > SPACING_TOLERANCE * float(np.median(gaps))

    def summary(self) -> str:
        rows, cols = self.shape
        spacing = f"{self.pixel_spacing[0]:.3g}x{self.pixel_spacing[1]:.3g}x{self.slice_spacing:.3g} mm"
        return f"{self.name}, {len(self.files)} slices of {rows}x{cols}, {spacing}, uid {self.uid or '(none)'}"


@dataclass
class ScanResult:
    folder: Path
    series: list  # DicomSeries, most slices first
    skipped: list  # SkippedFile
    volume_files: list  # NIfTI/NRRD/MetaImage files found beside the DICOM
    notes: list  # folder-level notes, one sentence each


def _is_volume_file(path: Path) -> bool:
    return path.name.lower().endswith(VOLUME_FILE_SUFFIXES)


def looks_like_dicom(head: bytes) -> bool:
    """From a file's first 132 bytes: DICOM Part 10 files carry 'DICM' at byte 128; raw datasets
    start with a group 0002/0008 tag. Anything else is classified without reading further."""
    return head[128:132] == b"DICM" or head[:2] in (b"\x02\x00", b"\x08\x00")


def _expected_pixel_bytes(ds) -> int:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8 * frames


TRUNCATED = "truncated (the file ends before its pixel data does)"


def _geometry_problem(spacing: tuple, orientation: np.ndarray, position: np.ndarray) -> str:
    """Why a slice's geometry cannot be trusted, or None. Slicer's reader takes a zero, negative or NaN pixel
    spacing as 1 mm: the model would come out the wrong size, silently."""
    if len(spacing) != 2 or not all(math.isfinite(v) and v > 0 for v in spacing):
        shown = "missing" if not spacing else f"{', '.join(f'{v:g}' for v in spacing)} mm"
        return f"its pixel spacing is {shown}, not two positive sizes (the model's size would be wrong)"
    row, column = orientation[:3], orientation[3:]
    if (not np.isfinite(orientation).all() or abs(np.linalg.norm(row) - 1) > ORIENTATION_TOLERANCE
            or abs(np.linalg.norm(column) - 1) > ORIENTATION_TOLERANCE
            or abs(float(np.dot(row, column))) > ORIENTATION_TOLERANCE):
        return (f"its image orientation ({', '.join(f'{v:g}' for v in orientation)}) is not two perpendicular "
                "unit directions")
    if not np.isfinite(position).all():
        return f"its image position ({', '.join(f'{v:g}' for v in position)}) is not finite"
    return None


def read_slice(path: Path, data: bytes = None):
    """Returns (DicomSlice, None) for an image slice, (None, reason) for anything else.

    data: the file's bytes when the caller has read them already (the inbox hashes them too).
    A reason starting with "truncated" may be a file still being written.
    """
    try:
        if data is None:
            with open(path, "rb") as f:
                head = f.read(132)
        else:
            head = data[:132]
    except OSError as error:
        return None, f"unreadable ({error.strerror})"
    if not looks_like_dicom(head):
        return None, "not a DICOM file"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(io.BytesIO(data) if data is not None else path, force=True)
    except EOFError:
        return None, TRUNCATED
    except Exception as error:  # noqa: BLE001 - any crafted or cut header: a reason, never a crash
        if "End of file" in str(error):  # pydicom's words for a cut file ("... <no filename>")
            return None, TRUNCATED
        return None, "unreadable DICOM (its header is malformed)"
    if any("End of file" in str(w.message) or "truncated" in str(w.message).lower() for w in caught):
        return None, TRUNCATED
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class in NON_IMAGE_SOP_CLASSES:
        return None, f"{NON_IMAGE_SOP_CLASSES[sop_class]}, not an image slice"
    if "PixelData" not in ds:
        return None, "truncated or not an image (no pixel data)"
    if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
        return None, "an image without patient position or orientation (a secondary capture?)"
    try:
        with warnings.catch_warnings():  # pydicom's words on a bad value ("Invalid value for VR IS"): ours follow
            warnings.simplefilter("ignore")
            ts = ds.file_meta.TransferSyntaxUID
            if not ts.is_compressed and len(ds.PixelData) < _expected_pixel_bytes(ds):
                return None, "truncated (its pixel data is shorter than its size says)"
            orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
            position = np.array([float(v) for v in ds.ImagePositionPatient])
            spacing = tuple(float(v) for v in ds.get("PixelSpacing") or ())
            shape = (int(ds.Rows), int(ds.Columns))
            instance_number, frames, announced = (int(ds.get(name, default) or default) for name, default in (
                ("InstanceNumber", 0), ("NumberOfFrames", 1), ("ImagesInAcquisition", 0)))  # crafted text: a reason
    except (AttributeError, TypeError, ValueError) as error:
        return None, f"malformed image attributes ({error})"
    if orientation.shape != (6,) or position.shape != (3,):
        return None, "malformed image position or orientation"
    problem = _geometry_problem(spacing, orientation, position)
    if problem:
        return None, problem
    series_uid = str(ds.get("SeriesInstanceUID", "") or "")
    series_number = str(ds.get("SeriesNumber", "") or "")
    # Anonymised data sometimes blanks the UID: fall back to folder + series number + orientation.
    key = series_uid or f"{path.parent}|{series_number}|{np.round(orientation, 3).tolist()}"
    return DicomSlice(
        path=path,
        series_key=key,
        series_uid=series_uid,
        modality=str(ds.get("Modality", "") or "OT"),
        description=str(ds.get("SeriesDescription", "") or ""),
        series_number=series_number,
        position=position,
        orientation=orientation,
        pixel_spacing=spacing,
        shape=shape,
        instance_number=instance_number,
        frames=frames,
        images_in_acquisition=announced,
    ), None


def _walk_files(folder: Path):
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(root) / name


def build_series(key: str, slices: list, skipped: list) -> DicomSeries:
    """One series from its slices: ordered along the normal, duplicates and odd slices moved to skipped."""
    # Localizers and reformats sometimes share a series: keep the largest stack of one orientation and size.
    stacks = {}
    for s in slices:
        stacks.setdefault((tuple(np.round(s.orientation, 3)), s.shape), []).append(s)
    stack = max(stacks.values(), key=len)
    for other in stacks.values():
        if other is not stack:
            skipped.extend(SkippedFile(s.path, "a different orientation or size from the rest of its series") for s in other)
    first = stack[0]
    row, col = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row, col)
    stack.sort(key=lambda s: (float(np.dot(s.position, normal)), s.instance_number))
    distances = np.array([float(np.dot(s.position, normal)) for s in stack])
    kept, kept_distances = [stack[0]], [distances[0]]
    for s, d in zip(stack[1:], distances[1:]):
        if s.frames == 1 and abs(d - kept_distances[-1]) < 1e-3:
            skipped.append(SkippedFile(s.path, f"same position as {kept[-1].path.name} (a duplicate slice)"))
            continue
        kept.append(s)
        kept_distances.append(d)
    series = DicomSeries(
        key=key,
        uid=first.series_uid,
        modality=first.modality,
        description=first.description,
        series_number=first.series_number,
        files=[s.path for s in kept],
        positions=np.array(kept_distances),
        shape=first.shape,
        pixel_spacing=first.pixel_spacing,
    )
    if len(kept) > 1:
        step = kept[-1].position - kept[0].position
        cos = abs(float(np.dot(step, normal))) / max(float(np.linalg.norm(step)), 1e-9)
        series.tilt_degrees = float(np.degrees(np.arccos(min(1.0, cos))))
    if not first.series_uid:
        series.notes.append(f"Series {series.name} has no SeriesInstanceUID; its files were grouped by folder and series number.")
    if series.is_uneven:
        gaps = np.diff(series.positions)
        worst = int(np.argmax(np.abs(gaps - series.slice_spacing)))
        series.notes.append(
            f"Series {series.name} has uneven slice spacing (a gap of {gaps[worst]:.2f} mm after "
            f"{kept[worst].path.name}, {series.slice_spacing:.2f} mm elsewhere; a slice is probably missing): "
            "it was resampled to even spacing.")
    return series


def scan_folder(folder, progress=None) -> ScanResult:
    """All image series under folder (any nesting, any file names), most slices first.

    progress(done, total, path), when given, is called after each file.
    """
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"{folder} does not exist: give a folder of DICOM files or a NIfTI/NRRD file.")
    paths = [folder] if folder.is_file() else list(_walk_files(folder))
    slices, skipped, volume_files = {}, [], []
    for done, path in enumerate(paths, 1):
        if progress:
            progress(done, len(paths), path.name)
        if _is_volume_file(path):
            volume_files.append(path)
            continue
        item, reason = read_slice(path)
        if item is None:
            skipped.append(SkippedFile(path, reason))
        else:
            slices.setdefault(item.series_key, []).append(item)
    series = [build_series(key, items, skipped) for key, items in slices.items()]
    series.sort(key=lambda s: (-len(s.files), s.description))
    notes = []
    if skipped:
        notes.append(f"{len(skipped)} file(s) in {folder} were skipped: " +
                     "; ".join(str(s) for s in skipped[:5]) + ("; ..." if len(skipped) > 5 else "") + ".")
    return ScanResult(folder=folder, series=series, skipped=skipped, volume_files=volume_files, notes=notes)


def choose_series(result: ScanResult, selector: str = None) -> DicomSeries:
    """The series named by UID or list number (1-based), else the CT series with the most slices."""
    if not result.series and result.folder.is_file() and len(result.skipped) == 1:  # one file given: its reason
        reason = result.skipped[0].reason
        advice = ("copy it again from its source" if reason.startswith("truncated")
                  else "give a DICOM image file or folder, or a NIfTI/NRRD volume")
        raise InputError(f"{result.folder} is not a usable image: {reason}; {advice}.")
    if not result.series:
        first = f"; the first: {result.skipped[0]}" if result.skipped else ""
        raise InputError(f"No DICOM image series found in {result.folder} ({len(result.skipped)} file(s) looked "
                         f"at, none a usable image slice{first}): check the folder.")
    if selector:
        if selector.isdigit() and 1 <= int(selector) <= len(result.series):
            return result.series[int(selector) - 1]
        for series in result.series:
            if selector in (series.uid, series.key):
                return series
        raise InputError(f"No series '{selector}' in {result.folder}: run with --list to see the series and their numbers.")
    ct = [s for s in result.series if s.modality == "CT"]
    return (ct or result.series)[0]
