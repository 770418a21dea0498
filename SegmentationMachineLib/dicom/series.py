"""Find DICOM image series in a folder tree: recognised by content, grouped by series, ordered in space.

Reads files only; never moves, edits or deletes them. Every file that is not used is reported
with its reason, and every geometry problem with what was done about it.
"""

import functools
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from ..core.errors import InputError
from ..core.files import PATH_NOT_UTF8, printable, utf8_path
from .slices import (ACQUISITION_TAGS, DICOMDIR, MEDIA_STORAGE_DIRECTORY, NOT_AN_IMAGE, SPACING_TOLERANCE,
                     DicomSlice, read_slice, says_what_to_do, slice_normal, uneven_gaps)
from .transfer_syntaxes import CANNOT_DECODE

VOLUME_FILE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
# CT gantries tilt up to about 30°: a stack leaning more has positions that are wrong, not tilted.
MAX_GANTRY_TILT_DEGREES = 30.0
STUDY_PART = "study "  # the part label of each patient's and study's images under one reused series UID (a hash)

# Of those, the tags that may also differ slice by slice within one volume (a trigger time follows the heart
# beat): they split a series only into parts that are each one volume.
SPLIT_ONLY_INTO_VOLUMES = {"NominalPercentageOfCardiacPhase", "TriggerTime", "KVP"}
ANOTHER_STACK = "a different orientation, size or pixel spacing from the rest of its series"
# ImageType values of an image made from others (a reformat, an MPR, a screenshot): a series of them is the default
# only where no series was reconstructed from the scan itself. A scout's: LOCALIZER.
MADE_FROM_OTHERS = {"DERIVED", "SECONDARY", "REFORMATTED", "MPR", "CSA MPR"}
LOCALIZER = "LOCALIZER"
LOCALIZER_LEFT_OUT = "a localizer, not part of the volume"




@dataclass
class SkippedFile:
    path: Path
    reason: str
    series: str = ""  # the name of the series it was left out of, where it is an image of one
    kind: str = ""  # the reason without what is this file's own (the image it lies on): said once for many files

    def __str__(self):
        return f"{self.path}: {self.reason}"


def skipped_groups(skipped: list) -> list:
    """(sentence, files) for files skipped: those left out of one series for one kind of reason are said together
    (a 300-slice series of images no tag tells apart is one line, not 300), any other file on its own."""
    groups = {}
    for item in skipped:
        together = (item.series, item.kind) if item.series and item.kind else (item.path,)
        groups.setdefault(together, []).append(item)
    return [(f"{len(items)} files of {items[0].series}: {items[0].kind}" if len(items) > 1 else str(items[0]), items)
            for items in groups.values()]


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
    part: str = ""  # which acquisition (or multi-frame file) of a DICOM series that holds several
    first_position: np.ndarray = None  # LPS position of the first slice along the normal
    problem: str = ""  # why it cannot be loaded as one volume, where it cannot
    image_type: str = ""  # ImageType's values joined by '/' (ORIGINAL/PRIMARY/AXIAL), where given
    orientation: np.ndarray = None  # row direction (3) then column direction (3), LPS
    origin: str = ""  # its patient and study, hashed (DicomSlice.origin; "": not known)

    @property
    def name(self) -> str:
        label = self.description or f"series {self.series_number or '?'}"
        part = self.part.replace("|", ", ")  # a reused UID's study, then its acquisition
        return f"{self.modality} '{label}'" + (f" ({part})" if part else "")

    @property
    def slice_spacing(self) -> float:
        gaps = np.diff(self.positions)
        return float(np.median(gaps)) if len(gaps) else 1.0

    @property
    def is_uneven(self) -> bool:
        return uneven_gaps(np.diff(self.positions))

    @property
    def slice_count(self) -> int:
        """Slices in the volume: one per file, or one per frame of an enhanced multi-frame file."""
        return len(self.positions)

    @property
    def voxel_count(self) -> int:
        return self.shape[0] * self.shape[1] * self.slice_count

    @property
    def is_axial(self) -> bool:
        """Its slices lie closer to axial than to sagittal or coronal (a gantry tilt or an oblique plan stays axial)."""
        if self.orientation is None:
            return False
        normal = np.abs(slice_normal(self.orientation))
        return bool(normal[2] >= normal.max())

    @property
    def is_localizer(self) -> bool:
        """A topogram (scout): ImageType holds LOCALIZER."""
        return says_localizer(self.image_type)

    def kind(self) -> tuple:
        """How fit its kind of series is to be the default, the fittest least: one that can be loaded; a CT (the
        presets need one); a stack of slices before a localizer or a single image; the scan's own reconstruction
        before a reformat made from it (a knee's coronal MPR has more slices than its axial series, and interpolated
        voxels); axial before sagittal or coronal."""
        return (bool(self.problem), self.modality != "CT", self.is_localizer or self.slice_count < 2,
                bool(set(self.image_type.split("/")) & MADE_FROM_OTHERS), not self.is_axial)

    def preference(self) -> tuple:
        """Sorts series the best default first: by kind(), then the most slices (the thinnest reconstruction)."""
        return (*self.kind(), -self.slice_count, self.description)

    def summary(self) -> str:
        rows, cols = self.shape
        spacing = f"{self.pixel_spacing[0]:.3g}x{self.pixel_spacing[1]:.3g}x{self.slice_spacing:.3g} mm"
        files = f" in {len(self.files)} file" if len(self.files) != self.slice_count else ""
        problem = f" (cannot be loaded: {self.problem})" if self.problem else ""
        return (f"{self.name}, {self.slice_count} slices{files} of {rows}x{cols}, {spacing}, "
                f"uid {self.uid or '(none)'}{problem}")


