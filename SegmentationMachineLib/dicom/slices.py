"""Read one DICOM file's header: whether it is an image slice we can stack, and where it lies; why not, if not.

Reads files only; pixel data is never decoded here (Slicer's reader does that for the whole series).
"""

import hashlib
import io
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from ..core.files import PATH_NOT_UTF8, utf8_path
from .transfer_syntaxes import ASK_FOR_DECODABLE, UNCOMPRESSED, lossy_compression, undecodable

# Slices whose stacking direction leans more than this from the slice normal are sheared (gantry tilt).
MAX_TILT_DEGREES = 0.5
# Relative difference between slice gaps that counts as uneven spacing (a missing slice).
SPACING_TOLERANCE = 0.01
# How far ImageOrientationPatient's two directions may be from unit length and from perpendicular.
ORIENTATION_TOLERANCE = 1e-3
# SOP classes that carry pixel data but are not image slices we can stack. Objects without pixel data
# (structured reports, presentation states, RT plans, vendor non-image objects...) are told by reading them.
NON_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "a DICOM SEG object",
}
# Names of private SOP classes, for the reason a file is skipped (pydicom knows the standard ones).
PRIVATE_SOP_CLASS_NAMES = {"1.3.12.2.1107.5.9.1": "Siemens CSA Non-Image Storage"}
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # a DICOMDIR
DICOMDIR = "a DICOMDIR (CD index; the files it lists are read where they lie)"
NOT_AN_IMAGE = "not an image"
# Tags that tell apart acquisitions kept in one series (Slicer's DICOM module splits on the first two, on
# orientation and on the diffusion gradient; MR needs echo, inversion, b-value and time point too), with how
# a part is named. A tag splits a series only where its groups of slices overlap in space: a scanner that
# numbers each rotation of a sequential scan as an acquisition still gives one volume.
ACQUISITION_TAGS = (
    ("AcquisitionNumber", "acquisition {}"),
    ("ImageType", "image type {}"),
    ("EchoNumbers", "echo {}"),
    ("EchoTime", "TE {} ms"),
    ("InversionTime", "TI {} ms"),
    ("DiffusionBValue", "b={}"),
    ("DiffusionGradientOrientation", "gradient {}"),
    ("TemporalPositionIdentifier", "time point {}"),
    ("NominalPercentageOfCardiacPhase", "phase {}%"),
    ("TriggerTime", "trigger {} ms"),
    ("KVP", "{} kV"),
)
COLOUR_IMAGE = "a colour image (a screenshot or 3D rendering), not an image slice"
# Secondary Capture Image Storage and its multi-frame kinds (.7.1 to .7.4): dose screens, scanned requisitions.
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
PLACELESS_CAPTURE = ("a secondary capture without a patient position (a dose screen or scanned document), not an "
                     "image slice")
# GDCM (Slicer's reader) takes a file without a Part 10 header only where its first attribute holds a value.
BARE_EMPTY_START = ("DICOM without its file header, starting with an empty attribute, which Slicer's reader cannot "
                    "read: have the series exported or sent again as DICOM files (Part 10)")
TRUNCATED = "truncated (the file ends before its pixel data does)"
# What helps with several stacks in one file: the folder is fine, the way it was exported is not.
EACH_APART = "as a series of its own from the scanner or PACS (single-frame images, or one file each)"
PIXEL_DATA = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


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
    acquisition: dict = field(default_factory=dict)  # ACQUISITION_TAGS keyword -> value as text, where given
    frame_positions: tuple = ()  # an enhanced multi-frame image: each frame's position (LPS), in file order
    origin: str = ""  # its patient and study, hashed: which images a reused series UID would mix ("": unknown)
    instance_uid: str = ""  # SOPInstanceUID: a copy of a slice has the same, another image at its place another
    lossy: str = ""  # the compression that lost detail in its pixels, where one did (lossy_compression)


def says_what_to_do(reason: str) -> bool:
    """Whether a file's reason ends in what to do about it (export it otherwise, have it sent again): then a message
    that quotes it adds no advice of its own ('check the folder' would send the user to a folder that is fine)."""
    return any(f": {verb} " in reason for verb in ("export", "have"))


def uneven_gaps(gaps: np.ndarray) -> bool:
    """Slice gaps that differ by more than SPACING_TOLERANCE: a slice is missing (or two volumes are mixed)."""
    return len(gaps) > 1 and float(gaps.max() - gaps.min()) > SPACING_TOLERANCE * float(np.median(gaps))


def looks_like_dicom(head: bytes) -> bool:
    """From a file's first 132 bytes: DICOM Part 10 files carry 'DICM' at byte 128; raw datasets
    start with a group 0002/0008 tag. Anything else is classified without reading further."""
    return head[128:132] == b"DICM" or head[:2] in (b"\x02\x00", b"\x08\x00")


def _expected_pixel_bytes(ds) -> int:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8 * frames


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


def slice_normal(orientation) -> np.ndarray:
    orientation = np.asarray(orientation, dtype=float)
    return np.cross(orientation[:3], orientation[3:])


