"""DICOM SEG: a segmentation as one DICOM Segmentation object that references its source series.

Written with highdicom (not bundled by Slicer: imported only here, when a SEG is written) on the
grid of the volume the segmentation was made on, one frame per slice that holds a segment, with
each frame's position stated, so the SEG lines up in space whatever the grid's orientation.
The SEG lives beside the mesh writers because the one-click export (export.py) writes it.
"""

import re

from dataclasses import dataclass

import numpy as np
import pydicom
import slicer
from pydicom.misc import is_dicom
import vtk

from .. import __version__
from ..core import arrays
from ..core.errors import ExportError
from ..core.files import atomic_file

SEG_FILE = "segmentation.dcm"
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"

# Segmented property category and type, SNOMED CT: (value, meaning).
TISSUE = ("85756007", "Tissue")
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


def _reference_volume(segmentation_node):
    role = segmentation_node.GetReferenceImageGeometryReferenceRole()
    return segmentation_node.GetNodeReference(role)


def source_files(volume_node) -> list:
    """The DICOM files the volume was read from (Slicer's archetype storage node keeps the list)."""
    storage = volume_node.GetStorageNode() if volume_node is not None else None
    if storage is None:
        return []
    names = [storage.GetNthFileName(i) for i in range(storage.GetNumberOfFileNames())] or [storage.GetFileName()]
    return [name for name in names if name and is_dicom(name)]


def _highdicom():
    try:
        import highdicom
    except ImportError:
        raise ExportError("DICOM SEG export needs highdicom: pip install 'segmentation-machine[hospital]' "
                          "(in Slicer, the export installs it after asking).") from None
    return highdicom


def check_seg_export(segmentation_node) -> list:
    """The source series' headers; raises the user's sentence before any work when no SEG can be written."""
    _highdicom()
    files = source_files(_reference_volume(segmentation_node))
    if not files:
        raise ExportError(f"DICOM SEG needs the DICOM series '{segmentation_node.GetName()}' was made on, and it "
                          "was not made on one: load the DICOM series (in the CLI: --volume FOLDER) and export again, "
                          "or choose STL, OBJ, 3MF or glTF.")
    return [_source_dataset(name) for name in files]


# The patient and study attributes a SEG copies from its source images (type 2 in the SEG IOD's modules).
TYPE_2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _source_dataset(path):
    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    if "SpecificCharacterSet" in dataset and not dataset.SpecificCharacterSet:
        del dataset.SpecificCharacterSet  # empty means the default repertoire; highdicom refuses ''
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


def _segment_on_grid(segmentation_node, segment_id, reference: "slicer.vtkOrientedImageData") -> np.ndarray:
    """The segment's voxels (K, J, I, bool) resampled onto the reference volume's grid."""
    labelmap = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        segmentation_node, segment_id, labelmap)
    on_grid = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        labelmap, reference, on_grid, False, True)
    return arrays.image_array(on_grid) > 0


def _reference_grid(volume_node) -> "slicer.vtkOrientedImageData":
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(volume_node.GetImageData().GetExtent())
    reference.SetImageToWorldMatrix(arrays.array_to_matrix(arrays.ijk_to_ras(volume_node)))
    reference.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    return reference


def _plane_geometry(ijk_to_ras: np.ndarray, slices: int):
    """highdicom's pixel measures, orientation and one position per slice, in LPS as DICOM wants."""
    import highdicom

    ijk_to_lps = arrays.RAS_TO_LPS @ ijk_to_ras
    spacing = arrays.spacing_of(ijk_to_lps)
    row_direction, column_direction = ijk_to_lps[:3, 0] / spacing[0], ijk_to_lps[:3, 1] / spacing[1]
    measures = highdicom.PixelMeasuresSequence(
        pixel_spacing=[float(spacing[1]), float(spacing[0])], slice_thickness=float(spacing[2]),
        spacing_between_slices=float(spacing[2]))
    orientation = highdicom.PlaneOrientationSequence(
        coordinate_system="PATIENT", image_orientation=[*map(float, row_direction), *map(float, column_direction)])
    positions = [highdicom.PlanePositionSequence(
        coordinate_system="PATIENT", image_position=[float(v) for v in (ijk_to_lps @ [0, 0, k, 1])[:3]])
        for k in range(slices)]
    return measures, orientation, positions


def _description(number: int, name: str, color):
    import highdicom
    from pydicom.sr.coding import Code

    category, kind = segment_codes(name)
    description = highdicom.seg.SegmentDescription(
        segment_number=number, segment_label=name,
        segmented_property_category=Code(category[0], "SCT", category[1]),
        segmented_property_type=Code(kind[0], "SCT", kind[1]),
        algorithm_type=highdicom.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,
        algorithm_identification=highdicom.AlgorithmIdentificationSequence(
            name="SegmentationMachine", version=__version__,
            family=Code("123110", "DCM", "Artificial Intelligence")))
    description.RecommendedDisplayCIELabValue = rgb_to_dicom_lab(color)
    return description


def _seg_pixels(segmentation_node, segment_ids, reference) -> np.ndarray:
    """Segment numbers (K, J, I) where segments do not overlap; else one mask per segment (K, J, I, n)."""
    labels = np.zeros(arrays.image_array(reference).shape, np.uint16)
    for number, segment_id in enumerate(segment_ids, 1):
        mask = _segment_on_grid(segmentation_node, segment_id, reference)
        if labels[mask].any():  # overlapping segments (bone inside skin): the larger form, one mask each
            return np.stack([_segment_on_grid(segmentation_node, i, reference) for i in segment_ids], axis=-1)
        labels[mask] = number
    return labels


@dataclass
class SegInput:
    """What a DICOM SEG needs from the scene, copied out of it."""
    datasets: list  # the source series' headers
    ijk_to_ras: np.ndarray
    pixels: np.ndarray  # segment numbers (K, J, I), or one mask per segment (K, J, I, n)
    segments: list  # (name, colour) per segment number
    description: str


def read_seg_input(segmentation_node, segment_ids) -> SegInput:
    """Main thread (MRML belongs to it): the given segments on the source series' grid, and its headers."""
    datasets = check_seg_export(segmentation_node)
    volume = _reference_volume(segmentation_node)
    segmentation = segmentation_node.GetSegmentation()
    return SegInput(datasets, arrays.ijk_to_ras(volume),
                    _seg_pixels(segmentation_node, segment_ids, _reference_grid(volume)),
                    [(segmentation.GetSegment(i).GetName(), segmentation.GetSegment(i).GetColor()) for i in segment_ids],
                    segmentation_node.GetName()[:64])


def write_seg(path, seg: SegInput):
    """Any thread: writes the segments as one DICOM SEG at path, segment numbers in their order."""
    highdicom = _highdicom()
    measures, orientation, positions = _plane_geometry(seg.ijk_to_ras, seg.pixels.shape[0])
    document = highdicom.seg.Segmentation(
        source_images=seg.datasets, pixel_array=seg.pixels,
        segmentation_type=highdicom.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_description(n, name, color) for n, (name, color) in enumerate(seg.segments, 1)],
        series_instance_uid=highdicom.UID(), series_number=900, sop_instance_uid=highdicom.UID(), instance_number=1,
        manufacturer="SegmentationMachine", manufacturer_model_name="SegmentationMachine",
        software_versions=__version__, device_serial_number="0", series_description=seg.description,
        pixel_measures=measures, plane_orientation=orientation, plane_positions=positions)
    with atomic_file(path) as stream:
        document.save_as(stream)