@dataclass
class ScanResult:
    folder: Path
    series: list  # DicomSeries, the best for a default first (DicomSeries.preference)
    skipped: list  # SkippedFile
    volume_files: list  # NIfTI/NRRD/MetaImage files found beside the DICOM
    notes: list  # folder-level notes, one sentence each


def is_volume_file(path: Path) -> bool:
    """A NIfTI, NRRD or MetaImage file, by its name."""
    return path.name.lower().endswith(VOLUME_FILE_SUFFIXES)


def unreadable_folder(error: OSError) -> str:
    """The reason given for a folder below the one walked that cannot be listed."""
    return f"a folder that cannot be read ({error.strerror})"


def unreadable_folder_advice() -> str:
    """What to do about a folder that cannot be listed, as the system in use has it."""
    if sys.platform == "darwin":
        return ("this program may not list it (macOS asks before a program reads Desktop, Documents, Downloads or an "
                "external disk: System Settings → Privacy & Security → Files and Folders)")
    return "check that you may read it, or choose another folder"


def _walk_files(folder: Path, skipped: list):
    """The files under folder, sorted; a folder that cannot be listed is skipped with its reason (the top one is
    refused: os.walk alone made it an empty folder, 'no DICOM series')."""
    def unreadable(error: OSError):
        if Path(error.filename) == folder:
            raise InputError(f"{printable(folder)} cannot be read ({error.strerror}): {unreadable_folder_advice()}.")
        if not isinstance(error, FileNotFoundError):  # gone while walked: nothing to say
            skipped.append(SkippedFile(Path(error.filename), unreadable_folder(error)))

    for root, dirs, files in os.walk(folder, onerror=unreadable):
        dirs.sort()
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(root) / name


def _overlap(extents) -> bool:
    """Whether any two (low, high) extents along a normal share a position."""
    reach = -math.inf
    for low, high in sorted(extents):
        if low <= reach + 1e-3:
            return True
        reach = max(reach, high)
    return False


def _stacks(slices: list, by_spacing: bool = True) -> dict:
    """Slices by orientation, size and pixel spacing: the stacks a series may hold (a localizer, reformats, the
    volume); slices of another pixel spacing would be stretched to the first's. Not by_spacing: the stacks whose
    acquisitions a tag may tell apart (two fields of view of one region)."""
    stacks = {}
    for s in slices:
        key = (tuple(np.round(s.orientation, 3)), s.shape, tuple(np.round(s.pixel_spacing, 3)) if by_spacing else ())
        stacks.setdefault(key, []).append(s)
    return stacks


def _is_one_volume(distances: list) -> bool:
    """Slices at distinct, evenly spaced positions: one volume, whatever their tags say (as Slicer loads it: an MR
    acquired in two interleaved packages numbers them as two acquisitions)."""
    gaps = np.diff(np.sort(distances))
    return not len(gaps) or (gaps.min() >= 1e-3 and not uneven_gaps(gaps))


