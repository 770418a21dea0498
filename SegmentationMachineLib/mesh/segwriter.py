"""DICOM SEG writing with highdicom: numpy, pydicom and highdicom only (no VTK, no Slicer), so it also runs as

    python -m SegmentationMachineLib.mesh.segwriter INPUT_FOLDER OUTPUT_FILE

in a child of Slicer's Python with pydicom 3 and highdicom first on its path: Slicer 5.10 bundles pydicom 2.4,
which highdicom on NumPy 2 cannot use and an install must not replace. The parent writes the input with
save_input (voxels as .npy, the rest as JSON, the source series as file paths: no pydicom object crosses
between pydicom versions); the child reads the source headers with its own pydicom.

The SEG is written on the grid of the volume the segmentation was made on, one frame per slice that holds a
segment. Where each slice is a source image as read (source_frames), highdicom copies the images' own geometry
and refers each frame to its image: a gantry-tilted series' sheared positions, which no regular grid holds.
Else (a resampled volume) each frame's position is stated from the grid, so it lines up in space whatever the
grid's orientation.
"""

import json
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from .. import __version__
from ..core.child import USER_ERROR_EXIT
from ..core.errors import ExportError, UserError
from ..core.grids import RAS_TO_LPS
from ..core.files import CONTROL_CHARACTERS, atomic_file
from ..core.provenance import NNINTERACTIVE, PRESET, PRESET_EDITED


# Segmented property category and type, SNOMED CT: (value, meaning).
TISSUE = ("85756007", "Tissue")
LONG_STRING = 64  # what a DICOM LO (a segment label, a series description) may hold: bytes, as validators count
ANATOMICAL_STRUCTURE = ("123037004", "Anatomical Structure")
# A segment named after one of these (any case, any word of its name, e.g. "kidney_left") gets its code;
# any other name is coded as tissue.
KNOWN_STRUCTURES = {
    "bone": (TISSUE, ("272673000", "Bone")),
    "skin": (ANATOMICAL_STRUCTURE, ("39937001", "Skin")),
    "liver": (ANATOMICAL_STRUCTURE, ("10200004", "Liver")),
    "spleen": (ANATOMICAL_STRUCTURE, ("78961009", "Spleen")),
    "kidney": (ANATOMICAL_STRUCTURE, ("64033007", "Kidney")),
    "pancreas": (ANATOMICAL_STRUCTURE, ("15776009", "Pancreas")),
    "stomach": (ANATOMICAL_STRUCTURE, ("69695003", "Stomach")),
    "gallbladder": (ANATOMICAL_STRUCTURE, ("28231008", "Gallbladder")),
    "heart": (ANATOMICAL_STRUCTURE, ("80891009", "Heart")),
    "lung": (ANATOMICAL_STRUCTURE, ("39607008", "Lung")),
    "aorta": (ANATOMICAL_STRUCTURE, ("15825003", "Aorta")),
    "esophagus": (ANATOMICAL_STRUCTURE, ("32849002", "Esophagus")),
    "trachea": (ANATOMICAL_STRUCTURE, ("44567001", "Trachea")),
    "duodenum": (ANATOMICAL_STRUCTURE, ("38848004", "Duodenum")),
    "colon": (ANATOMICAL_STRUCTURE, ("71854001", "Colon")),
    "brain": (ANATOMICAL_STRUCTURE, ("12738006", "Brain")),
    "prostate": (ANATOMICAL_STRUCTURE, ("41216001", "Prostate")),
    "femur": (ANATOMICAL_STRUCTURE, ("71341001", "Femur")),
    "sacrum": (ANATOMICAL_STRUCTURE, ("54735007", "Sacrum")),
    "rib": (ANATOMICAL_STRUCTURE, ("113197003", "Rib")),
    "humerus": (ANATOMICAL_STRUCTURE, ("85050009", "Humerus")),
    "skull": (ANATOMICAL_STRUCTURE, ("89546000", "Skull")),
}


def segment_codes(name: str):
    """((category value, meaning), (type value, meaning)) for a segment name; tissue when not known."""
    for word in re.split(r"[^a-z]+", name.lower()):
        if word in KNOWN_STRUCTURES:
            return KNOWN_STRUCTURES[word]
    return TISSUE, TISSUE