def _sop_class_name(uid: str) -> str:
    name = PRIVATE_SOP_CLASS_NAMES.get(uid) or pydicom.uid.UID(uid).name
    return name if name and name != uid else f"SOP class {uid or 'not given'}"


def _no_pixels_reason(ds) -> str:
    """A completely read dataset without pixel data: a non-image object, unless its header describes pixels
    (then the file was cut off just before them)."""
    if all(name in ds for name in ("Rows", "Columns", "BitsAllocated")):
        return TRUNCATED
    return f"{NOT_AN_IMAGE} ({_sop_class_name(str(ds.get('SOPClassUID', '')))})"


def _tag_text(value) -> str:
    """A tag's value as stable text: numbers in one form ('4.92', '2'), several values joined by '/'."""
    items = [value] if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__") else list(value)
    texts = []
    for item in items:
        try:
            number = float(item)
            texts.append(str(int(number)) if number.is_integer() else f"{number:.6g}")
        except (TypeError, ValueError, OverflowError):
            texts.append(str(item).strip().upper())
    return "/".join(texts)


def _acquisition_values(ds) -> dict:
    return {name: _tag_text(ds.get(name)) for name, _ in ACQUISITION_TAGS if ds.get(name) not in (None, "")}


def _from_groups(ds, index: int, sequence: str, attribute: str):
    """An attribute of one frame of an enhanced image: from its per-frame functional group, else the shared one."""
    shared = ds.get("SharedFunctionalGroupsSequence") or [None]
    for groups in (ds.PerFrameFunctionalGroupsSequence[index], shared[0]):
        items = getattr(groups, sequence, None) if groups is not None else None
        if items and attribute in items[0]:
            return items[0].get(attribute)
    return None


def _frame_geometry(ds):
    """(frame positions, orientation, pixel spacing) of an enhanced (or legacy-converted) multi-frame image,
    from its functional groups; or a reason it is not one stack Slicer's reader can place."""
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if len(ds.PerFrameFunctionalGroupsSequence) != count:
        groups = len(ds.PerFrameFunctionalGroupsSequence)
        return f"malformed multi-frame image ({groups} per-frame groups, {count} frames)"
    if int(ds.get("InConcatenationTotalNumber", 1) or 1) > 1:
        return ("one part of a multi-frame image split over several files (a concatenation), which Slicer's reader "
                "cannot join: export the series as single-frame images")
    frames = [[_from_groups(ds, k, sequence, attribute) for k in range(count)] for sequence, attribute in (
        ("PlanePositionSequence", "ImagePositionPatient"), ("PlaneOrientationSequence", "ImageOrientationPatient"),
        ("PixelMeasuresSequence", "PixelSpacing"))]
    if any(value is None for values in frames[:2] for value in values):
        return "an image without patient position or orientation (a secondary capture?)"
    positions, orientations = (np.array([[float(v) for v in value] for value in values]) for values in frames[:2])
    spacings = {tuple(float(v) for v in value or ()) for value in frames[2]}
    if positions.shape != (count, 3) or orientations.shape != (count, 6):
        return "malformed image position or orientation"
    if len(spacings) > 1 or np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        return ("a multi-frame image whose frames differ in orientation or pixel size (several stacks in one file), "
                f"which cannot be loaded as one volume: export each stack {EACH_APART}")
    rescales = {tuple(_from_groups(ds, k, "PixelValueTransformationSequence", name) for name in
                      ("RescaleSlope", "RescaleIntercept")) for k in range(count)}
    if len(rescales) > 1:
        return ("a multi-frame image whose frames are scaled differently (a rescale per frame), which Slicer's reader "
                "would load with wrong values: export the series as single-frame images")
    return positions, orientations[0], spacings.pop()


def _frame_stack_problem(positions: np.ndarray, orientation: np.ndarray) -> str:
    """Why the frames of an enhanced image are not one even, straight stack, or None: Slicer's reader (GDCM)
    places such frames wrongly without a word (a pixel size of 1 mm where the spacing is uneven)."""
    if len(positions) < 2:
        return None
    normal = slice_normal(orientation)
    in_file_order = np.diff(positions @ normal)
    distances = np.sort(positions @ normal)
    gaps = np.diff(distances)
    if gaps.min() >= 1e-3 and not ((in_file_order > 0).all() or (in_file_order < 0).all()):
        return ("a multi-frame image whose frames are not stored in slice order, which Slicer's reader would stack "
                "wrongly: export the series as single-frame images")
    if gaps.min() < 1e-3:
        return ("a multi-frame image with several frames at one position (several stacks in one file: echoes, "
                f"phases or time points), which cannot be loaded as one volume: export each echo or phase {EACH_APART}")
    if uneven_gaps(gaps):
        return (f"a multi-frame image whose frames are unevenly spaced ({gaps.min():.3g} to {gaps.max():.3g} mm; "
                "a frame is missing?), which Slicer's reader would load at the wrong size")
    ordered = positions[np.argsort(positions @ normal)]
    step = ordered[-1] - ordered[0]
    tilt = math.degrees(math.acos(min(1.0, abs(float(step @ normal)) / float(np.linalg.norm(step)))))
    if tilt > MAX_TILT_DEGREES:
        return (f"a multi-frame image whose frames lean {tilt:.1f}° from their normal (a gantry tilt), which "
                "Slicer's reader would load distorted")
    return None