def _splitting_tags(slices: list) -> list:
    """The ACQUISITION_TAGS whose values tell apart slices of one stack that overlap in space, where together
    they are not one volume (two slices at one position, or uneven spacing)."""
    stacks = []  # (slices, their distances along the stack's normal), of the stacks that are not one volume
    for stack in _stacks(slices, by_spacing=False).values():
        distances = [float(np.dot(s.position, slice_normal(stack[0].orientation))) for s in stack]
        if not _is_one_volume(distances):
            stacks.append((stack, distances))
    found = []
    for name, _ in ACQUISITION_TAGS:
        for stack, distances in stacks:
            parts = {}
            for s, distance in zip(stack, distances):
                parts.setdefault(s.acquisition.get(name), []).append(distance)
            if len(parts) > 1 and _overlap((min(part), max(part)) for part in parts.values()) and (
                    name not in SPLIT_ONLY_INTO_VOLUMES or _volumes_of_one_region(list(parts.values()))):
                found.append(name)
                break
    return found


def _volumes_of_one_region(parts: list) -> bool:
    """Parts (slice distances) that are each one volume, any two sharing at least half of the shorter one's extent:
    phases of one region, not the blocks of a sequential scan that touch at their ends."""
    if not all(len(part) > 1 and _is_one_volume(part) for part in parts):
        return False
    extents = [(min(part), max(part)) for part in parts]
    return all(min(a[1], b[1]) - max(a[0], b[0]) >= 0.5 * min(a[1] - a[0], b[1] - b[0])
               for index, a in enumerate(extents) for b in extents[index + 1:])


def _a_copy(one: DicomSlice, other: DicomSlice) -> bool:
    """Whether two slices at one position are one image: the same instance, or the same pixels (sent again under
    new UIDs). Else they are two images that no tag tells apart, such as cardiac phases."""
    if not (one.instance_uid and other.instance_uid) or one.instance_uid == other.instance_uid:
        return True
    try:
        return _same_pixels(_stamp(one.path), _stamp(other.path))
    except OSError:  # gone since the scan: left to the loader, as before
        return True


def _stamp(path) -> tuple:
    status = os.stat(path)
    return str(path), status.st_size, status.st_mtime_ns


@functools.lru_cache(maxsize=1 << 16)  # the inbox builds its series again at each change in the folder
def _same_pixels(one: tuple, other: tuple) -> bool:
    """one, other: (path, size, mtime): a file written again under its name is compared again."""
    try:
        return pydicom.dcmread(one[0]).PixelData == pydicom.dcmread(other[0]).PixelData
    except Exception:  # noqa: BLE001 - unreadable since the scan: left to the loader, as before
        return True


def says_localizer(image_type: str) -> bool:
    """A topogram (scout), by its ImageType's values joined by '/'."""
    return LOCALIZER in image_type.split("/")


def _localizers(stack: list, distances: list) -> dict:
    """Index -> why, of the slices of one stack that are its localizers, not part of its volume, as Slicer's DICOM
    module loads a series that holds its own (Siemens Axiom, GE volume viewer): those whose ImageType says LOCALIZER
    where most say otherwise; else the one slice of another acquisition number or image type than the rest, where
    the rest is one even stack and the whole is not. Beyond the stack it would be interpolated across the gap; at
    one of its positions it made the series two 'acquisitions', one of them a single image."""
    if len(stack) < 3 or any(s.frames > 1 for s in stack):
        return {}
    scouts = [i for i, s in enumerate(stack) if says_localizer(s.acquisition.get("ImageType", ""))]
    if scouts and len(stack) > 2 * len(scouts):  # a series of scouts with a stray image is not a volume of them
        return {i: _localizer_reason(stack[i], "ImageType", len(scouts) == 1) for i in scouts}
    for name, _ in ACQUISITION_TAGS[:2]:  # AcquisitionNumber, ImageType: Slicer's own subseries tags
        values = [s.acquisition.get(name) for s in stack]
        odd = [i for i, value in enumerate(values) if values.count(value) == 1]
        if len(set(values)) == 2 and len(odd) == 1:
            lone = distances[odd[0]]
            rest = _distinct([d for i, d in enumerate(distances) if i != odd[0]])
            with_it_uneven = np.min(np.abs(rest - lone)) < 1e-3 or uneven_gaps(np.diff(_distinct(distances)))
            if with_it_uneven and not uneven_gaps(np.diff(rest)):
                return {odd[0]: _localizer_reason(stack[odd[0]], name, True)}
    return {}


def _distinct(distances) -> np.ndarray:
    """Each position once, sorted: a copy of a slice is a duplicate (left out after), not a gap."""
    return np.unique(np.round(np.asarray(distances, float), 3))


def _localizer_reason(s: DicomSlice, name: str, lone: bool) -> str:
    value = dict(ACQUISITION_TAGS)[name].format(s.acquisition.get(name) or "not given")
    return f"{LOCALIZER_LEFT_OUT} (" + (f"the one image of {value} in its series)" if lone else f"{value})")