# sRGB (0..1) <-> CIELab (D65), as DICOM's RecommendedDisplayCIELabValue stores it (scaled to 0..65535).
_RGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                        [0.0193339, 0.1191920, 0.9503041]])
_D65 = _RGB_TO_XYZ.sum(axis=1)  # the white point is sRGB's white: white is a = b = 0 exactly


def _lab_f(t):
    return np.where(t > (6 / 29) ** 3, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)


def rgb_to_dicom_lab(rgb) -> list:
    srgb = np.clip(np.asarray(rgb[:3], float), 0, 1)
    linear = np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)
    fx, fy, fz = _lab_f(_RGB_TO_XYZ @ linear / _D65)
    lab = np.array([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)])
    scaled = [lab[0] / 100 * 65535, (lab[1] + 128) / 255 * 65535, (lab[2] + 128) / 255 * 65535]
    return [int(round(min(max(v, 0), 65535))) for v in scaled]


def dicom_lab_to_rgb(values) -> tuple:
    lightness, a, b = values[0] / 65535 * 100, values[1] / 65535 * 255 - 128, values[2] / 65535 * 255 - 128
    fy = (lightness + 16) / 116
    f = np.array([fy + a / 500, fy, fy - b / 200])
    xyz = np.where(f > 6 / 29, f ** 3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * _D65
    linear = np.clip(np.linalg.solve(_RGB_TO_XYZ, xyz), 0, 1)
    srgb = np.where(linear <= 0.0031308, linear * 12.92, 1.055 * linear ** (1 / 2.4) - 0.055)
    return tuple(float(c) for c in np.clip(srgb, 0, 1))


# The patient and study attributes a SEG copies from its source images (type 2 in the SEG IOD's modules).
TYPE_2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")


def source_dataset(path):
    """A source image's header as highdicom takes it; the user's sentence when a SEG cannot refer to it.
    Works on pydicom 2.4 too: the parent checks the series with Slicer's pydicom (dicomseg.check_seg_export and
    match_sources) before any mesh is made."""
    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    # Its names as text, its character set dropped: the SEG is written in UTF-8 (ISO_IR 192), and highdicom refuses
    # many a source's set ('\\ISO 2022 IR 87' of Japanese series, Korean's IR 149, an empty value, misspellings)
    dataset.decode()
    if "SpecificCharacterSet" in dataset:
        del dataset.SpecificCharacterSet
    # Some anonymisers blank the instance's UIDs in the data set but keep them in the file meta.
    dataset.SOPClassUID = dataset.get("SOPClassUID") or dataset.file_meta.get("MediaStorageSOPClassUID", "")
    dataset.SOPInstanceUID = dataset.get("SOPInstanceUID") or dataset.file_meta.get("MediaStorageSOPInstanceUID", "")
    missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
               if not dataset.get(k)]
    for keyword in TYPE_2_COPIED:  # highdicom copies these (type 2: present, may be empty); anonymisers drop them
        if keyword not in dataset:
            setattr(dataset, keyword, None)
    if missing:
        raise ExportError(f"{path} has no {' or '.join(missing)} (an anonymiser removed it), so a DICOM SEG "
                          "could not refer to it: export STL, OBJ, 3MF or glTF instead.")
    return dataset


def _unparsable(dataset) -> list:
    """Keywords highdicom parses strictly that dataset holds in a form it refuses: real headers hold an unknown
    birth date as 00000000, ACR-NEMA's 1901-01-01, sex 'U', a time as 14:03:52."""
    def refused(keyword, value) -> bool:
        if keyword == "PatientSex":
            return value not in ("M", "F", "O")
        try:
            (pydicom.valuerep.TM if keyword == "StudyTime" else pydicom.valuerep.DA)(value)
            return False
        except ValueError:
            return True

    return [keyword for keyword in ("PatientBirthDate", "StudyDate", "StudyTime", "PatientSex")
            if dataset.get(keyword) and refused(keyword, dataset.get(keyword))]