def _is_colour(ds) -> bool:
    try:
        return int(ds.get("SamplesPerPixel", 1) or 1) != 1 or not str(
            ds.get("PhotometricInterpretation", "MONOCHROME2")).startswith("MONOCHROME")
    except (AttributeError, TypeError, ValueError):  # a crafted header: not known to be colour
        return False


def read_slice(path: Path, data: bytes = None):
    """Returns (DicomSlice, None) for an image slice (or an enhanced multi-frame image: one stack in one file),
    (None, reason) for anything else.

    data: the file's bytes when the caller has read them already (the inbox hashes them too).
    A reason starting with "truncated" may be a file still being written.
    """
    if not utf8_path(path):
        return None, PATH_NOT_UTF8
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
    # Read to its end without a word: what is missing now is missing from the object, not cut off.
    meta = getattr(ds, "file_meta", None) or {}
    if meta.get("MediaStorageSOPClassUID") == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
        return None, DICOMDIR
    if not meta and len(ds) and ds[next(iter(ds.keys()))].value in (None, "", b""):
        return None, BARE_EMPTY_START
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class in NON_IMAGE_SOP_CLASSES:
        return None, f"{NON_IMAGE_SOP_CLASSES[sop_class]}, not an image slice"
    if not any(name in ds for name in PIXEL_DATA):
        return None, _no_pixels_reason(ds)
    if "PixelData" not in ds:
        return None, "floating-point pixel data (a parametric map or other derived image), which is not read here"
    enhanced = "ImagePositionPatient" not in ds and "PerFrameFunctionalGroupsSequence" in ds
    if not enhanced and ("ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds):
        # Most studies hold one (a dose screen, a scanned requisition): left aside quietly, as the README says; a CT
        # or MR image without its position is a fault, told.
        if _is_colour(ds):
            return None, COLOUR_IMAGE
        if sop_class == SECONDARY_CAPTURE or sop_class.startswith(SECONDARY_CAPTURE + "."):
            return None, PLACELESS_CAPTURE
        return None, "an image without patient position or orientation (a secondary capture?)"
    try:
        with warnings.catch_warnings():  # pydicom's words on a bad value ("Invalid value for VR IS"): ours follow
            warnings.simplefilter("ignore")
            # Without a Part 10 header (no file meta: old PACS exports) the dataset is read as it is encoded,
            # uncompressed; Slicer's reader takes such files too.
            ts = meta.get("TransferSyntaxUID") or "1.2.840.10008.1.2"
            encoding = undecodable(ts)
            if encoding:  # GDCM would fail on it later, as if the file were incomplete
                return None, f"{encoding}: {ASK_FOR_DECODABLE}"
            if ts in UNCOMPRESSED and len(ds.PixelData) < _expected_pixel_bytes(ds):
                return None, "truncated (its pixel data is shorter than its size says)"
            if enhanced:
                geometry = _frame_geometry(ds)
                if isinstance(geometry, str):
                    return None, geometry
                frame_positions, orientation, spacing = geometry
                position = frame_positions[0]
            else:
                frame_positions = ()
                orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
                position = np.array([float(v) for v in ds.ImagePositionPatient])
                spacing = tuple(float(v) for v in ds.get("PixelSpacing") or ())
            shape = (int(ds.Rows), int(ds.Columns))
            if _is_colour(ds):
                return None, COLOUR_IMAGE
            instance_number, frames, announced = (int(ds.get(name, default) or default) for name, default in (
                ("InstanceNumber", 0), ("NumberOfFrames", 1), ("ImagesInAcquisition", 0)))  # crafted text: a reason
            acquisition = _acquisition_values(ds)
    except (AttributeError, TypeError, ValueError) as error:
        return None, f"malformed image attributes ({error})"
    if orientation.shape != (6,) or position.shape != (3,):
        return None, "malformed image position or orientation"
    problem = _geometry_problem(spacing, orientation, position)
    if not problem and enhanced:
        finite = np.isfinite(frame_positions).all()
        problem = _frame_stack_problem(frame_positions, orientation) if finite else "its frame positions are not finite"
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
        acquisition=acquisition,
        frame_positions=tuple(tuple(float(v) for v in p) for p in frame_positions),
        origin=hashlib.sha256(f"{ds.get('PatientID', '')}\0{ds.get('StudyInstanceUID', '')}".encode()).hexdigest()[:8],
        instance_uid=str(ds.get("SOPInstanceUID", "") or ""),
        lossy=lossy_compression(ts, ds.get("LossyImageCompression")),
    ), None