def _part_label(s: DicomSlice, tags: list) -> str:
    """The label of the acquisition a slice belongs to, by the tags that split its series ("": not split)."""
    return ", ".join(dict(ACQUISITION_TAGS)[name].format(s.acquisition.get(name, "not given")) for name in tags)


def _without_localizers(slices: list) -> tuple:
    """(the rest, the localizers) of a series' slices, stack by stack (_localizers)."""
    found = set()
    for stack in _stacks(slices, by_spacing=False).values():
        distances = [float(np.dot(s.position, slice_normal(stack[0].orientation))) for s in stack]
        found.update(id(stack[i]) for i in _localizers(stack, distances))
    return [s for s in slices if id(s) not in found], [s for s in slices if id(s) in found]


def _natural(text: str):
    """Sorts 'acquisition 2' before 'acquisition 10'."""
    return [float(part) if index % 2 else part for index, part in enumerate(re.split(r"(\d+(?:\.\d+)?)", text))]


def group_series(slices: list) -> dict:
    """key -> the slices of one series. Slices are grouped by DICOM series; where a series holds several
    acquisitions of the same region (phases, echoes, b-values, time points: told apart by ACQUISITION_TAGS),
    or several enhanced multi-frame images, each becomes a series of its own, keyed '<series key>|<part>'
    (stable whatever the files' order). Mixed, they would alternate slice by slice in one volume. So do two
    patients' or studies' images under one series UID (which DICOM forbids, but a faulty anonymiser makes)."""
    by_series = {}
    for s in slices:
        by_series.setdefault(s.series_key, []).append(s)
    for key, members in list(by_series.items()):
        origins = {s.origin for s in members}
        if len(origins - {""}) > 1:  # "": read before slices knew their study (an inbox journal's older records)
            del by_series[key]
            for origin in sorted(origins):
                by_series[f"{key}|{STUDY_PART}{origin or 'unknown'}"] = [s for s in members if s.origin == origin]
    groups = {}
    for key, members in by_series.items():
        parts = {}
        if len(members) > 1:
            for s in sorted((s for s in members if s.frame_positions), key=lambda s: str(s.path)):
                label = f"file {s.path.name}"
                parts[label if label not in parts else f"{label} #{len(parts) + 1}"] = [s]
            members = [s for s in members if not s.frame_positions]
        members, localizers = _without_localizers(members)  # they split off a one-image 'acquisition' else
        tags = _splitting_tags(members)
        classic = {_part_label(s, tags) for s in members}  # not an enhanced file's part: one its localizer can join
        for s in members:
            parts.setdefault(_part_label(s, tags), []).append(s)
        for s in localizers:  # left out by build_series, with its reason, from the part of its values (or the first)
            label = _part_label(s, tags)
            parts[label if label in classic else min(classic, key=_natural)].append(s)
        for label in sorted(parts, key=_natural):
            groups[f"{key}|{label}" if label else key] = parts[label]
    return groups