@dataclass
class SegInput:
    """What a DICOM SEG needs from the scene, copied out of it: plain data, so it can cross to a child."""
    source_files: list  # the source series' DICOM files (absolute paths); the writer reads their headers
    ijk_to_ras: np.ndarray
    pixels: np.ndarray  # segment numbers (K, J, I), or one mask per segment (K, J, I, n)
    segments: list  # (name, colour) per segment number
    description: str
    source_frames: bool = False  # pixels[k] is source_files[k]'s image, pixel for pixel: the SEG takes its geometry
    made_by: tuple = ()  # core.provenance's PRESET, PRESET_EDITED, NNINTERACTIVE or "" (unknown) per segment
    slice_starts: np.ndarray = None  # (K, 3) LPS, where the scene puts each slice, until dicomseg.match_sources


def save_input(folder, seg: SegInput):
    """seg as files in folder (the parent's side of the child), its files matched to its slices (match_sources)."""
    if seg.slice_starts is not None:
        raise ValueError("dicomseg.match_sources(seg) first: the child cannot match the files to the slices")
    folder = Path(folder)
    np.save(folder / "pixels.npy", seg.pixels)
    (folder / "seg.json").write_text(json.dumps({
        "source_files": [str(name) for name in seg.source_files], "ijk_to_ras": np.asarray(seg.ijk_to_ras).tolist(),
        "segments": [[name, [float(c) for c in color]] for name, color in seg.segments],
        "description": seg.description, "source_frames": seg.source_frames, "made_by": list(seg.made_by)}))


def load_input(folder) -> SegInput:
    folder = Path(folder)
    saved = json.loads((folder / "seg.json").read_text())
    return SegInput(saved["source_files"], np.array(saved["ijk_to_ras"]), np.load(folder / "pixels.npy"),
                    [(name, tuple(color)) for name, color in saved["segments"]], saved["description"],
                    saved["source_frames"], tuple(saved["made_by"]))


def _plane_distance(ijk_to_ras: np.ndarray) -> float:
    """How far apart the slices' planes are, along their normal (for a gantry tilt's sheared grid, less than a step
    along the stack)."""
    normal = np.cross(ijk_to_ras[:3, 0], ijk_to_ras[:3, 1])
    return float(abs(ijk_to_ras[:3, 2] @ normal) / np.linalg.norm(normal))


def _plane_geometry(ijk_to_ras: np.ndarray, slices: int):
    """highdicom's pixel measures, orientation and one position per slice, in LPS as DICOM wants."""
    import highdicom

    ijk_to_lps = RAS_TO_LPS @ ijk_to_ras
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)  # voxel size along I, J, K
    row_direction, column_direction = ijk_to_lps[:3, 0] / spacing[0], ijk_to_lps[:3, 1] / spacing[1]
    distance = _plane_distance(ijk_to_ras)
    measures = highdicom.PixelMeasuresSequence(pixel_spacing=[float(spacing[1]), float(spacing[0])],
                                               slice_thickness=distance, spacing_between_slices=distance)
    orientation = highdicom.PlaneOrientationSequence(
        coordinate_system="PATIENT", image_orientation=[*map(float, row_direction), *map(float, column_direction)])
    positions = [highdicom.PlanePositionSequence(
        coordinate_system="PATIENT", image_position=[float(v) for v in (ijk_to_lps @ [0, 0, k, 1])[:3]])
        for k in range(slices)]
    return measures, orientation, positions


# How each kind of segment was made, in DICOM's terms: (algorithm type, name, family from CID 7162 "Surface
# Processing Algorithm Family", whose codes a SEG's algorithm family takes). A preset runs on its own once chosen
# (threshold, then morphology), and is semi-automatic once someone edited its result; nnInteractive, an AI model,
# follows the user's prompts.
ALGORITHMS = {
    PRESET: ("AUTOMATIC", "SegmentationMachine preset", ("123104", "Morphological Operations")),
    PRESET_EDITED: ("SEMIAUTOMATIC", "SegmentationMachine preset", ("123104", "Morphological Operations")),
    NNINTERACTIVE: ("SEMIAUTOMATIC", "nnInteractive", ("123110", "Artificial Intelligence")),
}