def build_series(key: str, slices: list, skipped: list) -> DicomSeries:
    """One series from its slices (one group of group_series): ordered along the normal, duplicates and odd
    slices moved to skipped."""
    ours = len(skipped)  # what this series leaves out is named with it
    # Localizers and reformats sometimes share a series: keep the largest stack of one orientation and size.
    stacks = _stacks(slices)
    stack = max(stacks.values(), key=len)
    for other in stacks.values():
        if other is not stack:
            skipped.extend(SkippedFile(s.path, ANOTHER_STACK, kind=ANOTHER_STACK) for s in other)
    first = stack[0]
    normal = slice_normal(first.orientation)
    stack.sort(key=lambda s: (float(np.dot(s.position, normal)), s.instance_number))
    distances = [float(np.dot(s.position, normal)) for s in stack]
    localizers = _localizers(stack, distances)  # before duplicates: one at a slice's position is no duplicate
    skipped.extend(SkippedFile(stack[i].path, reason, kind=LOCALIZER_LEFT_OUT) for i, reason in localizers.items())
    distances = [d for i, d in enumerate(distances) if i not in localizers]
    stack = [s for i, s in enumerate(stack) if i not in localizers]
    kept, kept_distances, others = [stack[0]], [distances[0]], 0
    for s, d in zip(stack[1:], distances[1:]):
        if s.frames == 1 and abs(d - kept_distances[-1]) < 1e-3:
            copy = _a_copy(s, kept[-1])
            others += not copy
            skipped.append(SkippedFile(s.path, f"same position as {kept[-1].path.name} " + (
                "(a duplicate slice)" if copy else "(another image, not a copy of it)"),
                kind="same position as another slice (a duplicate)" if copy else
                "same position as another image (not a copy of it)"))
            continue
        kept.append(s)
        kept_distances.append(d)
    first = kept[0]  # the series' attributes (pixel spacing...) from a slice of the volume, not from a localizer
    # An enhanced multi-frame image is a stack by itself: its frames are the slices.
    points = np.array([p for s in kept for p in (s.frame_positions or [s.position])], dtype=float)
    points = points[np.argsort(points @ normal, kind="stable")]
    series = DicomSeries(
        key=key,
        uid=first.series_uid,
        modality=first.modality,
        description=first.description,
        series_number=first.series_number,
        files=[s.path for s in kept],
        positions=points @ normal if first.frame_positions else np.array(kept_distances),
        shape=first.shape,
        pixel_spacing=first.pixel_spacing,
        part=key[len(first.series_key) + 1:] if key.startswith(f"{first.series_key}|") else "",
        first_position=points[0],
        image_type=first.acquisition.get("ImageType", ""),
        orientation=np.asarray(first.orientation, float),
        origin=first.origin,
    )
    if len(points) > 1:
        step = points[-1] - points[0]
        cos = abs(float(np.dot(step, normal))) / max(float(np.linalg.norm(step)), 1e-9)
        series.tilt_degrees = float(np.degrees(np.arccos(min(1.0, cos))))
    if others and len(kept) > 1:  # kept, one image a position would mix them slice by slice (one position: a slice)
        series.problem = (f"{others} of its images lie where others do, and no tag tells them apart (cardiac phases, "
                          "energies or two reconstructions in one series?): have each exported as a series of its own")
    if not first.series_uid:
        series.notes.append(f"Series {series.name} has no SeriesInstanceUID; its files were grouped by folder and series number.")
    if series.part.startswith(STUDY_PART):
        series.notes.append(f"Series {series.name} shares its series UID with another patient's or study's images "
                            "(UIDs must be unique: a faulty anonymiser or export?): each is listed as a series of its "
                            "own (--list), and --series chooses.")
    elif series.part:
        series.notes.append(f"Series {series.name} is one of several acquisitions or images of the same region kept in "
                            "one DICOM series: each is listed as a series of its own (--list), and --series chooses.")
    lossy = sorted({s.lossy for s in kept if s.lossy})
    if lossy:
        series.notes.append(f"Series {series.name} was compressed with loss ({', '.join(lossy)}): its values are not "
                            "quite the scanner's, nor are its surfaces; ask for the original images where that matters.")
    if series.is_uneven:
        series.notes.append(f"Series {series.name} has uneven slice spacing ({_unevenness(series.positions, kept)}): "
                            "it was resampled to even spacing.")
    for item in skipped[ours:]:
        item.series = series.name
    return series


def _unevenness(positions: np.ndarray, kept: list) -> str:
    """What is uneven: one gap of a whole number of steps is a missing slice; anything else is said as it is
    (two zones of spacing, positions rounded in the headers)."""
    gaps = np.diff(positions)
    step = float(np.median(gaps))
    odd = np.flatnonzero(np.abs(gaps - step) > SPACING_TOLERANCE * step)
    if not len(odd):
        return f"gaps from {gaps.min():.3f} to {gaps.max():.3f} mm: positions rounded in the headers?"
    steps = gaps[odd[0]] / step if len(odd) == 1 else 0
    if steps > 1.5 and abs(steps - round(steps)) < 0.1:
        return (f"a gap of {gaps[odd[0]]:.2f} mm after {kept[odd[0]].path.name}, {step:.2f} mm elsewhere; "
                "a slice is probably missing")
    return f"{len(odd)} of its {len(gaps)} gaps differ from {step:.2f} mm, from {gaps.min():.2f} to {gaps.max():.2f} mm"


def _is_dicomdir(path: Path) -> bool:
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
    except Exception:  # noqa: BLE001 - not a Part 10 file: not a DICOMDIR
        return False
    return meta.get("MediaStorageSOPClassUID") == MEDIA_STORAGE_DIRECTORY