def _long_string(text: str, suffix: str = "") -> str:
    """text as a LO holds it: no backslash (it separates values: 'Rib L\\R' was two labels) nor control character,
    cut to 64 bytes in UTF-8, whole characters only, suffix kept."""
    text = CONTROL_CHARACTERS.sub(" ", text.replace("\\", "/"))
    room = LONG_STRING - len(suffix.encode())
    return text.encode()[:room].decode(errors="ignore") + suffix


def _labels(names: list) -> list:
    """The segments' labels: each a LO; names that only the cut made alike are told apart ('... (2)')."""
    labels = []
    for name in names:
        label, copy = _long_string(name), 2
        while label != name and label in labels:
            label, copy = _long_string(name, f" ({copy})"), copy + 1
        labels.append(label)
    return labels


def _description(number: int, name: str, color, made_by: str = ""):
    """A segment made neither by a preset nor by nnInteractive (by hand, or in another program) is MANUAL: no
    algorithm of ours made it."""
    import highdicom
    from pydicom.sr.coding import Code

    category, kind = segment_codes(name)
    algorithm_type, identification = "MANUAL", None
    if made_by in ALGORITHMS:
        algorithm_type, algorithm_name, (value, meaning) = ALGORITHMS[made_by]
        identification = highdicom.AlgorithmIdentificationSequence(
            name=algorithm_name, version=__version__, family=Code(value, "DCM", meaning))
    description = highdicom.seg.SegmentDescription(
        segment_number=number, segment_label=name,
        segmented_property_category=Code(category[0], "SCT", category[1]),
        segmented_property_type=Code(kind[0], "SCT", kind[1]),
        algorithm_type=highdicom.seg.SegmentAlgorithmTypeValues[algorithm_type],
        algorithm_identification=identification)
    description.RecommendedDisplayCIELabValue = rgb_to_dicom_lab(color)
    return description


def write(path, seg: SegInput):
    """Writes the segments as one DICOM SEG at path, whole or not at all, with highdicom in this process."""
    import highdicom

    geometry = {} if seg.source_frames else dict(zip(("pixel_measures", "plane_orientation", "plane_positions"),
                                                     _plane_geometry(seg.ijk_to_ras, seg.pixels.shape[0])))
    made_by = seg.made_by or ("",) * len(seg.segments)
    sources = [source_dataset(name) for name in seg.source_files]
    # Left empty for highdicom, then copied onto the SEG as its series holds them: a PACS matches a SEG to its
    # patient and study by them.
    kept = {keyword: sources[0][keyword].value for keyword in _unparsable(sources[0])}
    for source in sources:
        for keyword in kept:
            setattr(source, keyword, None)
    document = highdicom.seg.Segmentation(
        source_images=sources, pixel_array=seg.pixels,
        segmentation_type=highdicom.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_description(n, label, color, how) for n, (label, (_, color), how) in enumerate(
            zip(_labels([name for name, _ in seg.segments]), seg.segments, made_by), 1)],
        series_instance_uid=highdicom.UID(), series_number=900, sop_instance_uid=highdicom.UID(), instance_number=1,
        manufacturer="SegmentationMachine", manufacturer_model_name="SegmentationMachine",
        software_versions=__version__, device_serial_number="0", series_description=_long_string(seg.description),
        **geometry)
    with warnings.catch_warnings():  # pydicom's, that the value is not of its VR: as the series holds it
        warnings.simplefilter("ignore")
        for keyword, value in kept.items():
            setattr(document, keyword, value)
    document.ContentCreatorName = None  # type 2: present, empty (highdicom leaves it out); we do not know who it is
    # Names in any script (highdicom copies the series' character set, often none: ASCII, which turned 'ü' into a
    # Latin-1 byte and Japanese into '?').
    document.SpecificCharacterSet = "ISO_IR 192"
    # dcmqi (Slicer's SEG reader) spaces its slices by the declared spacing, else by SliceThickness: highdicom
    # declares none for frames on a tilted series' images.
    document.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SpacingBetweenSlices = round(
        _plane_distance(seg.ijk_to_ras), 6)
    with atomic_file(path) as stream:
        document.save_as(stream)


def main(folder: str, output: str) -> int:
    try:
        write(output, load_input(folder))
    except UserError as error:
        print(error, file=sys.stderr)
        return USER_ERROR_EXIT  # the sentence is stderr's last line
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