def _dicomdir_files(path: Path) -> list:
    """The files a DICOMDIR lists, where all of them are there; else None (read its folder instead)."""
    from pydicom.fileset import FileSet
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            files = [Path(instance.path) for instance in FileSet(pydicom.dcmread(path))]
    except Exception:  # noqa: BLE001 - a DICOMDIR pydicom cannot follow: its folder is read instead
        return None
    return files if files and all(file.is_file() for file in files) else None


def is_quiet_skip(reason: str) -> bool:
    """Files that belong in a DICOM export but are no images (reports, CD indexes): listed, never warned about."""
    return reason.startswith((NOT_AN_IMAGE, DICOMDIR)) or reason.endswith("not an image slice")


def scan_folder(folder, progress=None) -> ScanResult:
    """All image series under folder (any nesting, any file names), the best default first (preference).

    folder may be one file; a DICOMDIR stands for the files it lists (or, where some are not where it says,
    for its folder). progress(done, total, path), when given, is called after each file.
    """
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"{folder} does not exist: give a folder of DICOM files or a NIfTI/NRRD file.")
    if not utf8_path(folder):  # else each file would be skipped for it
        raise InputError(f"{printable(folder)} cannot be read: {PATH_NOT_UTF8}.")
    skipped = []
    paths = [folder] if folder.is_file() else list(_walk_files(folder, skipped))
    if folder.is_file() and _is_dicomdir(folder):
        paths = _dicomdir_files(folder) or [p for p in _walk_files(folder.parent, skipped) if p != folder]
        folder = folder.parent
    slices, volume_files = [], []
    for done, path in enumerate(paths, 1):
        if progress:
            progress(done, len(paths), path.name)
        if is_volume_file(path):
            volume_files.append(path)
            continue
        item, reason = read_slice(path)
        if item is None:
            skipped.append(SkippedFile(path, reason))
        else:
            slices.append(item)
    series = [build_series(key, items, skipped) for key, items in group_series(slices).items()]
    series.sort(key=DicomSeries.preference)
    notes = []
    told = [s for s in skipped if not is_quiet_skip(s.reason)]
    if told:
        groups = [sentence for sentence, _ in skipped_groups(told)]
        notes.append(f"{len(told)} file(s) in {folder} were skipped: " +
                     "; ".join(groups[:5]) + ("; ..." if len(groups) > 5 else "") + ".")
    return ScanResult(folder=folder, series=series, skipped=skipped, volume_files=volume_files, notes=notes)


def choose_series(result: ScanResult, selector: str = None) -> DicomSeries:
    """The series named by UID or list number (1-based), else the best by DicomSeries.preference (the first of
    --list): a CT without a problem, the scan's own axial reconstruction with the most slices."""
    undecoded = [s for s in result.skipped if CANNOT_DECODE in s.reason]
    if not result.series and undecoded:  # the one reason that holds for them all, not 'check the folder'
        raise InputError(f"No series in {result.folder} can be loaded: {len(undecoded)} image file(s), the first "
                         f"{undecoded[0].path.name}, are {undecoded[0].reason}.")
    if not result.series and result.folder.is_file() and len(result.skipped) == 1:  # one file given: its reason
        reason = result.skipped[0].reason
        advice = ("" if says_what_to_do(reason)  # its own advice: how to export it
                  else "; copy it again from its source" if reason.startswith("truncated")
                  else "; give a DICOM image file or folder, or a NIfTI/NRRD volume")
        raise InputError(f"{result.folder} is not a usable image: {reason}{advice}.")
    if not result.series:
        looked_at = (f"No DICOM image series found in {result.folder} ({len(result.skipped)} file(s) looked at, "
                     "none a usable image slice")
        if result.skipped and says_what_to_do(result.skipped[0].reason):  # the folder is fine: the export is not
            raise InputError(f"{looked_at}): the first, {result.skipped[0].path}, is {result.skipped[0].reason}.")
        first = f"; the first: {result.skipped[0]}" if result.skipped else ""
        raise InputError(f"{looked_at}{first}): check the folder.")
    if selector:
        if selector.isdigit() and 1 <= int(selector) <= len(result.series):
            return result.series[int(selector) - 1]
        named = [series for series in result.series if selector in (series.uid, series.key)]
        if len(named) > 1:  # one DICOM series split into its acquisitions: the UID names them all
            parts = "; ".join(s.part.replace("|", ", ") for s in named)
            raise InputError(f"Series {selector} holds {len(named)} acquisitions ({parts}): give the number of the one "
                             "you want from --list.")
        if named:
            return named[0]
        raise InputError(f"No series '{selector}' in {result.folder}: run with --list to see the series and their numbers.")
    return min(result.series, key=DicomSeries.preference)
